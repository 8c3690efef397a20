"""Scorer interface: a batch of samples in, named score columns out.

The base class owns batching, error isolation, timing and stats, so a subclass
implements only :meth:`Scorer.score_batch` (and :meth:`Scorer.setup` / :meth:`Scorer.close`
if it loads a model, :meth:`Scorer.wants_gpu` if that model may run on a GPU).
Modelled on datatrove's PipelineStep.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from mlmfilter.core import errors
from mlmfilter.core.errors import is_infrastructure_failure
from mlmfilter.core.identity import options_identity, stable_identity
from mlmfilter.core.sample import Sample
from mlmfilter.core.stats import BlockStats

log = logging.getLogger(__name__)


@dataclass
class ScoreFailure:
    """Returned in place of a score dict when one sample of a batch cannot be scored."""

    reason: str
    detail: str = ""
    partial: dict[str, Any] = field(default_factory=dict)  # columns worth keeping anyway (e.g. raw text)


#: where the scoring stage keeps a digest of a pair's encoded image bytes for scorers that want it
IMAGE_DIGEST_META = "image_digest"

#: a scorer's lifetime counters (seen / done / skipped / failed by reason / batches / seconds)
ScorerStats = BlockStats


class ShardRefused(RuntimeError):
    """A scorer refuses a shard's results as a whole (a judge that does not answer with a score): the
    shard fails with this line, no table and no marker, so nothing is decided on them."""


class ScorerOptions(BaseModel):
    """Settings every scorer has; a scorer subclasses this as its ``Options``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    batch_size: int = 32


class Scorer(ABC):
    """Subclasses set ``name``, ``columns`` and ``Options`` and implement ``score_batch``."""

    Options: type[ScorerOptions] = ScorerOptions

    name: str = "scorer"
    #: output columns and their arrow types; every score dict uses exactly these keys
    columns: dict[str, pa.DataType] = {}
    #: shorter image side the scorer wants (the decoder resizes once to the max over scorers);
    #: None means the scorer does not look at pixels
    image_size: int | None = None
    #: the option that names the model it loads (a hub id or a local path); None: it loads no model by name
    model_option: str | None = None
    #: it reads ``sample.meta["image_digest"]``, a digest of the encoded image bytes that the scoring
    #: stage then computes before decoding drops them
    wants_image_digest: bool = False

    def __init__(self, options: ScorerOptions | None = None):
        self.options = options if options is not None else self.Options()
        self.batch_size = self.options.batch_size
        self.stats = ScorerStats()
        self._ready = False

    # -- to implement -------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models. Called once per worker process, lazily, before the first batch."""

    def close(self) -> None:
        """Release what :meth:`setup` built (weights, engines, HTTP clients); a later batch sets up again."""

    def wants_gpu(self) -> bool:
        """Its model runs in this process on a GPU, so each worker process gets a device of its own.

        Answered from the options alone: nothing is loaded to answer it.
        """
        return False

    def check_shard(self, stats: BlockStats) -> None:
        """Called by a stage after each shard with this scorer's counts there; raises :class:`ShardRefused`
        when the shard's scores as a whole cannot be trusted. By default every shard is accepted."""

    @abstractmethod
    def score_batch(self, samples: Sequence[Sample]) -> list[dict[str, Any] | ScoreFailure]:
        """Score ``samples`` (all without error). Return one dict (or ScoreFailure) per sample."""

    def provenance(self) -> dict[str, Any]:
        """What a reader of the scores needs to trust or reproduce them."""
        return {"scorer": self.name, "columns": list(self.columns)}

    def identity(self) -> dict[str, Any]:
        """Settings, resolved model (hub commit or content hash, random or not) and library versions:
        what a resumed run must share with the first one. Derived from :meth:`provenance`."""
        return {
            "scorer": self.name,
            "options": options_identity(self.options.model_dump(mode="json")),
            "provenance": stable_identity(self.provenance()),
        }

    # -- owned by the base --------------------------------------------------------------------
    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def schema_fields(self) -> list[pa.Field]:
        return [pa.field(name, dtype) for name, dtype in self.columns.items()]

    def empty_row(self) -> dict[str, Any]:
        return {name: None for name in self.columns}

    def wants(self, sample: Sample) -> bool:
        return not sample.skipped and sample.error is None

    def score(self, samples: Sequence[Sample], stats: BlockStats | None = None) -> list[dict[str, Any]]:
        """Score samples in batches; one row per sample, in order. Never raises for one bad sample.

        Counts go to the scorer's lifetime ``self.stats`` and, when given, to ``stats`` (a shard's).
        Infrastructure failures (out of memory, device loss) do raise: they are not the sample's.
        """
        shard = stats if stats is not None else BlockStats()
        rows = [self.empty_row() for _ in samples]
        todo = [i for i, s in enumerate(samples) if self.wants(s)]
        for target in (self.stats, shard):
            target.seen += len(samples)
            target.skipped += len(samples) - len(todo)
        if not todo:
            return rows
        self.ensure_setup()
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            batch = [samples[i] for i in idx]
            t0 = time.perf_counter()
            results = self._score_isolated(batch)
            elapsed = time.perf_counter() - t0
            for target in (self.stats, shard):
                target.seconds += elapsed
                target.batches += 1
            for i, result in zip(idx, results):
                if isinstance(result, ScoreFailure):
                    rows[i].update(result.partial)
                    samples[i].fail(result.reason, f"{self.name}: {result.detail}")
                    self.stats.failed[result.reason] += 1
                    shard.failed[result.reason] += 1
                else:
                    rows[i].update(result)
                    self.stats.done += 1
                    shard.done += 1
        return rows

    def _score_isolated(self, batch: list[Sample]) -> list[dict[str, Any] | ScoreFailure]:
        try:
            results = self.score_batch(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name} returned {len(results)} results for {len(batch)} samples")
            return results
        except Exception as exc:  # one bad sample must not sink its batch: retry one by one
            if is_infrastructure_failure(exc):
                raise
            if len(batch) == 1:
                log.debug("%s failed on %s", self.name, batch[0].uid, exc_info=True)
                return [ScoreFailure(errors.SCORER_ERROR, f"{type(exc).__name__}: {exc}")]
            log.warning("%s: batch of %d failed (%s); retrying one by one", self.name, len(batch), exc)
            return [r for s in batch for r in self._score_isolated([s])]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size})"


class BackendScorer(Scorer):
    """A scorer whose model runs behind a :class:`~mlmfilter.judge.backend.JudgeBackend`: one given to it
    (then it is ready at once, and closing it is its caller's business) or one its :meth:`setup` builds
    and :meth:`close` closes."""

    def __init__(self, options: ScorerOptions | None = None, backend: Any = None):
        super().__init__(options)
        self.backend = backend
        self._owns_backend = False
        if backend is not None:
            self._ready = True

    def own_backend(self, backend: Any) -> None:
        """Take ``backend``, built by :meth:`setup`: :meth:`close` closes it."""
        self.backend, self._owns_backend = backend, True

    def close(self) -> None:
        if self.backend is not None and self._owns_backend:
            self.backend.close()
            self.backend, self._owns_backend, self._ready = None, False, False
