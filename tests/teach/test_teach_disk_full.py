"""`teach label` on a disk that fills while the teacher answers: a real full filesystem (a small tmpfs; its
mount needs root, as CI has), the real command in a subprocess and a real server on 127.0.0.1.

The run must end with one line (no traceback), leave no temp file, and the next run, with space again,
must pay for no answer twice: every answer received went into the request cache before anything else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.fault_server import FaultServer
from tests.support.teach import SECRET, teach_folder

N_PAIRS = 6


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs of its own (its mount needs root; elsewhere the test is skipped)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        for _ in range(50):  # a child still closing its files keeps the mount busy for a moment
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def _fill(path: Path) -> None:
    """Write zeros until the filesystem has no byte left."""
    with open(path, "wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass


def test_a_disk_filling_during_teach_label_ends_in_one_line_and_pays_nothing_twice(small_disk, flickr_pairs):
    captions = [
        f"A dog number {i} runs on the grass [fault:slow] ." for i in range(N_PAIRS)
    ]  # each answer takes a moment
    folder = teach_folder(small_disk, flickr_pairs, captions)
    filler = small_disk / "filler"
    with FaultServer() as server:
        command = [sys.executable, "-m", "mlmfilter.cli.app", "teach", "label", str(folder.path), "--model", "teacher"]
        command += ["--metrics", "itm,odf", "--base-url", server.base_url, "--api-key-env", "TEACH_KEY"]
        command += ["--concurrency", "1"]
        env = {**os.environ, "TEACH_KEY": SECRET}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while server.by_kind["slow"] < 3:  # two answers are in the cache, the third is on its way
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the teacher was not asked within 120 s"
                time.sleep(0.02)
            _fill(filler)
            output = proc.communicate(timeout=120)[0].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 1, output
        assert "Traceback" not in output and "│" not in output, output  # no traceback, plain or boxed
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "space" in errors[0], output
        assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
        asked = server.requests
        assert 3 <= asked < 2 * N_PAIRS  # it stopped asking once the cache could not keep more

        filler.unlink()
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        bodies = [json.dumps(body, sort_keys=True) for body in server.bodies]
        assert len(bodies) == len(set(bodies)) == 2 * N_PAIRS  # every request paid for exactly once
        assert f"cache hits {asked}" in again.stdout + again.stderr
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
