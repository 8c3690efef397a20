"""Run a stage's shards on a Ray cluster (or a local Ray) through a pool of actors.

Each actor is the one worker body (:class:`~mlmfilter.runs.executors.worker.Worker`, wrapped by
``ray.remote``): it rebuilds the stage once from its spec (models load once per actor, on the GPUs
Ray gave it) and runs one shard at a time, so the table, stats and completion marker are written
exactly as by the local executor. Image decoding
stays in the stage's own decode pool inside each actor (``decode_workers`` CPU processes), so a
GPU actor never decodes JPEGs itself.

The run folder must be reachable from every node under the same URL: shared storage (NFS,
Lustre) or object storage (``s3://``, ``gs://`` through fsspec). A local path only works when
all actors run on this machine, as with a local Ray.

A shard whose actor or node is lost (Ray's retriable errors) is resubmitted to a fresh actor up
to ``max_retries`` times; a shard that fails in the stage's own code is reported failed without
a retry (the next run retries it), as in the local executor. A killed driver loses nothing:
completed shards have markers, the others are redone by the next run.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.core.reaper import start_reaper, stop_reaper
from mlmfilter.runs.executors import ExecutionReport
from mlmfilter.runs.executors.worker import ShardResult, Worker, failure_line
from mlmfilter.runs.progress import RunProgress
from mlmfilter.runs.stage import Stage, StageTask

log = logging.getLogger(__name__)


class RayOptions(BaseModel):
    """How ``--executor ray`` places the stage; a recipe's ``ray:`` mapping."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None  # "auto" or "ray://head:10001" joins a cluster; None starts a local Ray
    num_actors: int | None = Field(None, ge=1)  # None: the run's `workers`
    num_cpus: float = Field(1.0, ge=0)  # per actor (its decode pool's processes run inside this share)
    num_gpus: float = Field(0.0, ge=0)  # per actor: 1 gives each actor its own GPU
    max_retries: int = Field(2, ge=0)  # resubmissions of a shard whose actor or node was lost
    local_num_cpus: int | None = Field(None, ge=1)  # CPUs of a local Ray (None: all of this machine)


def _reap_local_ray(ray: Any):
    """A watcher that ends the local Ray's processes (GCS, raylet, their agents and workers) if this
    driver dies without shutting Ray down (SIGKILL): Ray's agents would outlive it."""
    node = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(node, "_global_node", None)
    try:
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
    except Exception:  # Ray's internals moved: no watcher, as before
        log.debug("no process list of the local Ray to watch", exc_info=True)
        return None
    return start_reaper(roots)


def _retriable_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a lost worker, actor, node or object: the shard itself may be fine."""
    import ray.exceptions as rex

    names = (
        "RayActorError",
        "WorkerCrashedError",
        "NodeDiedError",
        "ObjectLostError",
        "OutOfMemoryError",
        "LocalRayletDiedError",
    )
    return tuple(getattr(rex, name) for name in names if hasattr(rex, name))


class _ProgressInbox:
    """Rows reported by the actors, summed until the driver takes them (a fire-and-forget ``add``
    keeps actors from waiting on a round trip per chunk, which a ``ray.util.queue.Queue.put`` does)."""

    def __init__(self) -> None:
        self.rows = self.errors = 0

    def add(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors

    def take(self) -> tuple[int, int]:
        taken, self.rows, self.errors = (self.rows, self.errors), 0, 0
        return taken


class _ReportTo:
    """A worker's progress callback that adds to the inbox without waiting for the round trip."""

    def __init__(self, inbox: Any):
        self.inbox = inbox

    def __call__(self, rows: int, errors: int) -> None:
        self.inbox.add.remote(rows, errors)


