"""The scoring stage: read -> decode (worker processes) -> scorers -> one table per shard.

The first user of the stage interface (:mod:`mlmfilter.runs.stage`). Scorers are built and
their models loaded once per worker process; so is the decode pool, which every shard of the
worker reuses.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import pyarrow as pa
from pydantic import Field, field_validator

from mlmfilter.imaging import DEFAULT_MAX_PIXELS, DecodeSpec
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.runs.stage import ProgressCallback, Stage, StageOptions, StageTask, identity_schema
from mlmfilter.sample import Sample
from mlmfilter.scorers import Scorer, build_scorer
from mlmfilter.scorers.base import iter_batches

#: the shorter side decoded for runs whose scorers look at no pixels: draft mode makes it cheap
#: and decoding still proves the image is readable and yields its size
HEADER_ONLY_SIDE = 64


class ScorerSpec(StageOptions):
    """A scorer by registry name plus its options (validated by the scorer's own Options model)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ScoringOptions(StageOptions):
    scorers: list[ScorerSpec] = Field(default_factory=lambda: [ScorerSpec(name="rules")])
    decode_workers: int = 1  # image-decoding processes per shard worker (0: decode inline)
    chunk_size: int = 64  # samples handed to the scorers at a time (decoding runs a chunk ahead)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit on the source image

    @field_validator("scorers", mode="before")
    @classmethod
    def _names_to_specs(cls, value: Any) -> Any:
        # a recipe may list plain names: `scorers: [rules, clip]`
        if isinstance(value, (list, tuple)):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


def table_schema(scorers: Sequence[Scorer]) -> pa.Schema:
    return identity_schema([f for scorer in scorers for f in scorer.schema_fields()])


def decode_spec(scorers: Sequence[Scorer], max_pixels: int) -> DecodeSpec:
    """Decode once, at the largest size any scorer wants; each scorer crops/normalises from there."""
    sizes = [s.image_size for s in scorers if s.image_size]
    return DecodeSpec(shorter_side=max(sizes) if sizes else HEADER_ONLY_SIDE, max_pixels=max_pixels)


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
    return rows


class ScoringStage(Stage):
    kind = "score"
    Options = ScoringOptions

    def __init__(self, options: ScoringOptions | None = None, name: str | None = None, scorers: list[Scorer] | None = None):
        super().__init__(options, name)
        # scorers are built at once: options are validated here, before any work starts, and
        # provenance/identity come from config files without loading weights
        self.scorers = scorers if scorers is not None else [build_scorer(s.name, s.options) for s in self.options.scorers]
        self._decoder = None

    def schema(self) -> pa.Schema:
        return table_schema(self.scorers)

    def identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "scorers": [s.identity() for s in self.scorers],
            "max_pixels": self.options.max_pixels,
        }

    def provenance(self) -> dict[str, Any]:
        provenance = {"kind": self.kind, "scorers": {s.name: s.provenance() for s in self.scorers}}
        warnings = [w for p in provenance["scorers"].values() for w in p.get("warnings", [])]
        if warnings:
            provenance["warnings"] = warnings
        return provenance

    def setup(self) -> None:
        for scorer in self.scorers:
            scorer.ensure_setup()

    def _image_decoder(self):
        from mlmfilter.decode_pool import ImageDecoder

        if self._decoder is None:
            spec = decode_spec(self.scorers, self.options.max_pixels)
            # keep the decoders a whole chunk ahead of the scorers, so the model never waits on them
            self._decoder = ImageDecoder(spec, self.options.decode_workers, prefetch=2 * self.options.chunk_size)
        return self._decoder

    def process(self, task: StageTask, progress: ProgressCallback | None = None) -> Iterator[pa.RecordBatch]:
        schema = self.schema()
        samples = read_shard(task.source, ReadOptions(**task.read_options))
        decoded = self._image_decoder().decode(samples)
        for chunk in iter_batches(decoded, self.options.chunk_size):
            for sample in chunk:
                sample.image_bytes = None  # decoded or failed: the bytes are no longer needed
            rows = score_chunk(chunk, self.scorers, task.stats)
            errored = sum(1 for r in rows if r["error"])
            yield pa.RecordBatch.from_pylist(rows, schema=schema)
            if progress:
                progress(len(rows), errored)

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
