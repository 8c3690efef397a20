"""The ``enhance`` stage: per shard, rewrite the captions of the pairs a selection picks, keep the better ones.

For each shard: the ``score`` stage's table of that shard picks the pairs (``where``, e.g.
``itm < 40``); those pairs are read back from the shard, their images decoded as the score stage
decodes them (each judge scorer and the writer at their own size, :class:`DecodeSpec` ``sides``),
candidates written by the mode (:mod:`mlmfilter.enhance.modes`), checked
(:mod:`~mlmfilter.enhance.checks`), scored with the judge scorers and decided
(:mod:`~mlmfilter.enhance.decide`). The original's score is the run's own: where a judge scorer is the
one that scored the source stage (same identity, device and batch size aside), its recorded row is
used; a candidate's score is what ``mlmfilter score`` gives that caption with the same judge. The
table has one row per picked pair (columns: see :func:`enhance_schema`); the original caption is
never overwritten: ``caption`` holds the accepted rewrite, or null. ``mlmfilter reshard --captions-stage enhance`` writes it in place of the
original (the original kept in the sample's json).

Stats counters per shard: ``tried``, ``accepted``, ``rejected``, ``rejected:<reason>``,
``gain_sum`` (sum of the accepted rewrites' gains: mean gain = gain_sum / accepted) and
``candidates``; the judge scorers' own block stats. Resume, markers and logs are the run layer's.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Literal, Sequence

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from mlmfilter.backends.generation import CaptionGenerator, SamplingParams
from mlmfilter.core.batching import batched
from mlmfilter.core.identity import options_identity, stable_identity
from mlmfilter.core.sample import Sample
from mlmfilter.enhance.checks import CaptionChecker, CheckOptions
from mlmfilter.enhance.decide import ACCEPTED, REJECTED, Decider, Decision, DecisionOptions, Rescorer, judge_pairs
from mlmfilter.enhance.modes import AitqeMode, FuseMode, RewriteMode, Written
from mlmfilter.enhance.prompts import EnhancePrompts
from mlmfilter.images.decode import DEFAULT_MAX_PIXELS, DecodeSpec, decode_sample
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.runs.stage import ProgressCallback, Stage, StageOptions, StageTask, identity_schema
from mlmfilter.scorers import Scorer, build_scorer
from mlmfilter.scorers.stage import ScorerSpec, names_to_specs
from mlmfilter.selection.expression import expression_names, passing_rows

log = logging.getLogger(__name__)

#: the sampling temperature of several candidates per pair when none is given
CANDIDATES_TEMPERATURE = 0.7


class EnhanceOptions(StageOptions):
    #: which pairs to work on: an expression over the source stage's table, e.g. "itm < 40"
    where: str
    source_stage: str = "score"
    mode: Literal["rewrite", "fuse", "aitqe"] = "rewrite"
    #: the VLM that writes the candidates (hub id or path; aitqe: the converted AITQE folder; with
    #: ``backend="openai"``: the model name the server knows)
    model: str
    #: who runs the writer: "transformers" (this process) or "openai" (an OpenAI-compatible server, through
    #: the client and request cache ``teach label`` uses; its settings in ``backend_options``, base_url first)
    backend: Literal["transformers", "openai"] = "transformers"
    backend_options: dict[str, Any] = Field(default_factory=dict)
    #: conversation format of the writer; None: "auto" (aitqe mode: "aitqe")
    conversation: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = Field(default=8, ge=1)
    max_length: int | None = None
    max_image_pixels: int | None = None
    allow_random_fallback: bool = False
    #: None: greedy, 96 new tokens (aitqe mode: its released settings)
    sampling: SamplingParams | None = None
    prompts: EnhancePrompts = Field(default_factory=EnhancePrompts)
    #: the scorers that re-score the original and the candidates (the run's judge; optionally clip);
    #: empty: :func:`mlmfilter.api.enhance` takes the scorers of ``source_stage`` whose columns ``where`` reads
    judge: list[ScorerSpec] = Field(default_factory=list)
    checks: CheckOptions = Field(default_factory=CheckOptions)
    decision: DecisionOptions = Field(default_factory=DecisionOptions)
    chunk_size: int = Field(default=16, ge=1)  # pairs written, checked and judged together
    max_pixels: int = DEFAULT_MAX_PIXELS

    _names_to_specs = field_validator("judge", mode="before")(classmethod(lambda cls, v: names_to_specs(v)))

    @field_validator("sampling")
    @classmethod
    def _candidates_are_sampled(cls, sampling: SamplingParams | None) -> SamplingParams | None:
        """Several candidates without a temperature: sample (greedy decoding writes one text n times)."""
        if sampling is not None and sampling.n > 1 and "temperature" not in sampling.model_fields_set:
            return sampling.model_copy(update={"temperature": CANDIDATES_TEMPERATURE})
        return sampling

    @model_validator(mode="after")
    def _served_writer(self) -> "EnhanceOptions":
        """A served writer's settings are checked now (a misspelt one is refused by name); the server renders
        the prompt with its own chat template, so a reference conversation format cannot be asked for."""
        if self.backend == "openai":
            from mlmfilter.backends.openai_writer import ServedWriterOptions

            ServedWriterOptions(**self.backend_options)
            if self.conversation not in (None, "auto"):
                raise ValueError(
                    f"conversation {self.conversation!r} is a reference prompt format; a served writer is asked "
                    "through the server's chat template (leave --conversation out)"
                )
        elif self.backend_options:
            raise ValueError("backend_options are the settings of --backend openai (the served writer)")
        return self

    @property
    def resolved_conversation(self) -> str:
        return self.conversation or ("aitqe" if self.mode == "aitqe" else "auto")


def enhance_schema(compare: Sequence[str]) -> pa.Schema:
    """uid, shard, key, the enhancement columns, ``<c>_before`` / ``<c>_after`` per compared column, error."""
    strings = pa.list_(pa.string())
    columns = [
        pa.field("mode", pa.string()),
        pa.field("original_caption", pa.string()),
        pa.field("candidates", strings),
        pa.field("candidate_reasons", strings),  # per candidate: a check reason, not_better, accepted, outscored
        pa.field("candidate_gains", pa.list_(pa.float32())),  # null where not scored
        pa.field("intermediate", strings),  # fuse: the descriptions; aitqe: the raw answers
    ]
    for column in compare:
        columns += [pa.field(f"{column}_before", pa.float32()), pa.field(f"{column}_after", pa.float32())]
    columns += [
        pa.field("gain", pa.float32()),
        pa.field("decision", pa.string()),  # "accepted" | "rejected"
        pa.field("reason", pa.string()),
        pa.field("reason_detail", pa.string()),
        pa.field("caption", pa.string()),  # the accepted rewrite, else null
    ]
    return identity_schema(columns)


class EnhanceStage(Stage):
    kind = "enhance"
    Options = EnhanceOptions

    def __init__(
        self,
        options: EnhanceOptions,
        name: str | None = None,
        generator: CaptionGenerator | None = None,
        scorers: list[Scorer] | None = None,
    ):
        super().__init__(options, name)
        o: EnhanceOptions = self.options
        if not o.judge and scorers is None:
            raise ValueError("the enhance stage needs its judge scorers (mlmfilter.enhance takes the run's own)")
        # built now: options and compared columns are checked before anything runs
        self.scorers = scorers if scorers is not None else [build_scorer(s.name, s.options) for s in o.judge]
        self.rescorer = Rescorer(self.scorers)
        self.compare = self._compare_columns()
        self.decider = Decider(o.decision, self.compare)
        self.checker = CaptionChecker(o.checks, o.prompts.instruction_texts(o.mode))
        self.checker.require()
        self.generator = generator
        self._injected_generator = generator is not None  # else identity comes from config files, loaded or not
        self._mode = None
        self._recorded: set[int] | None = None

    # -- settings -----------------------------------------------------------------------------------

    def _compare_columns(self) -> list[str]:
        o: EnhanceOptions = self.options
        judged = self.rescorer.columns
        if o.decision.compare:
            unknown = [c for c in o.decision.compare if c not in judged]
            if unknown:
                raise ValueError(f"compare columns {unknown} are not judge columns ({', '.join(judged)})")
            return list(o.decision.compare)
        compare = [c for c in expression_names(o.where) if c in judged and pa.types.is_floating(judged[c])]
        if not compare:
            raise ValueError(
                f"--where {o.where!r} reads no score column of the judge ({', '.join(judged)}): "
                "name the columns to compare (decision.compare / --compare)"
            )
        return compare

    @property
    def sampling(self) -> SamplingParams:
        o: EnhanceOptions = self.options
        if o.sampling is not None:
            return o.sampling
        if o.mode == "aitqe":
            from mlmfilter.judge import aitqe

            return SamplingParams(max_new_tokens=aitqe.MAX_NEW_TOKENS, stop=(aitqe.OVERALL_MARKER,))
        return SamplingParams()

    def schema(self) -> pa.Schema:
        return enhance_schema(self.compare)

    def identity(self) -> dict[str, Any]:
        import py3langid

        o: EnhanceOptions = self.options
        options = o.model_dump(mode="json")
        if o.backend == "openai":  # the server's address, limits and cache change no text
            options["backend_options"] = self._served_settings().identity()
        options = options_identity(options)
        identity: dict[str, Any] = {
            "kind": self.kind,
            # the judge is identified by its scorers' own identities; device and batching change no output
            "options": {k: v for k, v in options.items() if k not in ("judge", "device", "batch_size", "chunk_size")},
            "sampling": self.sampling.model_dump(mode="json"),
            "generator": stable_identity(self._generator_provenance(for_identity=True)),
            "judge": [s.identity() for s in self.scorers],
            # the original's scores are the run's own (earlier enhance runs re-scored it at another size)
            "before": "recorded",
            "py3langid": getattr(py3langid, "__version__", "?"),
        }
        if o.checks.keep_entities:
            identity["spacy"] = _spacy_versions(o.checks.spacy_model)
        return identity

    def provenance(self) -> dict[str, Any]:
        o: EnhanceOptions = self.options
        judge = {s.name: s.provenance() for s in self.scorers}
        generator = self._generator_provenance()
        prov: dict[str, Any] = {
            "kind": self.kind,
            "mode": o.mode,
            "where": o.where,
            "source_stage": o.source_stage,
            "compare": self.compare,
            "before": "the run's own scores of the original where a judge scorer is the one that scored "
            f"stage {o.source_stage!r} (same identity, device and batch size aside); else scored here, as "
            "`mlmfilter score` scores (each scorer's own image decode)",
            "objective": f"mean of {', '.join(self.compare)}; accepted when it beats the original by >= {o.decision.margin:g}",
            "prompts": {**o.prompts.model_dump(), "sha256": o.prompts.sha256()},
            "sampling": self.sampling.model_dump(mode="json"),
            "generator": generator,
            "judge": judge,
            "checks": o.checks.model_dump(mode="json"),
        }
        warnings = list(generator.get("warnings", [])) + [w for p in judge.values() for w in p.get("warnings", [])]
        if warnings:
            prov["warnings"] = list(dict.fromkeys(warnings))
        return prov

    def _served_settings(self):
        from mlmfilter.backends.openai_writer import ServedWriterOptions

        return ServedWriterOptions(**self.options.backend_options)

    def _generator_provenance(self, for_identity: bool = False) -> dict[str, Any]:
        o: EnhanceOptions = self.options
        if self._injected_generator:
            return self.generator.describe()
        if o.backend == "openai":  # from the settings alone: nothing is asked before setup
            from mlmfilter.backends.openai_writer import describe_served_writer

            prov = describe_served_writer(o.model, self._served_settings())
            if for_identity:  # the address is recorded, not identified: a replica elsewhere writes the same
                prov.pop("endpoint")
            return prov
        from mlmfilter.models.common import resolve_device, resolve_dtype
        from mlmfilter.models.vlm import inspect_vlm, vlm_provenance

        spec = inspect_vlm(o.model, o.allow_random_fallback, o.max_image_pixels)  # config files only
        device = resolve_device(o.device)
        prov = vlm_provenance(spec, o.resolved_conversation, "", device, resolve_dtype(o.dtype, device), o.max_length)
        prov["backend"] = "transformers-generate"
        return prov

    # -- running ------------------------------------------------------------------------------------

    def setup(self) -> None:
        o: EnhanceOptions = self.options
        if self.generator is None and o.backend == "openai":
            from mlmfilter.backends.openai_writer import build_served_writer

            self.generator = build_served_writer(o.model, o.backend_options)
        if self.generator is None:
            from mlmfilter.backends.generation import load_caption_generator

            self.generator = load_caption_generator(
                o.model,
                o.device,
                o.dtype,
                o.resolved_conversation,
                o.batch_size,
                o.max_length,
                o.allow_random_fallback,
                o.max_image_pixels,
            )
        self.rescorer.setup()
        self.checker.setup()

    @property
    def mode(self):
        if self._mode is None:
            o: EnhanceOptions = self.options
            if o.mode == "rewrite":
                self._mode = RewriteMode(self.generator, o.prompts, self.sampling)
            elif o.mode == "fuse":
                self._mode = FuseMode(self.generator, o.prompts, self.sampling)
            else:
                self._mode = AitqeMode(self.generator, self.sampling)
        return self._mode

    def _writer_side(self) -> int | None:
        """The shorter side the writer's images are decoded to: a local writer's decode rule, a served one's own."""
        spec = getattr(getattr(self.generator, "loaded", None), "spec", None)
        if spec is not None:
            return spec.decode_side or spec.image_size
        return getattr(self.generator, "image_size", None)

    def decode_spec(self) -> DecodeSpec:
        """The score stage's decode: every judge scorer (and the writer) gets the bytes decoded at its own
        size, so a judge sees here exactly the pixels it saw when it scored the run."""
        sides = [s.image_size for s in self.scorers] + [self._writer_side()]
        return DecodeSpec.for_sides(sides, max_pixels=self.options.max_pixels)

    def recorded_scorers(self, task: StageTask) -> set[int]:
        """Indices of the judge scorers that scored ``source_stage`` themselves (same identity, device and
        batch size aside): their scores of an original are read from the run, not computed again."""
        o: EnhanceOptions = self.options
        if self._recorded is None:
            identity = task.run.settings(o.source_stage).get("identity") or {}
            theirs = {_comparable_identity(s) for s in identity.get("scorers") or []}
            self._recorded = {n for n, s in enumerate(self.scorers) if _comparable_identity(s.identity()) in theirs}
        return self._recorded

    def selected_uids(self, task: StageTask) -> set[str]:
        """uids of this shard's pairs that the selection picks in the source stage's table."""
        return {uid for uid, _ in self.selected_rows(task)}

    def selected_rows(self, task: StageTask) -> dict[tuple[str, str], dict[str, Any]]:
        """(uid, key) -> the source stage's row (error and the judge's columns) of each pair the selection picks."""
        o: EnhanceOptions = self.options
        table = task.run.table(task.shard_id, o.source_stage)
        if table is None:  # the shard fails without a marker; a later run retries it
            raise RuntimeError(f"stage {o.source_stage!r} has not completed shard {task.shard_id!r} yet")
        wanted = ["uid", "key", "error", "skipped", *self.rescorer.columns]
        columns = [c for c in wanted if c in table.schema.names]
        return {(r["uid"], r["key"]): r for r in passing_rows(table, o.where, columns).to_pylist()}

    def process(self, task: StageTask, progress: ProgressCallback | None = None) -> Iterator[pa.RecordBatch]:
        schema = self.schema()
        selected = self.selected_rows(task)
        wanted = {uid for uid, _ in selected}
        task.stats.count("selected", len(wanted))
        if not wanted:
            return
        self.rescorer.recorded = self.recorded_scorers(task)
        spec = self.decode_spec()
        picked = (s for s in read_shard(task.source, ReadOptions(**task.read_options)) if s.uid in wanted)
        for chunk in batched(picked, self.options.chunk_size):
            rows = self._chunk_rows([decode_sample(s, spec) for s in chunk], task, selected)
            yield pa.RecordBatch.from_pylist(rows, schema=schema)
            if progress:
                progress(len(rows), sum(1 for r in rows if r["error"]))
        for scorer in self.scorers:  # a judge that does not answer with a score decides nothing
            scorer.check_shard(task.stats.block(scorer.name))

    def _chunk_rows(
        self, samples: list[Sample], task: StageTask, selected: dict[tuple[str, str], dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        ok = [s for s in samples if s.ok]
        side = self._writer_side()
        images = [s.image_at(side) for s in ok]
        written: list[Written] = self.mode.write(images, [s.caption or "" for s in ok]) if ok else []
        recorded = [(selected or {}).get((s.uid, s.key)) for s in ok]
        judged = judge_pairs(
            self.checker,
            self.rescorer,
            self.decider,
            ok,
            [w.failure if w.failure else w.texts for w in written],
            stats={s.name: task.stats.block(s.name) for s in self.scorers},
            # a row the run could not score (or a cascade skipped) is scored here
            recorded=[r if r and r.get("error") is None and not r.get("skipped") else None for r in recorded],
        )
        task.stats.count("tried", len(ok))
        by_uid = {s.uid: (w, d) for s, w, d in zip(ok, written, judged)}
        rows = []
        for sample in samples:
            if sample.uid in by_uid:
                row = self._row(sample, *by_uid[sample.uid])
            else:  # the pair could not be read or decoded: nothing was tried
                row = self._row(sample, Written([]), None)
            rows.append(row)
            self._count(task, row)
        return rows

    def _row(self, sample: Sample, written: Written, decision: Decision | None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "uid": sample.uid,
            "shard": sample.shard,
            "key": sample.key,
            "mode": self.options.mode,
            "original_caption": sample.caption,
            "intermediate": written.intermediate,
            "error": sample.error,
            "error_detail": sample.error_detail,
        }
        if decision is None:
            row.update(decision=REJECTED, reason=sample.error, reason_detail=sample.error_detail, candidates=[])
            return row
        row.update(
            candidates=[c.text for c in decision.candidates],
            candidate_reasons=[c.reason for c in decision.candidates],
            candidate_gains=[c.gain for c in decision.candidates],
            gain=decision.gain,
            decision=decision.decision,
            reason=decision.reason,
            reason_detail=decision.detail,
            caption=decision.caption,
        )
        for column in self.compare:
            row[f"{column}_before"] = decision.before.get(column)
            row[f"{column}_after"] = decision.after.get(column)
        if written.failure and not written.texts:  # the writer failed: an error row (counted by reason)
            row["error"], _, detail = written.failure.partition(": ")
            row["error_detail"] = detail or written.failure
        return row

    @staticmethod
    def _count(task: StageTask, row: dict[str, Any]) -> None:
        task.stats.count("candidates", len(row["candidates"]))
        if row["decision"] == ACCEPTED:
            task.stats.count("accepted")
            task.stats.count("gain_sum", float(row["gain"]))
        else:
            task.stats.count("rejected")
            task.stats.count(f"rejected:{row['reason']}")

    def close(self) -> None:
        """Close the judge scorers (their weights, engines and HTTP clients) and drop the writer."""
        for scorer in self.scorers:
            scorer.close()
        close = getattr(self.generator, "close", None)
        if close is not None and not self._injected_generator:  # a served writer's client and cache
            close()
        self.generator = None
        self._mode = None


def run_judge(run: str, where: str, source_stage: str = "score") -> list[dict[str, Any]]:
    """The scorer specs of ``source_stage`` that produce a column ``where`` reads: the same judge,
    model and metrics that scored the originals, so the rewrites are re-scored as they were."""
    from mlmfilter.runs.read import RunReader

    settings = RunReader(run).settings(source_stage)
    specs = (settings.get("options") or {}).get("scorers") or []
    read = set(expression_names(where))
    judge = [s for s in specs if read & set(build_scorer(s["name"], s.get("options")).columns)]
    if not judge:
        raise ValueError(
            f"no scorer of stage {source_stage!r} produces a column that {where!r} reads "
            f"(scorers: {', '.join(s['name'] for s in specs) or 'none'}); name the judge with --judge-model"
        )
    return judge


#: scorer options that change where or how fast a judge runs, not its scores
_OPERATIONAL_OPTIONS = ("device", "batch_size", "batch_tokens")


def _comparable_identity(identity: dict[str, Any]) -> str:
    """A scorer's identity as a key, less its operational options (a run scored on another device or
    batch size still recorded the same judge's scores)."""
    from mlmfilter.core.ids import canonical_json

    options = {k: v for k, v in (identity.get("options") or {}).items() if k not in _OPERATIONAL_OPTIONS}
    return canonical_json({**identity, "options": options})


def _spacy_versions(model: str) -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for dist in ("spacy", model.replace("_", "-")):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
