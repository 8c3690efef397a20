"""``mlmfilter distill RUN``: judge quality at CLIP cost.

From a run where the judge scored a sample of the pool (``score --sample 0.01``, or a cascade
``--only``) and whose embeddings are kept (``mlmfilter embed``):

1. **fit** a head (:mod:`mlmfilter.training.head`) from the embeddings to each judge metric on the
   judged pairs, minus a seeded held-out part;
2. **measure** it on the held-out part: Spearman with the judge, the overlap of the top
   ``top_fraction`` chosen by the head and by the judge, and for the cascade the *uncertain band*:
   the narrowest interval of head predictions around the cut such that judging only the pairs
   inside it (the head decides the rest) agrees with an all-judge selection on at least
   ``agreement`` of the kept pairs -- and the fraction of judge calls that band needs;
3. **save** the head with its training provenance (a folder; ``--scorer distilled --model HEAD``);
4. **predict** the whole pool as a stage of the run (``distill``: ``distilled_<metric>`` per pair,
   a matrix product per shard over the kept embeddings; resumable like every stage).

Selection agreement: ``|kept by both| / max(|kept by the cascade|, |kept by the judge|)``, on
held-out pairs, where "kept" is ``metric >= threshold`` (the judge's cut: ``threshold``, else the
value that keeps ``top_fraction`` of the judged pairs) and the head keeps ``prediction >= its own
cut`` (the value that keeps the same fraction of the training pairs).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.runs.embeddings import EmbeddingBlock, NoEmbeddings, RunEmbeddings
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.stage import ProgressCallback, Stage, StageOptions, StageTask, identity_schema
from mlmfilter.selection.ranks import spearman
from mlmfilter.training.head import DistilledHead, build_features, fit_head

log = logging.getLogger(__name__)

DISTILL_STAGE = "distill"
#: the judge's metrics, looked for when none are named
JUDGE_METRICS = ("itm", "odf", "ctq", "su")
RANDOM_NOTE = (
    "the embeddings or the judge scores come from RANDOM stand-in weights: this head, its agreement "
    "and its predictions mean nothing"
)


class DistillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    metrics: list[str] | None = None  # judge columns to predict; default: the MLM metrics the judge stage has
    judge_stage: str | None = None  # default: the first stage holding the metrics
    embeddings_stage: str | None = None  # default: the stage keeping embeddings (`embed` first)
    form: str = Field("ridge", pattern="^(ridge|mlp)$")
    hidden: int = Field(256, ge=1)  # mlp hidden units
    holdout: float = Field(0.2, gt=0, lt=1)  # share of the judged pairs kept out of the fit
    seed: int = 0
    top_fraction: float = Field(0.3, gt=0, lt=1)  # the selection the overlap and the cascade are measured on
    threshold: float | None = None  # the judge's cut (decide_by >= threshold); default: top_fraction's
    decide_by: str | None = None  # the metric the cascade decides on; default: the first metric
    agreement: float = Field(0.95, gt=0, le=1)  # wanted agreement of the cascade with all-judge selection


@dataclass
class MetricReport:
    metric: str
    spearman: float | None
    top_overlap: float | None  # |top f by head ∩ top f by judge| / |top f|
    mae: float | None


@dataclass
class Cascade:
    """How much of the judge the head saves, measured on the held-out pairs."""

    metric: str
    judge_cut: float  # metric >= judge_cut is kept by the judge
    head_cut: float  # prediction >= head_cut is kept by the head
    band: tuple[float, float] | None  # judge only predictions inside (None: the head alone agrees enough)
    judge_fraction: float  # share of the pool the band sends to the judge
    agreement: float  # achieved selection agreement on held-out pairs
    head_only_agreement: float  # agreement with no judge call at all
    curve: dict[str, float]  # wanted agreement -> judge-call fraction


@dataclass
class DistillResult:
    run_dir: str
    head_dir: str
    stage: str
    metrics: list[str]
    judged: int  # pairs with every metric from the judge and embeddings
    trained: int
    heldout: int
    reports: list[MetricReport]
    cascade: Cascade | None
    predicted: dict[str, Any]  # the prediction stage's summary
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "head": self.head_dir,
            "stage": self.stage,
            "metrics": self.metrics,
            "judged": self.judged,
            "trained": self.trained,
            "heldout": self.heldout,
            "heldout_agreement": {r.metric: _report_json(r) for r in self.reports},
            "cascade": _cascade_json(self.cascade),
            "predicted": self.predicted,
            "warnings": self.warnings,
            "notes": self.notes,
        }


def _report_json(report: MetricReport) -> dict[str, Any]:
    return {"spearman": report.spearman, "top_overlap": report.top_overlap, "mae": report.mae}


def _cascade_json(cascade: Cascade | None) -> dict[str, Any] | None:
    if cascade is None:
        return None
    out = dict(cascade.__dict__)
    out["band"] = list(cascade.band) if cascade.band else None
    return out


# -- the judged sample --------------------------------------------------------------------------------


def resolve_judge(reader: RunReader, options: DistillOptions, exclude: tuple[str, ...]) -> tuple[str, list[str]]:
    """(stage, metrics) of the judge scores to distil: the named stage, else the first holding the
    named metrics, else the first holding any of the judge's metrics."""
    if options.judge_stage:
        names = reader.schema(options.judge_stage).names
        metrics = options.metrics or [m for m in JUDGE_METRICS if m in names]
        missing = [m for m in metrics if m not in names]
        if missing or not metrics:
            raise ValueError(
                f"stage {options.judge_stage!r} has no column {', '.join(map(repr, missing)) or 'of a judge metric'} "
                f"(its columns: {', '.join(names)})"
            )
        return options.judge_stage, metrics
    for stage, names in reader.columns_by_stage(exclude).items():
        metrics = list(options.metrics) if options.metrics else [m for m in JUDGE_METRICS if m in names]
        if metrics and all(m in names for m in metrics):
            return stage, metrics
    if options.metrics:
        raise ValueError(f"no stage of {reader.url} has the columns {', '.join(options.metrics)}")
    raise ValueError(
        f"no stage of {reader.url} holds judge scores ({', '.join(JUDGE_METRICS)}); score a sample with the judge "
        "first (`mlmfilter score ... --scorer mlm --stage judge --sample 0.01`) or name the columns with --metrics"
    )


