"""The run layer's seams, with a stage it has never heard of (tests/runs/caption_length_stage.py):
found by its class path, run by the one worker body in this process or in worker processes, an
old run folder of it resumes, and a folder of the run that is not a stage's is never touched."""

from __future__ import annotations

import os
import typing

import pyarrow.parquet as pq
import pytest
import yaml

from mlmfilter.api import ScoreConfig
from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.executors import EXECUTORS, ExecutorName, build_executor
from mlmfilter.runs.executors.local import LocalExecutor
from mlmfilter.runs.folder import ConfigMismatch, RunError, RunFolder
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import run_stage
from mlmfilter.runs.stage import StageSpec
from tests.runs.caption_length_stage import CaptionLengthOptions, CaptionLengthStage
from tests.support.builders import flickr_shards

#: stage.yaml as mlmfilter wrote it before stages were found by class path (kind, never the class)
OLD_STAGE_YAML = """\
kind: caption_length
name: lengths
options:
  min_chars: 20
  fail_shard: null
identity:
  kind: caption_length
  options:
    min_chars: 20
    fail_shard: null
fingerprint: 48d4422ad120f976
created: '2025-01-01T00:00:00+00:00'
"""


@pytest.fixture()
def shards(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=3, per_shard=4)
    return expand_inputs([str(tmp_path / "in" / "*.tar")])


def lengths_stage(**options) -> CaptionLengthStage:
    return CaptionLengthStage(CaptionLengthOptions(min_chars=20, **options), name="lengths")


def read_lengths(run_dir):
    return RunReader(run_dir).dataset("lengths").to_table().sort_by("uid")


def test_a_stage_in_a_new_module_is_built_from_its_class_path():
    spec = lengths_stage().spec()
    assert spec.stage_class == "tests.runs.caption_length_stage:CaptionLengthStage"
    rebuilt = StageSpec.model_validate(spec.model_dump()).build()
    assert type(rebuilt) is CaptionLengthStage and rebuilt.name == "lengths"
    assert rebuilt.options.min_chars == 20 and rebuilt.fingerprint() == lengths_stage().fingerprint()
    assert StageSpec(stage_class=spec.stage_class).build().name == "caption_length"  # kind: the default name
    with pytest.raises(ValueError, match="is not a Stage"):
        StageSpec(stage_class="tests.runs.caption_length_stage:CaptionLengthOptions").build()
    with pytest.raises(ValueError, match="no module"):
        StageSpec(stage_class="tests.runs.no_such_stage:Stage").build()


@pytest.mark.slow
def test_the_worker_body_runs_the_stage_alike_here_and_in_worker_processes(tmp_path, shards, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    inline = run_stage(tmp_path / "inline", lengths_stage(), sources=shards)
    pool = LocalExecutor(workers=2)
    spawned = run_stage(tmp_path / "pool", lengths_stage(), sources=shards, executor=pool)
    assert inline.ok and spawned.ok and sorted(spawned.shards_completed) == sorted(inline.shards_completed)
    assert len(inline.shards_completed) == 3

    table = read_lengths(tmp_path / "pool")
    assert table.equals(read_lengths(tmp_path / "inline"))
    assert table.num_rows == 12 and table["error"].null_count == 12
    for row in table.to_pylist():
        assert row["long_enough"] == (row["caption_chars"] >= 20) and row["caption_chars"] > 0

    # each shard ran in a worker process that rebuilt the stage from its class path and set it up once
    assert len(pool.worker_records) == 3
    for record in pool.worker_records:
        assert record["stage_pid"] == record["pid"] != os.getpid() and record["setups"] == 1
        assert record["slot"] in (0, 1)
        assert record["cuda_visible_devices"] == "0,1"  # the stage wants no GPU: devices left alone
    logs = sorted(p.name for p in (tmp_path / "pool" / "logs").glob("*.log"))
    assert [n for n in logs if n.startswith("lengths-worker-")] and not [n for n in logs if "-main-" in n]
    assert [p.name for p in (tmp_path / "inline" / "logs").glob("*.log")] == [f"lengths-main-{os.getpid()}.log"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_shard_is_reported_in_one_line_and_left_without_a_marker(tmp_path, shards, workers):
    stage = lengths_stage(fail_shard="00000001")
    summary = run_stage(tmp_path / "run", stage, sources=shards, executor=LocalExecutor(workers=workers))
    assert sorted(summary.shards_completed) == ["00000000", "00000002"]
    assert summary.shards_failed == {"00000001": "RuntimeError: shard 00000001 cannot be measured"}
    assert RunFolder(tmp_path / "run").stage("lengths").done_shards() == ["00000000", "00000002"]
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "logs").glob("*.log"))
    assert "shard 00000001 failed" in logs and "second line of the message" in logs  # the traceback is logged


