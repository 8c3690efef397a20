"""A stage turns one input shard into one table plus stats; the run layer does everything else.

Scoring is the first stage (:mod:`mlmfilter.scorers.stage`); teacher labelling, caption
enhancement, evaluation and resharding are others. A stage implements only its own work:

- ``kind`` (recorded in ``stage.yaml`` and the identity; the default folder name ``RUN/<kind>/``)
  and an ``Options`` pydantic model;
- :meth:`schema`: the arrow schema of its table, starting with ``uid, shard, key`` and ending
  with ``error, error_detail`` (:func:`identity_schema` builds those ends);
- :meth:`identity`: everything that changes its output (settings, resolved model identity,
  library versions); hashed into the stage fingerprint that a resume must match;
- :meth:`setup` (load models: once per worker process) and :meth:`close`;
- :meth:`process`: the rows of one shard, as record batches, recording counters in ``task.stats``;
- where it differs from the defaults: :meth:`wants_gpu` (the executors give each worker process its
  own devices) and :meth:`worker_info` (what the executors record per shard, e.g. pool processes).

A stage is found by its class path (:class:`StageSpec`): a new stage is one new file, and no list
in the run layer names it. Worker processes rebuild it from that spec.

The runner (:func:`mlmfilter.runs.runner.run_stage`) owns the run folder: locking, source
registration, fingerprint checks, markers, atomic writes, resume, logs, stats and provenance.
A stage never writes into the run folder itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from mlmfilter.core.classes import class_path, import_class
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
    """Subclasses set ``kind`` and ``Options`` and implement schema, identity and process."""

    #: the stage type, as stage.yaml and the identity record it (never change a released kind: the
    #: fingerprint of existing runs includes it); the default of ``name``, its folder in a run
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

    def wants_gpu(self) -> bool:
        """Whether a worker of this stage runs a model on an accelerator, so that each worker
        process gets its own share of the visible devices. Assumed unless a stage says otherwise."""
        return True

    def worker_info(self) -> dict[str, Any]:
        """What this stage runs with in its worker process (e.g. its decode pool's processes),
        recorded by the executors for each shard it runs."""
        return {}

    # -- owned by the base ------------------------------------------------------------------------
    def fingerprint(self) -> str:
        return fingerprint_of(self.identity())

    def spec(self) -> "StageSpec":
        return StageSpec(
            stage_class=class_path(type(self)), name=self.name, options=self.options.model_dump(mode="json")
        )


class StageSpec(BaseModel):
    """A stage by class path, folder name and options: what a worker process rebuilds it from.

    Only sent to workers, never written into a run folder (stage.yaml records ``kind``).
    """

    model_config = ConfigDict(extra="forbid")
    stage_class: str  # "package.module:Class"
    name: str | None = None
    options: dict[str, Any] = {}

    def build(self) -> Stage:
        cls: type[Stage] = import_class(self.stage_class, Stage)
        return cls(cls.Options(**self.options), name=self.name or cls.kind)


def identity_schema(columns: list[pa.Field]) -> pa.Schema:
    """``uid, shard, key`` + ``columns`` + ``error, error_detail``: every stage table's shape."""
    head = [pa.field("uid", pa.string()), pa.field("shard", pa.string()), pa.field("key", pa.string())]
    tail = [pa.field("error", pa.string()), pa.field("error_detail", pa.string())]
    return pa.schema(head + list(columns) + tail)
