"""Convert an original LLaVA-1.5 checkpoint (haotian-liu/LLaVA layout) into the llava-hf format.

The released ``weizhiwang/mlm-filter-llava-13b-gpt4v*`` judges are stored the way the LLaVA
training code saves them: a Llama/Vicuna ``LlavaLlamaForCausalLM`` whose config.json carries the
multimodal settings as ``mm_*`` fields, weights named ``model.layers.N...``, ``lm_head.weight`` and
``model.mm_projector.{0,2}.*``, and the CLIP vision tower referenced by name (``mm_vision_tower``)
rather than stored. Transformers cannot load that layout; this module rewrites it as a
``LlavaForConditionalGeneration`` folder (config, safetensors shards, tokenizer, processor with a
Vicuna v1 chat template) that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load.

The conversion streams one source shard at a time, so a 13B checkpoint needs about one shard of
memory, and it checks every written tensor's name and shape against the model transformers builds
from the new config before it returns.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlmfilter.convert.original import (
    EMBEDDING_PAD_MULTIPLE,
    EmbeddingResizer,
    LlavaConversionError,
    OriginalLlavaCheckpoint,
    ShardWriter,
    add_image_and_pad_tokens,
    check_complete,
    clip_image_settings,
    default_clip_image_settings,
    expected_tensors,
    generation_config,
    resolve_target_dtype,
)
from mlmfilter.convert.unified import SCORED_VOCAB_KEY

# conv_vicuna_v1: the format LLaVA-1.5 (and the MLM-Filter LLaVA judges) were trained on
from mlmfilter.judge.conversations import VICUNA_V1
from mlmfilter.judge.registry import SOURCE_KEY, identifying_fields
from mlmfilter.models.common import safe_pretrained_kwargs, safe_weights_kwargs

log = logging.getLogger(__name__)

_ORIGINAL_VISION_PREFIX = "model.vision_tower.vision_tower."
_TARGET_VISION_PREFIX = "model.vision_tower."
_SKIPPED_KEYS = re.compile(r"(\.rotary_emb\.inv_freq$|^model\.image_newline$)")


# -- the vision tower --------------------------------------------------------------------------------


@dataclass
class VisionTower:
    """The CLIP vision tower: its config, where its weights come from, and its image settings."""

    config: Any  # CLIPVisionConfig
    embedded: bool  # weights are inside the LLaVA checkpoint (model.vision_tower.vision_tower.*)
    source: str | None  # hub id / path given by the user, when the weights come from there
    image_settings: dict[str, Any]  # mean/std/size for the image processor

    @classmethod
    def resolve(cls, checkpoint: OriginalLlavaCheckpoint, shapes: dict[str, tuple[int, ...]], name: str | None):
        embedded = any(k.startswith(_ORIGINAL_VISION_PREFIX) for k in shapes)
        if name is not None:
            config = _clip_vision_config(name, local_only=False)
            if config is None:
                raise LlavaConversionError(f"vision tower {name!r}: no CLIP vision config found there")
            settings = clip_image_settings(name, config, local_only=False)
            return cls(config, embedded, None if embedded else name, settings)
        if not embedded:
            referenced = checkpoint.vision_tower_name or "openai/clip-vit-large-patch14-336"
            raise LlavaConversionError(
                f"{checkpoint.path} does not contain the vision tower (no {_ORIGINAL_VISION_PREFIX}* weights); "
                f"its config names {referenced!r}. Pass that CLIP model as vision_tower= (CLI: --vision-tower "
                f"{referenced}), as a hub id or the path of a local copy."
            )
        # Weights are embedded: take the config from the named tower if it is on this machine,
        # else read it off the tensor shapes (OpenAI CLIP conventions).
        referenced = checkpoint.vision_tower_name
        config = _clip_vision_config(referenced, local_only=True) if referenced else None
        if config is None:
            config = _infer_clip_vision_config(shapes)
            log.info("vision tower config inferred from the embedded weights: %s", config.to_diff_dict())
        settings = clip_image_settings(referenced, config, local_only=True) if referenced else None
        return cls(config, True, None, settings or default_clip_image_settings(config))

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Weights of a separately stored tower, named as CLIPVisionModel names them."""
        from transformers import CLIPVisionModel

        # a separately stored tower (often openai's .bin-only repos): .bin is read with weights_only, never unpickled freely
        model = CLIPVisionModel.from_pretrained(self.source, **safe_weights_kwargs(dtype=dtype, use_safetensors=None))
        return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}


