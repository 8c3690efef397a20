"""The ORIGINAL LLaVA-1.5 layout, written from haotian-liu/LLaVA: a tiny checkpoint (config, .bin shards,
CLIP tower) and the reference forward computed from the original tensors (shared by the convert and
security tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIDE, PATCH = 336, 14  # as openai/clip-vit-large-patch14-336: 24x24 = 576 image positions


def llama_sentencepiece_tokenizer(texts: list[str]):
    """A Llama-style tokenizer (SentencePiece BPE: "▁" word prefix, byte fallback, <s>/</s>), trained here.

    The class and settings of the released checkpoints' LlamaTokenizer (legacy=False); only the
    vocabulary is small.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=False)


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def released_style_config(llama_config, vision_tower: str, mm_hidden: int, dtype: str) -> dict:
    """config.json as LLaVA's training code writes it (cf. liuhaotian/llava-v1.5-13b)."""
    fields = {k: v for k, v in llama_config.to_dict().items() if k not in ("rope_parameters", "dtype")}
    fields.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        rope_theta=10000.0,
        rope_scaling=None,
        torch_dtype=dtype,
        transformers_version="4.31.0",
        freeze_mm_mlp_adapter=False,
        image_aspect_ratio="pad",
        mm_hidden_size=mm_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        mm_vision_select_feature="patch",
        mm_vision_select_layer=-2,
        mm_vision_tower=vision_tower,
        tokenizer_model_max_length=2048,
        tokenizer_padding_side="right",
        tune_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    return fields


def original_llava_state(llama_config, mm_hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Llama weights + mlp2x_gelu projector, named as LLaVA's LlavaLlamaForCausalLM saves them."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(llama_config)
    with torch.no_grad():  # random but not tiny: every layer must matter for the 1e-4 comparison
        for param in llama.parameters():
            param.normal_(0, 0.08)
        for name, param in llama.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    state = {k: v.detach().clone() for k, v in llama.state_dict().items()}  # model.*, lm_head.weight
    hidden = llama_config.hidden_size
    state["model.mm_projector.0.weight"] = torch.randn(hidden, mm_hidden) * 0.2
    state["model.mm_projector.0.bias"] = torch.randn(hidden) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(hidden, hidden) * 0.2
    state["model.mm_projector.2.bias"] = torch.randn(hidden) * 0.1
    return state


def write_bin_shards(folder: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    """pytorch_model-0000i-of-0000n.bin + index, the way the 13B judges are stored."""
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(keys, dtype=object), shards), start=1):
        name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def tiny_clip_tower(folder: Path, hidden: int, heads: int, seed: int):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=heads,
        image_size=IMAGE_SIDE,
        patch_size=PATCH,
    )
    model = CLIPVisionModel(config).eval()
    model.save_pretrained(folder)
    # what openai/clip-vit-large-patch14-336 ships: LLaVA builds its image processor from it
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    ).save_pretrained(folder)
    return model


# -- LLaVA-1.5 reference, written from its repository (llava/mm_utils.py, clip_encoder.py, llava_arch.py)


def llava_pixels(image: Image.Image) -> torch.Tensor:
    """process_images with image_aspect_ratio="pad": expand2square with the mean colour, then CLIP."""
    background = tuple(int(x * 255) for x in CLIP_MEAN)
    width, height = image.size
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    resized = square.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BICUBIC)  # already square: crop is a no-op
    array = np.asarray(resized, dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def clip_pixels(image: Image.Image) -> torch.Tensor:
    """CLIPImageProcessor without padding (the released scripts): bicubic resize of the shorter side to 336
    (the longer side truncated as transformers computes it), centre crop 336, CLIP mean/std."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(IMAGE_SIDE * long / short)
    size = (IMAGE_SIDE, new_long) if width <= height else (new_long, IMAGE_SIDE)
    resized = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - IMAGE_SIDE) // 2, (size[1] - IMAGE_SIDE) // 2
    cropped = resized.crop((left, top, left + IMAGE_SIDE, top + IMAGE_SIDE))
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def llava_input_ids(prompt: str, tokenizer, image_marker: int = -200) -> list[int]:
    """tokenizer_image_token: chunks around <image> encoded separately, BOS kept once."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_marker)
        ids.extend(chunk[offset:])
    return ids


def llava_reference_logits(state, llama_config, tower, ids: list[int], pixels: torch.Tensor, marker: int = -200):
    """encode_images -> mm_projector -> prepare_inputs_labels_for_multimodal -> Llama, from the original tensors."""
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # select_layer -2, "patch"
        x = F.linear(hidden, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])
        x = F.linear(F.gelu(x), state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])[0]
        embed = state["model.embed_tokens.weight"]
        at = ids.index(marker)
        before = embed[torch.tensor(ids[:at], dtype=torch.long)]
        after = embed[torch.tensor(ids[at + 1 :], dtype=torch.long)]
        inputs_embeds = torch.cat([before, x, after])[None]
        llama = LlamaForCausalLM(llama_config).eval()
        llama.load_state_dict({k: v for k, v in state.items() if "mm_projector" not in k}, strict=True)
        return llama(inputs_embeds=inputs_embeds).logits[0]
