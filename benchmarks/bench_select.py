"""Benchmark 3: exact top-fraction selection over a large run, streamed vs. pandas in memory.

    python benchmarks/bench_select.py                 # 100M rows (the recorded run)
    python benchmarks/bench_select.py --rows 5000000  # a quick look

Writes a synthetic run folder (RUN/scores/*.parquet) to a temp dir: float32 scores rounded to two
decimals (about 40 distinct values, so millions of rows tie at the cut), 1% errored rows with null
scores, uids as two uint64 columns ``uid_f0``/``uid_f1`` (100M uid *strings* would not fit a
pandas frame on a 24 GB box; select_run reads both layouts). Then, each in a fresh subprocess so
that the peak RSS is its own:

* ``select_run``: the radix top-k, streaming the parquet files (mlmfilter.selection);
* ``pandas``: read the three columns into one DataFrame, ``sort_values`` by (score desc, uid_f0,
  uid_f1) -- the same tie rule -- and take the first k.

Both write uids.npy + kept.parquet (uid halves and score of the kept rows); the subset files must be
identical. Prints time and peak memory of each and their ratios. The temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
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

ROWS_PER_FILE = 2_000_000
ROW_GROUP_ROWS = 250_000  # real score files hold one shard each: row groups of thousands of rows
SCORE_COLUMN = "clip_score"


def generate_run(run_dir: Path, rows: int, seed: int = 0, string_uids: bool = False) -> int:
    """Synthetic score files, written chunk by chunk into a run's score stage: one file in memory at a time."""
    from mlmfilter.runs.runner import write_tables

    rng = np.random.default_rng(seed)
    files = 0
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        score = np.clip(np.round(rng.normal(0.3, 0.05, n), 2), 0.0, 1.0).astype(np.float32)
        errored = rng.random(n) < 0.01
        error = pa.array(np.where(errored, "undecodable_image", None), pa.string())
        f0, f1 = (rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False) for _ in range(2))
        uids = {"uid": hex_strings(f0, f1)} if string_uids else {"uid_f0": f0, "uid_f1": f1}
        table = pa.table({**uids, SCORE_COLUMN: pa.array(score, mask=errored), "error": error})
        write_tables(run_dir, "score", {f"{files:08d}": table}, identity={"kind": "bench_select"})
        files += 1
    return files


def hex_strings(f0: np.ndarray, f1: np.ndarray) -> pa.Array:
    """32-char lowercase hex uids as an arrow string array, built without Python strings."""
    words = np.empty((len(f0), 2), dtype=">u8")
    words[:, 0], words[:, 1] = f0, f1
    packed = words.view(np.uint8).reshape(len(f0), 16)
    nibbles = np.empty((len(f0), 32), dtype=np.uint8)
    nibbles[:, 0::2], nibbles[:, 1::2] = packed >> 4, packed & 0x0F
    ascii_bytes = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    offsets = np.arange(0, 32 * (len(f0) + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(len(f0), pa.py_buffer(offsets), pa.py_buffer(ascii_bytes))


def run_select_run(run_dir: Path, out: Path, fraction: float) -> dict:
    from mlmfilter.selection import select_run

    result = select_run(run_dir, out, top_fraction=fraction, by=SCORE_COLUMN)
    return {"kept": result.kept, "passes": result.passes, "threshold": result.threshold}


def run_pandas(run_dir: Path, out: Path, fraction: float) -> dict:
    import pyarrow.dataset as ds

    from mlmfilter.io.uid import uids_to_halves
    from mlmfilter.selection.subset import write_datacomp_subset

    dataset = ds.dataset(run_dir / "score" / "tables", format="parquet")
    uid_columns = ["uid"] if "uid" in dataset.schema.names else ["uid_f0", "uid_f1"]
    frame = dataset.to_table(columns=uid_columns + [SCORE_COLUMN]).to_pandas()
    k = round(fraction * len(frame))
    frame = frame[frame[SCORE_COLUMN].notna()]
    # same-length lowercase hex sorts like the 128-bit integer, so the tie rule is the same
    top = frame.sort_values([SCORE_COLUMN] + uid_columns, ascending=[False] + [True] * len(uid_columns)).head(k)
    out.mkdir(parents=True, exist_ok=True)
    if uid_columns == ["uid"]:
        halves = uids_to_halves(pa.array(top["uid"].to_numpy(), pa.string()))
    else:
        halves = np.empty(len(top), dtype=[("f0", "<u8"), ("f1", "<u8")])
        halves["f0"], halves["f1"] = top["uid_f0"].to_numpy(), top["uid_f1"].to_numpy()
    write_datacomp_subset(halves, out / "uids.npy")
    pq.write_table(pa.Table.from_pandas(top, preserve_index=False), out / "kept.parquet")
    return {"kept": len(top)}


METHODS = {"select_run": run_select_run, "pandas": run_pandas}


def worker(method: str, run_dir: str, out: str, fraction: float) -> None:
    started = time.perf_counter()
    info = METHODS[method](Path(run_dir), Path(out), fraction)
    info["seconds"] = time.perf_counter() - started
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(info, default=str))


def measure(method: str, run_dir: Path, out: Path, fraction: float) -> dict:
    """One method in a fresh interpreter: its peak RSS is its own, not this process's."""
    command = [sys.executable, __file__, "--worker", method, str(run_dir), str(out), str(fraction)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument(
        "--string-uids",
        action="store_true",
        help="store uids as 32-char strings (as score files do) instead of two uint64 columns",
    )
    parser.add_argument("--tmp", default=None, help="parent folder of the temp data (default: the system temp)")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "RUN", "OUT", "FRACTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, run_dir, out, fraction = args.worker
        worker(method, run_dir, out, float(fraction))
        return

    root = Path(tempfile.mkdtemp(prefix="bench_select_", dir=args.tmp))
    try:
        started = time.perf_counter()
        files = generate_run(root / "run", args.rows, string_uids=args.string_uids)
        size = sum(p.stat().st_size for p in (root / "run" / "score" / "tables").iterdir())
        print(
            f"generated {args.rows:,} rows ({'string' if args.string_uids else 'uint64 pair'} uids) in {files} files ({size / 2**30:.2f} GiB) "
            f"in {time.perf_counter() - started:.0f} s"
        )
        results = {}
        for method in METHODS:
            results[method] = measure(method, root / "run", root / method, args.fraction)
            r = results[method]
            print(
                f"{method:>10}: {r['seconds']:7.1f} s   peak RSS {r['peak_rss_mb']:8.0f} MB   kept {r['kept']:,}"
                + (f"   passes {r['passes']}" if "passes" in r else "")
            )
        same = np.array_equal(np.load(root / "select_run" / "uids.npy"), np.load(root / "pandas" / "uids.npy"))
        ours, theirs = results["select_run"], results["pandas"]
        print(f"threshold: {ours['threshold']}")
        print(f"same uids.npy: {same}")
        print(
            f"memory ratio pandas/select_run: {theirs['peak_rss_mb'] / ours['peak_rss_mb']:.1f}x   "
            f"time ratio pandas/select_run: {theirs['seconds'] / ours['seconds']:.2f}x"
        )
        if not same:
            sys.exit("the two methods selected different uids")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
