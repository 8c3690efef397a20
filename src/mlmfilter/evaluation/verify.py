"""Trust the numbers after: re-score a sample of a finished run and compare it with the run's own scores.

A judge's scores must not depend on how pairs were batched, on the prefix cache or on the backend. This
check takes a seeded sample of a run's scored pairs, reads them back from their shards, decodes them as
the run did (the stage's decode size over all its scorers) and re-scores them with the run's recorded
MLM judge settings:

- ``batch_size_1``: one pair at a time, in the run's dtype (batching and padding must not matter);
- ``fp32``: one pair at a time in float32; judged when the run was fp32 too, shown (not judged) for a
  run scored in bf16/fp16, whose scores differ from fp32 by the precision, not by the readout;
- ``backend``: on a second backend when one is given (``vllm``, ``openai`` with its server).

Per metric it reports the largest absolute difference of the score (and of its mass) against the bound
derived from the readout recorded in ``provenance.json`` (the rule: DEVELOPERS.md, "Verifying a run"):

- ``generate``: the integers must be equal (bound 0);
- ``expected`` with ``trie_threshold`` t: each P(s) of either computation is within t of exact, so the two
  means differ by at most ``2t (sum_s s + mean * 101) / mass <= 30300 t / mass`` score points, per row
  (``mass``: the run's ``<metric>_mass``), plus :data:`FLOAT_FLOOR` for float32 rounding, capped at
  100 (the scale); ``<metric>_unplaced`` of a top-k backend adds ``100 x`` its unplaced mass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: score points allowed beyond the readout's bound: float32 rounding and summation order (a relative error
#: of ~1e-5 on each P(s) moves a 0..100 mean by ~1e-3 at most, whatever the mass)
FLOAT_FLOOR = 1e-3
#: no difference on the 0..100 scale can exceed this: a bound beyond it guarantees nothing
SCALE = 100.0
#: the bound's factor on the trie threshold: 2 (two computations) x (5050 + 100 x 101)
TRIE_FACTOR = 2.0 * (5050.0 + 100.0 * 101.0)


@dataclass
class MetricCheck:
    metric: str  # short name: itm, odf, ...
    bound: float  # the largest bound over the compared rows
    differences: dict[str, float | None]  # check -> largest |score difference| (None: not run)
    mass_differences: dict[str, float | None]
    exceeded: dict[str, int]  # check -> rows whose difference exceeds that row's bound
    informative: list[str] = field(default_factory=list)  # checks reported but not judged (see fp32)

    @property
    def ok(self) -> bool:
        return not any(n for check, n in self.exceeded.items() if check not in self.informative)


@dataclass
class VerifyReport:
    run: str
    stage: str
    readout: str
    readout_bound: str
    dtype: str  # what the run was scored in
    sampled: int
    checks: list[str]
    metrics: list[MetricCheck]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.metrics)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        for item, check in zip(out["metrics"], self.metrics):
            item["ok"] = check.ok
        return out


def verify_run(
    run: str,
    *,
    stage: str = "score",
    sample: int = 16,
    seed: int = 0,
    backend: str | None = None,
    backend_options: dict[str, Any] | None = None,
    device: str | None = None,
) -> VerifyReport:
    from mlmfilter.images.decode import decode_sample
    from mlmfilter.io.lookup import lookup_samples
    from mlmfilter.io.readers import ReadOptions
    from mlmfilter.judge.prompts import resolve_metrics, short_name
    from mlmfilter.runs.read import RunReader
    from mlmfilter.scorers.stage import ScoringOptions, ScoringStage, decode_spec

    reader = RunReader(run)
    settings = reader.settings(stage)
    if settings.get("kind") != "score":
        raise ValueError(f"stage {stage!r} of {run} is a {settings.get('kind')!r} stage, not a scoring")
    options = ScoringOptions(**settings["options"])
    specs = [s for s in options.scorers if s.name == "mlm"]
    if not specs:
        raise ValueError(f"stage {stage!r} of {run} has no mlm scorer to verify")
    spec = specs[0]
    provenance = reader.provenance(stage).get("scorers", {}).get("mlm", {})
    readout = str(provenance.get("readout") or spec.options.get("readout") or "expected")
    threshold = float(provenance.get("trie_threshold", spec.options.get("trie_threshold", 1e-4)))
    metrics = [short_name(m) for m in resolve_metrics(spec.options.get("metrics", "itm,odf,ctq,su"))]
    run_dtype = str((provenance.get("model") or {}).get("dtype") or "unknown")

    rows = _sample_rows(reader, stage, metrics, readout, sample, seed)
    notes: list[str] = []
    if not rows:
        raise ValueError(f"stage {stage!r} of {run} has no scored pair to verify")
    stage_scorers = ScoringStage(options).scorers  # the decode size over every scorer of the run
    spec_decode = decode_spec(stage_scorers, options.max_pixels)
    found = lookup_samples(
        reader.sources(), [(r["shard"], r["key"]) for r in rows], lambda s: s, ReadOptions(**reader.read_options())
    )
    pairs, kept = [], []
    for row in rows:
        pair = found.get((row["shard"], row["key"]))
        if pair is None or pair.error:
            continue
        decode_sample(pair, spec_decode)
        if pair.error:
            continue
        pairs.append(pair)
        kept.append(row)
    if len(kept) < len(rows):
        notes.append(f"{len(rows) - len(kept)} sampled pairs could not be read back from their shards")
    if not kept:
        raise ValueError(f"none of the sampled pairs of {run} could be read back from its shards")

    base = dict(spec.options)
    if device is not None:
        base["device"] = device
    variants: dict[str, dict[str, Any]] = {
        "batch_size_1": {**base, "batch_size": 1},
        "fp32": {**base, "batch_size": 1, "dtype": "fp32"},
    }
    if backend is not None:
        variants["backend"] = {**base, "backend": backend, "backend_options": dict(backend_options or {})}
    rescored = {name: _rescore(opts, pairs) for name, opts in variants.items()}

    low = [m for m in metrics if readout == "expected" and any(_num(r.get(f"{m}_mass")) < 0.1 for r in kept)]
    if low:
        notes.append(
            f"{', '.join(low)}: some pairs put under 10% of their probability on a score (an untrained or random "
            "judge?); the readout bound is loose there, divided by that mass"
        )
    # a run scored in bf16/fp16 is not expected to equal fp32 within the readout's bound: that check is
    # reported for what it shows, and the verdict rests on the run's own dtype (batch size 1, backend)
    informative = [] if run_dtype == "fp32" else ["fp32"]
    if informative:
        notes.append(f"the run was scored in {run_dtype}: the fp32 column shows the precision's effect, not judged")
    checks = []
    for metric in metrics:
        bounds = np.array([_row_bound(row, metric, readout, threshold) for row in kept])
        differences, mass_differences, exceeded = {}, {}, {}
        for name, new_rows in rescored.items():
            old = np.array([_num(r.get(metric)) for r in kept])
            new = np.array([_num(r.get(metric)) for r in new_rows])
            diff = np.abs(new - old)
            diff[np.isnan(diff)] = np.inf  # a pair scored once and not the other time is a difference
            extra = np.array([_unplaced_bound(a, metric) + _unplaced_bound(b, metric) for a, b in zip(kept, new_rows)])
            differences[name] = float(diff.max())
            exceeded[name] = int(np.sum(diff > bounds + extra))
            if readout == "expected":
                old_mass = np.array([_num(r.get(f"{metric}_mass")) for r in kept])
                new_mass = np.array([_num(r.get(f"{metric}_mass")) for r in new_rows])
                mass_differences[name] = float(np.nanmax(np.abs(new_mass - old_mass)))
        checks.append(MetricCheck(metric, float(bounds.max()), differences, mass_differences, exceeded, informative))
    return VerifyReport(
        run=str(run),
        stage=stage,
        readout=readout,
        readout_bound=str(provenance.get("readout_bound", "exact integers" if readout == "generate" else "")),
        dtype=run_dtype,
        sampled=len(kept),
        checks=list(variants),
        metrics=checks,
        notes=notes,
    )


def _sample_rows(reader, stage: str, metrics: Sequence[str], readout: str, n: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of the run's rows scored without error."""
    columns = ["shard", "key", "error", *metrics]
    if readout == "expected":
        columns += [f"{m}_mass" for m in metrics] + [f"{m}_unplaced" for m in metrics]
    dataset = reader.dataset(stage)
    present = [c for c in columns if c in dataset.schema.names]
    missing = [m for m in metrics if m not in dataset.schema.names]
    if missing:
        raise ValueError(f"stage {stage!r} has no column {', '.join(missing)}")
    table = dataset.to_table(columns=present)
    rows = [r for r in table.to_pylist() if r["error"] is None and all(r.get(m) is not None for m in metrics)]
    if len(rows) > n:
        picked = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
        rows = [rows[i] for i in sorted(picked)]
    return rows


def _rescore(options: dict[str, Any], pairs: list[Any]) -> list[dict[str, Any]]:
    from mlmfilter.scorers import build_scorer

    scorer = build_scorer("mlm", options)
    try:
        copies = [_copy(p) for p in pairs]  # a scorer marks failures on its samples: keep the originals clean
        return scorer.score(copies)
    finally:
        scorer.close()


def _copy(sample):
    import copy

    return copy.copy(sample)


def _row_bound(row: dict[str, Any], metric: str, readout: str, threshold: float) -> float:
    if readout == "generate":
        return 0.0
    mass = _num(row.get(f"{metric}_mass"))
    if not mass or math.isnan(mass) or mass <= 0:
        mass = 1.0
    return min(SCALE, TRIE_FACTOR * threshold / mass + FLOAT_FLOOR)


def _unplaced_bound(row: dict[str, Any], metric: str) -> float:
    unplaced = _num(row.get(f"{metric}_unplaced"))
    return 0.0 if math.isnan(unplaced) else 100.0 * unplaced


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)
