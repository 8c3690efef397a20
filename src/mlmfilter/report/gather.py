"""What a report shows, gathered from a run without rendering anything.

A few streaming passes over the score tables (see :mod:`mlmfilter.report.scan`) pick the pairs to
show: per column the top, bottom and borderline ones; per column pair the ones the two scorers
disagree on most; per error reason a few examples; with a selection, the kept pairs nearest the
cut and the dropped ones just below it; with an enhancement stage, accepted and rejected
rewrites. Only then are those pairs read back from their shards (:mod:`mlmfilter.io.lookup`), one
pass per shard, for captions and thumbnails.
"""

from __future__ import annotations

import datetime as _dt
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.io.lookup import lookup_samples
from mlmfilter.io.readers import ReadOptions
from mlmfilter.io.uid import isin_sorted, uids_to_halves
from mlmfilter.report.profile import ColumnProfile, profile_columns
from mlmfilter.report.scan import (
    BestRows,
    DisagreementCollector,
    ErrorCollector,
    ExtremesCollector,
    FlagCollector,
    NearestRows,
    PairRef,
    ReasonCollector,
    ReservoirCollector,
    flag_columns,
    numeric_columns,
    reason_columns,
    scan,
)
from mlmfilter.report.thumbnails import ShownSample, ThumbnailMaker
from mlmfilter.runs.folder import Completeness
from mlmfilter.runs.read import RunReader
from mlmfilter.selection.expression import parse_expression
from mlmfilter.selection.folder import SelectionFolder
from mlmfilter.selection.ranks import spearman
from mlmfilter.selection.stages import resolve_stages, stages_dataset

SCORE_STAGE = "score"
#: rule measurements (word counts, sizes, language probability) get histograms but no galleries:
#: their extremes say little about pairs; the rule flag's failures are shown instead
MEASUREMENT_PREFIX = "rules_"
#: column pairs whose sampled ranks agree this well are one ranking in two units (clip_cosine and
#: clip_score): their scatter plot and disagreements would show nothing
SAME_RANKING = 0.99
#: the scores people threshold on, shown first when present (then the others, in table order)
PRIMARY_SCORES = ("clip_score", "itm", "odf", "ctq", "su")
ENHANCE_COLUMNS = ("original_caption", "decision")


class ReportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    columns: list[str] | None = None  # score columns to show; None: every numeric score column
    gallery_size: int = Field(8, ge=0, le=100)  # pairs per gallery
    error_examples: int = Field(3, ge=0, le=50)  # pairs shown per error reason
    scatter_points: int = Field(3000, ge=10)  # uniform sample of rows in each scatter plot
    max_column_pairs: int = Field(6, ge=0)  # scatter plots / disagreement galleries
    thumbnail_side: int = Field(160, ge=16, le=1024)
    seed: int = 0
    #: the stages shown: one, several joined on uid ("score,judge"), or None / "all": every scoring
    #: stage (a selection's own stages first, so its expression reads the same columns)
    stage: str | None = None


@dataclass
class ColumnSection:
    profile: ColumnProfile
    threshold: float | None  # the cut drawn on the plots
    threshold_label: str
    same_ranking_as: str | None = None  # an earlier column that orders the pairs the same way
    top: list[PairRef] = field(default_factory=list)
    bottom: list[PairRef] = field(default_factory=list)
    borderline: list[PairRef] = field(default_factory=list)
    gallery: bool = True


@dataclass
class PairSection:
    a: str
    b: str
    x: np.ndarray  # sampled values of a
    y: np.ndarray
    rank_correlation: float | None  # Spearman on the sample
    a_over_b: list[PairRef]  # ranked high by a, low by b
    b_over_a: list[PairRef]


@dataclass
class FlagSection:
    name: str
    counts: dict[str, int]
    failing: list[PairRef]
    reasons: dict[str, int] = field(default_factory=dict)  # failed rule -> rows (rules_failed), most first


@dataclass
class SelectionSection:
    path: str
    summary: dict[str, Any]
    kept: int
    rows: int
    by: str | None
    cut: float | None
    kept_lowest: list[PairRef]
    dropped_highest: list[PairRef]  # passed the expression, fell below the cut
    kept_sample: list[PairRef]
    dropped_sample: list[PairRef]  # failed the expression (all dropped ones without an expression)
    expression: str | None = None


@dataclass
class Rewrite:
    ref: PairRef
    before: str | None
    after: str | None
    decision: str | None
    reason: str | None


@dataclass
class EnhanceSection:
    stage: str
    decisions: dict[str, int]
    reasons: dict[str, int]
    accepted: list[Rewrite]
    rejected: list[Rewrite]


