"""Benchmark 3b: selecting over two runs joined on uid, against the same selection over one run.

    python benchmarks/bench_select_join.py                  # 20M rows (the recorded run)
    python benchmarks/bench_select_join.py --rows 2000000   # a quick look

Run A is benchmark 3's synthetic run (float32 ``clip_score`` rounded to 2 decimals, 1% errored
rows, uids as ``uid_f0``/``uid_f1``). Run B holds the same uids in another order (files reversed,
rows shuffled within each file) with an ``itm`` column. Each measurement runs in a fresh
subprocess (peak RSS is its own):

* ``one run``: ``select_run(A, top_fraction=0.3, by="clip_score")``;
* ``joined``: ``select_run([A, B], expression="itm >= 20", top_fraction=0.3, by="clip_score")``.

The joined kept set is checked against a brute-force numpy answer. The temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_select import generate_run  # noqa: E402


def generate_other_run(run_a: Path, run_b: Path, seed: int = 1) -> None:
    """The uids of run A in another order, with an ``itm`` score (0-100, integers)."""
    from mlmfilter.runs.runner import write_tables

    rng = np.random.default_rng(seed)
    files = sorted((run_a / "score" / "tables").glob("*.parquet"))
    for index, path in enumerate(reversed(files)):
        table = pq.read_table(path, columns=["uid_f0", "uid_f1"])
        order = rng.permutation(table.num_rows)
        itm = rng.integers(0, 101, table.num_rows).astype(np.float32)
        out = pa.table(
            {
                "uid_f0": table["uid_f0"].take(order),
                "uid_f1": table["uid_f1"].take(order),
                "itm": itm,
                "error": pa.nulls(table.num_rows, pa.string()),
            }
        )
        write_tables(run_b, "score", {f"{index:08d}": out}, identity={"kind": "bench_select_join"})


def measure(method: str, root: Path) -> dict:
    from mlmfilter.selection import select_run

    started = time.perf_counter()
    if method == "one run":
        result = select_run(root / "a", root / "one", top_fraction=0.3, by="clip_score")
    else:
        result = select_run(
            [root / "a", root / "b"], root / "joined", expression="itm >= 20", top_fraction=0.3, by="clip_score"
        )
    return {
        "seconds": time.perf_counter() - started,
        "kept": result.kept,
        "passes": result.passes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def brute_force(root: Path, fraction: float) -> np.ndarray:
    """The joined selection by sorting everything in numpy (uid halves of the kept rows, sorted)."""
    from mlmfilter.io.uid import HALVES_DTYPE, sort_halves

    def load(run: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
        table = pa.concat_tables(
            pq.read_table(p, columns=["uid_f0", "uid_f1", column])
            for p in sorted((run / "score" / "tables").glob("*.parquet"))
        )
        halves = np.empty(table.num_rows, HALVES_DTYPE)
        halves["f0"], halves["f1"] = table["uid_f0"].to_numpy(), table["uid_f1"].to_numpy()
        return halves, table[column].to_numpy(zero_copy_only=False)

    a_uids, clip = load(root / "a", "clip_score")
    b_uids, itm = load(root / "b", "itm")
    b_order = np.argsort(b_uids, order=("f0", "f1"))
    position = np.searchsorted(b_uids[b_order], a_uids)
    itm_of_a = itm[b_order][np.minimum(position, len(b_uids) - 1)]
    qualifies = (itm_of_a >= 20) & ~np.isnan(clip)
    k = round(fraction * len(a_uids))
    rows = np.flatnonzero(qualifies)
    order = np.lexsort((a_uids["f1"][rows], a_uids["f0"][rows], -clip[rows]))
    return sort_halves(a_uids[rows[order[:k]]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, Path(args.root))))
        return
    root = Path(tempfile.mkdtemp(prefix="bench_select_join_"))
    try:
        generate_run(root / "a", args.rows)
        generate_other_run(root / "a", root / "b")
        results = {}
        for method in ("one run", "joined"):
            out = subprocess.run(
                [sys.executable, __file__, "--method", method, "--root", str(root)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{method:8s} {results[method]}")
        same = np.array_equal(np.load(root / "joined" / "uids.npy"), brute_force(root, 0.3))
        print(f"joined == brute force: {same}")
        one, joined = results["one run"], results["joined"]
        print(
            f"joined / one run: time {joined['seconds'] / one['seconds']:.2f}x, "
            f"memory {joined['peak_rss_mb'] / one['peak_rss_mb']:.2f}x"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
