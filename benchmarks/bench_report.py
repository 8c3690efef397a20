"""Report data gathering on a large run: streaming passes vs loading the score table whole.

A synthetic score stage (uid, shard, key, clip_score, itm, odf, rules_ok, error; N rows in
parquet tables of 100k rows, as a run holds one table per input shard) is profiled two ways, each in its own process so peak memory is its own:

- ours: `mlmfilter.report.gather`'s passes (range, fine histogram, top/bottom/borderline rows,
  disagreement ranks, error examples), one arrow batch at a time;
- reference: pandas reads the columns whole, then np.quantile / nlargest / nsmallest and the rank
  differences on the full frame (what a notebook would do).

Prints wall time and peak RSS of each and the ratios. Usage:
    .venv/bin/python benchmarks/bench_report.py [--rows 3000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ["clip_score", "itm", "odf"]


def make_tables(folder: Path, rows: int, per_file: int = 100_000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    files, per = max(rows // per_file, 1), min(per_file, rows)
    for f in range(files):
        n = per
        clip = rng.normal(30, 5, n).astype(np.float32)
        itm = np.clip(clip * 2 + rng.normal(0, 15, n), 0, 100).astype(np.float32)
        odf = rng.uniform(0, 100, n).astype(np.float32)
        error = np.where(rng.random(n) < 0.01, "undecodable_image", None)
        for column in (clip, itm, odf):
            column[error != None] = np.nan  # noqa: E711 (elementwise)
        uids = [f"{f:08x}{i:024x}" for i in range(n)]
        table = pa.table(
            {
                "uid": uids,
                "shard": [f"{f:05d}"] * n,
                "key": [f"{i:09d}" for i in range(n)],
                "clip_score": clip,
                "itm": itm,
                "odf": odf,
                "rules_ok": rng.random(n) < 0.7,
                "error": pa.array(error, pa.string()),
                "error_detail": pa.nulls(n, pa.string()),
            }
        )
        pq.write_table(table, folder / f"{f:05d}.parquet")


def ours(folder: Path) -> dict:
    import pyarrow.dataset as ds

    from mlmfilter.report.profile import profile_columns
    from mlmfilter.report.scan import (
        DisagreementCollector,
        ErrorCollector,
        ExtremesCollector,
        FlagCollector,
        NearestRows,
        scan,
    )

    dataset = ds.dataset(str(folder), format="parquet")
    profiles = profile_columns(dataset, COLUMNS)
    shown = [*COLUMNS, "rules_ok"]
    extremes, errors = ExtremesCollector(COLUMNS, 8, shown), ErrorCollector(3, shown)
    scan(dataset, [extremes, errors, FlagCollector(["rules_ok"], 8, shown)], shown)
    nearest = NearestRows({c: profiles[c].quantile(0.5) for c in COLUMNS}, 8, shown)
    pairs = [("clip_score", "itm"), ("clip_score", "odf"), ("itm", "odf")]
    disagreement = DisagreementCollector(pairs, {c: profiles[c].percentile_rank for c in COLUMNS}, 8, shown)
    scan(dataset, [nearest, disagreement], shown)
    return {"median_itm": profiles["itm"].quantile(0.5), "top_itm": extremes.top["itm"].rows()[0].values["itm"]}


def reference(folder: Path) -> dict:
    import pandas as pd

    frame = pd.read_parquet(folder, columns=["uid", "shard", "key", *COLUMNS, "rules_ok", "error"])
    medians = {c: float(np.nanquantile(frame[c], 0.5)) for c in COLUMNS}
    for c in COLUMNS:
        frame[c].nlargest(8), frame[c].nsmallest(8), (frame[c] - medians[c]).abs().nsmallest(8)
    ranks = {c: frame[c].rank(pct=True) for c in COLUMNS}
    for a, b in [("clip_score", "itm"), ("clip_score", "odf"), ("itm", "odf")]:
        gap = ranks[a] - ranks[b]
        gap.nlargest(8), gap.nsmallest(8)
    frame["error"].value_counts()
    return {"median_itm": medians["itm"], "top_itm": float(frame["itm"].max())}


def _child(mode: str, folder: str) -> None:
    # both modes import what either uses first, so the memory baselines match
    import pandas  # noqa: F401

    import mlmfilter.report.gather  # noqa: F401

    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    result = (ours if mode == "ours" else reference)(Path(folder))
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "baseline_mb": baseline_mb, **result}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"))
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        make_tables(Path(tmp), args.rows)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
        tables = len(list(Path(tmp).iterdir()))
        runs = {}
        for mode in ("reference", "ours"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, tmp], capture_output=True, text=True, check=True
            )
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    ref, our = runs["reference"], runs["ours"]
    print(f"{args.rows} rows, {size:.0f} MB of parquet in {tables} tables")
    for mode, r in runs.items():
        print(
            f"  {mode:9s}: {r['seconds']:6.2f} s, peak RSS {r['peak_mb']:5.0f} MB "
            f"({r['peak_mb'] - r['baseline_mb']:5.0f} MB above the {r['baseline_mb']:.0f} MB after imports), "
            f"median itm {r['median_itm']:.3f}"
        )

    def extra(r: dict) -> float:
        return r["peak_mb"] - r["baseline_mb"]

    print(
        f"time ratio ours/reference: {our['seconds'] / ref['seconds']:.2f}x; "
        f"memory above imports, ours/reference: {extra(our) / extra(ref):.2f}x"
    )


if __name__ == "__main__":
    main()
