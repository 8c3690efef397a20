"""Progress of a stage run, kept apart from the executors that feed it.

On a terminal: a rich bar on stderr with shards, rows, rate, errors and an ETA. Elsewhere (cluster
logs, CI): a plain line every ``interval`` seconds, so logs show movement without control codes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("mlmfilter.progress")


class RunProgress:
    def __init__(self, stage: str, total_shards: int, enabled: bool = True, interval: float = 30.0):
        self.stage = stage
        self.total = total_shards
        self.enabled = enabled and total_shards > 0
        self.interval = interval
        self.rows = 0
        self.errors = 0
        self.shards_done = 0
        self.shards_failed = 0
        self._started = time.perf_counter()
        self._last_line = self._started
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> "RunProgress":
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("shards"),
                TextColumn("{task.fields[rows]} pairs"),
                TextColumn("{task.fields[rate]:.1f} pairs/s"),
                TextColumn("[red]{task.fields[errors]} errors"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.stage, total=self.total, rows=0, rate=0.0, errors=0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
        elif self.enabled:
            self._line(final=True)

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self._started, 1e-9)

    def rows_done(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors
        if self._bar is not None:
            self._bar.update(self._task, rows=self.rows, rate=self.rows / self.elapsed, errors=self.errors)
        elif self.enabled and time.perf_counter() - self._last_line >= self.interval:
            self._line()

    def shard_done(self, ok: bool) -> None:
        self.shards_done += ok
        self.shards_failed += not ok
        if self._bar is not None:
            self._bar.advance(self._task)

    def _line(self, final: bool = False) -> None:
        self._last_line = time.perf_counter()
        finished = self.shards_done + self.shards_failed
        eta = ""
        if 0 < finished < self.total and not final:
            eta = f", eta {self.elapsed / finished * (self.total - finished):.0f} s"
        log.info(
            "%s: %d/%d shards (%d failed), %d pairs, %.1f pairs/s, %d errors%s",
            self.stage, finished, self.total, self.shards_failed, self.rows, self.rows / self.elapsed, self.errors, eta,
        )
