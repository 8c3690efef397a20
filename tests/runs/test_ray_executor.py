"""The Ray executor on a real local Ray (CPU): same run folder as the local executor, resume after a
SIGKILLed driver with nothing lost or duplicated, and clear refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from mlmfilter import api
from mlmfilter.api import ScoreConfig
from mlmfilter.runs.folder import RunFolder
from tests.support.builders import build_tiny_clip, flickr_shards, scores_dataset

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow  # a local Ray takes seconds to start on 2 cores

RAY_LOCAL = {"num_actors": 2, "num_cpus": 1, "local_num_cpus": 2}


def read_run(run_dir):
    return scores_dataset(run_dir).to_table().sort_by("uid")


def test_ray_run_equals_local_run(tmp_path, flickr_pairs):
    """Rules + a tiny real CLIP on 2 Ray actors: the same uids, scores and error rows as locally."""
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=4, per_shard=12)
    clip = build_tiny_clip(tmp_path / "clip")
    scorers = ["rules", {"name": "clip", "options": {"model": str(clip)}}]
    inputs = str(tmp_path / "in" / "*.tar")
    local = api.score(inputs, tmp_path / "local", scorers, decode_workers=0)
    on_ray = api.score(inputs, tmp_path / "ray", scorers, decode_workers=1, executor="ray", ray=RAY_LOCAL)
    assert local.ok and on_ray.ok, on_ray.shards_failed
    assert sorted(on_ray.shards_completed) == sorted(local.shards_completed) and len(on_ray.shards_completed) == 4
    assert on_ray.stats.rows == local.stats.rows == 48 and on_ray.stats.ok == local.stats.ok
    ours, theirs = read_run(tmp_path / "ray"), read_run(tmp_path / "local")
    assert ours.column_names == theirs.column_names and "clip_cosine" in ours.column_names
    assert ours["uid"].equals(theirs["uid"]) and ours["rules_ok"].equals(theirs["rules_ok"])
    assert ours["clip_cosine"].to_pylist() == pytest.approx(theirs["clip_cosine"].to_pylist(), abs=1e-5)
    assert not ray.is_initialized(), "the executor stops the local Ray it started"

    again = api.score(inputs, tmp_path / "ray", scorers, decode_workers=1, executor="ray", ray=RAY_LOCAL)
    assert again.shards_completed == [] and len(again.shards_skipped) == 4  # resume redoes nothing


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (the local Ray's raylet, GCS and workers)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=10)


def test_killed_ray_driver_resumes_to_identical_output(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=6, per_shard=30)
    base = [
        sys.executable,
        "-m",
        "mlmfilter.cli.app",
        "score",
        str(tmp_path / "in" / "*.tar"),
        "--scorer",
        "rules",
        "--decode-workers",
        "0",
    ]
    reference = subprocess.run(base + ["-o", str(tmp_path / "ref")], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "run"
    cmd = base + ["--executor", "ray", "--workers", "1", "-o", str(run)]  # one actor: shards finish one by one
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if RunFolder(run).stage("score").done_shards():
                break
            time.sleep(0.005)
    finally:
        _kill_tree(proc)
    done_before = len(RunFolder(run).stage("score").done_shards())
    assert 1 <= done_before < 6, "the kill must land mid-run for this test to mean anything"

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(RunFolder(run).stage("score").done_shards()) == 6
    table = read_run(run)
    assert table.num_rows == 180 and len(set(table["uid"].to_pylist())) == 180
    assert table.equals(read_run(tmp_path / "ref"))
    for path in (run / "score" / "tables").glob("*.parquet"):
        pq.read_table(path)  # every file is whole


def test_no_ray_process_outlives_a_killed_driver(tmp_path, flickr_pairs):
    """SIGKILL of the driver alone (not its process group): the local Ray it started, agents included, goes too."""
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=6, per_shard=30)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlmfilter.cli.app", "score", str(tmp_path / "in" / "*.tar"), "-o", str(run)]
    cmd += ["--scorer", "rules", "--decode-workers", "0", "--executor", "ray", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    family: list = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if RunFolder(run).stage("score").done_shards():  # Ray, its agents and an actor are up
                break
            time.sleep(0.01)
        family = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(p.name() for p in family)
        assert "raylet" in names and "Agent" in names, f"the local Ray is not up: {names}"
    finally:
        proc.kill()  # the driver only, as `kill -9 PID` does
        proc.wait()
    gone, alive = psutil.wait_procs(family, timeout=30)
    left = []
    for process in alive:
        try:
            left.append(process.name())
            process.kill()  # never leave them to the next test, whatever this one says
        except psutil.Error:
            pass
    assert not left, f"still running 30 s after the driver was killed: {left}"


def test_unknown_executor_and_ray_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="executor"):
        ScoreConfig(inputs=["x.tar"], output=str(tmp_path), executor="spark")
    with pytest.raises(ValueError, match="num_gpu"):
        ScoreConfig(inputs=["x.tar"], output=str(tmp_path), executor="ray", ray={"num_gpu": 1})


def test_shard_of_a_killed_actor_is_retried_on_a_fresh_one(tmp_path, flickr_pairs, caplog):
    """SIGKILL the actor while it reads a (slow, piped) shard: the shard is redone, once, elsewhere."""
    import threading

    [tar] = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=10)
    slow = f"pipe:sleep 4; cat {tar}"
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(
            summary=api.score(
                slow,
                tmp_path / "run",
                ["rules"],
                decode_workers=0,
                executor="ray",
                allow_pipe=True,
                ray={"num_actors": 1, "local_num_cpus": 2, "max_retries": 1},
            )
        )
    )
    worker.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and worker.is_alive():
        for process in psutil.Process().children(recursive=True):
            try:
                if any(part.startswith("ray::Worker") for part in process.cmdline()) and process.children(
                    recursive=True
                ):
                    killed = process.pid  # busy in the shard: its `sleep` child is running
                    process.kill()
                    break
            except psutil.Error:
                continue
        time.sleep(0.05)
    worker.join(timeout=240)
    assert killed is not None, "the actor was never seen reading the shard"
    summary = result["summary"]
    assert summary.ok and len(summary.shards_completed) == 1, summary.shards_failed
    assert "retrying on a fresh actor" in caplog.text
    table = read_run(tmp_path / "run")
    assert table.num_rows == 10 and len(set(table["uid"].to_pylist())) == 10
