"""Score evaluation pairs with the same scorers, decoder and chunking a run uses.

Evaluation pairs are not shards: a human-judgement set names image files and captions, a
corruption check makes several captions for one image. Both become :class:`~mlmfilter.core.sample.Sample`
objects scored by :func:`mlmfilter.scorers.stage.score_chunk`, after the one decode path
(:func:`mlmfilter.images.decode.decode_sample`) at the size :func:`mlmfilter.scorers.stage.decode_spec`
picks for the scorers. An image is decoded once and shared by all the captions scored against it.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa

from mlmfilter.core.batching import batched
from mlmfilter.core.ids import uid_of
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DEFAULT_MAX_PIXELS, decode_sample


def pair_uid(*parts: str) -> str:
    """A stable uid for an evaluation pair (no shard to derive it from)."""
    return uid_of("\x00".join(parts))


#: a judge's readout diagnostics beside each score (probability mass on a number, spread, mass left
#: unplaced): they say how sure the readout was, they do not score the pair; evaluated only when named
DIAGNOSTIC_SUFFIXES = ("_mass", "_std", "_unplaced")


def correlatable_columns(scorers, diagnostics: bool = False) -> list[str]:
    """The score columns a correlation or a win rate can be computed on (numbers and booleans);
    the readout diagnostics (``itm_mass``, ``itm_std``) only with ``diagnostics``."""
    wanted = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    return [
        name
        for s in scorers
        for name, dtype in s.columns.items()
        if any(test(dtype) for test in wanted) and (diagnostics or not name.endswith(DIAGNOSTIC_SUFFIXES))
    ]


class PairScorer:
    """Scorers built from ``mlmfilter score``-style specs, scoring decoded samples chunk by chunk."""

    def __init__(self, specs: Sequence[dict[str, Any]], max_pixels: int = DEFAULT_MAX_PIXELS, chunk_size: int = 64):
        from mlmfilter.scorers import build_scorer
        from mlmfilter.scorers.stage import decode_spec

        if not specs:
            raise ValueError("give at least one scorer (--scorer rules,clip ...)")
        self.scorers = [build_scorer(s["name"], s.get("options")) for s in specs]
        self.decode = decode_spec(self.scorers, max_pixels)
        self.chunk_size = chunk_size

    @property
    def columns(self) -> list[str]:
        """The columns evaluated unless others are named: the scores, not the readout diagnostics."""
        return correlatable_columns(self.scorers)

    @property
    def all_columns(self) -> list[str]:
        """Every column that can be named (``--column itm_mass`` too)."""
        return correlatable_columns(self.scorers, diagnostics=True)

    def decoded(self, sample: Sample) -> Sample:
        return decode_sample(sample, self.decode)

    def score(self, samples: Iterable[Sample]) -> Iterator[tuple[Sample, dict[str, Any]]]:
        """(sample, row) in input order; a sample that fails (decode or scorer) has ``error`` set in its row."""
        from mlmfilter.scorers.stage import score_chunk

        for chunk in batched(samples, self.chunk_size):
            for sample in chunk:
                self.decoded(sample)
            yield from zip(chunk, score_chunk(chunk, self.scorers))

    def provenance(self) -> dict[str, Any]:
        scorers = {s.name: s.provenance() for s in self.scorers}
        return {"scorers": scorers, "warnings": [w for p in scorers.values() for w in p.get("warnings", [])]}

    @staticmethod
    def share_image(source: Sample, uid: str, key: str, caption: str) -> Sample:
        """A sample with another caption for an already decoded image (the decoder leaves it as is)."""
        sample = Sample(
            uid=uid,
            shard=source.shard,
            key=key,
            caption=caption,
            image_format=source.image_format,
            image=source.image,
            width=source.width,
            height=source.height,
        )
        if not source.ok:
            sample.fail(source.error, source.error_detail or "")
        return sample
