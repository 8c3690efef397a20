"""`eval corrupt`: what each filter catches, on the user's own pairs.

For each pair read from the shards, :class:`~mlmfilter.teach.negatives.NegativeGenerator` makes
corrupted captions (another pair's caption, swapped nouns / attributes / counts, shuffled words,
truncation, typos, alt-text boilerplate). The true caption and its corruptions are scored against
the same decoded image; per score column and corruption kind we report how often the true caption
scores strictly higher (win rate; ties and losses too) and the AUC of telling true captions from
corrupted ones by that score. Higher scores are taken as better: a column where lower is better
(e.g. ``rules_aspect_ratio``) reads inverted, and columns that ignore the caption tie throughout.

Pairs are read in shard order up to ``limit`` (the first N usable pairs): the check wants a few
hundred pairs, not a dataset, and other-caption negatives are drawn from the pairs read.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from typing import Any, Iterator, Sequence

from mlmfilter.core.sample import Sample
from mlmfilter.evaluation.metrics import paired_comparison
from mlmfilter.evaluation.scoring import PairScorer, pair_uid
from mlmfilter.teach.negatives import CORRUPTION_KINDS, NegativeGenerator

TRUE_KEY = "true"
EXAMPLES_PER_KIND = 3


class CorruptionCheck:
    """Score true and corrupted captions; compare them per column and kind."""

    def __init__(self, scorer: PairScorer, generator: NegativeGenerator, columns: Sequence[str] | None = None):
        unknown = sorted(set(columns or ()) - set(scorer.all_columns))
        if unknown:
            raise ValueError(
                f"unknown score columns {', '.join(unknown)}; the scorers give: {', '.join(scorer.all_columns)}"
            )
        self.scorer = scorer
        self.generator = generator
        self.columns = list(columns) if columns else scorer.columns

    def evaluate(self, samples: Sequence[Sample], *, read_errors: dict[str, int] | None = None) -> dict[str, Any]:
        """``samples``: usable pairs (caption and image bytes, no error) as a reader yields them."""
        started = time.perf_counter()
        pool = [s.caption for s in samples]
        # a photo may come with several captions (Flickr, COCO): those of the same image are no negatives
        digests = [_image_digest(s) for s in samples]
        by_image: dict[str, set[str]] = defaultdict(set)
        for sample, digest in zip(samples, digests):
            by_image[digest].add(sample.caption)
        made: Counter[str] = Counter()
        examples: dict[str, list[dict[str, str]]] = defaultdict(list)
        rows: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # original uid -> key -> score row
        errors: Counter[str] = Counter()
        for sample, row in self.scorer.score(self._variants(zip(samples, digests), pool, by_image, made, examples)):
            if row["error"]:
                errors[row["error"]] += 1
            else:
                rows[sample.meta["original_uid"]][sample.key] = row
        kinds = list(self.generator.kinds)
        columns = {}
        for column in self.columns:
            per_kind = {}
            for kind in [*kinds, "all"]:
                true, corrupted = [], []
                for variants in rows.values():
                    truth = variants.get(TRUE_KEY, {}).get(column)
                    if truth is None:
                        continue
                    for key, row in variants.items():
                        if key != TRUE_KEY and (kind == "all" or key == kind) and row[column] is not None:
                            true.append(float(truth))
                            corrupted.append(float(row[column]))
                per_kind[kind] = paired_comparison(true, corrupted).to_json()
            columns[column] = per_kind
        provenance = self.scorer.provenance()
        return {
            "pairs": len(samples),
            "read_errors": dict(read_errors or {}),
            "pairs_scored": sum(1 for v in rows.values() if TRUE_KEY in v),
            "score_errors": dict(errors),
            "seed": self.generator.seed,
            "kinds": {k: {"made": made[k], "not_applicable": made["_tried"] - made[k]} for k in kinds},
            "columns": columns,
            "examples": dict(examples),
            "direction": "higher is better for every column; win = true caption scores strictly higher",
            "warnings": provenance["warnings"],
            "scorers": provenance["scorers"],
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _variants(self, samples, pool, by_image, made: Counter, examples) -> Iterator[Sample]:
        for sample, digest in samples:
            own = by_image[digest]
            others = pool if len(own) == 1 else [c for c in pool if c not in own]
            decoded = self.scorer.decoded(sample)  # once per image; its variants share it
            original = PairScorer.share_image(decoded, decoded.uid, TRUE_KEY, decoded.caption)
            original.meta["original_uid"] = decoded.uid
            yield original
            if not decoded.ok:
                continue  # the image failed: its row counts the error, corrupting the caption adds nothing
            made["_tried"] += 1
            for negative in self.generator.corrupt(decoded.caption, uid=decoded.uid, other_captions=others):
                made[negative.kind] += 1
                if len(examples[negative.kind]) < EXAMPLES_PER_KIND:
                    examples[negative.kind].append(
                        {"original": negative.original, "corrupted": negative.caption, "detail": negative.detail}
                    )
                variant = PairScorer.share_image(
                    decoded, pair_uid(decoded.uid, negative.kind), negative.kind, negative.caption
                )
                variant.meta["original_uid"] = decoded.uid
                yield variant


def _image_digest(sample: Sample) -> str:
    return hashlib.blake2b(sample.image_bytes or b"", digest_size=16).hexdigest()


def read_pairs(inputs: Sequence[str], limit: int, allow_pipe: bool = False) -> tuple[list[Sample], dict[str, int]]:
    """The first ``limit`` usable pairs of the shards, and the reader's error rows counted by reason."""
    from mlmfilter.io.readers import read_shard
    from mlmfilter.io.sources import expand_inputs

    if limit < 1:
        raise ValueError("--limit must be at least 1")
    pairs, errors = [], Counter()
    for source in expand_inputs(list(inputs), allow_pipe=allow_pipe):
        for sample in read_shard(source):
            if not sample.ok:
                errors[sample.error] += 1
                continue
            if not (sample.caption or "").strip():
                errors["empty_caption"] += 1
                continue
            pairs.append(sample)
            if len(pairs) >= limit:
                return pairs, dict(errors)
    return pairs, dict(errors)


__all__ = ["CorruptionCheck", "read_pairs", "CORRUPTION_KINDS"]
