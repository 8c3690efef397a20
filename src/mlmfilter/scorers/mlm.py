"""The MLM judge (MLM-Filter): a vision-language model rates each pair 0..100 on up to four metrics.

Metrics (columns named by the short name, so selections read ``itm >= 66 and odf >= 20``):
``itm`` image_text_matching, ``odf`` object_detail_fulfillment, ``ctq`` caption_text_quality,
``su`` semantic_understanding. The prompts are the reference texts character for character
(:mod:`mlmfilter.judge.prompts`); the request format is the reference's or the model's own
(:mod:`mlmfilter.judge.conversations`).

Readouts (:mod:`mlmfilter.judge.readout`):

- ``expected`` (default): the probability-weighted mean score under the model's exact distribution
  over the numbers 0..100, columns ``<m>`` (float32), ``<m>_mass`` (probability the answer is a
  number 0..100 at all, before renormalising) and ``<m>_std`` (spread of that distribution). A
  metric whose mass is below ``min_mass`` (default 0.5) has no score: it is null and the row is a
  ``low_score_mass`` error row (mass and spread kept); a shard where most judged pairs are such rows is
  refused (see :meth:`MLMScorer.check_shard` and DEVELOPERS.md, "Scores need probability mass");
- ``generate``: the reference's greedy answer parsed as an integer, columns ``<m>`` (float32 holding
  an integer) and ``<m>_raw`` (the decoded text); an unparseable answer is an
  ``unparseable_score`` error row that keeps the raw text.

The model runs behind the :class:`~mlmfilter.judge.backend.JudgeBackend` interface; this module
only builds prompts and turns distributions or texts into columns.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Sequence

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from mlmfilter.backends import DEFAULT_BACKEND, backend_info, known_backend
from mlmfilter.backends.base import BackendInfo
from mlmfilter.core import errors
from mlmfilter.core.errors import InfrastructureError
from mlmfilter.core.sample import Sample
from mlmfilter.core.stats import BlockStats
from mlmfilter.judge.backend import (
    EXACT_EXPECTED_DEFINITION,
    JudgeBackend,
    JudgeRequest,
    LogprobsMissing,
    RequestFailure,
    TopKDistribution,
    capabilities_of,
    refuse_unsupported_readout,
)
from mlmfilter.judge.conversations import validate_conversation
from mlmfilter.judge.prompts import resolve_metrics, resolve_template, short_name
from mlmfilter.judge.readout import ExpectedScore, parse_generated_score
from mlmfilter.judge.trained_format import apply_recorded_format
from mlmfilter.scorers.base import BackendScorer, ScoreFailure, ShardRefused
from mlmfilter.scorers.text_mask import TextMasking, TextMaskOptions

#: the newest, smallest and fastest released MLM-Filter judge (LLaVA-Unified layout: converted into the
#: cache on first use, see mlmfilter.convert.cache)
DEFAULT_MODEL = "weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o"
EXPECTED_DEFINITION = EXACT_EXPECTED_DEFINITION  # the exact backends' definition (judge.backend)
GENERATE_DEFINITION = "greedy decoding, int() of the first line of the stripped text, kept if 0..100"
#: the floor on a metric's probability mass on the numbers 0..100 below which it is not a score
DEFAULT_MIN_MASS = 0.5


class MLMOptions(TextMaskOptions):  # mask_text: T-MARS, see scorers/text_mask.py
    model: str = DEFAULT_MODEL
    #: "itm,odf", ["itm", "semantic_understanding"] or "all"
    metrics: str | list[str] = "itm,odf,ctq,su"
    readout: Literal["expected", "generate"] = "expected"
    #: "v2", "v1" or a custom template string containing {caption} (and optionally {criteria}, {aspect})
    template: str = "v2"
    #: "auto" (the processor's chat template), "vicuna_v1", "llama3", "llava_llama3" or "qwen"
    conversation: str = "auto"
    #: text after the assistant cue; None: " " for the reference formats, "" for auto
    answer_prefix: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    #: transformers backend: LLM tokens per forward (shared prefixes with their padding, prompts, trie);
    #: micro-batches are filled up to it instead of a fixed number of pairs. None: automatic (on CUDA a
    #: budget from the model's size and free memory, elsewhere ``batch_size`` pairs); 0: ``batch_size`` pairs.
    #: Changes speed only, never a score: not part of a run's identity
    batch_tokens: int | None = Field(default=None, ge=0)
    #: refuse (error row) prompts longer than this many tokens; None: the model's context length
    max_length: int | None = None
    #: generate readout: None picks enough tokens to write "100" and see it end
    max_new_tokens: int | None = None
    #: downscale larger images before the processor; None: the family's default budget
    max_image_pixels: int | None = None
    allow_random_fallback: bool = False
    #: expected readout: a score-trie node whose path probability P(t_1 .. t_k) is below this is not
    #: expanded (counted as "stops here"), so every P(s) is within this of its exact value; 0 = exact
    trie_threshold: float = Field(default=1e-4, ge=0.0, lt=1.0)
    #: expected readout: a metric whose probability mass on the numbers 0..100 is below this has no
    #: score (null, a ``low_score_mass`` error row); 0 turns the floor off (e.g. for a random stand-in)
    min_mass: float = Field(default=DEFAULT_MIN_MASS, ge=0.0, le=1.0)
    #: a released judge (identified from its config.json, judge/registry.py) is asked as it was trained,
    #: or as its released scoring script asks ("released-script"); options set explicitly win (warned)
    checkpoint_settings: Literal["trained", "released-script", "off"] = "trained"
    #: what runs the judge (a name in mlmfilter.backends.BACKENDS); its own settings go in
    #: backend_options, checked by its model
    backend: str = DEFAULT_BACKEND
    backend_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("backend", mode="before")
    @classmethod
    def _known_backend(cls, value):
        return known_backend(value)

    @model_validator(mode="after")
    def _valid_backend_options(self):
        info = backend_info(self.backend)
        self.backend_options = info.validate_options(self.backend_options)
        info.check(self)  # what the backend cannot serve is refused now rather than in a worker
        return self

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value):
        resolve_metrics(value)
        return value

    @field_validator("template")
    @classmethod
    def _valid_template(cls, value):
        resolve_template(value)
        return value

    @field_validator("conversation")
    @classmethod
    def _known_conversation(cls, value):
        return validate_conversation(value)


class MLMScorer(TextMasking, BackendScorer):
    Options = MLMOptions
    name = "mlm"
    model_option = "model"

    def __init__(self, options: MLMOptions | None = None, backend: JudgeBackend | None = None):
        super().__init__(options, backend)  # injected (another backend) or built in setup()
        self.info: BackendInfo = backend_info(self.options.backend)
        self.released = None
        #: a released judge named by hub id or original-layout folder, converted into the cache (else None)
        self.converted = None
        # a served model's name is the server's, not a hub id: nothing to read about it here
        if self.info.runs_in_process or os.path.isdir(os.path.expanduser(self.options.model)):
            from mlmfilter.convert.cache import with_converted_model

            # the backends load the converted folder; identity and provenance name the source and revision
            if backend is None:
                self.options, self.converted = with_converted_model(self.options)
            # a judge trained by `mlmfilter train` records its request format: options the user left unset follow it
            self.options = apply_recorded_format(self.options)
            from mlmfilter.judge.registry import apply_released_settings

            self.options, self.released = apply_released_settings(self.options)
        self.metrics = resolve_metrics(self.options.metrics)
        self.short_names = [short_name(m) for m in self.metrics]
        self.template = resolve_template(self.options.template)
        self.columns = self._columns()
        if self._token_budgeted():
            from mlmfilter.backends.transformers import BUDGET_ENCODE_PAIRS

            # the backend fills its forwards by tokens: hand it pairs enough to fill them
            self.batch_size = max(self.batch_size, BUDGET_ENCODE_PAIRS)

    def _token_budgeted(self) -> bool:
        """The transformers backend fills micro-batches by a token budget (set, or automatic on CUDA)."""
        o = self.options
        if o.backend != "transformers" or o.batch_tokens == 0:
            return False
        if o.batch_tokens:
            return True
        device = (o.device or "auto").strip().lower()
        if device == "auto":  # not resolved here: the scorer is built where the GPUs may not be visible
            import torch

            return torch.cuda.is_available()
        return device.startswith("cuda")

    def _columns(self) -> dict[str, pa.DataType]:
        columns: dict[str, pa.DataType] = {}
        for short in self.short_names:
            columns[short] = pa.float32()
            if self.options.readout == "expected":
                columns[f"{short}_mass"] = pa.float32()
                columns[f"{short}_std"] = pa.float32()
                if self.info.distribution == "top_k":  # mass the backend could not place: the row's bound
                    columns[f"{short}_unplaced"] = pa.float32()
            else:
                columns[f"{short}_raw"] = pa.string()
        return columns

    @property
    def image_size(self) -> int | None:  # type: ignore[override]
        """Shorter side to decode to: the backend's declared size, else its settings or config files (no weights)."""
        if self.backend is not None:
            return capabilities_of(self.backend).image_size
        return self.info.image_size(self.options)

    def wants_gpu(self) -> bool:
        return self.info.wants_gpu(self.options)

    def setup(self) -> None:
        if self.backend is not None:
            return
        o = self.options
        backend = self.info.build(o, self.released)
        try:
            refuse_unsupported_readout(o.readout, capabilities_of(backend), o.backend)
        except ValueError:
            backend.close()
            raise
        self.own_backend(backend)

    # -- scoring --------------------------------------------------------------------------------------

    def score_batch(self, samples: Sequence[Sample]) -> list[dict[str, Any] | ScoreFailure]:
        results: list[dict[str, Any] | ScoreFailure | None] = [None] * len(samples)
        requests, positions = [], []
        side = self.image_size
        for i, sample in enumerate(samples):
            failure = self._check(sample)
            if failure is not None:
                results[i] = failure
                continue
            prompts = [self.template.render(metric, sample.caption) for metric in self.metrics]
            requests.append(JudgeRequest(self.masked(sample.image_at(side)), prompts))
            positions.append(i)
        if requests:
            try:
                if self.options.readout == "expected":
                    outputs = [self._expected_row(o) for o in self.backend.score_distributions(requests)]
                else:
                    texts = self.backend.generate(requests, self.options.max_new_tokens)
                    outputs = [self._generated_row(t) for t in texts]
            except LogprobsMissing as exc:  # the server's fault, not the pairs': the shard fails with this line
                raise InfrastructureError(f"{self.options.backend} backend: {exc}") from exc
            for i, output in zip(positions, outputs):
                results[i] = output
        return results  # type: ignore[return-value]

    def _check(self, sample: Sample) -> ScoreFailure | None:
        if not (sample.caption or "").strip():
            return ScoreFailure(errors.EMPTY_CAPTION, "the caption is empty")
        if sample.image is None and sample.image_bytes is not None:
            from mlmfilter.images.decode import DecodeSpec, decode_sample

            decode_sample(sample, DecodeSpec(shorter_side=self.image_size))
            if sample.error:
                return ScoreFailure(sample.error, sample.error_detail or "")
        if sample.image is None:
            return ScoreFailure(errors.MISSING_IMAGE, "no decoded image")
        return None

    def _expected_row(self, output) -> dict[str, Any] | ScoreFailure:
        if isinstance(output, RequestFailure):
            return ScoreFailure(output.reason, output.detail)
        row: dict[str, Any] = {}
        low: list[str] = []
        unplaced = None
        if isinstance(output, TopKDistribution):
            output, unplaced = output.log_probs, output.unplaced
        for n, (short, log_probs) in enumerate(zip(self.short_names, output)):
            if unplaced is not None:
                row[f"{short}_unplaced"] = float(unplaced[n])
            summary = ExpectedScore.from_log_probs(log_probs)
            if summary is None:
                return ScoreFailure(
                    errors.UNPARSEABLE_SCORE, f"{short}: no probability on any score 0..100", partial=row
                )
            row[f"{short}_mass"] = summary.mass
            row[f"{short}_std"] = summary.std
            if summary.mass < self.options.min_mass:  # mostly not a number: its mean is not a score
                row[short] = None
                low.append(f"{short} {summary.mass:.2g}")
            else:
                row[short] = summary.mean
        if low:
            return ScoreFailure(
                errors.LOW_SCORE_MASS,
                f"probability on a score 0..100 below min_mass {self.options.min_mass:g}: {', '.join(low)}",
                partial=row,
            )
        return row

    def check_shard(self, stats: BlockStats) -> None:
        """Refuse a shard where most pairs the judge answered are ``low_score_mass`` rows: such a judge
        does not answer with a score (a wrong model, template or conversation), and its few rows above the
        floor are chance."""
        low = stats.failed.get(errors.LOW_SCORE_MASS, 0)
        judged = stats.done + low
        if low and 2 * low > judged:
            raise ShardRefused(
                f"{self.name}: for {low} of {judged} pairs the judge put less than min_mass="
                f"{self.options.min_mass:g} of its probability on a score 0..100 (the answer is mostly not a "
                "number): it does not answer with a score, so the shard is refused. Check the model, "
                "--template and --conversation, or lower the floor (--option mlm.min_mass=0.1; 0: off)"
            )

    def _generated_row(self, output) -> dict[str, Any] | ScoreFailure:
        if isinstance(output, RequestFailure):
            return ScoreFailure(output.reason, output.detail)
        row: dict[str, Any] = {}
        bad = []
        for short, text in zip(self.short_names, output):
            value = parse_generated_score(text)
            row[short] = None if value is None else float(value)
            row[f"{short}_raw"] = text
            if value is None:
                bad.append(f"{short}={text!r}")
        if bad:
            return ScoreFailure(errors.UNPARSEABLE_SCORE, "not an integer 0..100: " + ", ".join(bad), partial=row)
        return row

    # -- provenance -----------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        options = identity["options"]
        options["backend_options"] = self.info.identity_options(options.get("backend_options") or {})
        if self.converted is not None:  # what the user named; the revision and converter are in provenance
            options["model"] = self.converted.model_identity
        options.pop("batch_tokens", None)  # speed only: a run resumes under another budget
        return identity

    def _readout_provenance(self) -> dict[str, str]:
        readout = getattr(self.backend, "readout_provenance", None)  # a test's stand-in backend may have none
        if readout is not None:
            return readout()
        return self.info.readout_provenance(self.options)

    def provenance(self) -> dict[str, Any]:
        o = self.options
        prov: dict[str, Any] = {
            **super().provenance(),
            "metrics": {short_name(m): m for m in self.metrics},
            "readout": o.readout,
            "readout_definition": EXPECTED_DEFINITION if o.readout == "expected" else GENERATE_DEFINITION,
            "template": {"name": self.template.name, "sha256": self.template.sha256(self.metrics)},
        }
        if o.readout == "expected":
            # the definition and bound of the backend that produced the scores
            prov["trie_threshold"] = o.trie_threshold
            prov["min_mass"] = o.min_mass
            prov.update(self._readout_provenance())
        if o.readout == "generate":
            prov["max_new_tokens"] = o.max_new_tokens or "enough for '100' plus one"
        # the backend's own word once built; before, what its settings and the model's config files say
        prov["model"] = self.backend.describe() if self.backend is not None else self.info.describe_settings(o)
        if self.converted is not None:
            from mlmfilter.convert.cache import describe_converted_model

            prov["model"] = describe_converted_model(prov["model"], self.converted)
        prov.update(self.text_mask_provenance())
        if self.released is not None:
            prov["checkpoint"] = self.released.describe()
            prov.setdefault("warnings", []).extend(self.released.warnings)
        if prov["model"].get("warnings"):
            prov["warnings"] = list(prov.get("warnings", [])) + list(prov["model"]["warnings"])
        if not prov.get("warnings"):
            prov.pop("warnings", None)
        return prov


def low_mass_note(stats) -> str | None:
    """The summary's word on ``low_score_mass`` rows (a stage's :class:`~mlmfilter.core.stats.ShardStats`)."""
    low = int(stats.errors.get(errors.LOW_SCORE_MASS, 0))
    if not low:
        return None
    return (
        f"{low} pairs have no judge score: the judge put less than its min_mass of probability on a score 0..100 "
        "(error low_score_mass; <metric>_mass says how much). Selections and enhance never decide on them"
    )
