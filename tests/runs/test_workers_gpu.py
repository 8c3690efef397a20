"""`--workers N` on a machine with GPUs: each worker process gets its own share of the visible devices
(CUDA_VISIBLE_DEVICES per worker slot), and keeps one image-decoding pool for every shard it runs.

CI has no GPU: real worker processes run with a fake device list (CUDA_VISIBLE_DEVICES="0,1"); torch
finds no device behind it and runs on CPU, but each process's environment is what a GPU run would see.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.executors.local import LocalExecutor
from mlmfilter.runs.executors.worker import visible_devices, worker_devices
from mlmfilter.runs.runner import run_stage
from mlmfilter.scorers.stage import ScoringOptions, ScoringStage
from tests.support.builders import build_tiny_clip, flickr_shards


def test_worker_devices_share_the_visible_devices():
    assert [worker_devices(i, 2, ["0", "1"]) for i in range(2)] == [["0"], ["1"]]
    assert [worker_devices(i, 4, list("01234567")) for i in range(4)] == [
        ["0", "1"],
        ["2", "3"],
        ["4", "5"],
        ["6", "7"],
    ]
    assert [worker_devices(i, 3, ["0", "1", "2", "3"]) for i in range(3)] == [["0"], ["1"], ["2"]]  # "3" left over
    assert [worker_devices(i, 3, ["5", "7"]) for i in range(3)] == [["5"], ["7"], ["5"]]  # fewer GPUs: shared
    assert worker_devices(0, 2, []) == []
    with pytest.raises(ValueError):
        worker_devices(2, 2, ["0", "1"])
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-aa11, GPU-bb22"}) == ["GPU-aa11", "GPU-bb22"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == ["0"]  # CUDA stops at the first invalid id
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []


def _worker_logs(run_dir) -> dict[int, tuple[int, str]]:
    """pid -> (slot, CUDA_VISIBLE_DEVICES) as each worker process logged them from its own environment."""
    seen = {}
    for path in (run_dir / "logs").glob("score-worker-*.log"):
        match = re.search(r"worker slot (\d+): CUDA_VISIBLE_DEVICES=(\S+)", path.read_text())
        if match:
            seen[int(path.stem.rsplit("-", 1)[1])] = (int(match.group(1)), match.group(2))
    return seen


@pytest.mark.slow
def test_each_worker_sees_its_own_gpu_and_keeps_one_decode_pool(tmp_path, flickr_pairs, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=4, per_shard=6)
    sources = expand_inputs([str(tmp_path / "in" / "*.tar")])
    clip = build_tiny_clip(tmp_path / "clip")
    # a model scorer on device "auto" wants a GPU (here it finds none behind the fake ids and uses the CPU)
    stage = ScoringStage(
        ScoringOptions(
            scorers=["rules", {"name": "clip", "options": {"model": str(clip), "device": "auto"}}], decode_workers=1
        )
    )
    assert stage.wants_gpu()
    executor = LocalExecutor(workers=2)
    summary = run_stage(tmp_path / "run", stage, sources=sources, executor=executor)
    assert summary.ok and len(executor.worker_records) == 4

    logged = _worker_logs(tmp_path / "run")
    assert sorted(logged.values()) == [(0, "0"), (1, "1")]  # two processes, one device each
    by_pid = defaultdict(list)
    for record in executor.worker_records:
        by_pid[record["pid"]].append(record)
        assert record["cuda_visible_devices"] == logged[record["pid"]][1]  # what the process saw while scoring
    for records in by_pid.values():
        # one decode pool per worker for the whole run: the same decoder and the same live processes
        assert len({r["decoder"] for r in records}) == 1 and len({tuple(r["decode_pids"]) for r in records}) == 1
        assert records[0]["decode_pids"] and records[0]["pid"] not in records[0]["decode_pids"]


@pytest.mark.slow
def test_a_stage_without_a_gpu_model_leaves_the_devices_alone(tmp_path, flickr_pairs, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=4)
    stage = ScoringStage(ScoringOptions(scorers=["rules"], decode_workers=0))
    assert not stage.wants_gpu()
    executor = LocalExecutor(workers=2)
    assert run_stage(
        tmp_path / "run", stage, sources=expand_inputs([str(tmp_path / "in" / "*.tar")]), executor=executor
    ).ok
    assert {r["cuda_visible_devices"] for r in executor.worker_records} == {"0,1"}
    assert {slot for slot, _ in _worker_logs(tmp_path / "run").values()} <= {0, 1}
