"""Benchmark: `teach sample`'s clustering at pool scale, embeddings on disk (memmap) vs all in memory.

    python benchmarks/bench_teach_kmeans.py                         # 10^6 x 384, k = 1000 (the recorded run)
    python benchmarks/bench_teach_kmeans.py --points 200000 --reference

Synthetic pool: random unit vectors of dim 384 (what all-MiniLM-L6-v2 gives; the encoder is skipped),
written chunk by chunk to ``embeddings.npy`` as ``teach sample`` does (float16). Each measurement runs
in a fresh child process and reports its wall time, its peak RSS (VmHWM: file pages of the memmap
included, which the kernel can drop at any time) and its peak anonymous memory (RssAnon, sampled every
50 ms: what the process really holds).

* ours: ``cluster(memmap, k)`` (fit on a 65,536-row sample, one ``partial_fit`` epoch over 4,096-row
  chunks read from disk, labels chunk by chunk) + ``pick_evenly`` of 10,000 pairs;
* reference (``--reference``): the array loaded whole as float32 and ``MiniBatchKMeans.fit_predict``
  on it, the code before the streaming pass (same k, seed, batch size, n_init).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _peak_anon() -> tuple[list[int], threading.Event]:
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return peak, stop


def _hwm_kb() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def child(mode: str, path: str, k: int, picks: int) -> None:
    from mlmfilter.teach.sample import cluster, pick_evenly

    peak, stop = _peak_anon()
    start = time.perf_counter()
    if mode == "ours":
        embeddings = np.load(path, mmap_mode="r")
        labels, _ = cluster(embeddings, k, seed=0)
    else:
        from sklearn.cluster import MiniBatchKMeans

        embeddings = np.load(path).astype(np.float32)
        labels = MiniBatchKMeans(n_clusters=k, random_state=0, batch_size=4096, n_init=3, max_iter=100).fit_predict(
            embeddings
        )
    chosen = pick_evenly(labels, picks, seed=0)
    elapsed = time.perf_counter() - start
    stop.set()
    print(
        json.dumps(
            {
                "wall_s": elapsed,
                "peak_rss_mb": _hwm_kb() / 1024,
                "peak_anon_mb": peak[0] / 1024,
                "clusters": int(len(np.unique(labels))),
                "picked": int(len(chosen)),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--picks", type=int, default=10_000)
    parser.add_argument("--reference", action="store_true", help="also time the all-in-memory fit (slow at 10^6)")
    parser.add_argument("--skip-ours", action="store_true", help="only the reference (with --reference)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"))
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.clusters, args.picks)

    from _common import load_average
    from mlmfilter.teach.sample import NpyAppender

    with tempfile.TemporaryDirectory() as tmp:
        store = NpyAppender(Path(tmp) / "embeddings.npy", "float16")
        rng = np.random.default_rng(0)
        for start in range(0, args.points, 100_000):
            block = rng.normal(size=(min(100_000, args.points - start), args.dim)).astype(np.float32)
            store.append(block / np.linalg.norm(block, axis=1, keepdims=True))
        path = store.close()
        print(
            f"{args.points} x {args.dim} float16 on disk: {path.stat().st_size / 2**20:.0f} MiB; k = {args.clusters}; "
            f"load {load_average()}"
        )
        for mode in ([] if args.skip_ours else ["ours"]) + (["reference"] if args.reference else []):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    str(path),
                    "--clusters",
                    str(args.clusters),
                    "--picks",
                    str(args.picks),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{mode:9s} wall {result['wall_s']:8.1f} s  peak RSS {result['peak_rss_mb']:7.0f} MB  "
                f"peak anon {result['peak_anon_mb']:7.0f} MB  clusters {result['clusters']}  picked {result['picked']}"
            )
        print(f"load after: {load_average()}")


if __name__ == "__main__":
    main()