@dataclass
class DuplicateGroup:
    group: int
    size: int
    reason: str | None
    members: list[PairRef]  # the kept pair first, then the most similar to it


@dataclass
class DuplicatesSection:
    stage: str
    summary: dict[str, Any]  # pairs, groups, removed, by_reason, settings (from the stage's provenance)
    groups: list[DuplicateGroup]  # the largest groups


@dataclass
class DistillSection:
    stage: str
    head: dict[str, Any]  # the head's record: metrics, held-out agreement, cascade, training provenance
    warnings: list[str]


@dataclass
class ReportData:
    run: str
    generated: str
    rows: int
    stages: list[str]  # the stages shown, joined on uid when several
    card_columns: list[str]  # the values printed on each pair's card: scores and flags, not measurements
    completeness: Completeness  # of the score stage
    provenance: dict[str, dict]
    warnings: list[str]
    columns: list[ColumnSection]
    pairs: list[PairSection]
    flags: list[FlagSection]
    errors: list[tuple[str, int, list[PairRef]]]
    selection: SelectionSection | None
    enhancement: EnhanceSection | None
    shown: dict[tuple[str, str], ShownSample] = field(default_factory=dict)
    duplicates: DuplicatesSection | None = None
    distilled: list[DistillSection] = field(default_factory=list)
    embeddings: list[dict[str, Any]] = field(default_factory=list)  # each stage keeping them: what made them
    not_found: list[tuple[str, str]] = field(default_factory=list)

    def sample(self, ref: PairRef) -> ShownSample | None:
        return self.shown.get(ref.where)


def gather_report(
    run: RunReader, run_url: str, selection_dir: str | None = None, options: ReportOptions | None = None
) -> ReportData:
    options = options or ReportOptions()
    selection = _read_selection(run_url, selection_dir)
    stages = resolve_stages(run, options.stage, first=selection["stages"] if selection else ())
    dataset = stages_dataset(run, stages)
    schema = dataset.schema
    numeric = _chosen_columns(numeric_columns(schema), options.columns)
    flags = flag_columns(schema)
    reasons = reason_columns(schema)  # which rule failed (rules_failed), shown on every card
    shown_values = [*numeric, *flags, *reasons]  # what the galleries' rows carry
    k = options.gallery_size

    cut_column = selection["by"] if selection and selection.get("by") in numeric else None
    cut = selection.get("cut") if cut_column else None
    profiles = profile_columns(dataset, numeric, thresholds={cut_column: [cut]} if cut is not None else None)
    rows = next(iter(profiles.values())).rows if profiles else dataset.count_rows()
    gallery_columns = sorted(
        (c for c in numeric if not c.startswith(MEASUREMENT_PREFIX) and not profiles[c].empty),
        key=lambda c: PRIMARY_SCORES.index(c) if c in PRIMARY_SCORES else len(PRIMARY_SCORES),
    )

    # pass: extremes, errors, flags, a sample for the scatter plots
    extremes = ExtremesCollector(gallery_columns, k, shown_values)
    error_rows = ErrorCollector(options.error_examples, shown_values)
    flag_rows = FlagCollector(flags, k, shown_values)
    reason_counts = ReasonCollector(reasons)
    reservoir = ReservoirCollector(gallery_columns, options.scatter_points, options.seed)
    scan(dataset, [extremes, error_rows, flag_rows, reason_counts, reservoir], shown_values)

    thresholds, labels = {}, {}
    for name in gallery_columns:
        if name == cut_column and selection.get("cut") is not None:
            thresholds[name], labels[name] = selection["cut"], "the selection's cut"
        else:
            thresholds[name], labels[name] = profiles[name].quantile(0.5), "the median"
    sample = reservoir.values()
    aliases = _same_rankings(gallery_columns, sample)
    column_pairs = _distinct_pairs([c for c in gallery_columns if c not in aliases], sample)[: options.max_column_pairs]

    # pass: borderline pairs, disagreements, the selection's edges
    nearest = NearestRows(thresholds, k, shown_values)
    disagreement = DisagreementCollector(
        [(a, b) for a, b, _ in column_pairs], {n: profiles[n].percentile_rank for n in gallery_columns}, k, shown_values
    )
    collectors: list = [nearest, disagreement]
    edges = _SelectionEdges(selection, schema, k, shown_values, options.seed) if selection else None
    if edges:
        collectors.append(edges)
    scan(dataset, collectors, shown_values, extra_columns=edges.columns if edges else ())

    columns = []
    for name in [*gallery_columns, *(n for n in numeric if n not in gallery_columns)]:  # measurements last
        section = ColumnSection(profiles[name], thresholds.get(name), labels.get(name, ""), aliases.get(name))
        if name in thresholds and name not in aliases:
            section.top, section.bottom = extremes.top[name].rows(), extremes.bottom[name].rows()
            section.borderline = sorted(nearest.nearest[name].rows(), key=lambda r: r.values.get(name) or 0.0)
        else:
            section.gallery = False
        columns.append(section)
    pairs = [
        PairSection(
            a,
            b,
            sample[a],
            sample[b],
            rho,
            disagreement.first_higher[(a, b)].rows(),
            disagreement.second_higher[(a, b)].rows(),
        )
        for a, b, rho in column_pairs
    ]
    enhancement = _gather_enhancement(run, k)
    provenance = {stage: _safe(run.provenance, stage) for stage in run.stages()}
    data = ReportData(
        run=run_url,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        rows=rows,
        stages=stages,
        card_columns=[*(c for c in gallery_columns if c not in aliases), *flags, *reasons],
        completeness=run.completeness(stages[0]),
        provenance=provenance,
        warnings=run.warnings(),
        columns=columns,
        pairs=pairs,
        flags=[
            FlagSection(n, flag_rows.counts[n], flag_rows.false_examples[n], reason_counts.for_flag(n)) for n in flags
        ],
        errors=sorted(((r, c, error_rows.examples[r]) for r, c in error_rows.counts.items()), key=lambda e: -e[1]),
        selection=edges.section(selection, rows) if edges else None,
        enhancement=enhancement,
        duplicates=_gather_duplicates(run, k),
        distilled=_gather_distilled(run),
        embeddings=_gather_embeddings(run),
    )
    _look_up(run, data, options)
    return data


