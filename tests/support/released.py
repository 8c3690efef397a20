"""Tiny checkpoints in the ORIGINAL layouts of the released judges, and their forward passes by hand.

Written from the original repositories (Victorwz/LLaVA-Unified ``llava_arch.py``,
``multimodal_projector/builder.py``, ``siglip_encoder.py``, ``mm_utils.py``; hanhuang22/AITQE
``modeling_mm.py``, ``data_processor.py``), never from mlmfilter: weights are named and config
fields set as the original training code saves them, and the reference forward uses the original
tensors directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIGLIP_SIDE, SIGLIP_PATCH = 70, 14  # 5x5 patches: AdaptiveAvgPool2d to 2x2 has overlapping windows (as 27 -> 12)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGE_MARKER = -200  # LLaVA's IMAGE_TOKEN_INDEX


def randomize(module: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Random but not tiny weights: every layer must matter for a 1e-4 comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def tiny_siglip(folder: Path | None, seed: int, hidden: int = 32):
    """A SigLIP vision model (+ the SiglipImageProcessor config google ships) saved to ``folder``."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=SIGLIP_SIDE,
        patch_size=SIGLIP_PATCH,
    )
    model = SiglipVisionModel(config).eval()
    randomize(model, seed, std=0.1)
    if folder is not None:
        model.save_pretrained(folder)
        SiglipImageProcessor(size={"height": SIGLIP_SIDE, "width": SIGLIP_SIDE}, resample=3).save_pretrained(folder)
    return model


def text_model(kind: str, vocab_size: int, seed: int, tie: bool = False):
    """A tiny Qwen2 or Llama causal LM with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
    )
    if kind == "qwen2":
        config = Qwen2Config(**common, rope_theta=1000000.0, use_sliding_window=False)
        model = Qwen2ForCausalLM(config)
    else:
        config = LlamaConfig(**common, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
        model = LlamaForCausalLM(config)
    randomize(model.eval(), seed)
    return model


def config_fields(model) -> dict:
    """The text model's config as old transformers wrote it (rope fields flat, no v5-only keys)."""
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("rope_parameters", "dtype", "layer_types")}
    fields["rope_theta"] = float(model.config.rope_parameters["rope_theta"])
    return fields


def save_safetensors(folder: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )


# -- reference preprocessing --------------------------------------------------------------------


def siglip_pixels(image: Image.Image, pad: bool) -> torch.Tensor:
    """LLaVA-Unified process_images: expand2square (mean colour) when pad, then SiglipImageProcessor."""
    if pad:
        background = tuple(int(x * 255) for x in SIGLIP_MEAN)
        width, height = image.size
        side = max(width, height)
        square = Image.new(image.mode, (side, side), background)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    resized = image.resize((SIGLIP_SIDE, SIGLIP_SIDE), Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    array = (array - np.array(SIGLIP_MEAN, dtype=np.float32)) / np.array(SIGLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """llava/mm_utils.py: chunks around <image> encoded apart, a leading BOS kept once."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_MARKER)
        ids.extend(chunk[offset:])
    return ids


def spliced_logits(lm, embed: torch.Tensor, ids: list[int], features: torch.Tensor, marker: int) -> torch.Tensor:
    """prepare_inputs_labels_for_multimodal / _merge_input_ids_with_image_features: text embeddings
    around the marker, the image features in its place, then the language model on inputs_embeds."""
    at = ids.index(marker)
    before = embed[torch.tensor(ids[:at], dtype=torch.long)]
    after = embed[torch.tensor(ids[at + 1 :], dtype=torch.long)]
    inputs_embeds = torch.cat([before, features, after])[None]
    with torch.no_grad():
        return lm(inputs_embeds=inputs_embeds).logits[0]


def aapool(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """AvgPoolProjector's sampler: b (h w) d -> b d h w -> AdaptiveAvgPool2d -> b (h w) d, written out:
    window i covers [floor(i*n/k), ceil((i+1)*n/k)) in each direction."""
    b, length, d = features.shape
    n, k = int(round(length**0.5)), int(round(tokens**0.5))
    grid = features.reshape(b, n, n, d)
    out = torch.empty(b, k, k, d, dtype=features.dtype)
    for i in range(k):
        r0, r1 = (i * n) // k, -(-((i + 1) * n) // k)
        for j in range(k):
            c0, c1 = (j * n) // k, -(-((j + 1) * n) // k)
            out[:, i, j] = grid[:, r0:r1, c0:c1].mean(dim=(1, 2))
    return out.reshape(b, k * k, d)


def mlp(x: torch.Tensor, state: dict, first: str, second: str) -> torch.Tensor:
    x = F.linear(x, state[first + ".weight"], state.get(first + ".bias"))
    return F.linear(F.gelu(x), state[second + ".weight"], state.get(second + ".bias"))


def write_config(folder: Path, fields: dict) -> None:
    (folder / "config.json").write_text(json.dumps(fields, indent=2), encoding="utf-8")
