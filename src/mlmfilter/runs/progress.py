"""Progress of a stage run, kept apart from the executors that feed it.

The unit is the pair: executors report rows as each chunk of a shard is done (inline, or from
worker processes through a queue), so a bar moves inside a 10k-pair shard. The total is an
estimate: each shard's pair count where it can be told cheaply (a parquet footer, img2dataset's
``_stats.json``, a local tar's headers; :func:`mlmfilter.io.readers.layout.estimate_rows`), else the
mean of the shards counted (or, with none counted, the pairs per shard finished so far).

On a terminal: a rich bar on stderr with pairs done/total, shards, rate, errors and an ETA.
Elsewhere (cluster logs, CI): a plain line every ``interval`` seconds, so logs show movement
without control codes.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, Sequence

log = logging.getLogger("mlmfilter.progress")

#: time spent counting pairs (in a thread, while the run starts); shards left uncounted use the mean
ESTIMATE_BUDGET_S = 5.0


class RunProgress:
    def __init__(
        self,
        stage: str,
        total_shards: int,
        enabled: bool = True,
        interval: float = 30.0,
        sources: Sequence[Any] = (),
        estimate: Callable[[Any], int | None] | None = None,
        tty: bool | None = None,
    ):
        self.stage = stage
        self.total = total_shards
        self.enabled = enabled and total_shards > 0
        self.interval = interval
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.rows = 0
        self.errors = 0
        self.shards_done = 0
        self.shards_failed = 0
        self._known: list[int] = []  # pair counts of the shards counted before the run
        self._unknown = total_shards  # shards not counted
        #: set once the shards are counted; counting runs beside the run, so it never delays its start
        self.estimated = threading.Event()
        if self.enabled and sources:
            threading.Thread(
                target=self._estimate, args=(list(sources), estimate), daemon=True, name="progress-estimate"
            ).start()
        else:
            self.estimated.set()
        self._started = time.perf_counter()
        self._last_line = self._started
        self._bar: Any = None
        self._task: Any = None

    def _estimate(self, sources: Sequence[Any], estimate: Callable[[Any], int | None] | None) -> None:
        if estimate is None:
            from mlmfilter.io.readers.layout import estimate_rows as estimate
        deadline = time.perf_counter() + ESTIMATE_BUDGET_S
        try:
            for source in sources:
                if time.perf_counter() > deadline:
                    break
                rows = estimate(source)
                if rows is not None:
                    self._unknown -= 1  # first: a reader in between sees a slightly low total, never a high one
                    self._known.append(rows)
        finally:
            self.estimated.set()

    # -- the estimate -------------------------------------------------------------------------------
    @property
    def expected_rows(self) -> int | None:
        """Pairs the run will have read when done (None while nothing is known to estimate from)."""
        if self._known:  # counted shards, and their mean for the others
            mean = sum(self._known) / len(self._known)
            return max(self.rows, round(sum(self._known) + mean * self._unknown))
        finished = self.shards_done + self.shards_failed
        if finished:  # nothing counted up front: the pairs per finished shard so far
            return max(self.rows, round(self.rows / finished * self.total))
        return None

    @property
    def eta(self) -> float | None:
        expected = self.expected_rows
        if expected is None or self.rows <= 0:
            return None
        return max(0.0, (expected - self.rows) / (self.rows / self.elapsed))

    # -- display ------------------------------------------------------------------------------------
    def __enter__(self) -> "RunProgress":
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:.0f}/{task.fields[expected]} pairs"),
                TextColumn("{task.fields[shards]}/{task.fields[total_shards]} shards"),
                TextColumn("{task.fields[rate]:.1f} pairs/s"),
                TextColumn("[red]{task.fields[errors]} errors"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                self.stage,
                total=self.expected_rows,
                rate=0.0,
                errors=0,
                shards=0,
                total_shards=self.total,
                expected=self._expected_text(),
            )
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
        """A chunk of ``rows`` pairs (``errors`` of them failed) is done, in any shard."""
        self.rows += rows
        self.errors += errors
        if self._bar is not None:
            self._refresh()
        elif self.enabled and time.perf_counter() - self._last_line >= self.interval:
            self._line()

    def shard_done(self, ok: bool) -> None:
        self.shards_done += ok
        self.shards_failed += not ok
        if self._bar is not None:
            self._refresh()

    def _expected_text(self) -> str:
        expected = self.expected_rows
        if expected is None:
            return "?"
        return str(expected) if self._known and not self._unknown else f"~{expected}"

    def _refresh(self) -> None:
        self._bar.update(
            self._task,
            completed=self.rows,
            total=self.expected_rows,
            rate=self.rows / self.elapsed,
            errors=self.errors,
            shards=self.shards_done + self.shards_failed,
            expected=self._expected_text(),
        )

    def _line(self, final: bool = False) -> None:
        self._last_line = time.perf_counter()
        finished = self.shards_done + self.shards_failed
        eta = self.eta
        tail = f", eta {eta:.0f} s" if eta is not None and not final and finished < self.total else ""
        log.info(
            "%s: %d/%s pairs, %d/%d shards (%d failed), %.1f pairs/s, %d errors%s",
            self.stage,
            self.rows,
            self._expected_text(),
            finished,
            self.total,
            self.shards_failed,
            self.rows / self.elapsed,
            self.errors,
            tail,
        )
