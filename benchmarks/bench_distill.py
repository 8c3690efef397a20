"""Benchmark distillation with real weights: a fine-tuned SmolLM2 judge's caption-quality (ctq) scores
distilled into a head over real MiniLM caption embeddings, on Flickr8k captions and corrupted variants.

1. The judge: the LLaVA-layout judge of ``bench_train_learns.py`` (real SmolLM2-135M-Instruct as its
   language model, a small random vision tower: ctq is judged from the text), LoRA-fine-tuned on a
   scripted teacher's ctq labels (``--judge DIR`` reuses one).
2. The pool: every Flickr8k dev photo (127) with 2 of its human captions and corrupted variants of 2
   others (``teach/negatives.py``: shuffled words, truncation, typos, boilerplate), as WebDataset tars.
3. ``mlmfilter embed --text-only`` (real all-MiniLM-L6-v2), then the judge scores every pair
   (``score --scorer mlm --metrics ctq --stage judge``): the truth the head is measured against.
4. ``mlmfilter distill``: a ridge head on a seeded share of the judged pairs; held-out Spearman,
   top-30 % overlap, and the judge calls the cascade needs for 95 % agreement with an all-judge
   selection of the top 30 %.

The reference in the same process: the judge's seconds per pair against the head's (MiniLM forward +
matrix product), measured on the same pool.

    python benchmarks/bench_distill.py [--judge DIR] [--work DIR] [--max-steps 24] [--holdout 0.3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import flickr_captions, load_average  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
KINDS = ("shuffle_words", "truncate", "typos", "boilerplate")


def train_judge(work: Path, max_steps: int, seed: int) -> Path:
    """bench_train_learns' judge, fine-tuned on its scripted teacher's ctq labels (1 clean + 1 corrupted
    caption per photo of its training split)."""
    import bench_train_learns as bench
    from mlmfilter.teach.export import ExportOptions, export
    from mlmfilter.training.train import TrainOptions, train

    base = work / "base"
    if not (base / "config.json").exists():
        bench.build_small_judge(base, seed)
    train_pairs, heldout = bench.make_pairs(95, 32, seed, per_photo=1)
    kinds = {pair.caption: kind for pair, kind in train_pairs + heldout}
    with bench.ScriptedTeacher(kinds, seed, bench.SHORT_TEMPLATE) as teacher:
        rows, requests, _ = bench.label(train_pairs, teacher, bench.SHORT_TEMPLATE)
    export_dir = work / "export"
    shutil.rmtree(export_dir, ignore_errors=True)
    export(rows, {p.uid: p for p, _ in train_pairs}, export_dir, requests, ExportOptions(), {"benchmark": "distill"})
    judge = work / "judge"
    shutil.rmtree(judge, ignore_errors=True)
    options = TrainOptions(
        base=str(base),
        method="lora",
        conversation="auto",
        max_steps=max_steps,
        batch_size=8,
        learning_rate=1e-3,
        save_steps=max(10, max_steps // 2),
        logging_steps=4,
        seed=seed,
        template=bench.SHORT_TEMPLATE,
    )
    train(export_dir / "mlm_filter_instruct.json", judge, options)
    return judge


def write_pool(folder: Path, seed: int, shards: int = 4) -> dict[str, str]:
    """Flickr8k photos with 2 human captions and 2 corrupted variants each; returns key -> kind."""
    from mlmfilter.io.writers import add_tar_member
    from mlmfilter.teach.negatives import NegativeGenerator

    generator = NegativeGenerator(seed=seed, kinds=KINDS)
    members, kind_of = [], {}
    for i, (path, captions) in enumerate(flickr_captions().items()):
        data = path.read_bytes()
        uid = hashlib.blake2b(path.name.encode(), digest_size=16).hexdigest()
        for j in range(2):
            key = f"{i:04d}c{j}"
            members.append((key, data, captions[j]))
            kind_of[key] = "clean"
            negatives = generator.corrupt(captions[2 + j], uid=uid)
            negative = negatives[(i * 2 + j) % len(negatives)]
            key = f"{i:04d}n{j}"
            members.append((key, data, negative.caption))
            kind_of[key] = negative.kind
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(members) // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for key, data, caption in members[s * per : (s + 1) * per]:
                add_tar_member(tar, f"{key}.jpg", data)
                add_tar_member(tar, f"{key}.txt", caption.encode())
    return kind_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--judge", type=Path, default=None, help="a judge trained before (skips the fine-tuning)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--holdout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from mlmfilter import api
    from mlmfilter.runs.read import RunReader

    torch.manual_seed(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    judge = args.judge or work / "judge"
    if args.judge is None and not (judge / "config.json").exists():
        judge = train_judge(work, args.max_steps, args.seed)
    t_train = time.perf_counter() - t0
    kind_of = write_pool(work / "shards", args.seed)
    run = work / "run"
    shards = str(work / "shards" / "*.tar")

    t1 = time.perf_counter()
    embedded = api.embed(run, shards, text_only=True, decode_workers=0)
    t_embed = time.perf_counter() - t1
    t1 = time.perf_counter()
    judged = api.score(
        shards,
        run,
        [{"name": "mlm", "options": {"model": str(judge), "metrics": "ctq", "batch_size": 8}}],
        stage="judge",
    )
    t_judge = time.perf_counter() - t1
    assert embedded.ok and judged.ok, (embedded.shards_failed, judged.shards_failed)
    pairs = judged.stats.rows

    t1 = time.perf_counter()
    result = api.distill(
        run, metrics=["ctq"], judge_stage="judge", holdout=args.holdout, top_fraction=0.3, seed=args.seed
    )
    t_distill = time.perf_counter() - t1
    report = result.reports[0]
    cascade = result.cascade
    scores = RunReader(run).dataset("judge").to_table(columns=["key", "ctq"]).to_pylist()
    by_kind: dict[str, list[float]] = {}
    for row in scores:
        if row["ctq"] is not None:
            by_kind.setdefault(kind_of[row["key"]], []).append(row["ctq"])
    head_cost = t_embed / pairs  # the MiniLM forward per pair; the head's matrix product adds ~nothing
    print(f"judge: {judge} (fine-tuned in {t_train:.0f} s)" if args.judge is None else f"judge: {judge}")
    print(
        f"pool: {pairs} pairs ({sum(k == 'clean' for k in kind_of.values())} clean); judge ctq mean by kind: "
        + ", ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in sorted(by_kind.items()))
    )
    print(
        f"cost per pair: judge {t_judge / pairs * 1000:.0f} ms, MiniLM embedding {head_cost * 1000:.1f} ms "
        f"(ratio {t_judge / t_embed:.1f}x); distill (fit + measure + predict the pool) {t_distill:.1f} s"
    )
    print(
        f"head ({result.trained} train / {result.heldout} held-out pairs): Spearman {report.spearman:+.3f}, "
        f"top-30% overlap {report.top_overlap:.3f}, mean abs error {report.mae:.1f}"
    )
    print(
        f"cascade (top 30% by ctq, judge cut {cascade.judge_cut:.1f}): head alone agrees {cascade.head_only_agreement:.3f}; "
        f"95% agreement needs {cascade.judge_fraction:.1%} of the judge calls (saves {1 - cascade.judge_fraction:.1%}); "
        f"curve {json.dumps(cascade.curve)}"
    )
    print(
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB, load {load_average()}, work {work}"
    )
    print(json.dumps({"spearman": report.spearman, "top_overlap": report.top_overlap, **result.to_json()["cascade"]}))


if __name__ == "__main__":
    main()
