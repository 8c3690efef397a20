"""`mlmfilter enhance` on a run scored by `mlmfilter score` with a tiny random judge."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.runs.read import RunReader
from tests.support import mlm as mlm_support
from tests.support.builders import flickr_shards
from tests.support.enhance import one_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
runner = CliRunner()


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, flickr_pairs, smollm2_cache_dir):
    tmp = tmp_path_factory.mktemp("enhance-cli")
    model = str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))
    shards = flickr_shards(flickr_pairs[:3], tmp / "in", n_shards=1, per_shard=3)
    result = runner.invoke(
        app,
        [
            "score",
            str(shards[0]),
            "-o",
            str(tmp / "run"),
            "--scorer",
            "mlm",
            "--model",
            model,
            "--metrics",
            "itm,odf",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--decode-workers",
            "0",
            "--option",
            "mlm.min_mass=0",  # a tiny random judge puts ~0.02% on numbers: the floor is tested on its own
        ],
    )
    assert result.exit_code == 0, result.output
    return tmp / "run", model


def test_enhance_command_rescores_with_the_runs_own_judge(scored_run):
    run, model = scored_run
    result = runner.invoke(
        app,
        [
            "enhance",
            str(run),
            "--where",
            "itm <= 100",
            "--model",
            model,
            "--max-new-tokens",
            "8",
            "--candidates",
            "2",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "3 pairs tried, 0 accepted" in _flat(result.output)
    reader = RunReader(run)
    settings = reader.settings("enhance")["options"]
    assert settings["judge"][0]["options"]["metrics"] == "itm,odf"  # the same judge and metrics as the scores
    assert settings["sampling"]["n"] == 2 and settings["sampling"]["temperature"] == 0.7
    rows = reader.dataset("enhance").to_table().to_pylist()
    assert len(rows) == 3 and all(r["decision"] == "rejected" for r in rows)
    # the before of every pair is the run's own number, even where no candidate passed its checks
    scores = {r["uid"]: r for r in reader.dataset("score").to_table().to_pylist()}
    assert all(r["itm_before"] == scores[r["uid"]]["itm"] for r in rows), rows
    again = runner.invoke(
        app,
        [
            "enhance",
            str(run),
            "--where",
            "itm <= 100",
            "--model",
            model,
            "--max-new-tokens",
            "8",
            "--candidates",
            "2",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ],
    )
    assert again.exit_code == 0 and "3 pairs tried" in _flat(again.output)  # resumed: the totals of the done shard


@pytest.mark.parametrize(
    "args, message",
    [
        (["--where", "nope < 3"], "nope"),
        (["--where", "itm <"], "syntax"),
        (["--where", "itm < 40", "--mode", "shout"], "mode"),
        (["--where", "itm < 40", "--margin", "-1"], "margin"),
    ],
)
def test_enhance_command_turns_mistakes_into_one_line(scored_run, args, message):
    run, model = scored_run
    result = runner.invoke(app, ["enhance", str(run), "--model", model, *args])
    assert result.exit_code == 2, result.output
    assert message in _flat(result.output) and "Traceback" not in result.output


def test_enhance_command_needs_a_run(tmp_path):
    result = runner.invoke(app, ["enhance", str(tmp_path / "missing"), "--where", "itm < 3", "--model", "m"])
    assert result.exit_code == 2 and "run folder" in _flat(result.output), result.output


def test_several_candidates_are_sampled_from_python_as_from_the_command_line(scored_run):
    from mlmfilter import api
    from mlmfilter.backends.generation import SamplingParams
    from mlmfilter.enhance.stage import EnhanceOptions

    run, model = scored_run
    assert EnhanceOptions(where="itm < 3", model=model, sampling=SamplingParams(n=4)).sampling.temperature == 0.7
    greedy = EnhanceOptions(where="itm < 3", model=model, sampling={"n": 4, "temperature": 0.0})
    assert greedy.sampling.temperature == 0.0  # a temperature given is kept, even greedy
    assert EnhanceOptions(where="itm < 3", model=model, sampling={"n": 1}).sampling.temperature == 0.0

    common = ["--where", "itm <= 100", "--model", model, "--device", "cpu", "--dtype", "fp32"]
    result = runner.invoke(
        app, ["enhance", str(run), *common, "--candidates", "2", "--max-new-tokens", "6", "--stage", "cli"]
    )
    assert result.exit_code == 0, result.output
    summary = api.enhance(
        run,
        where="itm <= 100",
        model=model,
        device="cpu",
        dtype="fp32",
        sampling=SamplingParams(n=2, max_new_tokens=6),
        stage="python",
    )
    assert summary.ok and summary.stats.counters["tried"] == 3
    reader = RunReader(run)
    from_python, from_cli = reader.settings("python"), reader.settings("cli")
    assert from_python["options"]["sampling"] == from_cli["options"]["sampling"]
    assert (
        from_python["options"]["sampling"]["temperature"] == 0.7
        and from_python["fingerprint"] == from_cli["fingerprint"]
    )
    candidates = [r["candidates"] for r in reader.dataset("python").to_table().to_pylist()]
    assert all(len(c) == 2 for c in candidates) and any(c[0] != c[1] for c in candidates)  # sampled, not one text twice


def test_enhance_stage_flag_keeps_its_old_name(scored_run):
    run, model = scored_run
    common = ["--where", "itm <= 100", "--model", model, "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "4"]
    result = runner.invoke(app, ["enhance", str(run), *common, "--name", "old"])
    assert result.exit_code == 0, result.output
    assert f"{run}/old: 3 pairs tried" in _flat(result.output) and (run / "old" / "stage.yaml").exists()
    help_text = runner.invoke(app, ["enhance", "--help"], env={"COLUMNS": "160"}).output
    assert "--stage" in help_text and "--name" not in help_text  # the old spelling works, unadvertised
