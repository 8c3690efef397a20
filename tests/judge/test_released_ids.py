"""One set of released judge ids: the registry, README's table, `mlmfilter judges` and `mlmfilter scorers`
(whose `mlm` default is the released Qwen2.5-1.5B judge) name the same ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.judge.registry import REGISTRY, judge_of_hub_id
from mlmfilter.scorers.mlm import DEFAULT_MODEL, MLMOptions

README = Path(__file__).resolve().parents[2] / "README.md"
HUB_ID = re.compile(r"`((?:weizhiwang|HymanH)/[\w.-]+)`")


def registry_ids() -> set[str]:
    return {hub_id for judge in REGISTRY.values() for hub_id in judge.hub_ids}


def test_the_mlm_default_is_the_released_qwen_judge():
    assert DEFAULT_MODEL == MLMOptions().model == "weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o"
    assert judge_of_hub_id(DEFAULT_MODEL).key == "mlm-filter-qwen2.5-1.5b"
    assert judge_of_hub_id("WEIZHIWANG/MLM-FILTER-LLAVA-13B-GPT4V").key == "mlm-filter-llava-13b"
    assert judge_of_hub_id("someone/else") is None


def test_readme_table_names_exactly_the_registry_ids():
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| checkpoint | size (weights)") :]
    table = table[: table.index("\n\n")]
    assert set(HUB_ID.findall(table)) == registry_ids()
    assert f"`{DEFAULT_MODEL}` (the `mlm` default)" in table


def test_judges_and_scorers_commands_name_the_same_ids():
    runner = CliRunner()
    judges = runner.invoke(app, ["judges", "--json"])
    assert judges.exit_code == 0, judges.output
    listed = json.loads(judges.output)
    assert {h for j in listed.values() for h in j["hub_ids"]} == registry_ids()
    assert all(j["vision_tower"] for j in listed.values())
    scorers = runner.invoke(app, ["scorers"], env={"COLUMNS": "400"})
    assert scorers.exit_code == 0, scorers.output
    assert DEFAULT_MODEL in scorers.output and "mlm-filter-llama-3-8b-gpt4v" not in scorers.output
