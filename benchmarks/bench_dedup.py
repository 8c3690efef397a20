"""Benchmark the duplicate search at pool scale: 10^6 or 10^7 synthetic 512-d embeddings with planted
duplicate groups at known cosines; time, peak memory, precision and recall of the planted groups.

The pool (written once to ``--work``, float16 ``.npy``, by a child process so that its memory does not
count): unit vectors around ``n / 2000`` random topics (cosine 0.3-0.7 to their topic, so two pairs of
one topic sit far below any duplicate threshold), of which 10 % are in planted groups of 2-5: an
original and copies at a cosine drawn uniformly in ``[threshold + 0.005, 0.999]`` to it (two copies of
one original are only joined through it, as a chain in real data is). Rows are shuffled.

The search is :func:`mlmfilter.selection.dedup.find_duplicates` as ``mlmfilter dedup`` runs it
(reads the ``.npy`` in blocks, no memory map). Peak memory is the process's resident set, sampled
every 0.2 s during the search (and ``ru_maxrss``); precision and recall count pairs of rows put in one
group (planted vs found). The reference, in the same process: exact all-pairs on the first
``--reference-rows`` rows (every pair's cosine) against the clustered search on the same rows
(``--clusters`` clusters there too, so that the clusters' borders are tested).

    python benchmarks/bench_dedup.py --n 1000000 [--threshold 0.9] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average  # noqa: E402

DIM = 512
GROUP_SHARE = 0.10
CHUNK = 1 << 17


# -- the planted pool ---------------------------------------------------------------------------------


def _write_pool(n: int, dim: int, threshold: float, seed: int, folder: str) -> None:
    """vectors.npy (float16) and truth.npy (each row's planted group: its original's row id)."""
    from mlmfilter.io.npy import NpyAppender

    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((max(1, n // 2000), dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    store = NpyAppender(Path(folder) / "vectors.npy", "float16")
    truth_parts, copy_parts = [], []
    written = 0
    while written < n:
        rows = min(CHUNK, n - written)
        sizes, planted = [], 0
        while planted < GROUP_SHARE * rows:
            sizes.append(int(rng.integers(2, 6)))
            planted += sizes[-1]
        base_rows = rows - planted + len(sizes)
        r = rng.uniform(0.3, 0.7, size=(base_rows, 1)).astype(np.float32)
        noise = rng.standard_normal((base_rows, dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        base = r * topics[rng.integers(0, len(topics), base_rows)] + np.sqrt(1 - r**2) * noise
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        originals = np.arange(base_rows - len(sizes), base_rows)
        copies_of = np.repeat(originals, np.array(sizes) - 1)
        cosine = rng.uniform(threshold + 0.005, 0.999, size=(len(copies_of), 1)).astype(np.float32)
        o = base[copies_of]
        u = rng.standard_normal(o.shape).astype(np.float32)
        u -= (u * o).sum(1, keepdims=True) * o
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        block = np.concatenate([base, cosine * o + np.sqrt(1 - cosine**2) * u])
        truth = np.concatenate([np.arange(base_rows), copies_of]) + written
        order = rng.permutation(rows)
        store.append(block[order].astype(np.float16))
        truth_parts.append(truth[order])
        copy_parts.append(np.arange(rows)[order] >= base_rows)
        written += rows
    store.close()
    np.save(Path(folder) / "copy.npy", np.concatenate(copy_parts))
    np.save(Path(folder) / "truth.npy", np.concatenate(truth_parts))


def planted_pool(n: int, dim: int, threshold: float, seed: int, folder: Path) -> None:
    if all((folder / name).exists() for name in ("vectors.npy", "truth.npy", "copy.npy")):
        if np.load(folder / "truth.npy", mmap_mode="r").shape[0] == n:
            return
    process = multiprocessing.get_context("spawn").Process(
        target=_write_pool, args=(n, dim, threshold, seed, str(folder))
    )
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"writing the pool failed (exit {process.exitcode})")


# -- measuring ----------------------------------------------------------------------------------------


class PeakMemory:
    """The resident set of this process, sampled every ``interval`` seconds while running."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def pair_scores(found: np.ndarray, truth: np.ndarray) -> tuple[float, float, int, int]:
    """(precision, recall, found pairs, planted pairs) counting pairs of rows in one group."""

    def pairs(labels: np.ndarray) -> int:
        _, counts = np.unique(labels, return_counts=True)
        return int((counts.astype(np.int64) * (counts - 1) // 2).sum())

    both = pairs(found.astype(np.int64) * (int(truth.max()) + 1) + truth)
    found_pairs, planted_pairs = pairs(found), pairs(truth)
    return both / max(1, found_pairs), both / max(1, planted_pairs), found_pairs, planted_pairs


def exact_groups(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """The reference: every pair's cosine, groups by connected components (smallest row id)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    x = vectors.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a, b = [], []
    for start in range(0, len(x), 4096):
        sims = x[start : start + 4096] @ x.T
        i, j = np.nonzero(sims >= threshold)
        keep = j > i + start
        a.append(i[keep] + start)
        b.append(j[keep])
    a, b = np.concatenate(a), np.concatenate(b)
    _, labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(x), len(x))), directed=False)
    lead = np.full(labels.max() + 1, len(x))
    np.minimum.at(lead, labels, np.arange(len(x)))
    return lead[labels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-rows", type=int, default=40_000)
    parser.add_argument("--spill-margin", type=float, default=None)
    parser.add_argument("--clusters", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="keep the pool here (reused when it matches)")
    args = parser.parse_args()

    from mlmfilter.io.uid import HALVES_DTYPE
    from mlmfilter.selection.dedup import DedupOptions, find_duplicates

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    planted_pool(args.n, args.dim, args.threshold, args.seed, work)
    t_pool = time.perf_counter() - t0
    truth = np.load(work / "truth.npy")
    n = len(truth)
    settings = {"threshold": args.threshold, "seed": args.seed}
    if args.spill_margin is not None:
        settings["spill_margin"] = args.spill_margin
    if args.clusters is not None:
        settings["clusters"] = args.clusters
    options = DedupOptions(**settings)
    halves = np.zeros(n, dtype=HALVES_DTYPE)
    halves["f0"] = np.arange(n, dtype=np.uint64)

    # the reference: exact all-pairs on the first rows, and the clustered search on the same rows
    head = np.load(work / "vectors.npy", mmap_mode="r")[: args.reference_rows].copy()
    t1 = time.perf_counter()
    exact = exact_groups(head, args.threshold)
    t_exact = time.perf_counter() - t1
    t1 = time.perf_counter()
    k = max(2, round(np.sqrt(len(head))))  # the pool's cluster rule, not one exact cluster
    small = find_duplicates(
        head,
        np.ones(len(head), bool),
        uid_halves=halves[: len(head)],
        options=options.model_copy(update={"clusters": k}),
    )
    t_small = time.perf_counter() - t1
    ref_precision, ref_recall, _, _ = pair_scores(small.group, exact)
    del head, small, exact

    with PeakMemory() as memory:
        t1 = time.perf_counter()
        result = find_duplicates(
            work / "vectors.npy", np.ones(n, bool), uid_halves=halves, options=options, work_dir=work
        )
        seconds = time.perf_counter() - t1
    precision, recall, found_pairs, planted_pairs = pair_scores(result.group, truth)
    copies = np.load(work / "copy.npy")
    original_row = np.zeros(int(truth.max()) + 1, dtype=np.int64)
    original_row[truth[~copies]] = np.flatnonzero(~copies)
    copy_recall = float((result.group[copies] == result.group[original_row[truth[copies]]]).mean())

    print(f"pool: {n:,} x {args.dim} float16 ({n * args.dim * 2 / 1e9:.1f} GB), written in {t_pool:.0f} s, {work}")
    print(
        f"reference, first {args.reference_rows:,} rows: exact all-pairs {t_exact:.1f} s, clustered {t_small:.1f} s "
        f"(ratio {t_exact / t_small:.2f}x); clustered vs exact: precision {ref_precision:.4f}, recall {ref_recall:.4f}"
    )
    print(
        f"dedup of {n:,}: {seconds:.0f} s ({seconds / 60:.1f} min), peak RSS {memory.peak / 1e9:.2f} GB "
        f"(ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB), {result.clusters} clusters"
    )
    print(
        f"planted groups: precision {precision:.4f}, recall {recall:.4f} (pairs: {found_pairs:,} found, "
        f"{planted_pairs:,} planted); copies joined to their original: {copy_recall:.4f}"
    )
    print(f"stages: {json.dumps(result.stats)}")
    print(f"load average {load_average()}")
    print(
        json.dumps(
            {
                "n": n,
                "seconds": seconds,
                "peak_rss_gb": memory.peak / 1e9,
                "precision": precision,
                "recall": recall,
                "copy_recall": copy_recall,
                "reference_ratio": t_exact / t_small,
            }
        )
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
