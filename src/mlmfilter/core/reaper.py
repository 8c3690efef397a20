"""Process trees that die with their owner, even when the owner is killed with SIGKILL.

:func:`start_reaper` starts a small watcher process in a session of its own (a Ctrl-C to the
terminal does not reach it) that reads a pipe only its owner can write to. While the owner lives,
the watcher records every process below ``roots`` twice a second (e.g. the GCS and raylet of a
local Ray, and the agents and workers they start). When the pipe ends -- the owner exited or was
killed -- it ends every recorded process still running (SIGTERM, then SIGKILL after a grace).

Why: a local Ray's dashboard and runtime-env agents notice their raylet's death but then wait on
reporting it to a GCS that died with it, and outlive a killed driver for good.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Iterable

#: seconds between two looks at the process trees
POLL_SECONDS = 0.5
#: seconds the recorded processes get to exit on SIGTERM before SIGKILL
GRACE_SECONDS = 3.0


def start_reaper(roots: Iterable[int]) -> subprocess.Popen | None:
    """Watch the trees below ``roots`` (pids); None when there is nothing to watch or no psutil."""
    roots = [int(pid) for pid in roots]
    try:
        import psutil  # noqa: F401  (Ray installs it; without it there is no portable process tree)
    except ImportError:
        return None
    if not roots:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "mlmfilter.core.reaper", *map(str, roots)],
        stdin=subprocess.PIPE,  # its write end is this process's alone: it closes when this process dies
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_reaper(reaper: subprocess.Popen | None) -> None:
    """The owner stopped the trees itself: the watcher leaves without ending anything."""
    if reaper is None:
        return
    reaper.kill()
    reaper.wait(5)
    if reaper.stdin is not None:
        reaper.stdin.close()


def watch(roots: list[int]) -> None:
    """The watcher's body: record the trees below ``roots`` until stdin ends, then end them."""
    import psutil

    owner_gone = threading.Event()

    def wait_for_owner() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the owner closed the pipe or died
        owner_gone.set()

    threading.Thread(target=wait_for_owner, daemon=True).start()
    known: dict[int, float] = {}  # pid -> start time (a pid reused later is another process)
    while True:
        for root in roots:
            try:
                tree = [psutil.Process(root)]
                tree += tree[0].children(recursive=True)
            except psutil.Error:
                continue
            for process in tree:
                try:
                    known[process.pid] = process.create_time()
                except psutil.Error:
                    pass
        if owner_gone.wait(POLL_SECONDS):
            break
    left = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                left.append(process)
        except psutil.Error:
            continue
    for process in left:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=GRACE_SECONDS)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    watch([int(arg) for arg in sys.argv[1:]])
