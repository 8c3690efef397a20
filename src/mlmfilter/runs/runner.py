"""Run one stage over a run's shards: the orchestration every stage shares.

lock the folder -> register the sources (ids never change, inputs may grow) -> check the stage's
fingerprint -> verify completion markers -> execute the shards still to do -> merge stats.
Nothing is written before every setting has been validated (stage and scorer options are
pydantic models checked when the stage is built).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from mlmfilter import __version__
from mlmfilter.core.ids import fingerprint_of
from mlmfilter.core.stats import ShardStats
from mlmfilter.io.sources import ShardSource
from mlmfilter.runs.executors import ExecutionReport, Executor
from mlmfilter.runs.executors.local import LocalExecutor
from mlmfilter.runs.folder import RunFolder, RunLock, now_iso, source_identity
from mlmfilter.runs.progress import RunProgress
from mlmfilter.runs.stage import Stage, StageTask

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

Overwrite = Literal[False, "stage", "run"]


@dataclass
class StageSummary:
    """What one run of a stage did: the one summary type of every stage (score, enhance, teach ...)."""

    run_url: str
    stage: str
    shards_total: int  # shards this invocation was asked to cover
    shards_completed: list[str]
    shards_skipped: list[str]  # already done by an earlier run (markers verified)
    shards_failed: dict[str, str]
    stats: ShardStats  # every completed shard of the stage, this run and earlier ones
    provenance: dict[str, Any]
    seconds: float
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)  # hints for the user (e.g. which input flag to pass)
    #: the shards this invocation covered (done now or before): a partition's or a subset's own pairs,
    #: where ``stats`` counts every job's
    job_stats: ShardStats | None = None
    #: shards done now of which no pair could be read (every row lacked its image or caption, or the shard
    #: could not be opened): shard -> why. They have tables and markers, yet the run did not do its job
    shards_unusable: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.shards_failed and not self.interrupted and not self.shards_unusable

    @property
    def run_dir(self) -> Path | str:
        """The run folder: a local path, or the fsspec URL of a folder on object storage."""
        return Path(self.run_url) if "://" not in self.run_url else self.run_url

    def to_json(self) -> dict[str, Any]:
        """The summary as one JSON-ready object (what ``--json`` prints); stats add ``shards_done``."""
        return {
            "run_dir": str(self.run_dir),
            "stage": self.stage,
            "shards_total": self.shards_total,
            "shards_completed": list(self.shards_completed),
            "shards_skipped": list(self.shards_skipped),
            "shards_failed": dict(self.shards_failed),
            "shards_unusable": dict(self.shards_unusable),
            "stats": {"shards_done": self.stats.shards, **self.stats.to_json()},
            "provenance": self.provenance,
            "seconds": self.seconds,
            "interrupted": self.interrupted,
            "notes": list(self.notes),
            "ok": self.ok,
            # this invocation's shards (a partition's own), where "stats" counts every job's
            **({"job_stats": self.job_stats.to_json()} if self.job_stats is not None else {}),
        }


def run_stage(
    run: str | RunFolder,
    stage: Stage,
    *,
    sources: Sequence[ShardSource] | None = None,
    inputs: Sequence[str] = (),
    read_options: dict[str, Any] | None = None,
    executor: Executor | None = None,
    overwrite: Overwrite = False,
    show_progress: bool = False,
    partition: str | None = None,
) -> StageSummary:
    """Run ``stage`` on ``sources`` (new ones are added to the run) or on all of the run's sources.

    ``partition="i/N"``: this job is one of N scoring disjoint shards into the same folder at once.
    It registers every source (so the run's completeness counts the shares of jobs that never ran)
    and runs its share (:func:`partition_sources`); a job of another N is refused while the stage
    has shards left.
    """
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    executor = executor or LocalExecutor()
    if partition is not None and overwrite:
        raise ValueError("--overwrite cannot be combined with --partition (the other partitions share the folder)")
    with RunLock(folder, partition=partition):
        if overwrite == "run":
            folder.clear()
        elif overwrite == "stage":
            folder.stage(stage.name).clear()
        if sources is None:
            record = folder.read_record()
            registered = list(folder.sources().values())
            read = dict(record.get("read") or {})
        else:
            read = dict(read_options or {})
            partitions = (stage.name, parse_partition(partition)[1]) if partition is not None else None
            registered = folder.open(inputs, list(sources), read, partitions=partitions)
            if partition is not None:
                registered = partition_sources(registered, partition)
        stage_folder = folder.stage(stage.name)
        stage_folder.create()
        fingerprint = stage_folder.check_or_write_settings(
            {
                "kind": stage.kind,
                "name": stage.name,
                "options": stage.options.model_dump(mode="json"),
                "identity": stage.identity(),
                "fingerprint": stage.fingerprint(),
                "created": now_iso(),
            }
        )
        provenance = stage_folder.read_provenance()
        if not provenance:  # the first run's record stays: a resume has the same fingerprint
            provenance = {
                "mlmfilter": __version__,
                "python": platform.python_version(),
                "fingerprint": fingerprint,
                "stage": stage.name,
                **stage.provenance(),
            }
            stage_folder.write_provenance(provenance)

        todo, skipped = [], []
        for source in registered:
            (skipped if stage_folder.verify(source.id, source, fingerprint) else todo).append(source)
        if skipped:
            log.info("stage %s: %d of %d shards already done", stage.name, len(skipped), len(registered))
        tasks = [
            StageTask(
                shard_id=s.id,
                source=s,
                run_url=folder.url,
                stage_name=stage.name,
                read_options=read,
                source_identity=source_identity(s),
            )
            for s in todo
        ]
        with RunProgress(stage.name, len(tasks), enabled=show_progress, sources=[t.source for t in tasks]) as progress:
            report: ExecutionReport = executor.run(tasks, stage, fingerprint, progress)
        stats = stage_folder.write_merged_stats()
        covered = {*report.completed, *(s.id for s in skipped)}
        job_stats = ShardStats.total(
            part for part in (stage_folder.read_stats(sid) for sid in sorted(covered)) if part is not None
        )
    return StageSummary(
        run_url=folder.url,
        stage=stage.name,
        shards_total=len(registered),
        shards_completed=report.completed,
        shards_skipped=[s.id for s in skipped],
        shards_failed=report.failed,
        stats=stats,
        provenance=provenance,
        seconds=report.seconds,
        interrupted=report.interrupted,
        job_stats=job_stats,
    )


def write_tables(
    run: str | RunFolder,
    stage_name: str,
    tables: dict[str, "pa.Table"],
    *,
    sources: Sequence[ShardSource] | None = None,
    identity: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> RunFolder:
    """Put ready-made tables into a run as a completed stage (imported score dumps, synthetic runs).

    ``tables`` maps shard id -> table (with uid, shard, key, ..., error, error_detail; or uid_f0/uid_f1).
    ``sources`` are the input shards the tables describe (registered under the same ids, so that
    ``reshard`` can read them); without them the shards are registered as ``imported:<id>``.
    """
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    by_id = {s.id: s for s in sources or []}
    with RunLock(folder):
        record = (
            folder.read_record()
            if folder.is_run
            else {"mlmfilter": __version__, "created": now_iso(), "inputs": [], "read": {}, "sources": {}}
        )
        for shard_id in tables:
            if shard_id not in record["sources"]:
                source = by_id.get(shard_id)
                entry = source_identity(source) if source else {"url": f"imported:{shard_id}", "format": "parquet"}
                record["sources"][shard_id] = {**entry, "added": now_iso()}
        folder.storage.makedirs("logs")
        folder._write_record(record)
        stage_folder = folder.stage(stage_name)
        stage_folder.create()
        identity = identity or {"kind": "imported", "stage": stage_name}
        fingerprint = stage_folder.check_or_write_settings(
            {
                "kind": identity.get("kind", "imported"),
                "name": stage_name,
                "options": {},
                "identity": identity,
                "fingerprint": fingerprint_of(identity),
                "created": now_iso(),
            }
        )
        stage_folder.write_provenance({"mlmfilter": __version__, "fingerprint": fingerprint, **(provenance or {})})
        for shard_id, table in tables.items():
            stats = ShardStats(shards=1)
            errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * table.num_rows
            stats.add_rows(errors)
            marker = {
                "shard": shard_id,
                "source": record["sources"][shard_id],
                "fingerprint": fingerprint,
                "finished": now_iso(),
            }
            stage_folder.finish_shard(shard_id, table, stats, marker)
        stage_folder.write_merged_stats()
    return folder


def parse_partition(text: str) -> tuple[int, int]:
    index, _, total = text.partition("/")
    try:
        i, n = int(index), int(total)
    except ValueError:
        raise ValueError(f"--partition takes i/N (e.g. 0/8), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--partition {text!r}: need 0 <= i < N")
    return i, n


def partition_sources(sources: Sequence[ShardSource], partition: str) -> list[ShardSource]:
    """The share of job i of N: a stable hash of each url, so the split does not depend on the
    other inputs, their order, or on which machine lists them."""
    import hashlib

    i, n = parse_partition(partition)
    return [s for s in sources if int(hashlib.blake2b(s.url.encode(), digest_size=8).hexdigest(), 16) % n == i]
