"""A stage turns one input shard into one table plus stats; the run layer does everything else.

Scoring is the first stage (:mod:`mlmfilter.scorers.stage`); teacher labelling, caption
enhancement, evaluation and resharding are others. A stage implements only its own work:

- ``name`` (default folder name ``RUN/<name>/``) and an ``Options`` pydantic model;
- :meth:`schema`: the arrow schema of its table, starting with ``uid, shard, key`` and ending
  with ``error, error_detail`` (:func:`identity_schema` builds those ends);
- :meth:`identity`: everything that changes its output (settings, resolved model identity,
  library versions); hashed into the stage fingerprint that a resume must match;
- :meth:`setup` (load models: once per worker process) and :meth:`close`;
- :meth:`process`: the rows of one shard, as record batches, recording counters in ``task.stats``.

The runner (:func:`mlmfilter.runs.runner.run_stage`) owns the run folder: locking, source
registration, fingerprint checks, markers, atomic writes, resume, logs, stats and provenance.
A stage never writes into the run folder itself.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from mlmfilter.core.ids import fingerprint_of
from mlmfilter.core.stats import ShardStats
from mlmfilter.io.sources import ShardSource

if TYPE_CHECKING:
    from mlmfilter.runs.read import RunReader

#: reports (rows, errored rows) as a shard advances, for progress displays
ProgressCallback = Callable[[int, int], None]


class StageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass
class StageTask:
    """One shard of one stage; picklable, so any executor can ship it to a worker."""

    shard_id: str
    source: ShardSource
    run_url: str  # the run folder (local path or fsspec URL)
    stage_name: str
    read_options: dict[str, Any] = field(default_factory=dict)  # the run's ReadOptions fields
    source_identity: dict[str, Any] = field(default_factory=dict)  # size/mtime/etag when registered
    stats: ShardStats = field(default_factory=ShardStats)

    @property
    def run(self) -> "RunReader":
        """Read access to the run (other stages' tables of this shard, the run's read options)."""
        from mlmfilter.runs.read import RunReader

        return RunReader(self.run_url)


class Stage(ABC):
    """Subclasses set ``kind``/``name`` and ``Options`` and implement schema, identity and process."""

    #: registry name of the stage type (what a spec names); ``name`` is its folder in a run
    kind: str = "stage"
    Options: type[StageOptions] = StageOptions

    def __init__(self, options: StageOptions | None = None, name: str | None = None):
        self.options = options if options is not None else self.Options()
        self.name = name or self.kind

    # -- to implement -----------------------------------------------------------------------------
    @abstractmethod
    def schema(self) -> pa.Schema:
        """The table's schema: ``uid, shard, key``, the stage's columns, ``error, error_detail``."""

    def identity(self) -> dict[str, Any]:
        """What decides the output; a resume under a different identity is refused."""
        return {"kind": self.kind, "options": self.options.model_dump(mode="json")}

    def setup(self) -> None:
        """Load models. Called once per worker process before its first shard."""

    @abstractmethod
    def process(self, task: StageTask, progress: ProgressCallback | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of ``schema()`` covering every pair of the shard (one row each)."""

    def provenance(self) -> dict[str, Any]:
        """What a reader of the table needs to trust or reproduce it (models, versions, warnings)."""
        return {"kind": self.kind}

    def close(self) -> None:
        """Release models, pools and connections."""

    # -- owned by the base ------------------------------------------------------------------------
    def fingerprint(self) -> str:
        return fingerprint_of(self.identity())

    def spec(self) -> "StageSpec":
        return StageSpec(kind=self.kind, name=self.name, options=self.options.model_dump(mode="json"))


class StageSpec(BaseModel):
    """A stage by registry kind, folder name and options: what a worker process rebuilds it from."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    name: str | None = None
    options: dict[str, Any] = {}

    def build(self) -> Stage:
        cls = stage_class(self.kind)
        return cls(cls.Options(**self.options), name=self.name or cls.kind)


#: kind -> "module:Class"; imported lazily so that a rules-only run never imports torch
STAGE_REGISTRY: dict[str, str] = {
    "score": "mlmfilter.scorers.stage:ScoringStage",
    "enhance": "mlmfilter.enhance.stage:EnhanceStage",
    "teach_label": "mlmfilter.teach.stage:TeachLabelStage",
}


def stage_class(kind: str) -> type[Stage]:
    try:
        module, cls = STAGE_REGISTRY[kind].split(":")
    except KeyError:
        raise ValueError(f"unknown stage {kind!r}; known: {', '.join(sorted(STAGE_REGISTRY))}") from None
    return getattr(importlib.import_module(module), cls)


def identity_schema(columns: list[pa.Field]) -> pa.Schema:
    """``uid, shard, key`` + ``columns`` + ``error, error_detail``: every stage table's shape."""
    head = [pa.field("uid", pa.string()), pa.field("shard", pa.string()), pa.field("key", pa.string())]
    tail = [pa.field("error", pa.string()), pa.field("error_detail", pa.string())]
    return pa.schema(head + list(columns) + tail)