def _clip_vision_config(name: str, local_only: bool):
    from transformers import CLIPVisionConfig

    try:
        return CLIPVisionConfig.from_pretrained(name, **safe_pretrained_kwargs(local_files_only=local_only))
    except (OSError, ValueError) as exc:
        if not local_only:
            raise LlavaConversionError(f"cannot load the vision tower {name!r}: {exc}") from exc
        return None


def _infer_clip_vision_config(shapes: dict[str, tuple[int, ...]]):
    """A CLIPVisionConfig from embedded tensor shapes; head size 64 and quick_gelu as in every OpenAI CLIP ViT."""
    from transformers import CLIPVisionConfig

    prefix = _ORIGINAL_VISION_PREFIX + "vision_model."
    hidden, _, patch, _ = shapes[prefix + "embeddings.patch_embedding.weight"]
    positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    grid = math.isqrt(positions - 1)
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),
        patch_size=patch,
        image_size=grid * patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


# -- renaming and writing ----------------------------------------------------------------------------


class KeyMapper:
    """Original LLaVA tensor names -> the names LlavaForConditionalGeneration uses in memory."""

    def __init__(self, expected: set[str]):
        self.expected = expected

    def __call__(self, key: str) -> str | None:
        if _SKIPPED_KEYS.search(key):
            return None
        if key.startswith(_ORIGINAL_VISION_PREFIX):
            rest = key[len(_ORIGINAL_VISION_PREFIX) :]
            # LLaVA saved CLIPVisionModel keys (vision_model.*); newer transformers may drop that level
            for candidate in (_TARGET_VISION_PREFIX + rest, _TARGET_VISION_PREFIX + rest.removeprefix("vision_model.")):
                if candidate in self.expected:
                    return candidate
            raise LlavaConversionError(f"vision tower tensor {key!r} has no place in LlavaForConditionalGeneration")
        if key.startswith("model.mm_projector."):
            index, _, param = key[len("model.mm_projector.") :].partition(".")
            layer = {"0": "linear_1", "2": "linear_2"}.get(index)
            if layer is None:
                raise LlavaConversionError(f"unexpected projector tensor {key!r} (mlp2x_gelu has layers 0 and 2)")
            return f"model.multi_modal_projector.{layer}.{param}"
        if key == "lm_head.weight":
            return key
        if key.startswith("model."):
            return "model.language_model." + key[len("model.") :]
        raise LlavaConversionError(f"unexpected tensor {key!r} in the checkpoint")


def _load_tokenizer(checkpoint: OriginalLlavaCheckpoint):
    """The checkpoint's tokenizer, set up to split prompts around <image> the way LLaVA does.

    LLaVA encodes the text before and after ``<image>`` as separate strings (tokenizer_image_token),
    so SentencePiece puts its dummy-prefix "▁" at the start of the text after the image too
    ("\n" -> "▁", "<0x0A>"). A Llama tokenizer with ``legacy=False`` prepends "▁" only at the very
    start of the prompt; with ``legacy=True`` it prepends it after every added token, which is
    exactly LLaVA's chunking for an ``<image>`` prompt. Byte-level BPE tokenizers are unaffected.
    """
    from transformers import AutoTokenizer

    # config= keeps AutoTokenizer from parsing LLaVA's config.json (model_type llava_llama is unknown)
    kwargs: dict[str, Any] = safe_pretrained_kwargs(config=checkpoint.text_config())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path), **kwargs)
        if _metaspace_scheme(tokenizer) == "first":
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path), legacy=True, **kwargs)
            if _metaspace_scheme(tokenizer) != "always":
                raise LlavaConversionError(
                    f"cannot make the tokenizer of {checkpoint.path} prefix text after <image> as LLaVA does"
                )
            tokenizer.init_kwargs["legacy"] = True  # saved, so the converted tokenizer reloads the same way
        return tokenizer
    except (ImportError, ValueError, OSError) as exc:
        if isinstance(exc, LlavaConversionError):
            raise
        hint = ""
        if (checkpoint.path / "tokenizer.model").is_file() and not (checkpoint.path / "tokenizer.json").is_file():
            hint = (
                " The folder has only a SentencePiece tokenizer.model: converting it needs the "
                "`sentencepiece` and `protobuf` packages (pip install sentencepiece protobuf)."
            )
        raise LlavaConversionError(f"cannot load the tokenizer of {checkpoint.path}: {exc}.{hint}") from exc


def _metaspace_scheme(tokenizer) -> str | None:
    """SentencePiece-style tokenizers (Metaspace pre-tokenizer): when the "▁" prefix is added."""
    from tokenizers.pre_tokenizers import Metaspace

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    return pre.prepend_scheme if isinstance(pre, Metaspace) else None


