"""The scoring stage: read -> decode (worker processes) -> scorers -> one table per shard.

The first user of the stage interface (:mod:`mlmfilter.runs.stage`). Scorers are built and
their models loaded once per worker process; so is the decode pool, which every shard of the
worker reuses.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import pyarrow as pa
from pydantic import Field, field_validator

from mlmfilter.core.batching import batched
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DEFAULT_MAX_PIXELS, DecodeSpec
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.runs.stage import ProgressCallback, Stage, StageOptions, StageTask, identity_schema
from mlmfilter.scorers import Scorer, build_scorer

#: the score stage's kind, and the folder it writes unless given another name (``--stage``)
SCORE_STAGE = "score"

#: the shorter side decoded for runs whose scorers look at no pixels: draft mode makes it cheap
#: and decoding still proves the image is readable and yields its size
HEADER_ONLY_SIDE = 64


class ScorerSpec(StageOptions):
    """A scorer by registry name plus its options (validated by the scorer's own Options model)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registry_case(cls, value: str) -> str:
        """Scorer names in any case (``CLIP``, ``Rules``), as the registry spells them."""
        from mlmfilter.scorers import REGISTRY

        folded = value.strip().lower()
        return folded if folded in REGISTRY else value


def names_to_specs(value: Any) -> Any:
    """A recipe may list plain names (`scorers: [rules, clip]`): make them specs."""
    if isinstance(value, (list, tuple)):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class ScoringOptions(StageOptions):
    scorers: list[ScorerSpec] = Field(default_factory=lambda: [ScorerSpec(name="rules")])
    decode_workers: int = 1  # image-decoding processes per shard worker (0: decode inline)
    chunk_size: int = 64  # samples handed to the scorers at a time (decoding runs a chunk ahead)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit on the source image
    #: cascade: score only the pairs passing this expression over ``only_stage``'s columns of the
    #: same run (e.g. "rules_ok and clip_cosine >= 0.2"); the others keep a row marked ``skipped``
    only: str | None = None
    only_stage: str = SCORE_STAGE
    #: score only a random fraction of the pairs (0 < sample <= 1; e.g. the judge on 1% to distill it):
    #: a pair is in the sample when a seeded hash of its uid falls below the fraction, so the same
    #: pairs are drawn whatever the sharding, the order or the workers; the others keep a row marked
    #: ``skipped``. With ``only`` too, a pair must pass both.
    sample: float | None = Field(None, gt=0, le=1)
    sample_seed: int = 0

    _names_to_specs = field_validator("scorers", mode="before")(classmethod(lambda cls, v: names_to_specs(v)))


#: how ``sample`` draws its pairs (recorded in the stage's identity)
SAMPLE_RULE = "int(blake2b(f'{seed}:{uid}', digest_size=8), big-endian) / 2**64 < fraction"


def in_sample(uid: str, fraction: float, seed: int) -> bool:
    """Whether the pair ``uid`` is in the seeded random ``fraction`` (:data:`SAMPLE_RULE`)."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def table_schema(scorers: Sequence[Scorer], cascade: bool = False) -> pa.Schema:
    fields = [f for scorer in scorers for f in scorer.schema_fields()]
    return identity_schema(fields + ([pa.field("skipped", pa.bool_())] if cascade else []))


def decode_spec(scorers: Sequence[Scorer], max_pixels: int) -> DecodeSpec:
    """Decode at the size each scorer wants, each size from the bytes on its own (``Sample.views``):
    a scorer's pixels, and so its scores, do not depend on which other scorers share the run."""
    sizes = [s.image_size for s in scorers if s.image_size]
    return DecodeSpec.for_sides(sizes, shorter_side=HEADER_ONLY_SIDE, max_pixels=max_pixels)


def score_chunk(samples: list[Sample], scorers: Sequence[Scorer], stats=None) -> list[dict[str, Any]]:
    """Rows for a chunk of decoded samples: identity columns, every scorer's columns, the first error."""
    rows = [{"uid": s.uid, "shard": s.shard, "key": s.key} for s in samples]
    for scorer in scorers:
        block = stats.block(scorer.name) if stats is not None else None
        for row, scored in zip(rows, scorer.score(samples, block)):
            row.update(scored)
    for row, sample in zip(rows, samples):
        row["error"] = sample.error
        row["error_detail"] = sample.error_detail
        if sample.skipped:
            row["skipped"] = True
    return rows


class ScoringStage(Stage):
    kind = SCORE_STAGE
    Options = ScoringOptions

    def __init__(
        self, options: ScoringOptions | None = None, name: str | None = None, scorers: list[Scorer] | None = None
    ):
        super().__init__(options, name)
        # scorers are built at once: options are validated here, before any work starts, and
        # provenance/identity come from config files without loading weights
        self.scorers = (
            scorers if scorers is not None else [build_scorer(s.name, s.options) for s in self.options.scorers]
        )
        self._decoder = None

    @property
    def cascade(self) -> bool:
        """Some pairs are left unscored (``only`` or ``sample``): the table has a ``skipped`` column."""
        return self.options.only is not None or self.options.sample is not None

    def schema(self) -> pa.Schema:
        return table_schema(self.scorers, cascade=self.cascade)

    def identity(self) -> dict[str, Any]:
        identity = {
            "kind": self.kind,
            "scorers": [s.identity() for s in self.scorers],
            "max_pixels": self.options.max_pixels,
        }
        if decode_spec(self.scorers, self.options.max_pixels).sides:
            # scorers wanting different sizes each get their own decode (before: one decode at the largest
            # size), so their pixels differ from a run folder written before: that one is not resumed
            identity["decode"] = "one decode per scorer size"
        if self.options.only is not None:
            identity["only"] = {"expression": self.options.only, "stage": self.options.only_stage}
        if self.options.sample is not None:
            identity["sample"] = {
                "fraction": self.options.sample,
                "seed": self.options.sample_seed,
                "rule": SAMPLE_RULE,
            }
        return identity

    def provenance(self) -> dict[str, Any]:
        provenance = {"kind": self.kind, "scorers": {s.name: s.provenance() for s in self.scorers}}
        warnings = [w for p in provenance["scorers"].values() for w in p.get("warnings", [])]
        if warnings:
            provenance["warnings"] = warnings
        return provenance

    def setup(self) -> None:
        self._image_decoder().start()  # decoders spawn while the models load
        for scorer in self.scorers:
            scorer.ensure_setup()

    def wants_gpu(self) -> bool:
        """A scorer runs a model in this process on a GPU (each scorer says so from its options)."""
        return any(scorer.wants_gpu() for scorer in self.scorers)

    def worker_info(self) -> dict[str, Any]:
        """The stage's one image decoder (one pool for all its shards; None before the first) and its processes."""
        decoder = self._decoder
        return {
            "decoder": id(decoder) if decoder is not None else None,
            "decode_pids": decoder.worker_pids() if decoder is not None else [],
        }

    def _image_decoder(self):
        from mlmfilter.images.pool import ImageDecoder

        if self._decoder is None:
            spec = decode_spec(self.scorers, self.options.max_pixels)
            # keep the decoders a whole chunk ahead of the scorers, so the model never waits on them
            self._decoder = ImageDecoder(spec, self._decode_workers(), prefetch=2 * self.options.chunk_size)
        return self._decoder

    def _decode_workers(self) -> int:
        """``decode_workers``, raised to what keeps a judge on a GPU fed (:func:`decode_workers_for`);
        0 (decode inline) is kept as asked."""
        from mlmfilter.images.pool import decode_workers_for

        workers = self.options.decode_workers
        if workers <= 0 or not self.wants_gpu():
            return workers
        import torch

        if not torch.cuda.is_available():
            return workers
        return max(workers, decode_workers_for())

    def process(self, task: StageTask, progress: ProgressCallback | None = None) -> Iterator[pa.RecordBatch]:
        schema = self.schema()
        samples = read_shard(task.source, ReadOptions(**task.read_options))
        if self.options.only is not None:
            samples = self._mark_skipped(samples, self._passing_keys(task), task)
        if self.options.sample is not None:
            samples = self._mark_unsampled(samples, task)
        if any(scorer.wants_image_digest for scorer in self.scorers):
            samples = _with_digests(samples)
        decoded = self._image_decoder().decode(samples)
        for chunk in batched(decoded, self.options.chunk_size):
            for sample in chunk:
                sample.image_bytes = None  # decoded or failed: the bytes are no longer needed
            rows = score_chunk(chunk, self.scorers, task.stats)
            if self.cascade:
                for row in rows:
                    row.setdefault("skipped", False)
            errored = sum(1 for r in rows if r["error"])
            yield pa.RecordBatch.from_pylist(rows, schema=schema)
            if progress:
                progress(len(rows), errored)
        for scorer in self.scorers:  # a scorer may refuse the shard's scores as a whole (a judge not judging)
            scorer.check_shard(task.stats.block(scorer.name))

    def _passing_keys(self, task: StageTask) -> set[str]:
        """Keys of this shard passing the cascade expression over the earlier stage's table."""
        from mlmfilter.selection.expression import passing_rows

        table = task.run.table(task.shard_id, self.options.only_stage)
        if table is None:  # a shard-level failure: the cascade cannot be decided yet
            raise RuntimeError(
                f"stage {self.options.only_stage!r} has not finished shard {task.shard_id!r}; run it first"
            )
        return set(passing_rows(table, self.options.only, ["key"])["key"].to_pylist())

    @staticmethod
    def _mark_skipped(samples, passing: set[str], task: StageTask):
        for sample in samples:
            if sample.ok and sample.key not in passing:
                sample.skipped = True
                sample.image_bytes = None
                task.stats.count("skipped_by_cascade")
            yield sample

    def _mark_unsampled(self, samples, task: StageTask):
        fraction, seed = self.options.sample, self.options.sample_seed
        for sample in samples:
            if sample.ok and not sample.skipped and not in_sample(sample.uid, fraction, seed):
                sample.skipped = True
                sample.image_bytes = None
                task.stats.count("skipped_by_sample")
            yield sample

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        for scorer in self.scorers:  # their models, engines and HTTP clients
            scorer.close()


def _with_digests(samples):
    """Each pair's image-bytes digest in ``meta`` (for the hash columns), before decoding drops the bytes."""
    from mlmfilter.images.phash import bytes_digest
    from mlmfilter.scorers.base import IMAGE_DIGEST_META

    for sample in samples:
        if sample.ok and not sample.skipped and sample.image_bytes:
            sample.meta[IMAGE_DIGEST_META] = bytes_digest(sample.image_bytes)
        yield sample
