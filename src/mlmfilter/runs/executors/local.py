"""Executors decide where shard tasks run; stages know nothing of them.

:func:`execute_task` is the unit of work every executor runs: one stage on one shard, then its
table, stats and completion marker (marker last). Any failure of the shard as a whole (a dead
decode pool, out of memory, a full disk, a bug) raises out of it: the shard is reported failed,
gets no marker, and the next run retries it. Per-sample problems never get here: they are rows.

:class:`LocalExecutor` runs shards inline (``workers=1``) or in worker processes that each build
the stage once (models load once per process, and the stage keeps ONE image-decoding pool for every
shard it runs) and die with the parent. A worker that dies takes its pool down; the shards it held
are retried once in a fresh pool.

GPUs: with ``workers=N`` and a stage that wants one (``stage.wants_gpu()``; a stage without it is
assumed to), worker slot i gets its own share of the visible devices (:func:`worker_devices`) as its
``CUDA_VISIBLE_DEVICES``, set before it builds the stage, so each worker's ``cuda`` is its own GPU.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import pyarrow as pa

from mlmfilter.core.processes import worker_initializer
from mlmfilter.core.stats import Stopwatch
from mlmfilter.runs.folder import RunFolder, now_iso
from mlmfilter.runs.progress import RunProgress
from mlmfilter.runs.stage import ProgressCallback, Stage, StageSpec, StageTask

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def execute_task(
    stage: Stage, task: StageTask, fingerprint: str, progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Run ``stage`` on one shard and write its table, stats and marker; returns the stats."""
    stats = task.stats
    with Stopwatch(stats):
        schema = stage.schema()
        batches = [batch for batch in stage.process(task, progress)]
        table = pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()
        stats.add_rows(table.column("error").to_pylist())
    stats.shards = 1
    folder = RunFolder(task.run_url).stage(task.stage_name)
    marker = {
        "shard": task.shard_id,
        "source": task.source_identity,
        "fingerprint": fingerprint,
        "finished": now_iso(),
        "host": os.uname().nodename if hasattr(os, "uname") else "",
    }
    folder.finish_shard(task.shard_id, table, stats, marker)
    log.info(
        "%s: shard %s done, %d rows (%d errors) in %.1f s",
        task.stage_name,
        task.shard_id,
        stats.rows,
        stats.errored,
        stats.seconds,
    )
    return stats.to_json()


@dataclass
class ExecutionReport:
    completed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard id -> one-line reason
    interrupted: bool = False
    seconds: float = 0.0


class Executor(Protocol):
    def run(self, tasks: Sequence[StageTask], stage: Stage, fingerprint: str, progress: RunProgress) -> ExecutionReport:
        """Run every task; never raises for a failed shard (it is in the report)."""