class RayExecutor:
    """Shards as Ray actor tasks: ``num_actors`` actors of ``num_cpus``/``num_gpus`` each."""

    def __init__(
        self,
        address: str | None = None,
        num_actors: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_retries: int = 2,
        local_num_cpus: int | None = None,
    ):
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # refused before the run folder is touched
            raise ValueError("--executor ray needs Ray: pip install 'mlmfilter[ray]'")
        self.address = address
        self.num_actors = max(1, num_actors)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.local_num_cpus = local_num_cpus

    @classmethod
    def from_options(cls, options: RayOptions | dict | None = None, workers: int = 1) -> "RayExecutor":
        """The executor a recipe's ``ray:`` section describes (``num_actors`` defaults to ``workers``)."""
        options = RayOptions.model_validate(options or {})
        return cls(
            address=options.address,
            num_actors=options.num_actors or workers,
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
            max_retries=options.max_retries,
            local_num_cpus=options.local_num_cpus,
        )

    def run(self, tasks: Sequence[StageTask], stage: Stage, fingerprint: str, progress: RunProgress) -> ExecutionReport:
        report = ExecutionReport()
        started = time.perf_counter()
        if not tasks:
            return report
        import ray

        started_ray = self._connect(ray)
        reaper = _reap_local_ray(ray) if started_ray else None
        actors: list[Any] = []
        try:
            self._run_pool(ray, list(tasks), stage, fingerprint, progress, report, actors)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            self._stop(ray, actors)
            if started_ray:
                ray.shutdown()
                stop_reaper(reaper)
        report.seconds = time.perf_counter() - started
        return report

    def _connect(self, ray: Any) -> bool:
        """Join ``address`` or start a local Ray; True when this call started it (and must stop it)."""
        if ray.is_initialized():
            return False
        if self.address:
            ray.init(address=self.address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=self.local_num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        return True

    def _run_pool(
        self,
        ray: Any,
        tasks: list[StageTask],
        stage: Stage,
        fingerprint: str,
        progress: RunProgress,
        report: ExecutionReport,
        actors: list[Any],
    ) -> None:
        retriable = _retriable_errors()
        inbox = ray.remote(num_cpus=0)(_ProgressInbox).remote()
        actor_class = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(Worker)
        threads = max(1, int(self.num_cpus))
        spec = stage.spec().model_dump()

        def new_actor() -> Any:
            actor = actor_class.remote(
                spec,
                tasks[0].run_url,
                tasks[0].stage_name,
                log_name="{stage}-ray-{host}-{pid}",
                progress=_ReportTo(inbox),
                threads=threads,
            )
            actors.append(actor)
            return actor

        todo = list(reversed(tasks))  # pop() hands out shards in run order
        attempts = {task.shard_id: 0 for task in tasks}
        idle = [new_actor() for _ in range(min(self.num_actors, len(tasks)))]
        running: dict[Any, tuple[Any, StageTask]] = {}  # object ref -> (actor, task)
        while todo or running:
            while todo and idle:
                actor, task = idle.pop(), todo.pop()
                running[actor.run.remote(task, fingerprint)] = (actor, task)
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
            self._drain(ray, inbox, progress)
            for ref in done:
                actor, task = running.pop(ref)
                try:
                    result: ShardResult = ray.get(ref)
                    shard_id, error = result.shard_id, result.error
                except retriable as exc:  # the actor or its node is gone; the shard may be fine
                    attempts[task.shard_id] += 1
                    self._discard(ray, actor, actors)
                    if attempts[task.shard_id] <= self.max_retries:
                        log.warning(
                            "shard %s: lost its Ray worker (%s); retrying on a fresh actor",
                            task.shard_id,
                            failure_line(exc),
                        )
                        todo.append(task)
                        idle.append(new_actor())
                        continue
                    shard_id, error = (
                        task.shard_id,
                        f"Ray worker lost {attempts[task.shard_id]} times: {failure_line(exc)}",
                    )
                    if todo:
                        idle.append(new_actor())
                except Exception as exc:  # e.g. a result Ray could not ship back: this shard only
                    shard_id, error = task.shard_id, failure_line(exc)
                    idle.append(actor)
                else:
                    idle.append(actor)
                if error:
                    report.failed[shard_id] = error
                else:
                    report.completed.append(shard_id)
                progress.shard_done(error is None)
        self._drain(ray, inbox, progress)

    @staticmethod
    def _drain(ray: Any, inbox: Any, progress: RunProgress) -> None:
        rows, errors = ray.get(inbox.take.remote())
        if rows or errors:
            progress.rows_done(rows, errors)

    @staticmethod
    def _discard(ray: Any, actor: Any, actors: list[Any]) -> None:
        if actor in actors:
            actors.remove(actor)
        ray.kill(actor, no_restart=True)

    @staticmethod
    def _stop(ray: Any, actors: list[Any]) -> None:
        """Close each stage (its decode pool, its models), bounded; then end the actors."""
        if not actors:
            return
        try:
            ray.wait([actor.close.remote() for actor in actors], num_returns=len(actors), timeout=30)
        except Exception:  # an actor that is already gone has nothing to close
            pass
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
