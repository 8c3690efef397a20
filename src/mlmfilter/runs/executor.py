"""Executors run shard tasks; blocks (scorers) know nothing of them.

`LocalExecutor` scores shards in parallel processes on one machine. Each worker builds its
scorers once (models load once per process) and reports progress through a queue so the
parent can draw one progress bar.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mlmfilter.config import ScorerSpec
from mlmfilter.runs.pipeline import ShardTask, process_shard
from mlmfilter.scorers import Scorer, build_scorer

log = logging.getLogger(__name__)


def build_scorers(specs: Sequence[ScorerSpec]) -> list[Scorer]:
    return [build_scorer(spec.name, spec.options) for spec in specs]


def _attach_log_file(run_dir: str, name: str) -> None:
    path = Path(run_dir) / "logs" / f"{name}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


# -- worker side ------------------------------------------------------------------------------
_worker_scorers: list[Scorer] | None = None
_worker_queue: Any = None


def _init_worker(specs: list[ScorerSpec], run_dir: str, progress_queue: Any, torch_threads: int | None) -> None:
    global _worker_scorers, _worker_queue
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    _attach_log_file(run_dir, f"worker-{os.getpid()}")
    _worker_scorers = build_scorers(specs)
    _worker_queue = progress_queue


def _run_task(task: ShardTask) -> tuple[str, dict | None, str | None]:
    assert _worker_scorers is not None
    try:
        stats = process_shard(task, _worker_scorers, lambda n, e: _worker_queue.put((n, e)))
        return task.source.id, stats, None
    except Exception as exc:  # a shard that fails as a whole is reported, not fatal: a rerun retries it
        log.exception("shard %s failed", task.source.id)
        return task.source.id, None, f"{type(exc).__name__}: {exc}"


# -- parent side ------------------------------------------------------------------------------
@dataclass
class ExecutionReport:
    completed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already done by an earlier run
    failed: dict[str, str] = field(default_factory=dict)
    pairs: int = 0
    errors: int = 0
    seconds: float = 0.0


class LocalExecutor:
    def __init__(self, workers: int = 1, show_progress: bool = True):
        self.workers = max(1, workers)
        self.show_progress = show_progress

    def run(self, tasks: Sequence[ShardTask], specs: Sequence[ScorerSpec], scorers: Sequence[Scorer] | None = None) -> ExecutionReport:
        """Run tasks; `scorers` (already built, in this process) are used when workers == 1."""
        report = ExecutionReport()
        started = time.perf_counter()
        with self._progress(len(tasks)) as bar:
            task_id = bar.add_task("scoring", total=len(tasks), pairs=0, rate=0.0, errors=0)

            def on_pairs(n: int, e: int) -> None:
                report.pairs += n
                report.errors += e
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.update(task_id, pairs=report.pairs, rate=report.pairs / elapsed, errors=report.errors)

            def on_done(shard_id: str, stats: dict | None, error: str | None) -> None:
                if error:
                    report.failed[shard_id] = error
                else:
                    report.completed.append(shard_id)
                bar.advance(task_id)

            if self.workers == 1 or len(tasks) <= 1:
                self._run_inline(tasks, scorers or build_scorers(specs), on_pairs, on_done)
            else:
                self._run_pool(tasks, specs, on_pairs, on_done)
        report.seconds = time.perf_counter() - started
        return report

    def _run_inline(self, tasks, scorers, on_pairs, on_done) -> None:
        for task in tasks:
            try:
                on_done(task.source.id, process_shard(task, scorers, on_pairs), None)
            except Exception as exc:
                log.exception("shard %s failed", task.source.id)
                on_done(task.source.id, None, f"{type(exc).__name__}: {exc}")

    def _run_pool(self, tasks, specs, on_pairs, on_done) -> None:
        # ProcessPoolExecutor workers are not daemonic, so each may run its own decode pool;
        # spawn because torch and fork do not mix
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            progress_queue = manager.Queue()
            # split the cores between shard workers so torch does not oversubscribe them
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            init_args = (list(specs), tasks[0].run_dir, progress_queue, threads)
            with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=init_args) as pool:
                pending = {pool.submit(_run_task, task): task.source.id for task in tasks}
                while pending:
                    done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    self._drain(progress_queue, on_pairs)
                    for future in done:
                        shard_id = pending.pop(future)
                        try:
                            on_done(*future.result())
                        except Exception as exc:  # the worker process itself died
                            on_done(shard_id, None, f"{type(exc).__name__}: {exc}")
                self._drain(progress_queue, on_pairs)

    @staticmethod
    def _drain(progress_queue, on_pairs) -> None:
        while True:
            try:
                on_pairs(*progress_queue.get_nowait())
            except queue.Empty:
                return

    def _progress(self, total: int) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards"),
            TextColumn("{task.fields[pairs]} pairs"),
            TextColumn("{task.fields[rate]:.1f} pairs/s"),
            TextColumn("[red]{task.fields[errors]} errors"),
            TimeElapsedColumn(),
            disable=not self.show_progress,
            transient=False,
        )