# -- helpers ---------------------------------------------------------------------------------------


def _chosen_columns(available: list[str], wanted: list[str] | None) -> list[str]:
    if wanted is None:
        return available
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ValueError(f"no numeric score column {', '.join(map(repr, unknown))} (columns: {', '.join(available)})")
    return list(wanted)


def _same_rankings(columns: list[str], sample: dict[str, np.ndarray]) -> dict[str, str]:
    """column -> the earlier column it ranks the same as (e.g. clip_cosine and clip_score)."""
    aliases: dict[str, str] = {}
    for i, name in enumerate(columns):
        for earlier in columns[:i]:
            rho = _sampled_spearman(sample[earlier], sample[name])
            if earlier not in aliases and rho is not None and rho >= SAME_RANKING:
                aliases[name] = earlier
                break
    return aliases


def _distinct_pairs(columns: list[str], sample: dict[str, np.ndarray]) -> list[tuple[str, str, float | None]]:
    """Column pairs worth comparing, least agreeing first, with their sampled rank correlation."""
    pairs = []
    for a, b in itertools.combinations(columns, 2):
        if _scorer_of(a) == _scorer_of(b):  # clip_cosine and clip_score: one scorer, one derived from the other
            continue
        rho = _sampled_spearman(sample[a], sample[b])
        if rho is not None and rho >= SAME_RANKING:
            continue
        pairs.append((a, b, rho))
    return sorted(pairs, key=lambda p: 2.0 if p[2] is None else p[2])


def _scorer_of(column: str) -> str:
    """The scorer that wrote a column: its name's prefix (``clip`` of ``clip_score``, ``judge.clip`` of
    ``judge.clip_score``); the judge's metrics (itm, odf) are each their own."""
    stage, _, name = column.rpartition(".")
    return f"{stage}.{name.split('_', 1)[0]}" if stage else name.split("_", 1)[0]


def _sampled_spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho over the rows of a sample where both columns have a value; None when fewer
    than three do or one column is constant there (it ranks nothing)."""
    both = ~np.isnan(x) & ~np.isnan(y)
    if both.sum() < 3:
        return None
    x, y = x[both], y[both]
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearman(x, y))


def _read_selection(run_url: str, selection_dir: str | None) -> dict[str, Any] | None:
    """The selection's summary and its sorted uid halves; None when the run holds none (and none was named)."""
    if selection_dir is None:
        folder = SelectionFolder.in_run(run_url)
        if not folder.exists():
            return None
    else:
        folder = SelectionFolder(selection_dir).require()
    summary = folder.summary()
    threshold = summary.get("threshold") or {}
    arguments = summary.get("arguments") or {}
    by = arguments.get("by")
    cut = threshold.get("score") if isinstance(threshold, dict) else None
    # the stages it read, so the report reads its columns under the same names (older selections: one stage)
    stages = arguments.get("stages") or [arguments.get("stage") or SCORE_STAGE]
    return {"path": folder.url, "summary": summary, "halves": folder.uids(), "by": by, "cut": cut, "stages": stages}


