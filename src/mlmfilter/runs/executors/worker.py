"""The one worker body every executor runs; the executors only decide where it runs.

:class:`Worker` is what one process does with a stage, wherever it is: the parent process itself
(``workers=1``), a process of the local pool, or a Ray actor. Built once per process, it

1. limits the threads the libraries may start, and takes its share of the devices
   (``CUDA_VISIBLE_DEVICES``, set before anything can initialise CUDA in the process);
2. opens its log file ``RUN/logs/<stage>-<role>-<pid>.log``;
3. builds the stage from its spec (a class path, see :class:`~mlmfilter.runs.stage.StageSpec`);

then runs shards one at a time (:meth:`Worker.run`: the stage's models load before the first,
then :func:`execute_task`) and finally closes the stage and its log (:meth:`Worker.close`).

:func:`execute_task` is the unit of work: one stage on one shard, then its table, stats and
completion marker (marker last). Any failure of the shard as a whole (a dead decode pool, out of
memory, a full disk, a bug) raises out of it: the shard is reported failed, gets no marker, and
the next run retries it. Per-sample problems never get here: they are rows.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyarrow as pa

from mlmfilter.core.stats import Stopwatch
from mlmfilter.runs.folder import LOGS_DIR, RunFolder, now_iso
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


def attach_log_file(folder: RunFolder, name: str) -> logging.Handler | None:
    """``RUN/logs/<name>.log`` for this process (local run folders; object stores log locally only)."""
    logs_dir = folder.logs_dir()
    if logs_dir is None:
        return None
    folder.storage.makedirs(LOGS_DIR)
    path = folder.storage.writable_path(f"{LOGS_DIR}/{name}.log", final=True)  # appended to: never through a link
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)  # library warnings (warnings.warn) land in this log, not on a worker's stderr
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


class _RunLogHandler(logging.FileHandler):
    """The run's log file. A log line that cannot be written (a full disk) is lost quietly: the run's
    own failure says what happened, and a log must not add a traceback of its own to the terminal."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last lines could not be flushed (a full disk): nothing more to do
            pass


def detach_log_file(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def visible_devices(environ: Mapping[str, str] | None = None) -> list[str]:
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


def failure_line(exc: BaseException) -> str:
    """An exception as one line for a run's summary (the traceback goes to the log)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def limit_threads(threads: int) -> None:
    """Let the numeric libraries of this process use ``threads`` threads (workers share the CPUs)."""
    # set before torch is imported (it reads these once); if it already is, tell it directly
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


@dataclass
class ShardResult:
    """What a worker sends back for one shard (picklable: it crosses process and Ray boundaries)."""

    shard_id: str
    stats: dict[str, Any] | None  # None when the shard failed
    error: str | None  # one line; None when the shard is done
    worker: dict[str, Any] = field(default_factory=dict)  # pid, slot, devices, the stage's worker_info()

    @property
    def ok(self) -> bool:
        return self.error is None


class Worker:
    """One process's stage: set up once, then shard after shard (see the module docstring).

    ``stage`` is a built stage (run in this process as it is) or its spec (a worker process
    rebuilds it, after taking ``threads`` and ``devices``). ``log_name`` may name ``{stage}``,
    ``{host}`` and ``{pid}``, filled in by the process that runs the worker. ``progress`` receives
    (rows, errored rows) as shards advance.
    """

    def __init__(
        self,
        stage: Stage | StageSpec | Mapping[str, Any],
        run_url: str,
        stage_name: str,
        *,
        log_name: str = "{stage}-worker-{pid}",
        progress: ProgressCallback | None = None,
        threads: int | None = None,
        slot: int | None = None,
        devices: Sequence[str] | None = None,
    ):
        if devices is not None:  # before anything can initialise CUDA in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        if threads is not None:
            limit_threads(threads)
        self.slot = slot
        self.progress = progress
        name = log_name.format(stage=stage_name, host=platform.node(), pid=os.getpid())
        self._log_handler = attach_log_file(RunFolder(run_url), name)
        if slot is not None:
            log.info("worker slot %s: CUDA_VISIBLE_DEVICES=%s", slot, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if isinstance(stage, Stage):
            self.stage = stage
        else:
            spec = stage if isinstance(stage, StageSpec) else StageSpec.model_validate(dict(stage))
            self.stage = spec.build()
        self._ready = False

    def setup(self) -> None:
        """Load the stage's models (once; a setup that failed is tried again on the next shard)."""
        if not self._ready:
            self.stage.setup()
            self._ready = True

    def run(self, task: StageTask, fingerprint: str) -> ShardResult:
        """One shard: its table, stats and marker written, or its failure as one line (never raises
        for a failed shard; an interrupt still does)."""
        try:
            self.setup()
            stats = execute_task(self.stage, task, fingerprint, self.progress)
            return ShardResult(task.shard_id, stats, None, self.record(task))
        except Exception as exc:  # the shard fails as a whole; a rerun retries it
            line = failure_line(exc)
            log.error("shard %s failed: %s", task.shard_id, line)  # the terminal gets one line
            self._log_traceback(task.shard_id)
            return ShardResult(task.shard_id, None, line, self.record(task))

    def _log_traceback(self, shard_id: str) -> None:
        """The failed shard's traceback, for the run's log file only (a terminal shows the one line)."""
        record = log.makeRecord(
            log.name, logging.ERROR, __file__, 0, "shard %s failed:\n%s", (shard_id, traceback.format_exc()), None
        )
        if self._log_handler is not None:
            self._log_handler.handle(record)
        else:  # no log file (a run folder on object storage): the debug log keeps it
            log.debug(record.getMessage())

    def record(self, task: StageTask) -> dict[str, Any]:
        """What this worker was when it ran a shard: its process, device slot and the stage's own info."""
        return {
            "shard": task.shard_id,
            "pid": os.getpid(),
            "slot": self.slot,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            **self.stage.worker_info(),
        }

    def close(self) -> None:
        """Close the stage (its pools, models and connections), then the log file."""
        try:
            self.stage.close()
        finally:
            detach_log_file(self._log_handler)
            self._log_handler = None