def _aligned(reader: RunReader, shard_id: str, stage: str, columns: list[str], keys: pa.Array) -> np.ndarray:
    """(rows, columns) of ``stage``'s values for these keys of the shard; NaN where it has none."""
    import pyarrow.compute as pc

    out = np.full((len(keys), len(columns)), np.nan)
    names = reader.schema(stage).names
    wanted = ["key"] + columns + (["skipped"] if "skipped" in names else []) + ["error"]
    table = reader.table(shard_id, stage, columns=wanted)
    if table is None:
        return out
    usable = table.column("error").is_null()
    if "skipped" in table.column_names:
        usable = pc.and_(usable, pc.invert(table.column("skipped").fill_null(False)))
    table = table.filter(usable)
    where = pc.index_in(keys, value_set=table.column("key").combine_chunks())
    found = where.is_valid().to_numpy(zero_copy_only=False)
    rows = where.filter(where.is_valid())
    for j, column in enumerate(columns):
        values = table.column(column).take(rows).cast(pa.float64()).fill_null(np.nan)
        out[found, j] = values.to_numpy(zero_copy_only=False)
    return out


def _heldout_mask(uids: list[str], fraction: float, seed: int) -> np.ndarray:
    """A seeded split by uid (the same pairs whatever the order they are read in)."""
    out = np.empty(len(uids), dtype=bool)
    for i, uid in enumerate(uids):
        digest = hashlib.blake2b(f"holdout:{seed}:{uid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2**64 < fraction
    return out


@dataclass
class JudgedSample:
    x: np.ndarray
    y: np.ndarray
    uids: list[str]
    pool: int  # pairs read


def judged_sample(
    reader: RunReader, embeddings: RunEmbeddings, judge_stage: str, metrics: list[str], product: bool
) -> JudgedSample:
    """Features and judge scores of every pair the judge scored (all metrics) that has embeddings."""
    xs, ys, uids, pool = [], [], [], 0
    for shard_id, block in embeddings.blocks(columns=("uid", "key")):
        pool += block.num_rows
        y = _aligned(reader, shard_id, judge_stage, metrics, block.table.column("key").combine_chunks())
        labelled = block.valid & ~np.isnan(y).any(axis=1)
        if not labelled.any():
            continue
        vectors = {m: v[labelled] for m, v in block.vectors.items()}
        xs.append(build_features(vectors, embeddings.modalities, product))
        ys.append(y[labelled])
        uids += [u for u, keep in zip(block.table.column("uid").to_pylist(), labelled) if keep]
    if not xs:
        raise ValueError(
            f"no pair of {reader.url} has both embeddings (stage {embeddings.stage!r}) and judge scores "
            f"(stage {judge_stage!r}: {', '.join(metrics)})"
        )
    return JudgedSample(np.concatenate(xs), np.concatenate(ys), uids, pool)


# -- measuring ----------------------------------------------------------------------------------------


def top_overlap(head: np.ndarray, judge: np.ndarray, fraction: float) -> float | None:
    """Share of the judge's top ``fraction`` that the head's top ``fraction`` also holds."""
    k = int(round(fraction * len(judge)))
    if k < 1:
        return None
    top_head = set(np.argsort(-head, kind="stable")[:k].tolist())
    top_judge = set(np.argsort(-judge, kind="stable")[:k].tolist())
    return len(top_head & top_judge) / k


def selection_agreement(cascade_kept: np.ndarray, judge_kept: np.ndarray) -> float:
    both = int((cascade_kept & judge_kept).sum())
    most = max(int(cascade_kept.sum()), int(judge_kept.sum()))
    return both / most if most else 1.0


def cascade_curve(
    prediction: np.ndarray, judge: np.ndarray, head_cut: float, judge_cut: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For m = 0..n pairs judged (the m predictions nearest the head's cut): the agreement of the
    cascade's selection with the all-judge one, and the band half-width that judges them."""
    order = np.argsort(np.abs(prediction - head_cut), kind="stable")
    distance = np.abs(prediction - head_cut)[order]
    head_keeps = prediction[order] >= head_cut
    judge_keeps = judge[order] >= judge_cut
    zero = np.zeros(1, dtype=np.int64)
    judged_kept = np.concatenate([zero, np.cumsum(judge_keeps)])  # the judge's kept among the first m
    head_kept = np.concatenate([zero, np.cumsum(head_keeps)])
    head_right = np.concatenate([zero, np.cumsum(head_keeps & judge_keeps)])
    kept = judged_kept + (head_kept[-1] - head_kept)
    both = judged_kept + (head_right[-1] - head_right)
    most = np.maximum(kept, judge_keeps.sum())
    agreement = np.where(most > 0, both / np.maximum(most, 1), 1.0)
    widths = np.concatenate([[-1.0], distance])  # m judged pairs need every distance <= widths[m]
    return agreement, widths, np.arange(len(order) + 1) / max(1, len(order))


def plan_cascade(
    train_pred: np.ndarray,
    train_judge: np.ndarray,
    pred: np.ndarray,
    judge: np.ndarray,
    metric: str,
    options: DistillOptions,
) -> Cascade:
    """The judge's cut, the head's cut and the narrowest band reaching the wanted agreement."""
    if options.threshold is not None:
        judge_cut = float(options.threshold)
    else:
        judge_cut = float(np.quantile(train_judge, 1 - options.top_fraction, method="higher"))
    kept_share = float((train_judge >= judge_cut).mean())
    head_cut = float(np.quantile(train_pred, 1 - kept_share)) if 0 < kept_share < 1 else judge_cut
    agreement, widths, fractions = cascade_curve(pred, judge, head_cut, judge_cut)
    curve = {}
    for wanted in sorted({0.9, 0.95, 0.99, options.agreement}):
        reached = np.flatnonzero(agreement >= wanted)
        curve[f"{wanted:g}"] = float(fractions[reached[0]]) if len(reached) else 1.0
    reached = np.flatnonzero(agreement >= options.agreement)
    m = int(reached[0]) if len(reached) else len(pred)
    band = None
    if m > 0:
        half = float(widths[m])
        band = (head_cut - half, head_cut + half)
    return Cascade(
        metric=metric,
        judge_cut=judge_cut,
        head_cut=head_cut,
        band=band,
        judge_fraction=float(fractions[m]),
        agreement=float(agreement[m]),
        head_only_agreement=float(agreement[0]),
        curve=curve,
    )


def _stat(value: Any) -> float | None:
    value = float(value)
    return None if np.isnan(value) else round(value, 4)


# -- the stage: predictions for the whole pool --------------------------------------------------------


class DistillStageOptions(StageOptions):
    head: str  # the head's folder
    embeddings_stage: str


class DistillStage(Stage):
    """``distilled_<metric>`` for every pair with kept embeddings: one matrix product per shard."""

    kind = DISTILL_STAGE
    Options = DistillStageOptions

    def __init__(self, options: DistillStageOptions, name: str | None = None):
        super().__init__(options, name)
        self.head = DistilledHead.load(options.head)

    def schema(self) -> pa.Schema:
        return identity_schema([pa.field(c, pa.float32()) for c in self.head.columns])

    def identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "head": self.head.fingerprint(),
            "metrics": self.head.metrics,
            "embeddings_stage": self.options.embeddings_stage,
        }

    def provenance(self) -> dict[str, Any]:
        info = dict(self.head.info)
        warnings = info.pop("warnings", [])
        return {
            "kind": self.kind,
            "head": {
                "folder": str(Path(self.options.head).resolve()),
                "fingerprint": self.head.fingerprint(),
                "form": self.head.form,
                "metrics": self.head.metrics,
                **info,
            },
            **({"warnings": warnings} if warnings else {}),
        }

    def wants_gpu(self) -> bool:
        return False

    def process(self, task: StageTask, progress: ProgressCallback | None = None) -> Iterator[pa.RecordBatch]:
        embeddings = RunEmbeddings(task.run, self.options.embeddings_stage)
        columns = ("uid", "shard", "key", "error", "error_detail")
        block: EmbeddingBlock | None = embeddings.shard(task.shard_id, self.head.modalities, columns)
        if block is None:  # a shard-level failure: the embeddings of this shard are not done
            raise RuntimeError(f"stage {self.options.embeddings_stage!r} has not finished shard {task.shard_id!r}")
        table = block.table
        usable = block.valid & table.column("error").is_null().to_numpy(zero_copy_only=False)
        predictions = np.zeros((table.num_rows, len(self.head.metrics)), dtype=np.float32)
        if usable.any():
            predictions[usable] = self.head.predict({m: v[usable] for m, v in block.vectors.items()})
        error = table.column("error").to_pylist()
        detail = table.column("error_detail").to_pylist()
        for i in np.flatnonzero(~usable):
            if error[i] is None:
                error[i], detail[i] = "no_embedding", f"no {self.options.embeddings_stage} embedding for this pair"
        arrays = {name: table.column(name).combine_chunks() for name in ("uid", "shard", "key")}
        for j, column in enumerate(self.head.columns):
            arrays[column] = pa.array(predictions[:, j], mask=~usable, type=pa.float32())
        arrays["error"] = pa.array(error, type=pa.string())
        arrays["error_detail"] = pa.array(detail, type=pa.string())
        batch = pa.RecordBatch.from_pydict(arrays, schema=self.schema())
        if progress:
            progress(batch.num_rows, int((~usable).sum()))
        yield batch


# -- the verb -----------------------------------------------------------------------------------------


def distill_run(
    run: str | Path,
    options: DistillOptions | None = None,
    *,
    head_dir: str | Path | None = None,
    stage: str = DISTILL_STAGE,
    overwrite: bool = False,
    show_progress: bool = False,
) -> DistillResult:
    """Fit, measure and save a head, then predict the whole pool into the stage ``stage``."""
    from mlmfilter import __version__
    from mlmfilter.runs.runner import run_stage

    options = options or DistillOptions()
    reader = RunReader(run)
    embeddings = RunEmbeddings(reader, options.embeddings_stage)
    judge_stage, metrics = resolve_judge(reader, options, exclude=(stage, embeddings.stage))
    decide_by = options.decide_by or metrics[0]
    if decide_by not in metrics:
        raise ValueError(f"--decide-by {decide_by!r} is not among the distilled metrics ({', '.join(metrics)})")
    modalities = embeddings.modalities
    product = len(modalities) == 2 and embeddings.dim("image") == embeddings.dim("text")
    sample = judged_sample(reader, embeddings, judge_stage, metrics, product)
    heldout = _heldout_mask(sample.uids, options.holdout, options.seed)
    if heldout.all() or (~heldout).sum() < 2:
        raise ValueError(f"too few judged pairs to fit and hold out ({len(sample.uids)}); score a larger sample")
    notes: list[str] = []
    if heldout.sum() < 10:
        notes.append(f"only {int(heldout.sum())} held-out pairs: the agreement figures are rough")

    head = fit_head(
        sample.x[~heldout], sample.y[~heldout], metrics, modalities, product, options.form, options.seed, options.hidden
    )
    train_pred = head.predict_features(sample.x[~heldout])
    pred = head.predict_features(sample.x[heldout]) if heldout.any() else np.zeros((0, len(metrics)))
    judge = sample.y[heldout]
    reports = []
    for j, metric in enumerate(metrics):
        if len(judge) >= 3:
            rho = _stat(spearman(pred[:, j], judge[:, j]))
            overlap = top_overlap(pred[:, j], judge[:, j], options.top_fraction)
            mae = _stat(np.abs(pred[:, j] - judge[:, j]).mean())
        else:
            rho = overlap = mae = None
        reports.append(MetricReport(metric, rho, None if overlap is None else round(overlap, 4), mae))
    d = metrics.index(decide_by)
    cascade = (
        plan_cascade(train_pred[:, d], sample.y[~heldout][:, d], pred[:, d], judge[:, d], decide_by, options)
        if len(judge)
        else None
    )

    warnings = list(dict.fromkeys(embeddings.warnings() + reader.provenance(judge_stage).get("warnings", [])))
    if warnings:
        warnings.append(RANDOM_NOTE)
    judge_settings = reader.settings(judge_stage)
    head.info.update(
        {
            "mlmfilter": __version__,
            "trained_on": {
                "run": reader.url,
                "judge_stage": judge_stage,
                "sample": _sample_description(judge_settings),
                "judged_pairs": len(sample.uids),
                "train_pairs": int((~heldout).sum()),
                "heldout_pairs": int(heldout.sum()),
                "holdout": {"fraction": options.holdout, "seed": options.seed, "rule": "blake2b(holdout:seed:uid)"},
                "judge_provenance": reader.provenance(judge_stage).get("scorers", {}),
            },
            "embeddings": embeddings.describe(),
            "features": modalities + (["image*text"] if product else []),
            "options": options.model_dump(mode="json"),
            "heldout_agreement": {r.metric: _report_json(r) for r in reports},
            "cascade": _cascade_json(cascade),
            "warnings": warnings,
        }
    )
    head_dir = Path(head_dir) if head_dir is not None else _default_head_dir(reader, stage)
    head.save(head_dir)
    summary = run_stage(
        reader.url,
        DistillStage(DistillStageOptions(head=str(head_dir), embeddings_stage=embeddings.stage), name=stage),
        overwrite="stage" if overwrite else False,
        show_progress=show_progress,
    )
    if not summary.ok:
        notes.append(f"the prediction stage did not finish: {summary.shards_failed or 'interrupted'}")
    return DistillResult(
        run_dir=reader.url,
        head_dir=str(head_dir),
        stage=stage,
        metrics=metrics,
        judged=len(sample.uids),
        trained=int((~heldout).sum()),
        heldout=int(heldout.sum()),
        reports=reports,
        cascade=cascade,
        predicted={**summary.stats.to_json(), "ok": summary.ok, "interrupted": summary.interrupted},
        warnings=warnings,
        notes=notes,
    )


def _sample_description(settings: dict[str, Any]) -> dict[str, Any]:
    """How the judge stage chose the pairs it scored (its cascade / random sample settings)."""
    identity = settings.get("identity") or {}
    return {
        "only": identity.get("only"),
        "sample": identity.get("sample"),
        "scorers": [s.get("scorer") for s in identity.get("scorers", []) if isinstance(s, dict)],
    }


def _default_head_dir(reader: RunReader, stage: str) -> Path:
    if "://" in reader.url:
        raise ValueError("a run folder on object storage needs an explicit head folder (-o/--output)")
    return Path(reader.url) / "heads" / stage


__all__ = ["DISTILL_STAGE", "DistillOptions", "DistillResult", "DistillStage", "NoEmbeddings", "distill_run"]