class _SelectionEdges:
    """Kept pairs nearest the cut, dropped ones just below it (they passed the expression), and
    random kept pairs and pairs the expression dropped."""

    def __init__(self, selection: dict[str, Any], schema, k: int, shown: list[str], seed: int):
        self.halves = selection["halves"]
        self.by = selection.get("by")
        text = (selection["summary"].get("arguments") or {}).get("expression")
        if text:
            # a selection joined over several runs, or over stages the report does not show: the
            # columns it read may not be here; then kept/dropped are still shown, only the "passed
            # the expression" split is not
            try:
                parse_expression(text, schema)
            except ValueError:
                text = None
        self.expression = parse_expression(text, schema) if text else None
        self.columns = list(self.expression.columns) if self.expression else []
        self.kept_lowest, self.dropped_highest = BestRows(k, shown), BestRows(k, shown)
        self.kept_sample, self.dropped_sample = BestRows(k, shown), BestRows(k, shown)
        self.kept = 0
        self._rng = np.random.default_rng(seed)

    def update(self, batch) -> None:
        kept = isin_sorted(self.halves, uids_to_halves(batch.arrow.column("uid")))
        self.kept += int(kept.sum())
        passed = self._passed(batch.arrow)
        random = self._rng.random(batch.num_rows)
        self.kept_sample.offer(batch, np.where(kept, random, np.nan))
        self.dropped_sample.offer(batch, np.where(~kept & ~passed, random, np.nan))
        if self.by in batch.values:
            values = batch.values[self.by]
            self.kept_lowest.offer(batch, np.where(kept, -values, np.nan))
            self.dropped_highest.offer(batch, np.where(~kept & passed, values, np.nan))

    def _passed(self, arrow_batch) -> np.ndarray:
        if self.expression is None:
            return np.ones(arrow_batch.num_rows, dtype=bool)
        scanner = ds.Scanner.from_batches(
            iter([arrow_batch]), schema=arrow_batch.schema, columns={"passed": self.expression.expression}
        )
        return scanner.to_table()["passed"].to_numpy(zero_copy_only=False).astype(bool)

    def section(self, selection: dict[str, Any], rows: int) -> SelectionSection:
        return SelectionSection(
            path=selection["path"],
            summary=selection["summary"],
            kept=self.kept,
            rows=rows,
            by=self.by,
            cut=selection.get("cut"),
            kept_lowest=self.kept_lowest.rows(),
            dropped_highest=self.dropped_highest.rows(),
            kept_sample=self.kept_sample.rows(),
            dropped_sample=self.dropped_sample.rows(),
            expression=self.expression.text if self.expression else None,
        )


def _gather_enhancement(run: RunReader, k: int) -> EnhanceSection | None:
    """The first stage whose table holds rewrites (original_caption + decision), summarised."""
    for stage in run.stages():
        if stage == SCORE_STAGE:
            continue
        try:
            dataset = run.dataset(stage)
        except ValueError:  # a stage without completed shards has nothing to show yet
            continue
        names = dataset.schema.names
        if not set(ENHANCE_COLUMNS) <= set(names):
            continue
        # the scores before and after each rewrite, and the gain, shown on its card
        shown = [n for n in names if n.endswith(("_before", "_after")) or n == "gain"]
        collector = _RewriteCollector(k, shown)
        extra = [c for c in ("original_caption", "decision", "reason", "caption", "candidates") if c in names]
        scan(dataset, [collector], shown, extra_columns=extra)
        return EnhanceSection(stage, collector.decisions, collector.reasons, collector.accepted, collector.rejected)
    return None


class _RewriteCollector:
    def __init__(self, k: int, shown: list[str]):
        self.k, self.shown = k, shown
        self.decisions: dict[str, int] = {}
        self.reasons: dict[str, int] = {}
        self.accepted: list[Rewrite] = []
        self.rejected: list[Rewrite] = []

    def update(self, batch) -> None:
        for entry in pc.value_counts(batch.arrow.column("decision")).to_pylist():
            name = entry["values"] or "none"
            self.decisions[name] = self.decisions.get(name, 0) + entry["counts"]
        for i in range(batch.num_rows):
            decision, reason = batch.scalar("decision", i), batch.scalar("reason", i)
            if decision != "accepted" and reason:
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
            bucket = self.accepted if decision == "accepted" else self.rejected
            if len(bucket) >= self.k:
                continue
            after = batch.scalar("caption", i)
            if after is None:  # rejected: show the best candidate that was turned down
                after = next(iter(batch.scalar("candidates", i) or []), None)
            bucket.append(
                Rewrite(batch.ref(i, self.shown), batch.scalar("original_caption", i), after, decision, reason)
            )


