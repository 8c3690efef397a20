"""Tiny UniFilter checkpoints in the ORIGINAL layout, and the classifier's forward pass by hand.

Written from Victorwz/UniFilter (``LLaVA/llava/train/train_classifier.py`` for what its training code
saves, ``llava/model/language_model/llava_qwen.py`` / ``llava_qwen3.py`` ``Llava*Classifier``,
``llava/model/multimodal_projector/builder.py``, ``llava/model/multimodal_encoder/siglip_encoder.py``
and ``data_scoring/data_quality_classifier_caption_scoring.py`` for how a pair is scored), never from
mlmfilter: weights are named and config fields set as the original saves them, and the reference
forward uses the original tensors directly, one pair at a time.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.support.released import (
    IMAGE_MARKER,
    aapool,
    config_fields,
    mlp,
    randomize,
    save_safetensors,
    tiny_siglip,
    tokenizer_image_token,
    write_config,
)

HIDDEN = 64
TOWER_WIDTH = 32
IMAGE_TOKENS = 4  # 5x5 patches pooled to 2x2 (overlapping windows, as 27x27 -> 12x12)
RELEASED_MAX_LEN = 75  # DataCollatorForImagePreprocessing(tokenizer, image_processor, 75)


@dataclass(frozen=True)
class Layout:
    family: str  # "qwen2" / "qwen3"
    architecture: str
    model_type: str
    tower_name: str  # what config.json names in mm_vision_tower
    tower_resample: int  # the tower's preprocessor_config.json filter
    num_labels: int
    eos_is_pad: bool  # the tokenizer's EOS is its pad token too (then the original drops it)


LAYOUTS = {
    # UniFilter-Qwen2.5-1.5B: Qwen2.5 + SigLIP so400m (bicubic), one-row regression head
    "qwen2.5": Layout("qwen2", "LlavaQwenClassifier", "llava_qwen", "google/siglip-so400m-patch14-384", 3, 1, False),
    # UniFilter-Qwen3-0.6B: Qwen3 + SigLIP-2 so400m (its processor is bilinear); here also a two-row head
    # (softmax readout) and EOS == pad, the two other paths of the original scorer
    "qwen3": Layout("qwen3", "LlavaQwen3Classifier", "llava_qwen3", "google/siglip2-so400m-patch14-384", 2, 2, True),
}


def _text_model(family: str, vocab_size: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=family == "qwen3",
    )
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, rope_theta=1000000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1000000.0, use_sliding_window=False))
    randomize(model.eval(), seed)
    return model


def unifilter_tokenizer(base, root: Path, eos_is_pad: bool):
    """train_classifier.py for Qwen: ``<s>`` added as a special token and made the BOS (the Qwen tokenizers
    have none); Qwen's pad is ``<|endoftext|>`` and its instruct EOS ``<|im_end|>`` (eos_is_pad: both one)."""
    from transformers import AutoTokenizer

    base.save_pretrained(root / "base-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "base-tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<s>"]})
    tokenizer.bos_token = "<s>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>" if eos_is_pad else "<|endoftext|>"
    return tokenizer


def build_unifilter(root: Path, layout_name: str, base_tokenizer, seed: int = 21) -> dict:
    """A UniFilter checkpoint folder (``root/checkpoint``) and its tower (``root/tower``), as saved by the original."""
    layout = LAYOUTS[layout_name]
    src, tower_dir = root / "checkpoint", root / "tower"
    src.mkdir(parents=True)
    tokenizer = unifilter_tokenizer(base_tokenizer, root, layout.eos_is_pad)
    tokenizer.save_pretrained(src)
    lm = _text_model(layout.family, len(tokenizer) + 24, seed)
    tower = tiny_siglip(tower_dir, seed=seed + 1, hidden=TOWER_WIDTH)
    processor_file = tower_dir / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text(encoding="utf-8"))
    processor["resample"] = layout.tower_resample
    processor_file.write_text(json.dumps(processor, indent=2), encoding="utf-8")

    gen = torch.Generator().manual_seed(seed + 2)
    state = {f"model.{k}": v.detach().clone() for k, v in lm.model.state_dict().items()}  # no LM head
    state["model.mm_projector.mlp_projector.0.weight"] = torch.randn(HIDDEN, TOWER_WIDTH, generator=gen) * 0.2
    state["model.mm_projector.mlp_projector.0.bias"] = torch.randn(HIDDEN, generator=gen) * 0.1
    state["model.mm_projector.mlp_projector.2.weight"] = torch.randn(HIDDEN, HIDDEN, generator=gen) * 0.2
    state["model.mm_projector.mlp_projector.2.bias"] = torch.randn(HIDDEN, generator=gen) * 0.1
    state["score.weight"] = torch.randn(layout.num_labels, HIDDEN, generator=gen) * 0.5  # nn.Linear(bias=False)
    # the trained model also saves its (frozen) tower; the original never reads it (delay_load): other weights here
    for key, value in tiny_siglip(None, seed=seed + 99, hidden=TOWER_WIDTH).state_dict().items():
        state[f"model.vision_tower.vision_tower.vision_model.{key.removeprefix('vision_model.')}"] = value
    save_safetensors(src, state)

    fields = config_fields(lm)
    fields.update(
        architectures=[layout.architecture],
        model_type=layout.model_type,
        torch_dtype="float32",
        transformers_version="4.51.3",
        num_labels=layout.num_labels,
        id2label={str(i): f"LABEL_{i}" for i in range(layout.num_labels)},
        label2id={f"LABEL_{i}": i for i in range(layout.num_labels)},
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
        image_aspect_ratio="pad",
        mm_hidden_size=TOWER_WIDTH,
        mm_num_image_tokens=IMAGE_TOKENS,
        mm_patch_merge_type="flat",
        mm_projector_lr=None,
        mm_projector_type="aapool_mlp",
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        mm_vision_select_feature="patch",
        mm_vision_select_layer=-1,
        mm_vision_tower=layout.tower_name,
        tokenizer_model_max_length=8192,
        tokenizer_padding_side="right",
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    write_config(src, fields)
    return {
        "layout": layout,
        "src": src,
        "tower_dir": tower_dir,
        "tower": tower,
        "lm": lm,
        "state": state,
        "tokenizer": tokenizer,
    }


def place_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str) -> Path:
    """``folder``'s files as huggingface_hub lays out a downloaded repo: models--org--name/snapshots/<commit>/, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in folder.iterdir():
        (snapshot / item.name).symlink_to(item)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# -- the original's forward, one pair at a time ----------------------------------------------------


def pilrgb(data: bytes) -> Image.Image:
    """webdataset's ``decode("pilrgb")``: PIL opens the bytes, converted to RGB, nothing else."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def reference_pixels(image: Image.Image, pad: bool, side: int, resample: int) -> torch.Tensor:
    """expand2square (mean colour 127) when pad, then SiglipImageProcessor: resize to side x side with its filter,
    rescale 1/255 (float64 -> float32), normalise with mean = std = 0.5."""
    if pad and image.width != image.height:
        longer = max(image.size)
        square = Image.new(image.mode, (longer, longer), (127, 127, 127))
        square.paste(image, ((longer - image.width) // 2, (longer - image.height) // 2))
        image = square
    array = np.asarray(image.resize((side, side), resample=resample)).astype(np.float64) * (1 / 255)
    array = (array.astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def reference_ids(tokenizer, caption: str, released: bool) -> list[int]:
    """DataCollatorForImagePreprocessing: format_text, tokenizer_image_token, BOS/EOS, [:75], mask = ids != pad."""
    ids = tokenizer_image_token("<image>\n" + caption.replace("<image>", "image"), tokenizer)
    if ids[0] != tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    if ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    if released:
        ids = ids[:RELEASED_MAX_LEN]
    return [i for i in ids if i != tokenizer.pad_token_id]  # prepare_inputs_labels: cur_input_ids[attention_mask]


def reference_score(ckpt: dict, image: Image.Image, caption: str, released: bool) -> float:
    """Llava*Classifier.forward for one pair: tower hidden_states[-1] -> aapool_mlp, spliced at the marker,
    the language model, the hidden state of the last position through score.weight; the scorer's readout."""
    layout, state = ckpt["layout"], ckpt["state"]
    pixels = reference_pixels(
        image, pad=not released, side=ckpt["tower"].config.image_size, resample=layout.tower_resample
    )
    ids = reference_ids(ckpt["tokenizer"], caption, released)
    at = ids.index(IMAGE_MARKER)
    with torch.no_grad():
        features = ckpt["tower"](pixels, output_hidden_states=True).hidden_states[-1]
        image_embeds = mlp(
            aapool(features, IMAGE_TOKENS),
            state,
            "model.mm_projector.mlp_projector.0",
            "model.mm_projector.mlp_projector.2",
        )[0]
        embed = state["model.embed_tokens.weight"]
        inputs = torch.cat([embed[ids[:at]], image_embeds, embed[ids[at + 1 :]]])[None]
        hidden = ckpt["lm"].model(inputs_embeds=inputs).last_hidden_state[0, -1]
        logits = state["score.weight"].double() @ hidden.double()
    if layout.num_labels == 1:
        return float(logits[0])
    return float(torch.softmax(logits, dim=-1)[1])
