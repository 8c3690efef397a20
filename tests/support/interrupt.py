"""Ctrl-C as a user gives it: a real SIGINT to a real `mlmfilter` process, once it has got somewhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence


def mlmfilter_command(*args: str) -> list[str]:
    """The `mlmfilter` command line, run by this interpreter (the tree under test)."""
    return [sys.executable, "-m", "mlmfilter.cli.app", *map(str, args)]


def interrupt_when(
    command: Sequence[str], ready: Callable[[], bool], timeout_s: float = 240, env: dict | None = None
) -> tuple[int, str]:
    """Start ``command``, wait until ``ready()`` (it failing to get there fails the test), send SIGINT;
    returns its exit status and everything it printed (stdout and stderr, a wide terminal)."""
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, f"it ended before it got there:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"it did not get there within {timeout_s:g} s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, output