#: columns of a dedup stage (``mlmfilter dedup``) and how many of its largest groups the report shows
DEDUP_COLUMNS = ("dup_group", "dup_size", "dup_keep")
DEDUP_SHOWN = ("dup_keep", "dup_reason", "dup_nearest_cosine", "dup_size")
LARGEST_GROUPS = 6


def _gather_duplicates(run: RunReader, k: int) -> DuplicatesSection | None:
    """The first dedup stage: its summary and its largest groups (each member a card)."""
    for stage in run.stages():
        try:
            dataset = run.dataset(stage)
        except ValueError:
            continue
        if not set(DEDUP_COLUMNS) <= set(dataset.schema.names):
            continue
        columns = ["uid", "shard", "key", "dup_group", "dup_reason", "error", "error_detail"]
        columns += [c for c in DEDUP_SHOWN if c not in columns]
        table = dataset.to_table(columns=columns, filter=pc.field("dup_group").is_valid())
        groups: list[DuplicateGroup] = []
        if table.num_rows:
            counts = pc.value_counts(table.column("dup_group")).to_pylist()
            counts.sort(key=lambda e: (-e["counts"], e["values"]))
            for entry in counts[:LARGEST_GROUPS]:
                members = table.filter(pc.equal(table.column("dup_group"), entry["values"])).to_pylist()
                members.sort(key=lambda r: (not r["dup_keep"], -(r["dup_nearest_cosine"] or 0.0), r["uid"]))
                refs = [
                    PairRef(
                        uid=r["uid"],
                        shard=r["shard"],
                        key=r["key"],
                        values={name: r[name] for name in DEDUP_SHOWN},
                        error=r["error"],
                        error_detail=r["error_detail"],
                        note="kept" if r["dup_keep"] else None,
                    )
                    for r in members[: max(k, 2)]
                ]
                reason = next((r["dup_reason"] for r in members if r["dup_keep"]), members[0]["dup_reason"])
                groups.append(DuplicateGroup(int(entry["values"]), int(entry["counts"]), reason, refs))
        summary = (_safe(run.provenance, stage).get("summary")) or {}
        return DuplicatesSection(stage, summary, groups)
    return None


def _gather_embeddings(run: RunReader) -> list[dict[str, Any]]:
    """Per stage keeping embeddings (read through the one embeddings reader): model, size, random or not."""
    from mlmfilter.runs.embeddings import RunEmbeddings

    out = []
    for stage in RunEmbeddings.stages_with(run):
        embeddings = RunEmbeddings(run, stage)
        for modality in embeddings.modalities:
            info = embeddings.info(modality)
            out.append(
                {
                    "stage": stage,
                    "modality": modality,
                    "model": info.get("model"),
                    "dim": embeddings.dim(modality),
                    "random": bool(info.get("random_weights")) or bool(embeddings.warnings()),
                }
            )
    return out


def _gather_distilled(run: RunReader) -> list[DistillSection]:
    """Every stage of a distilled head's predictions: the head's held-out agreement with the judge."""
    out = []
    for stage in run.stages():
        provenance = _safe(run.provenance, stage)
        if provenance.get("kind") == "distill" and isinstance(provenance.get("head"), dict):
            out.append(DistillSection(stage, provenance["head"], list(provenance.get("warnings", []))))
    return out


def _safe(read, stage: str) -> dict:
    try:
        return read(stage) or {}
    except FileNotFoundError:
        return {}


def _look_up(run: RunReader, data: ReportData, options: ReportOptions) -> None:
    """Captions and thumbnails of every pair the report shows, one pass per shard."""
    refs: list[PairRef] = []
    for column in data.columns:
        refs += column.top + column.bottom + column.borderline
    for pair in data.pairs:
        refs += pair.a_over_b + pair.b_over_a
    for flag in data.flags:
        refs += flag.failing
    for _, _, examples in data.errors:
        refs += examples
    if data.selection:
        s = data.selection
        refs += s.kept_lowest + s.dropped_highest + s.kept_sample + s.dropped_sample
    if data.enhancement:
        refs += [r.ref for r in data.enhancement.accepted + data.enhancement.rejected]
    if data.duplicates:
        refs += [ref for group in data.duplicates.groups for ref in group.members]
    wanted = {ref.where for ref in refs if ref.in_shard}
    found = lookup_samples(
        run.sources(), wanted, ThumbnailMaker(options.thumbnail_side), ReadOptions(**run.read_options())
    )
    data.shown = dict(found)
    data.not_found = found.missing