def convert_llava_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: str = "auto",
    vision_tower: str | None = None,
) -> Path:
    """Convert an original LLaVA-1.5 checkpoint folder ``src`` into a llava-hf folder ``dst``.

    Args:
        src: folder of the original checkpoint (config.json with ``mm_*`` fields, weight shards,
            tokenizer files), e.g. a download of ``weizhiwang/mlm-filter-llava-13b-gpt4v``.
        dst: output folder (created; existing files with the same names are overwritten).
        dtype: "auto" keeps the checkpoint's dtype; or fp32/bf16/fp16 (any name ``resolve_dtype`` knows).
        vision_tower: hub id or local path of the CLIP vision model (a CLIPVisionModel or CLIPModel
            checkpoint), normally the one config.json names in ``mm_vision_tower``
            (``openai/clip-vit-large-patch14-336``). Needed unless the checkpoint stores the tower
            itself (``model.vision_tower.vision_tower.*`` tensors, which then take precedence and
            this argument only supplies the config and image settings).

    Returns the output folder. Raises :class:`LlavaConversionError` with the reason when ``src``
    cannot be converted (e.g. no vision tower available, unsupported projector).

    What the converted model reproduces, and what it does not:

    * Model: exact. Vision features are CLIP ``hidden_states[mm_vision_select_layer]`` without the
      CLS token (``vision_feature_select_strategy="default"`` for "patch"), through the mlp2x_gelu
      projector (``linear_1``/``linear_2``, exact GELU), spliced in at the ``<image>`` tokens.
      ``<image>`` and, when the tokenizer has none, ``<pad>`` are added to the tokenizer; the
      embedding matrices grow to a multiple of 64 rows, new rows set to the mean of the old ones.
    * Prompt: the processor carries a chat template that renders LLaVA's conv_vicuna_v1
      (``"<system> USER: <image>\\n<text> ASSISTANT:"``), and the processor expands ``<image>``
      into the 576 (24x24) feature positions.
    * Image preprocessing: LLaVA-1.5 with ``image_aspect_ratio: "pad"`` first expands the photo to a
      square filled with the CLIP mean colour ``tuple(int(255 * m) for m in image_mean)`` (pasted
      centred), then applies CLIPImageProcessor (bicubic resize of the shorter side to 336, centre
      crop). llava-hf's published processors skip that padding (they resize + centre-crop, cutting
      off the sides of non-square photos). Transformers' ``LlavaImageProcessor`` implements the same
      expand-to-square (``do_pad=True``, mean-colour fill, centred), so the converted processor sets
      ``do_pad`` from ``image_aspect_ratio`` and reproduces LLaVA's pixels exactly with the PIL
      backend (the default when torchvision is not installed). With torchvision installed,
      transformers picks the torchvision backend, whose bicubic resize differs from PIL's by a few
      intensity levels at edges; load with ``AutoProcessor.from_pretrained(path, backend="pil")``
      if bit-identical pixels matter.
    * Tokenization: exact for single-turn prompts. LLaVA tokenizes the text before and after
      ``<image>`` as separate strings (``tokenizer_image_token``), so Llama's SentencePiece puts its
      dummy-prefix ``"▁"`` after the image too (``"\\n"`` -> ``"▁", "<0x0A>"``); llava-hf tokenizes
      the whole prompt, and a Llama tokenizer with ``legacy=False`` would drop that ``"▁"``. The
      converted tokenizer is saved with ``legacy=True`` (prefix after every added token), which
      gives LLaVA's ids; byte-level BPE tokenizers need no change.
    """
    checkpoint = OriginalLlavaCheckpoint(src)
    checkpoint.check_supported()
    target_dtype = resolve_target_dtype(dtype, checkpoint)
    shapes = checkpoint.key_shapes()
    tower = VisionTower.resolve(checkpoint, shapes, vision_tower)
    _check_projector_fits(checkpoint, shapes, tower)
    tokenizer = _load_tokenizer(checkpoint)
    text_config = checkpoint.text_config()
    resize, image_token_id = _extend_vocabulary(tokenizer, text_config)
    config = _llava_config(checkpoint, text_config, tower, image_token_id, shapes)
    # the original scores over its own vocabulary: the rows added for <image>, <pad> and the multiple of 64
    # stay out of the judge's softmax (their mean logit would otherwise take probability from every number)
    setattr(config, SCORED_VOCAB_KEY, resize.old_vocab)
    # what the judge registry identifies a released judge by (its trained / released-script request)
    setattr(config, SOURCE_KEY, identifying_fields(checkpoint.config))
    config.dtype = target_dtype
    # the fields the judge registry identifies the released 13B judges by (as the other converters keep them)
    setattr(config, SOURCE_KEY, identifying_fields(checkpoint.config))

    out = Path(dst).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(checkpoint, tower, config, resize, target_dtype, out)
    config.save_pretrained(out)
    generation_config(checkpoint, tokenizer).save_pretrained(out)
    _llava_processor(checkpoint, tower, tokenizer, config).save_pretrained(out)
    return out


