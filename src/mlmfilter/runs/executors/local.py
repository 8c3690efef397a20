"""Shards on this machine: inline in this process (``workers=1``) or in worker processes.

Each worker process runs the one worker body (:class:`~mlmfilter.runs.executors.worker.Worker`):
it builds the stage once (models load once per process, and the stage keeps ONE image-decoding
pool for every shard it runs) and dies with the parent. A worker that dies takes its pool down;
the shards it held are retried once in a fresh pool.

GPUs: with ``workers=N`` and a stage that wants one (``stage.wants_gpu()``), worker slot i gets its
own share of the visible devices (:func:`~mlmfilter.runs.executors.worker.worker_devices`) as its
``CUDA_VISIBLE_DEVICES``, set before it builds the stage, so each worker's ``cuda`` is its own GPU.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Sequence

from mlmfilter.core.processes import children_ignore_sigint, worker_initializer
from mlmfilter.runs.executors import ExecutionReport
from mlmfilter.runs.executors.worker import ShardResult, Worker, visible_devices, worker_devices
from mlmfilter.runs.progress import RunProgress
from mlmfilter.runs.stage import Stage, StageTask

log = logging.getLogger(__name__)


# -- worker side (pool) ---------------------------------------------------------------------------
#: the worker of this pool process (set by the pool's initializer)
_worker: Worker | None = None


def _start_worker(
    spec_json: dict,
    run_url: str,
    stage_name: str,
    progress_queue: Any,
    threads: int,
    slots: Any,
    devices_by_slot: Sequence[Sequence[str]] = (),
) -> None:
    global _worker
    slot = slots.get(timeout=60)  # each process of the pool takes one slot, hence its own devices
    _worker = Worker(
        spec_json,
        run_url,
        stage_name,
        log_name="{stage}-worker-{pid}",
        progress=lambda rows, errors: progress_queue.put((rows, errors)),
        threads=threads,
        slot=slot,
        devices=devices_by_slot[slot] if devices_by_slot else None,
    )
    # close the stage (its decode pool) when the worker exits; threading's exit hooks run
    # before concurrent.futures joins pools, which would otherwise wait on our decoders forever
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(_worker.close)


def _run_in_worker(task: StageTask, fingerprint: str) -> ShardResult:
    assert _worker is not None, "the pool initializer builds the worker"
    return _worker.run(task, fingerprint)


# -- parent side ----------------------------------------------------------------------------------
class LocalExecutor:
    """Shards in this process (``workers=1``) or in ``workers`` processes on this machine."""

    def __init__(self, workers: int = 1, retries: int = 1):
        self.workers = max(1, workers)
        self.retries = retries
        #: per shard run in a worker process: pid, device slot, CUDA_VISIBLE_DEVICES, the stage's
        #: worker_info() (e.g. its decode pool); see Worker.record
        self.worker_records: list[dict[str, Any]] = []

    @classmethod
    def from_options(cls, options: Any = None, workers: int = 1) -> "LocalExecutor":
        """``local`` has no settings of its own: ``workers`` is all it takes."""
        if options is not None:
            raise ValueError(f"the local executor takes no settings, got {options!r}")
        return cls(workers=workers)

    def run(self, tasks: Sequence[StageTask], stage: Stage, fingerprint: str, progress: RunProgress) -> ExecutionReport:
        report = ExecutionReport()
        started = time.perf_counter()
        try:
            if self.workers == 1 or len(tasks) <= 1:
                self._run_inline(tasks, stage, fingerprint, progress, report)
            else:
                self._run_pool(list(tasks), stage, fingerprint, progress, report)
        except KeyboardInterrupt:
            report.interrupted = True
        report.seconds = time.perf_counter() - started
        return report

    def _run_inline(
        self, tasks, stage: Stage, fingerprint: str, progress: RunProgress, report: ExecutionReport
    ) -> None:
        if not tasks:
            return
        worker = Worker(
            stage, tasks[0].run_url, tasks[0].stage_name, log_name="{stage}-main-{pid}", progress=progress.rows_done
        )
        try:
            worker.setup()  # a stage that cannot set up fails the run here, not shard by shard
            for task in tasks:
                result = worker.run(task, fingerprint)
                if result.ok:
                    report.completed.append(task.shard_id)
                else:
                    report.failed[task.shard_id] = result.error
                progress.shard_done(result.ok)
        finally:
            worker.close()  # its decode pool: no worker processes outlive the run

    def _run_pool(
        self, tasks: list[StageTask], stage: Stage, fingerprint: str, progress: RunProgress, report: ExecutionReport
    ) -> None:
        # spawn: torch and fork do not mix; each worker is a fresh interpreter building the stage
        ctx = mp.get_context("spawn")
        progress_queue = ctx.Queue()
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        devices = visible_devices() if stage.wants_gpu() else []
        attempts = {task.shard_id: 0 for task in tasks}
        todo = tasks
        try:
            while todo:
                retry: list[StageTask] = []
                size = min(self.workers, len(todo))
                devices_by_slot = [worker_devices(slot, size, devices) for slot in range(size)] if devices else []
                if devices and len(devices) < size:
                    log.warning("%d workers share %d GPU(s): %s", size, len(devices), devices_by_slot)
                slots = ctx.Queue()  # each process of this pool takes one slot, hence its own devices
                for slot in range(size):
                    slots.put(slot)
                init = (
                    _start_worker,
                    (
                        stage.spec().model_dump(),
                        tasks[0].run_url,
                        tasks[0].stage_name,
                        progress_queue,
                        threads,
                        slots,
                        devices_by_slot,
                    ),
                )
                pool = ProcessPoolExecutor(
                    size, mp_context=ctx, initializer=worker_initializer, initargs=(os.getpid(), init)
                )
                finished = False
                try:
                    with children_ignore_sigint():  # the pool starts its processes on these submits
                        pending = {pool.submit(_run_in_worker, task, fingerprint): task for task in todo}
                    while pending:
                        done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                        self._drain(progress_queue, progress)
                        for future in done:
                            task = pending.pop(future)
                            try:
                                result = future.result()
                                self.worker_records.append(result.worker)
                                shard_id, error = result.shard_id, result.error
                            except BrokenProcessPool as exc:  # a worker process died (OOM killer, segfault)
                                attempts[task.shard_id] += 1
                                if attempts[task.shard_id] <= self.retries:
                                    retry.append(task)
                                    continue
                                shard_id, error = task.shard_id, f"worker process died: {exc}"
                            if error:
                                report.failed[shard_id] = error
                            else:
                                report.completed.append(shard_id)
                            progress.shard_done(error is None)
                    self._drain(progress_queue, progress)
                    finished = not retry
                finally:
                    # every finished shard's files are complete before its result was sent, so a
                    # worker that does not exit at once (its own pools winding down) is just ended
                    _stop_pool(pool, grace=2.0 if finished else 0.0)
                if retry:
                    log.warning("a worker process died; retrying %d shard(s) in a fresh pool", len(retry))
                todo = retry
        finally:
            progress_queue.close()

    @staticmethod
    def _drain(progress_queue, progress: RunProgress) -> None:
        while True:
            try:
                progress.rows_done(*progress_queue.get_nowait())
            except (queue.Empty, OSError, EOFError):
                return


def _stop_pool(pool: ProcessPoolExecutor, grace: float = 0.0) -> None:
    """Shut a pool down; workers get ``grace`` seconds to exit on their own, then are terminated.

    Every wait is bounded: a worker stuck at exit (or busy after Ctrl-C) never hangs the run, and
    a finished shard's files are complete before its result was sent, so nothing is lost.
    """
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