def test_a_stage_folder_written_before_class_paths_resumes(tmp_path, shards):
    first = run_stage(tmp_path / "run", lengths_stage(), sources=shards)
    settings = tmp_path / "run" / "lengths" / "stage.yaml"
    written = yaml.safe_load(settings.read_text())
    written["created"] = "2025-01-01T00:00:00+00:00"
    assert written == yaml.safe_load(OLD_STAGE_YAML)  # the same record, value for value
    markers = [RunReader(tmp_path / "run").marker(sid, "lengths") for sid in first.shards_completed]
    assert {m["fingerprint"] for m in markers} == {"48d4422ad120f976"}

    settings.write_text(OLD_STAGE_YAML)  # as an earlier version left it
    tables = {p.name: pq.read_table(p) for p in (tmp_path / "run" / "lengths" / "tables").glob("*.parquet")}
    again = run_stage(tmp_path / "run", lengths_stage(), sources=shards)
    assert again.ok and again.shards_completed == [] and len(again.shards_skipped) == 3
    assert settings.read_text() == OLD_STAGE_YAML
    assert {p.name: pq.read_table(p) for p in (tmp_path / "run" / "lengths" / "tables").glob("*.parquet")} == tables
    with pytest.raises(ConfigMismatch, match="options.min_chars"):
        run_stage(tmp_path / "run", CaptionLengthStage(CaptionLengthOptions(min_chars=5), name="lengths"))


def test_a_folder_of_the_run_that_is_no_stage_is_never_written_or_cleared(tmp_path, shards):
    run_stage(tmp_path / "run", lengths_stage(), sources=shards)
    selection = tmp_path / "run" / "selection"
    selection.mkdir()
    (selection / "selection.json").write_text("{}")
    (selection / "uids.npy").write_bytes(b"\x93NUMPY")
    for overwrite in (False, "stage"):
        with pytest.raises(RunError, match="is not a stage folder .*selection.json"):
            run_stage(tmp_path / "run", CaptionLengthStage(name="selection"), overwrite=overwrite)
    assert sorted(p.name for p in selection.iterdir()) == ["selection.json", "uids.npy"]
    with pytest.raises(RunError, match="invalid stage name 'logs'"):
        run_stage(tmp_path / "run", CaptionLengthStage(name="logs"))
    assert RunFolder(tmp_path / "run").stages() == ["lengths"]

    # a stage folder a killed run left before its stage.yaml is still the stage's
    (tmp_path / "run" / "early" / "tables").mkdir(parents=True)
    assert run_stage(tmp_path / "run", CaptionLengthStage(name="early")).ok
    assert RunFolder(tmp_path / "run").stages() == ["early", "lengths"]


def test_executors_are_chosen_by_name(tmp_path):
    assert typing.get_args(ExecutorName) == tuple(EXECUTORS) == ("local", "ray")
    local = build_executor("local", workers=3)
    assert isinstance(local, LocalExecutor) and local.workers == 3
    with pytest.raises(ValueError, match="unknown executor 'spark'"):
        build_executor("spark")
    with pytest.raises(ValueError, match="takes no settings"):
        build_executor("local", options={"num_gpus": 1})
    assert ScoreConfig(inputs=["x.tar"], output=str(tmp_path), executor="ray").executor == "ray"
    pytest.importorskip("ray")
    on_ray = build_executor("ray", workers=2, options={"num_gpus": 1})
    assert (type(on_ray).__name__, on_ray.num_actors, on_ray.num_gpus) == ("RayExecutor", 2, 1.0)
    assert build_executor("ray", workers=2, options={"num_actors": 5}).num_actors == 5
