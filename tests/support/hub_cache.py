"""A Hugging Face hub cache on disk, laid out as ``huggingface_hub`` lays out what it downloads, holding
tiny released judges in their ORIGINAL layouts (LLaVA-Unified Qwen2.5 + aapool_mlp, LLaVA-1.5) and their
vision towers under the hub ids their configs name.

``models--org--name/blobs/<sha256>`` (the file contents), ``snapshots/<commit>/<file>`` (relative
symlinks to the blobs), ``refs/main`` (the commit): what ``snapshot_download`` / ``hf_hub_download``
read with ``HF_HUB_OFFLINE=1``. The checkpoints are written from the original code's conventions
(:mod:`tests.support.released`, :mod:`tests.support.llava`), never from mlmfilter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from tests.support.llava import (
    original_llava_state,
    released_style_config,
    tiny_clip_tower,
    tiny_llama_config,
    write_bin_shards,
)
from tests.support.released import config_fields, save_safetensors, text_model, tiny_siglip, write_config

SIGLIP_ID = "google/siglip-so400m-patch14-384"
CLIP_ID = "openai/clip-vit-large-patch14-336"


def place_in_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str | None = None) -> Path:
    """Copy ``folder`` into ``cache`` as the snapshot ``revision`` of ``repo_id`` (refs/main names it);
    returns the snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    if revision is None:
        revision = hashlib.sha1(f"{repo_id}:{folder}".encode()).hexdigest()
    snapshot = storage / "snapshots" / revision
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = storage / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(revision, encoding="utf-8")
    return snapshot


def unified_qwen_checkpoint(folder: Path, tokenizer, seed: int = 11) -> Path:
    """mlm-filter-qwen2.5-1.5b-gpt4o's layout at a tiny size: LlavaQwenForCausalLM, SigLIP named by hub id,
    ``aapool_mlp`` (5x5 patches pooled to 2x2), a head longer than the tokenizer, a stale tower copy."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "_base")
    tokenizer = AutoTokenizer.from_pretrained(folder / "_base")
    shutil.rmtree(folder / "_base")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<s>"]})  # train.py, version qwen_instruct
    tokenizer.bos_token = "<s>"
    tokenizer.save_pretrained(folder)
    lm = text_model("qwen2", len(tokenizer) + 40, seed=seed)
    state = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 2)
    state["model.mm_projector.mlp_projector.0.weight"] = torch.randn(64, 32, generator=gen) * 0.2
    state["model.mm_projector.mlp_projector.0.bias"] = torch.randn(64, generator=gen) * 0.1
    state["model.mm_projector.mlp_projector.2.weight"] = torch.randn(64, 64, generator=gen) * 0.2
    state["model.mm_projector.mlp_projector.2.bias"] = torch.randn(64, generator=gen) * 0.1
    for key, value in tiny_siglip(None, seed=99).state_dict().items():  # never used by LLaVA-Unified
        state[f"model.vision_tower.vision_tower.vision_model.{key}"] = value
    save_safetensors(folder, state)
    fields = config_fields(lm)
    fields.update(
        architectures=["LlavaQwenForCausalLM"],
        model_type="llava_qwen",
        torch_dtype="float32",
        transformers_version="4.51.2",
        image_aspect_ratio="pad",
        mm_hidden_size=32,
        mm_patch_merge_type="flat",
        mm_projector_type="aapool_mlp",
        mm_num_image_tokens=4,
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        mm_vision_select_feature="patch",
        mm_vision_select_layer=-1,
        mm_vision_tower=SIGLIP_ID,
        tokenizer_model_max_length=4096,
        tokenizer_padding_side="right",
        use_mm_proj=True,
    )
    write_config(folder, fields)
    return folder


def llava15_checkpoint(folder: Path, tokenizer, seed: int = 7) -> Path:
    """mlm-filter-llava-13b-gpt4v's layout at a tiny size: LlavaLlamaForCausalLM, .bin shards, mlp2x_gelu,
    the CLIP tower named by hub id and not stored."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config = tiny_llama_config(len(tokenizer))
    write_bin_shards(folder, original_llava_state(config, mm_hidden=32, seed=seed), shards=2)
    write_config(folder, released_style_config(config, CLIP_ID, mm_hidden=32, dtype="float32"))
    return folder


def siglip_tower(folder: Path) -> Path:
    tiny_siglip(folder, seed=12)
    return folder


def clip_tower(folder: Path) -> Path:
    tiny_clip_tower(folder, hidden=32, heads=2, seed=5)
    return folder


def aitqe_checkpoint(folder: Path, tokenizer, seed: int = 21) -> Path:
    """HymanH/AITQE's layout at a tiny size (hanhuang22/AITQE modeling_mm.py): MMForCausalLM, the SigLIP
    weights stored inside, its config named by a path of the author's machine (not found here)."""
    from tests.support.released import SIGLIP_PATCH, SIGLIP_SIDE

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    lm = text_model("qwen2", len(tokenizer) + 64, seed=seed)
    state = {f"model.{k}": v.detach().clone() for k, v in lm.state_dict().items()}
    for key, value in tiny_siglip(None, seed=seed + 1).state_dict().items():
        state[f"vision_model.vision_model.{key}"] = value
    gen = torch.Generator().manual_seed(seed + 2)
    state["mm_projector.0.weight"] = torch.randn(64, 32, generator=gen) * 0.2
    state["mm_projector.0.bias"] = torch.randn(64, generator=gen) * 0.1
    state["mm_projector.2.weight"] = torch.randn(64, 64, generator=gen) * 0.2
    save_safetensors(folder, state)
    fields = config_fields(lm)
    fields.update(
        architectures=["MMForCausalLM"],
        model_type="mm",
        torch_dtype="float32",
        language_model_name_or_path="/mnt/author/Qwen2-7B",
        vision_model_name_or_path="/mnt/author/siglip-so400m-patch14-384",
        mm_projector_type="mlp",
        image_aspect_ratio="square",
        visual_hidden_dim=32,
        image_tile_tokens=(SIGLIP_SIDE // SIGLIP_PATCH) ** 2,
        image_token_index=-1,
        pad_token_index=tokenizer.pad_token_id,
        eos_token_index=tokenizer.eos_token_id,
        image_pattern="<image>",
    )
    write_config(folder, fields)
    return folder
