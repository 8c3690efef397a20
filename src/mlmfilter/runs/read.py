"""One read API for a run's tables: selection, reports, evaluation and later stages use it.

Every read names its stage (a run may hold several; the run layer knows none of them by name).
Only completed shards are read (a table without its marker may still be being written or be
left from a killed run). Tables of a stage are one pyarrow dataset with a unified schema (a
column that is all null in one shard widens to the others' type).
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mlmfilter.core.stats import ShardStats
from mlmfilter.io.sources import ShardSource
from mlmfilter.runs.folder import Completeness, RunError, RunFolder


class RunReader:
    def __init__(self, run: str | os.PathLike | RunFolder):
        self.folder = run if isinstance(run, RunFolder) else RunFolder(run)
        if not self.folder.is_run:
            raise RunError(f"{self.folder.url} is not a run folder (no run.yaml); make one with `mlmfilter score`")
        self.url = self.folder.url

    def stages(self) -> list[str]:
        return self.folder.stages()

    def sources(self) -> dict[str, ShardSource]:
        return self.folder.sources()

    def read_options(self) -> dict[str, Any]:
        return self.folder.read_options()

    def _stage(self, stage: str):
        folder = self.folder.stage(stage)
        if not folder.exists:
            known = ", ".join(self.stages()) or "none"
            raise RunError(f"{self.url} has no stage {stage!r} (stages: {known})")
        return folder

    def table_files(self, stage: str) -> list[str]:
        """Tables of the completed shards, in shard-id order (full paths or object keys)."""
        folder = self._stage(stage)
        rels = [folder.table_rel(sid) for sid in folder.done_shards()]
        return [self.folder.storage.path(rel) for rel in rels if self.folder.storage.exists(rel)]

    def table(self, shard_id: str, stage: str, columns: list[str] | None = None) -> pa.Table | None:
        """One completed shard's table, or None if the shard is not done."""
        folder = self._stage(stage)
        if folder.read_marker(shard_id) is None:
            return None
        storage = self.folder.storage
        with storage.fs.open(storage.path(folder.table_rel(shard_id)), "rb") as fh:
            return pq.read_table(fh, columns=columns)

    def schema(self, stage: str) -> pa.Schema:
        files = self.table_files(stage)
        if not files:
            raise RunError(f"stage {stage!r} of {self.url} has no completed shard yet")
        fs = self.folder.storage.arrow_filesystem
        schemas = [pq.read_schema(f, filesystem=fs) for f in files]
        return pa.unify_schemas(schemas, promote_options="permissive")

    def dataset(self, stage: str) -> ds.Dataset:
        files = self.table_files(stage)
        if not files:
            raise RunError(f"stage {stage!r} of {self.url} has no completed shard yet")
        fs = self.folder.storage.arrow_filesystem
        return ds.dataset(files, schema=self.schema(stage), format="parquet", filesystem=fs)

    def provenance(self, stage: str) -> dict[str, Any]:
        return self._stage(stage).read_provenance()

    def settings(self, stage: str) -> dict[str, Any]:
        return self._stage(stage).read_settings() or {}

    def stats(self, stage: str) -> dict[str, Any]:
        return self._stage(stage).merged_stats().to_json()

    def shard_stats(self, shard_id: str, stage: str) -> ShardStats | None:
        """What one completed shard's run of the stage counted, or None if the shard is not done."""
        folder = self._stage(stage)
        return folder.read_stats(shard_id) if folder.read_marker(shard_id) is not None else None

    def completeness(self, stage: str) -> Completeness:
        self._stage(stage)
        return self.folder.completeness(stage)

    def marker(self, shard_id: str, stage: str) -> dict[str, Any] | None:
        return self._stage(stage).read_marker(shard_id)

    def columns_by_stage(self, exclude: tuple[str, ...] = ()) -> dict[str, list[str]]:
        """Each stage's column names (stages without a completed shard have none yet and are left out)."""
        out: dict[str, list[str]] = {}
        for stage in self.stages():
            if stage in exclude:
                continue
            try:
                out[stage] = self.schema(stage).names
            except RunError:
                continue
        return out

    def warnings(self) -> list[str]:
        """Warnings of every stage's provenance (e.g. random weights), for reports and summaries."""
        out: list[str] = []
        for stage in self.stages():
            out += [w for w in self.provenance(stage).get("warnings", []) if w not in out]
        return out
