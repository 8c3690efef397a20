"""`eval human`: score a judgement set's pairs and correlate every score column with the humans.

Each distinct (image, caption) pair is scored once and its scores stand for all of its ratings
(the three flattened Expert scores share one model score). A judgement whose image file is not in
the images folder is counted and its image listed, never silently ignored; a pair the decoder or a
scorer rejects is counted by reason. Correlations use the judgements that have a score.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

from mlmfilter.core.sample import Sample
from mlmfilter.evaluation.human import Judgement, JudgementSet
from mlmfilter.evaluation.metrics import CORRELATIONS, correlations
from mlmfilter.evaluation.scoring import PairScorer, pair_uid
from mlmfilter.io.readers.samples import sniff_image_format

#: listed in full up to this many; the count is always complete
MAX_LISTED_MISSING = 200


class ImageFolder:
    """Image files named relative to one folder; a name that leads outside it is not opened."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"images folder {self.root} not found")
        self._resolved = self.root.resolve()

    def path(self, name: str) -> Path | None:
        path = (self.root / name).resolve()
        if self._resolved not in path.parents or not path.is_file():
            return None
        return path


class HumanAgreement:
    """Correlations of each score column with a :class:`JudgementSet`'s human ratings."""

    def __init__(
        self,
        scorer: PairScorer,
        *,
        n_resamples: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
        columns: Sequence[str] | None = None,
    ):
        unknown = sorted(set(columns or ()) - set(scorer.all_columns))
        if unknown:
            raise ValueError(
                f"unknown score columns {', '.join(unknown)}; the scorers give: {', '.join(scorer.all_columns)}"
            )
        self.scorer = scorer
        self.columns = list(columns) if columns else scorer.columns
        self.n_resamples, self.confidence, self.seed = n_resamples, confidence, seed

    def evaluate(self, judgements: JudgementSet, images: str | Path) -> dict[str, Any]:
        started = time.perf_counter()
        folder = ImageFolder(images)
        by_image: dict[str, list[Judgement]] = defaultdict(list)
        for judgement in judgements.judgements:
            by_image[judgement.image].append(judgement)
        missing = sorted(name for name in by_image if folder.path(name) is None)
        scores: dict[tuple[str, str], dict[str, Any]] = {}
        errors: Counter[str] = Counter()
        for sample, row in self.scorer.score(self._samples(by_image, folder, set(missing))):
            pair = (sample.meta["image"], sample.caption)
            if row["error"]:
                errors[row["error"]] += 1
            else:
                scores[pair] = row
        missing_judgements = sum(len(by_image[name]) for name in missing)
        columns = {}
        for column in self.columns:
            pairs = [
                (scores[(j.image, j.caption)][column], j.rating)
                for j in judgements.judgements
                if (j.image, j.caption) in scores and scores[(j.image, j.caption)][column] is not None
            ]
            x, y = [float(p[0]) for p in pairs], [p[1] for p in pairs]
            estimates = correlations(x, y, n_resamples=self.n_resamples, confidence=self.confidence, seed=self.seed)
            columns[column] = {"n": len(pairs), **{name: estimates[name].to_json() for name in CORRELATIONS}}
        provenance = self.scorer.provenance()
        return {
            "benchmark": judgements.benchmark,
            "annotations": judgements.source,
            "images": str(images),
            "aggregation": judgements.aggregation,
            "headline": f"kendall_tau_{judgements.headline_tau}",
            "judgements": len(judgements.judgements) + sum(judgements.dropped.values()),
            "dropped_by_protocol": judgements.dropped,
            "judgements_evaluated": len(judgements.judgements),
            "pairs": len({(j.image, j.caption) for j in judgements.judgements}),
            "images_total": len(by_image),
            "images_missing": len(missing),
            "judgements_missing_image": missing_judgements,
            "missing_images": missing[:MAX_LISTED_MISSING],
            "pairs_scored": len(scores),
            "pair_errors": dict(errors),
            "judgements_scored": sum(1 for j in judgements.judgements if (j.image, j.caption) in scores),
            "columns": columns,
            "bootstrap": {
                "n_resamples": self.n_resamples,
                "confidence": self.confidence,
                "seed": self.seed,
                "method": "percentile, resampling judgements with replacement",
            },
            "warnings": provenance["warnings"],
            "scorers": provenance["scorers"],
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _samples(
        self, by_image: dict[str, list[Judgement]], folder: ImageFolder, missing: set[str]
    ) -> Iterator[Sample]:
        for image in sorted(by_image):
            if image in missing:
                continue
            data = folder.path(image).read_bytes()
            # decode once: every caption of the image shares the decoded picture (or its decode error)
            decoded = self.scorer.decoded(
                Sample(
                    uid=pair_uid(image),
                    shard="eval",
                    key=image,
                    image_bytes=data,
                    image_format=sniff_image_format(data),
                )
            )
            for i, caption in enumerate(sorted({j.caption for j in by_image[image]})):
                sample = PairScorer.share_image(decoded, pair_uid(image, caption), f"{image}#{i}", caption)
                sample.meta["image"] = image
                yield sample
