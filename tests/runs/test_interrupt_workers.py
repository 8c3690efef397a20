"""Ctrl-C during `score --workers 2` (the terminal signals the whole process group): the parent stops
its workers and says so in one line, exit 130; no worker prints a traceback of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.support.builders import flickr_shards


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _spawned(parent: psutil.Process) -> list[psutil.Process]:
    out = []
    for child in parent.children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            continue
    return out


def _importing(parent: psutil.Process) -> list[psutil.Process]:
    """Spawned workers whose interpreter runs and imports (past its first 20 MB), not yet scoring."""
    out = []
    for child in _spawned(parent):
        try:
            if child.memory_info().rss > 20 << 20:
                out.append(child)
        except psutil.Error:
            continue
    return out


@pytest.mark.parametrize("when", ["workers starting", "workers scoring"])
def test_ctrl_c_with_two_workers_prints_no_worker_traceback(tmp_path, flickr_pairs, when):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=40, per_shard=8)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "mlmfilter.cli.app", "score", str(tmp_path / "in" / "*.tar"), "-o", str(run)]
    command += ["--scorer", "rules", "--workers", "2", "--decode-workers", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        parent = psutil.Process(proc.pid)
        if when == "workers starting":  # the shard workers exist and are still importing mlmfilter
            ready = _wait(lambda: len(_importing(parent)) >= 2, 60)
        else:  # the workers run shards (each writes its log once its stage is built)
            ready = _wait(lambda: len(list((run / "logs").glob("score-worker-*.log"))) >= 2, 120)
        assert ready, f"the run never got to '{when}'"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "interrupted:" in stderr
