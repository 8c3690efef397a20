"""docs/guide.md runs: every command of its ```bash blocks, in order, through the CLI, on a small
pool of real Flickr8k shards. The model names in the guide are swapped for tiny models of the same
architectures, the teacher's URL for a loopback server, and the score floor is off for the tiny judge it trains
(`mlm.min_mass=0`); nothing else is changed, so a command the
tool no longer takes, or a step that no longer follows from the one before, fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support import mlm as mlm_support
from tests.support.builders import flickr_shards
from tests.support.fault_server import FaultServer

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
CLIP = "openai/clip-vit-base-patch32"
VLM = "HuggingFaceTB/SmolVLM-256M-Instruct"
TEACHER_URL = "http://127.0.0.1:8000/v1"


def guide_steps(text: str) -> list[str]:
    """The shell lines of the guide's ```bash blocks, continuation lines joined."""
    steps = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                steps.append(line)
    return steps


def test_the_guide_names_every_command_of_the_loop():
    steps = guide_steps(GUIDE.read_text(encoding="utf-8"))
    commands = [" ".join(s.split()[:3]) for s in steps if s.startswith("mlmfilter ")]
    for wanted in (
        "mlmfilter score",
        "mlmfilter stats",
        "mlmfilter inspect",
        "mlmfilter teach sample",
        "mlmfilter teach negatives",
        "mlmfilter teach label",
        "mlmfilter teach balance",
        "mlmfilter teach export",
        "mlmfilter train",
        "mlmfilter enhance",
        "mlmfilter select",
        "mlmfilter reshard",
        "mlmfilter report",
        "mlmfilter export",
        "mlmfilter import",
    ):
        assert any(c.startswith(wanted) for c in commands), wanted
    assert any("--captions-stage" in s for s in steps) and any("--stage judge" in s for s in steps)
    readme = (GUIDE.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "docs/guide.md" in readme


@pytest.mark.slow
def test_every_command_of_the_guide_runs_in_order(
    tmp_path, flickr_pairs, tiny_clip_dir, smollm2_cache_dir, monkeypatch
):
    vlm = str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))
    flickr_shards(flickr_pairs[:18], tmp_path / "pool", n_shards=3, per_shard=6)
    for shard in sorted((tmp_path / "pool").glob("*.tar")):  # img2dataset's names: 00000.tar
        shard.rename(shard.with_name(f"{int(shard.stem):05d}.tar"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    outputs: dict[str, str] = {}
    with FaultServer() as teacher:
        swaps = {CLIP: str(tiny_clip_dir), VLM: vlm, TEACHER_URL: teacher.base_url}
        for step in guide_steps(GUIDE.read_text(encoding="utf-8")):
            for name, local in swaps.items():
                step = step.replace(name, local)
            words = shlex.split(step)
            if words[0] == "export" and "=" in words[1]:  # an environment variable the next commands read
                name, _, value = words[1].partition("=")
                monkeypatch.setenv(name, value)
                continue
            assert words[0] == "mlmfilter", f"the guide's bash blocks hold mlmfilter commands only: {step}"
            if words[1] == "score" and "mlm" in words:  # the one change besides names: a judge trained for
                words += ["--option", "mlm.min_mass=0"]  # 4 steps puts little mass on numbers (the floor refuses it)
            result = runner.invoke(app, words[1:])
            assert result.exit_code == 0, f"{step}\n{result.output}"
            outputs[" ".join(words[1:3])] = result.output
    flat = {k: " ".join(v.split()) for k, v in outputs.items()}
    # what each step promises, seen in what it printed or wrote
    assert "kept at >=" in outputs["stats runs/pool"] and "loss" in flat["train teach/export/mlm_filter_instruct.json"]
    assert re.search(r"loss \d+\.\d+ -> \d+\.\d+", flat["train teach/export/mlm_filter_instruct.json"])
    assert (tmp_path / "low_clip.html").exists() and (tmp_path / "teach" / "export" / "README.md").exists()
    assert int(re.search(r"(\d+) pairs tried", flat["enhance runs/pool"]).group(1)) > 0
    assert list((tmp_path / "shards_kept").glob("*.tar")) and (tmp_path / "runs" / "pool" / "report.html").exists()
    assert list((tmp_path / "dumps").glob("*_image_text_matching.parquet"))
    assert "kept" in flat["select runs/imported"]
