"""Process hygiene for worker pools: children die with their parent, scripts without a guard work.

- :func:`die_with_parent` runs in every worker process mlmfilter starts (shard workers holding
  models, image decoders): when the process that started it dies, even by SIGKILL, the worker
  exits too instead of living on and writing into the run folder.
- :func:`unguarded_main_call` tells whether the public API is being called from the top level of
  a script without ``if __name__ == "__main__":``. Worker processes started with spawn or
  forkserver re-import that script, re-run the call and die while bootstrapping; the API then
  runs without worker processes instead (and says so).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import logging
import os
import sys
import threading
from typing import Any, Iterator

log = logging.getLogger(__name__)


def die_with_parent(parent: int | None = None, poll_seconds: float = 1.0) -> None:
    """Make this process exit within ``poll_seconds`` of its parent's death.

    A watcher thread, not PR_SET_PDEATHSIG: that signal fires when the *thread* that started the
    child ends, which would kill workers of an API call made from a short-lived thread. A
    forkserver child's parent is the server, which itself exits when the main process dies.
    """
    parent = parent if parent is not None else os.getppid()
    if os.getppid() != parent:  # the parent died before this worker got going
        os._exit(1)

    def watch() -> None:
        import time

        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="mlmfilter-parent-watch", daemon=True).start()


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside this block never receive SIGINT, from their first instruction on.

    Ctrl-C goes to the terminal's whole process group: without this, every worker (still importing
    mlmfilter, or busy) raises KeyboardInterrupt and prints its own traceback, while the parent is
    the one that decides (stops them, keeps what is done, exits 130). The calling thread blocks
    SIGINT while its children start; a blocked signal stays blocked in a child across fork and exec
    (Python never unblocks it), and the parent, unblocking it afterwards, still gets a Ctrl-C that
    came in the meantime: nothing is lost.
    """
    import signal

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_initializer(parent: int, *callables_and_args: Any) -> None:
    """Pool initializer: die with ``parent`` (the pid that made the pool), then run ``(fn, args)`` pairs."""
    die_with_parent(parent)
    for fn, args in callables_and_args:
        fn(*args)


def unguarded_main_call() -> str | None:
    """The script path if the current call comes from unguarded top-level code of ``__main__``.

    Looks for the ``__main__`` module's frame on the stack and checks, in the script's syntax tree,
    whether the top-level statement being executed is an ``if __name__ == "__main__":`` block.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:
        return None  # REPL, notebook, python -c: workers do not re-run anything
    if not os.path.isfile(path):
        return path  # a script read from stdin ("<stdin>"): spawned workers cannot re-import it
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            break
        frame = frame.f_back
    if frame is None:
        return None
    guarded = _guarded_lines(os.path.abspath(path))
    if guarded is None:
        return None
    return None if any(start <= frame.f_lineno <= end for start, end in guarded) else path


@functools.lru_cache(maxsize=8)
def _guarded_lines(path: str) -> tuple[tuple[int, int], ...] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    spans = []
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            spans.append((node.lineno, node.end_lineno or node.lineno))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            spans.append((node.lineno, node.end_lineno or node.lineno))
    return tuple(spans)
