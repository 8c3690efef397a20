"""The public face: every verb in mlmfilter.api, re-exported lazily by the package; one settings model
for scoring; one summary type; the behaviour rules the command line used to own."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import yaml

from mlmfilter import api
from mlmfilter.runs.runner import StageSummary
from mlmfilter.scorers.stage import ScoringOptions
from tests.support.builders import flickr_shards, scores_dataset


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_package_reexports_every_verb_lazily_and_without_torch():
    out = _python(
        "import sys, mlmfilter\n"
        "print('api' if 'mlmfilter.api' in sys.modules else 'lazy')\n"
        "from mlmfilter import api\n"
        "public = {n for n, o in vars(api).items() if not n.startswith('_') and getattr(o, '__module__', '') == api.__name__}\n"
        "print(sorted(public - set(mlmfilter.__all__)))\n"
        "print(all(getattr(mlmfilter, n) is getattr(api, n) for n in mlmfilter.__all__ if n != '__version__'))\n"
        "print('torch' in sys.modules)\n"
    )
    # every verb and result type defined in api.py is a name of the package, and none loads torch
    assert out.splitlines() == ["lazy", "[]", "True", "False"]
    import mlmfilter

    assert {"score", "enhance", "teach_label", "train", "evaluate_corrupt", "StageSummary"} <= set(mlmfilter.__all__)
    with pytest.raises(AttributeError, match="no_such_verb"):
        mlmfilter.no_such_verb  # noqa: B018


def test_score_config_is_the_scoring_options_plus_where_and_how(tmp_path):
    recipe = yaml.safe_load(
        "inputs: shards/a.tar\noutput: runs/r\nworkers: 2\ndecode_workers: 0\nchunk_size: 8\n"
        "scorers: [rules, {name: clip, options: {dtype: bf16}}]\nonly: rules_ok\nonly_stage: score\n"
        "stage: judge\nread: {caption_column: alt}\n"
    )
    config = api.ScoreConfig(**recipe)
    assert isinstance(config, ScoringOptions) and set(ScoringOptions.model_fields) < set(api.ScoreConfig.model_fields)
    assert config.inputs == ["shards/a.tar"] and config.read_options() == {"caption_column": "alt"}
    stage_options = config.scoring_options()
    assert type(stage_options) is ScoringOptions  # what stage.yaml records: the stage's own fields only
    assert (
        stage_options.model_dump()
        == ScoringOptions(
            scorers=["rules", {"name": "clip", "options": {"dtype": "bf16"}}],
            decode_workers=0,
            chunk_size=8,
            only="rules_ok",
        ).model_dump()
    )
    assert config.scoring_options(decode_workers=3).decode_workers == 3
    with pytest.raises(ValueError, match="chunk_sise"):
        api.ScoreConfig(**recipe, chunk_sise=4)  # a typo is refused, as before


def test_score_returns_the_one_summary_type(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=3)
    summary = api.score([str(tmp_path / "in" / "*.tar")], tmp_path / "run", ["rules"], decode_workers=0)
    assert isinstance(summary, StageSummary) and summary.ok and summary.notes == []
    assert summary.run_dir == tmp_path / "run" and summary.stats.rows == 6 and summary.stats.shards == 2
    as_json = json.loads(json.dumps(summary.to_json()))
    assert list(as_json) == [
        "run_dir",
        "stage",
        "shards_total",
        "shards_completed",
        "shards_skipped",
        "shards_failed",
        "shards_unusable",
        "stats",
        "provenance",
        "seconds",
        "interrupted",
        "notes",
        "ok",
        "job_stats",  # the shards this call covered (here every shard of the run)
    ]
    assert as_json["stats"] == {"shards_done": 2, **summary.stats.to_json()}
    assert as_json["job_stats"] == summary.stats.to_json()
    assert as_json["run_dir"] == str(tmp_path / "run") and as_json["ok"] is True
    remote = StageSummary("memory://bucket/run", "score", 0, [], [], {}, summary.stats, {}, 0.0)
    assert remote.run_dir == "memory://bucket/run" and remote.to_json()["run_dir"] == "memory://bucket/run"


def test_score_goes_offline_only_for_a_model_named_on_the_hub(
    tmp_path, flickr_pairs, tiny_clip_dir, monkeypatch, caplog
):
    from mlmfilter.models import hub
    from mlmfilter.scorers import scorer_class

    assert {n: scorer_class(n).model_option for n in ("rules", "clip", "mlm", "aitqe")} == {
        "rules": None,
        "clip": "model",
        "mlm": "model",
        "aitqe": "model",
    }
    asked: list[bool] = []
    monkeypatch.setattr(hub, "go_offline_if_unreachable", lambda: asked.append(True) or True)
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    inputs, run = [str(tmp_path / "in" / "*.tar")], tmp_path / "run"

    api.score(inputs, run, ["rules"], decode_workers=0)
    local = {"name": "clip", "options": {"model": str(tiny_clip_dir), "dtype": "fp32"}}
    api.score(inputs, run, [local], decode_workers=0, stage="local")
    assert asked == []  # no model at all, or one named by its local path: the hub is never asked

    by_name = {"name": "clip", "options": {"model": "tiny-org/no-such-clip", "allow_random_fallback": True}}
    with caplog.at_level(logging.INFO, logger="mlmfilter"):
        summary = api.score(inputs, run, [by_name], decode_workers=0, stage="hub")
    assert asked == [True] and summary.ok
    assert "the Hugging Face hub is not reachable: models load from the local cache only" in caplog.text
    api.score(inputs, run, [by_name], decode_workers=0, stage="hub2", offline_if_unreachable=False)
    assert asked == [True]


def test_base_url_without_the_mlm_judge_is_refused_before_anything_is_written(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=1)
    with pytest.raises(ValueError, match="--base-url is for the MLM judge"):
        api.score([str(tmp_path / "in" / "*.tar")], tmp_path / "run", ["rules"], base_url="http://127.0.0.1:9/v1")
    assert not (tmp_path / "run").exists()


def test_evaluate_and_inspect_verbs_on_a_real_run(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=6)
    summary = api.score([str(tmp_path / "in" / "*.tar")], tmp_path / "run", ["rules"], decode_workers=0)
    rows = scores_dataset(summary.run_dir).to_table().to_pylist()
    matches = api.inspect(summary.run_dir, "rules_words >= 8", limit=2)
    assert matches.matched == sum(1 for r in rows if (r["rules_words"] or 0) >= 8) and len(matches.rows) <= 2
    profiles = api.stats(summary.run_dir, ["rules_words"])
    assert list(profiles.profiles) == ["rules_words"] and profiles.profiles["rules_words"].count == len(rows)
    result = api.evaluate_corrupt(
        str(tmp_path / "in" / "*.tar"), ["rules"], limit=6, kinds=["shuffle_words"], output=tmp_path / "eval.json"
    )
    assert result["pairs"] == 6 and json.loads((tmp_path / "eval.json").read_text())["inputs"] == result["inputs"]


def test_the_api_keeps_library_bars_off_the_callers_terminal(tmp_path, flickr_pairs, tiny_clip_dir, capfd):
    """transformers' "Loading weights" bar is no output of a verb; the caller's own setting comes back after."""
    from transformers.utils import logging as transformers_logging

    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    transformers_logging.enable_progress_bar()
    capfd.readouterr()
    summary = api.score(
        [str(tmp_path / "in" / "*.tar")], tmp_path / "run", [{"name": "clip", "options": {"model": str(tiny_clip_dir)}}]
    )
    assert summary.ok
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert transformers_logging.is_progress_bar_enabled()  # as the caller had it
