"""AITQE as a scorer: one greedy answer per pair gives the overall score, five aspect scores and,
for poor captions, a recaption (:mod:`mlmfilter.judge.aitqe`).

Columns: ``aitqe_overall`` and ``aitqe_<aspect>`` (float32, None where the answer has none),
``aitqe_recaption`` (the rewrite, None when the model keeps the caption), ``aitqe_raw`` (the whole
generated text). An answer without an overall score is an ``unparseable_score`` error row that keeps
the raw text. With ``readout: expected`` two more columns come from the model's distribution over
the overall score's digits at the point the answer writes them: ``aitqe_overall_expected`` (mean
over 0..100) and ``aitqe_overall_mass`` -- read by a second pass that re-encodes the generated text
up to ``"Overall Score": "`` after the prompt.

The request is AITQE's own (raw prompt, greedy, 384 new tokens, optional early stop at ``<Overall>``),
taken from the checkpoint registry (:mod:`mlmfilter.judge.registry`); the model is a converted
AITQE folder (``mlmfilter convert``).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import pyarrow as pa
from pydantic import Field

from mlmfilter.backends.transformers import INFO as TRANSFORMERS
from mlmfilter.backends.transformers import TransformersJudgeBackend
from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.judge import aitqe
from mlmfilter.judge.backend import JudgeBackend, JudgeRequest, RequestFailure
from mlmfilter.judge.readout import ExpectedScore
from mlmfilter.scorers.base import BackendScorer, ScoreFailure, ScorerOptions

DEFAULT_MODEL = "HymanH/AITQE"


class AITQEOptions(ScorerOptions):
    model: str = DEFAULT_MODEL
    readout: Literal["generate", "expected"] = "generate"
    #: stop at "<Overall>" as the released script's default mode (recaption + overall score only)
    early_stop: bool = True
    max_new_tokens: int = Field(default=aitqe.MAX_NEW_TOKENS, ge=1)
    device: str = "auto"
    dtype: str = "bf16"
    batch_size: int = 4
    max_length: int | None = None
    max_image_pixels: int | None = None
    allow_random_fallback: bool = False


class AITQEScorer(BackendScorer):
    Options = AITQEOptions
    name = "aitqe"
    model_option = "model"

    def __init__(self, options: AITQEOptions | None = None, backend: JudgeBackend | None = None):
        super().__init__(options, backend)
        from mlmfilter.convert.cache import with_converted_model

        #: the released checkpoint named by hub id or original-layout folder, converted into the cache
        self.options, self.converted = (self.options, None) if backend else with_converted_model(self.options)
        self.columns = self._columns()

    def _columns(self) -> dict[str, pa.DataType]:
        columns = {"aitqe_overall": pa.float32()}
        columns.update({f"aitqe_{key}": pa.float32() for key in aitqe.ASPECTS})
        columns["aitqe_recaption"] = pa.string()
        columns["aitqe_raw"] = pa.string()
        if self.options.readout == "expected":
            columns["aitqe_overall_expected"] = pa.float32()
            columns["aitqe_overall_mass"] = pa.float32()
        return columns

    @property
    def image_size(self) -> int | None:  # type: ignore[override]
        if self.backend is not None and hasattr(self.backend, "image_size"):
            return self.backend.image_size
        return TRANSFORMERS.image_size(self.options)

    def wants_gpu(self) -> bool:
        return TRANSFORMERS.wants_gpu(self.options)

    def setup(self) -> None:
        if self.backend is not None:
            return
        from mlmfilter.models.vlm import load_vlm

        o = self.options
        loaded = load_vlm(o.model, o.device, o.dtype, o.allow_random_fallback, o.max_image_pixels)
        # AITQE's own request (raw prompt, no answer prefix, its stop string), not the MLM judge's options
        self.own_backend(
            TransformersJudgeBackend(
                loaded,
                conversation="aitqe",
                answer_prefix="",
                batch_size=o.batch_size,
                max_length=o.max_length,
                stop_strings=(aitqe.OVERALL_MARKER,) if o.early_stop else (),
            )
        )

    def score_batch(self, samples: Sequence[Sample]) -> list[dict[str, Any] | ScoreFailure]:
        results: list[dict[str, Any] | ScoreFailure | None] = [None] * len(samples)
        requests, positions = [], []
        side = self.image_size
        for i, sample in enumerate(samples):
            if not (sample.caption or "").strip():
                results[i] = ScoreFailure(errors.EMPTY_CAPTION, "the caption is empty")
            elif sample.image is None:
                results[i] = ScoreFailure(errors.MISSING_IMAGE, "no decoded image")
            else:
                requests.append(JudgeRequest(sample.image_at(side), [aitqe.prompt(sample.caption)]))
                positions.append(i)
        if not requests:
            return results  # type: ignore[return-value]
        texts = self.backend.generate(requests, self.options.max_new_tokens)
        rows = [self._row(t) for t in texts]
        if self.options.readout == "expected":
            self._add_expected(requests, texts, rows)
        for i, row in zip(positions, rows):
            results[i] = row
        return results  # type: ignore[return-value]

    def _row(self, output) -> dict[str, Any] | ScoreFailure:
        if isinstance(output, RequestFailure):
            return ScoreFailure(output.reason, output.detail)
        text = output[0]
        answer = aitqe.parse_aitqe(text)
        row: dict[str, Any] = {
            "aitqe_overall": answer.overall,
            **{f"aitqe_{k}": v for k, v in answer.aspects.items()},
            "aitqe_recaption": answer.recaption,
            "aitqe_raw": text,
        }
        if not answer.ok:
            return ScoreFailure(errors.UNPARSEABLE_SCORE, "; ".join(answer.problems), partial=row)
        return row

    def _add_expected(self, requests, texts, rows) -> None:
        """Second pass: the distribution over the overall score after the answer's own text up to it."""
        follow, where = [], []
        for n, (request, output, row) in enumerate(zip(requests, texts, rows)):
            if isinstance(row, ScoreFailure) or isinstance(output, RequestFailure):
                continue
            before = aitqe.text_before_score(output[0])
            if before is None:
                continue
            follow.append(JudgeRequest(request.image, [request.prompts[0] + before]))
            where.append(n)
        if not follow:
            return
        for n, dist in zip(where, self.backend.score_distributions(follow)):
            if isinstance(dist, RequestFailure):
                continue
            summary = ExpectedScore.from_log_probs(dist[0])
            if summary is not None:
                rows[n]["aitqe_overall_expected"] = summary.mean
                rows[n]["aitqe_overall_mass"] = summary.mass

    def provenance(self) -> dict[str, Any]:
        from mlmfilter.judge.registry import REGISTRY

        o = self.options
        prov: dict[str, Any] = {
            **super().provenance(),
            "prompt": aitqe.QUESTION,
            "readout": o.readout,
            "decoding": {
                "greedy": True,
                "max_new_tokens": o.max_new_tokens,
                "stop": aitqe.OVERALL_MARKER if o.early_stop else None,
            },
            "checkpoint": REGISTRY["aitqe"].describe("trained"),
        }
        if o.readout == "expected":
            prov["expected_definition"] = (
                "distribution over 0..100 at the overall score's position, after the prompt and the "
                'generated text up to \'"Overall Score": "\' re-encoded as text'
            )
        if self.backend is not None:
            prov["model"] = self.backend.describe()
            if prov["model"].get("warnings"):
                prov["warnings"] = list(prov["model"]["warnings"])
        if self.converted is not None:
            from mlmfilter.convert.cache import describe_converted_model

            prov["model"] = describe_converted_model(prov.get("model", {}), self.converted)
        return prov

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        if self.converted is not None:  # what the user named; the revision and converter are in provenance
            identity["options"]["model"] = self.converted.model_identity
        return identity