def attach_log_file(folder: RunFolder, name: str) -> logging.Handler | None:
    """``RUN/logs/<name>.log`` for this process (local run folders; object stores log locally only)."""
    logs_dir = folder.logs_dir()
    if logs_dir is None:
        return None
    os.makedirs(logs_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(logs_dir, f"{name}.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)  # library warnings (warnings.warn) land in this log, not on a worker's stderr
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def visible_devices(environ: Any = None) -> list[str]:
    """The accelerators this process may use: ``CUDA_VISIBLE_DEVICES`` when set (ids or UUIDs, up to the
    first invalid entry, as CUDA reads it), else the devices torch counts; [] without any."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        devices = []
        for item in (v.strip() for v in value.split(",")):
            if not item or item.startswith("-"):
                break  # CUDA stops at the first invalid entry ("-1" hides every device)
            devices.append(item)
        return devices
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_devices(slot: int, workers: int, devices: Sequence[str]) -> list[str]:
    """The devices worker ``slot`` (0-based) of ``workers`` gets.

    At least as many devices as workers: an equal contiguous share each (8 GPUs, 4 workers: 2 each;
    leftovers unused). Fewer: one device each, round-robin (workers then share a device).
    """
    if not 0 <= slot < workers:
        raise ValueError(f"worker slot {slot} is not in 0..{workers - 1}")
    if not devices:
        return []
    if len(devices) >= workers:
        share = len(devices) // workers
        return list(devices[slot * share : (slot + 1) * share])
    return [devices[slot % len(devices)]]


def _stage_wants_gpu(stage: Stage) -> bool:
    wants = getattr(stage, "wants_gpu", None)
    return bool(wants()) if callable(wants) else True


def _worker_record(stage: Stage, task: StageTask) -> dict[str, Any]:
    """What one worker was when it ran a shard: its process, device slot and decode pool."""
    decoder = getattr(stage, "decoder", None)
    return {
        "shard": task.shard_id,
        "pid": os.getpid(),
        "slot": _worker.get("slot"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "decoder": id(decoder) if decoder is not None else None,
        "decode_pids": decoder.worker_pids() if decoder is not None else [],
    }


def _failure_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _limit_threads(threads: int) -> None:
    # set before torch is imported (it reads these once); if it already is, tell it directly
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


# -- worker side (pool) ---------------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(
    spec_json: dict,
    run_url: str,
    stage_name: str,
    progress_queue: Any,
    threads: int,
    slots: Any = None,
    devices_by_slot: Sequence[Sequence[str]] = (),
) -> None:
    slot = slots.get(timeout=60) if slots is not None else None
    if slot is not None and devices_by_slot:  # before anything can initialise CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices_by_slot[slot])
    _worker["slot"] = slot
    _limit_threads(threads)
    folder = RunFolder(run_url)
    attach_log_file(folder, f"{stage_name}-worker-{os.getpid()}")
    log.info("worker slot %s: CUDA_VISIBLE_DEVICES=%s", slot, os.environ.get("CUDA_VISIBLE_DEVICES"))
    stage = StageSpec(**spec_json).build()
    _worker.update(stage=stage, queue=progress_queue)
    # close the stage (its decode pool) when the worker exits; threading's exit hooks run
    # before concurrent.futures joins pools, which would otherwise wait on our decoders forever
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(stage.close)


def _run_in_worker(task: StageTask, fingerprint: str) -> tuple[str, dict | None, str | None, dict]:
    stage: Stage = _worker["stage"]
    report = _worker["queue"]
    try:
        stage.setup()
        stats = execute_task(stage, task, fingerprint, lambda n, e: report.put((n, e)))
        return task.shard_id, stats, None, _worker_record(stage, task)
    except Exception as exc:  # the shard fails as a whole; a rerun retries it
        log.error("shard %s failed:\n%s", task.shard_id, traceback.format_exc())
        return task.shard_id, None, _failure_line(exc), _worker_record(stage, task)


# -- parent side ----------------------------------------------------------------------------------
class LocalExecutor:
    """Shards in this process (``workers=1``) or in ``workers`` processes on this machine."""

    def __init__(self, workers: int = 1, retries: int = 1):
        self.workers = max(1, workers)
        self.retries = retries
        #: per shard run in a worker process: pid, device slot, CUDA_VISIBLE_DEVICES, decode pool (see _worker_record)
        self.worker_records: list[dict[str, Any]] = []

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
        folder = RunFolder(tasks[0].run_url)
        handler = attach_log_file(folder, f"{tasks[0].stage_name}-main-{os.getpid()}")
        try:
            stage.setup()
            for task in tasks:
                try:
                    execute_task(stage, task, fingerprint, progress.rows_done)
                    report.completed.append(task.shard_id)
                    progress.shard_done(True)
                except Exception as exc:
                    log.error("shard %s failed:\n%s", task.shard_id, traceback.format_exc())
                    report.failed[task.shard_id] = _failure_line(exc)
                    progress.shard_done(False)
        finally:
            stage.close()  # its decode pool: no worker processes outlive the run
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()

    def _run_pool(
        self, tasks: list[StageTask], stage: Stage, fingerprint: str, progress: RunProgress, report: ExecutionReport
    ) -> None:
        # spawn: torch and fork do not mix; each worker is a fresh interpreter building the stage
        ctx = mp.get_context("spawn")
        progress_queue = ctx.Queue()
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        devices = visible_devices() if _stage_wants_gpu(stage) else []
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
                    _init_worker,
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
                    pending = {pool.submit(_run_in_worker, task, fingerprint): task for task in todo}
                    while pending:
                        done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                        self._drain(progress_queue, progress)
                        for future in done:
                            task = pending.pop(future)
                            try:
                                shard_id, _, error, record = future.result()
                                self.worker_records.append(record)
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