def _check_projector_fits(
    checkpoint: OriginalLlavaCheckpoint, shapes: dict[str, tuple[int, ...]], tower: VisionTower
) -> None:
    projector_in = shapes.get("model.mm_projector.0.weight")
    if projector_in is None:
        raise LlavaConversionError(f"{checkpoint.path} has no model.mm_projector.0.weight")
    if projector_in[1] != tower.config.hidden_size:
        raise LlavaConversionError(
            f"the projector expects {projector_in[1]}-wide vision features but the vision tower's hidden "
            f"size is {tower.config.hidden_size}: wrong vision tower for this checkpoint"
        )


def _extend_vocabulary(tokenizer, text_config) -> tuple[EmbeddingResizer, int]:
    """<image> (+ <pad>) appended after the trained vocabulary, the embeddings grown to a multiple of 64
    rows; returns their resizer and the image token's id."""
    old_vocab = text_config.vocab_size
    if len(tokenizer) > old_vocab:
        raise LlavaConversionError(f"tokenizer has {len(tokenizer)} tokens but the embeddings only {old_vocab} rows")
    image_token_id = add_image_and_pad_tokens(tokenizer)
    new_rows = max(len(tokenizer), old_vocab)
    new_rows = math.ceil(new_rows / EMBEDDING_PAD_MULTIPLE) * EMBEDDING_PAD_MULTIPLE
    text_config.vocab_size = new_rows
    text_config.pad_token_id = tokenizer.pad_token_id
    return EmbeddingResizer(old_vocab, new_rows), image_token_id


def _llava_config(checkpoint: OriginalLlavaCheckpoint, text_config, tower: VisionTower, image_token_id: int, shapes):
    from transformers import LlavaConfig

    patches = (tower.config.image_size // tower.config.patch_size) ** 2
    strategy = checkpoint.vision_feature_strategy
    return LlavaConfig(
        text_config=text_config,
        vision_config=tower.config,
        image_token_index=image_token_id,
        image_seq_length=patches if strategy == "default" else patches + 1,
        projector_hidden_act="gelu",
        vision_feature_layer=checkpoint.vision_select_layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias="model.mm_projector.0.bias" in shapes,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )


def _write_weights(
    checkpoint: OriginalLlavaCheckpoint,
    tower: VisionTower,
    config,
    resize: EmbeddingResizer,
    dtype: torch.dtype,
    out: Path,
) -> None:
    """The checkpoint's tensors renamed one shard at a time (embeddings resized), the tower's after them; checked."""
    from transformers import LlavaForConditionalGeneration

    expected, tied = expected_tensors(LlavaForConditionalGeneration, config)
    rename = KeyMapper(set(expected))
    writer = ShardWriter(out, total=len(checkpoint.weight_files) + (0 if tower.embedded else 1))
    for weight_file in checkpoint.weight_files:
        shard: dict[str, torch.Tensor] = {}
        for key, tensor in checkpoint.iter_tensors(weight_file):
            target = rename(key)
            if target is None:
                continue
            if target in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                tensor = resize(tensor)
            shard[target] = tensor.to(dtype).contiguous()
        writer.write(shard)
        log.info("converted %s (%d tensors)", weight_file.name, len(shard))
    if not tower.embedded:
        writer.write({_TARGET_VISION_PREFIX + k: v for k, v in tower.tensors(dtype).items()})
    writer.finish()
    check_complete(writer.shapes, expected, tied)


def _llava_processor(checkpoint: OriginalLlavaCheckpoint, tower: VisionTower, tokenizer, config):
    """LLaVA's image preprocessing (pad to square with the mean colour when trained so) and the vicuna_v1 chat template."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        do_pad=checkpoint.pads_to_square, do_resize=True, do_center_crop=True, **tower.image_settings
    )
    tokenizer.chat_template = VICUNA_V1.chat_template(tokenizer.eos_token or "</s>")
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS position, dropped again by the "default" strategy
        chat_template=tokenizer.chat_template,
    )
