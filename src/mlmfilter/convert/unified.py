"""Convert a LLaVA-Unified checkpoint (Victorwz/LLaVA-Unified layout) into a folder transformers loads.

The newer MLM-Filter judges (``weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o``, ``…-llama-3.2-3b``,
``…-llama-3-8b``) are saved the way LLaVA-Unified's training code saves them: a
``LlavaQwenForCausalLM`` / ``LlavaLlamaForCausalLM`` whose config.json carries ``mm_*`` fields,
weights ``model.layers.N…``, ``model.mm_projector…`` and a copy of the vision tower, and the tower
*named* in ``mm_vision_tower``.

What LLaVA-Unified's ``load_pretrained_model`` does, and the conversion reproduces:

* the vision tower is the one ``mm_vision_tower`` names (CLIP or SigLIP), loaded from its own files;
  the copy inside the checkpoint is never used (``delay_load``), so it is skipped here too;
* features are ``hidden_states[mm_vision_select_layer]`` (CLIP drops its CLS position, SigLIP has
  none), then the projector: ``mlp2x_gelu`` -> llava-hf's ``multi_modal_projector``; ``aapool_mlp``
  (average pool to ``mm_num_image_tokens`` positions first) -> :mod:`mlmfilter.models.pooled_llava`;
* the token embeddings and head are resized to the tokenizer's length (for Qwen2.5 that CUTS the
  head from 151936 to 151665 rows), so the model scores over those rows only. The converted model
  gets ``<image>`` (and ``<pad>`` if needed) after them, rows set to the mean of the kept rows, and
  records ``mlmfilter_scored_vocab_size`` so the judge normalises over the original rows exactly;
* the image processor is the tower's own (SigLIP: square bicubic resize to 384, mean/std 0.5),
  with LLaVA's mean-colour pad-to-square when ``image_aspect_ratio`` is ``pad`` (as in training;
  the released scoring scripts skip it: the judge registry switches it per request mode).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
    expected_tensors,
    generation_config,
    resolve_target_dtype,
)
from mlmfilter.judge.registry import SOURCE_KEY, identifying_fields

log = logging.getLogger(__name__)

#: the config key the judge backend reads: softmax over this many head rows (the trained vocabulary)
SCORED_VOCAB_KEY = "mlmfilter_scored_vocab_size"
_SKIPPED = re.compile(r"(\.rotary_emb\.inv_freq$|^model\.image_newline$|^model\.vision_tower\.)")
_PROJECTOR_LAYERS = {
    "mlp2x_gelu": {"model.mm_projector.0.": "linear_1", "model.mm_projector.2.": "linear_2"},
    "aapool_mlp": {
        "model.mm_projector.mlp_projector.0.": "linear_1",
        "model.mm_projector.mlp_projector.2.": "linear_2",
    },
}


class UnifiedCheckpoint(OriginalLlavaCheckpoint):
    """A LLaVA-Unified training-code checkpoint: LLaVA's layout plus Qwen LLMs, SigLIP and aapool_mlp."""

    DROPPED_FIELDS = (*OriginalLlavaCheckpoint.DROPPED_FIELDS, SOURCE_KEY)

    @property
    def is_qwen(self) -> bool:
        arch = " ".join([str(self.config.get("model_type", "")), *map(str, self.config.get("architectures") or [])])
        return "qwen" in arch.lower()

    def check_supported(self) -> None:
        if self.projector_type not in _PROJECTOR_LAYERS:
            raise LlavaConversionError(
                f"mm_projector_type {self.projector_type!r} is not supported (mlp2x_gelu, aapool_mlp)"
            )
        if self.config.get("mm_use_im_start_end") or self.config.get("mm_use_im_patch_token", True):
            raise LlavaConversionError(
                "mm_use_im_start_end/mm_use_im_patch_token are set: image start/end or patch tokens are not "
                "supported (no released MLM-Filter checkpoint uses them)"
            )
        if self.config.get("mm_vision_select_feature", "patch") != "patch":
            raise LlavaConversionError("only mm_vision_select_feature 'patch' is supported")
        if self.config.get("image_aspect_ratio", "square") not in ("pad", "square", None):
            raise LlavaConversionError(f"image_aspect_ratio {self.config.get('image_aspect_ratio')!r} is not supported")

    def text_config_class(self):
        from transformers import LlamaConfig, Qwen2Config

        return Qwen2Config if self.is_qwen else LlamaConfig


@dataclass
class Tower:
    """The vision tower as the original loader builds it: config, weights, image settings."""

    config: Any
    kind: str  # "clip" / "siglip"
    image_settings: dict[str, Any]
    tensors: Callable[[torch.dtype], dict[str, torch.Tensor]]

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)


def load_tower(name: str, local_only: bool = True) -> Tower:
    """CLIP or SigLIP vision model ``name`` (hub id or folder; a full CLIP/SigLIP model works too)."""
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_only, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise LlavaConversionError(
            f"cannot load the vision tower {name!r} ({str(exc).splitlines()[0]}). Pass a local copy of it "
            f"(CLI: --vision-tower PATH)"
        ) from exc
    config = getattr(config, "vision_config", config)
    kind = "siglip" if "siglip" in config.model_type else "clip" if "clip" in config.model_type else ""
    if not kind:
        raise LlavaConversionError(f"vision tower {name!r} is a {config.model_type!r}, not CLIP or SigLIP")
    model_class = SiglipVisionModel if kind == "siglip" else CLIPVisionModel

    def tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        model = model_class.from_pretrained(
            name, dtype=dtype, local_files_only=local_only, trust_remote_code=False, weights_only=True
        )
        return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}

    settings = (
        siglip_image_settings(name, config, local_only)
        if kind == "siglip"
        else clip_image_settings(name, config, local_only)
    )
    return Tower(config, kind, settings, tensors)


def siglip_image_settings(name: str | None, config, local_only: bool = True) -> dict[str, Any]:
    """SiglipImageProcessor's settings: a square resize (no crop), mean/std 0.5, bicubic.

    ``crop_size`` is written equal to the resize (SigLIP never crops): left out, the converted
    processor would carry LlavaImageProcessor's default 224 beside the 384 resize, and a reader of
    the folder could take the image size from it.
    """
    side = int(config.image_size)
    settings: dict[str, Any] = {
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"height": side, "width": side},
        "crop_size": {"height": side, "width": side},
        "resample": 3,
        "do_center_crop": False,
    }
    if name is None:
        return settings
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name, local_files_only=local_only, trust_remote_code=False)
    except (OSError, ValueError):
        log.info("no preprocessor config for %s: SigLIP defaults at %d px", name, side)
        return settings
    for key in ("image_mean", "image_std", "resample"):
        if getattr(processor, key, None) is not None:
            settings[key] = getattr(processor, key)
    size = getattr(processor, "size", None)
    if size is not None:
        settings["size"] = {k: v for k, v in dict(size).items() if v is not None}
        height, width = settings["size"].get("height"), settings["size"].get("width")
        if height and width:
            settings["crop_size"] = {"height": height, "width": width}
    return settings


@dataclass
class LlavaFolderSpec:
    """Everything the writer needs to emit one llava-hf (or pooled llava) folder."""

    text_config: Any
    tower: Tower
    feature_layer: int
    scored_vocab: int  # head rows the original model scores over
    pooled_tokens: int | None  # aapool_mlp: positions after pooling; None: one per patch
    projector_bias: bool
    pad_to_square: bool
    source_fields: dict[str, Any]


def write_llava_folder(
    spec: LlavaFolderSpec,
    tokenizer,
    tensors: Callable[[], Any],  # yields (shard of renamed tensors) dicts
    shard_count: int,
    dst: Path,
    dtype: torch.dtype,
    generation_source: OriginalLlavaCheckpoint | None = None,
) -> Path:
    """Tokenizer with <image>, config, checked weight shards, processor: a folder AutoModel* loads."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from mlmfilter.models.pooled_llava import PooledLlavaConfig, PooledLlavaForConditionalGeneration

    image_token_id = add_image_and_pad_tokens(tokenizer)
    rows = max(len(tokenizer), spec.scored_vocab)
    if rows > spec.scored_vocab:
        rows = math.ceil(rows / EMBEDDING_PAD_MULTIPLE) * EMBEDDING_PAD_MULTIPLE
    resize = EmbeddingResizer(spec.scored_vocab, rows)
    text_config = spec.text_config
    text_config.vocab_size = rows
    text_config.pad_token_id = tokenizer.pad_token_id
    strategy = "default" if spec.tower.kind == "clip" else "full"  # CLIP's CLS position is dropped
    patches = (spec.tower.image_size // spec.tower.config.patch_size) ** 2
    common = dict(
        text_config=text_config,
        vision_config=spec.tower.config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=spec.projector_bias,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    extra_tokens = 1 if spec.tower.kind == "clip" else 0  # CLIP's CLS position, dropped by the "default" strategy
    if spec.pooled_tokens:
        # AdaptiveAvgPool2d takes any patch grid (27 -> 12 at 384 px, or a grid that is no multiple of the
        # pooled side): the processor must write exactly pooled_tokens <image> tokens whatever the image size.
        # LlavaProcessor writes (size // patch_size)^2 + num_additional_image_tokens: one "patch" the size of
        # the image, plus the rest as additional tokens.
        config = PooledLlavaConfig(
            pooled_image_tokens=spec.pooled_tokens, image_seq_length=spec.pooled_tokens, **common
        )
        model_class = PooledLlavaForConditionalGeneration
        processor_patch = spec.tower.image_size
        extra_tokens += spec.pooled_tokens - 1
    else:
        config = LlavaConfig(image_seq_length=patches, **common)
        model_class = LlavaForConditionalGeneration
        processor_patch = spec.tower.config.patch_size
    setattr(config, SCORED_VOCAB_KEY, spec.scored_vocab)
    setattr(config, SOURCE_KEY, spec.source_fields)
    config.dtype = dtype
    expected, tied = expected_tensors(model_class, config)

    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(dst, total=shard_count + 1)
    for shard in tensors():
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in shard:
                shard[key] = resize(shard[key])
        writer.write({k: v.to(dtype).contiguous() for k, v in shard.items()})
    writer.write({_tower_key(k, expected): v for k, v in spec.tower.tensors(dtype).items()})
    writer.finish()
    check_complete(writer.shapes, expected, tied)

    config.save_pretrained(dst)
    if generation_source is not None:
        generation_config(generation_source, tokenizer).save_pretrained(dst)
    settings = dict(spec.tower.image_settings)
    settings.setdefault("do_center_crop", spec.tower.kind == "clip")
    image_processor = LlavaImageProcessorPil(do_pad=spec.pad_to_square, do_resize=True, **settings)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=processor_patch,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
    )
    processor.save_pretrained(dst)
    return dst


def convert_unified_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: str = "auto",
    vision_tower: str | None = None,
    local_files_only: bool = True,
) -> Path:
    """Convert a LLaVA-Unified checkpoint folder ``src`` into ``dst`` (llava-hf, or pooled llava for aapool_mlp).

    ``vision_tower``: hub id or local folder of the tower config.json names in ``mm_vision_tower``
    (e.g. ``google/siglip-so400m-patch14-384``); default: that name, looked up locally only unless
    ``local_files_only=False``. Raises :class:`LlavaConversionError` saying why when it cannot convert.
    """

    checkpoint = UnifiedCheckpoint(src)
    checkpoint.check_supported()
    target_dtype = resolve_target_dtype(dtype, checkpoint)
    tower_name = vision_tower or checkpoint.vision_tower_name
    if not tower_name:
        raise LlavaConversionError(f"{checkpoint.path}/config.json names no mm_vision_tower; pass --vision-tower")
    tower = load_tower(tower_name, local_only=local_files_only)
    shapes = checkpoint.key_shapes()
    layers = _PROJECTOR_LAYERS[checkpoint.projector_type]
    first = next(iter(layers)) + "weight"
    if first not in shapes:
        raise LlavaConversionError(f"{checkpoint.path} has no {first} ({checkpoint.projector_type} projector)")
    if shapes[first][1] != tower.config.hidden_size:
        raise LlavaConversionError(
            f"the projector expects {shapes[first][1]}-wide vision features but the vision tower's hidden size is "
            f"{tower.config.hidden_size}: wrong vision tower for this checkpoint"
        )
    text_config = checkpoint.text_config()
    tokenizer = load_original_tokenizer(checkpoint.path, text_config)
    scored = len(tokenizer)  # load_pretrained_model: model.resize_token_embeddings(len(tokenizer))
    if scored > text_config.vocab_size:
        log.info(
            "tokenizer (%d) is longer than the embeddings (%d): new rows get the mean", scored, text_config.vocab_size
        )

    def renamed_shards():
        for weight_file in checkpoint.weight_files:
            shard: dict[str, torch.Tensor] = {}
            for key, tensor in checkpoint.iter_tensors(weight_file):
                target = _rename(key, layers)
                if target is not None:
                    shard[target] = tensor
            if scored > tensor_rows(shard):
                raise LlavaConversionError("the embeddings have fewer rows than the tokenizer: not supported")
            yield shard

    spec = LlavaFolderSpec(
        text_config=text_config,
        tower=tower,
        feature_layer=checkpoint.vision_select_layer,
        scored_vocab=scored,
        pooled_tokens=int(checkpoint.config.get("mm_num_image_tokens", 256))
        if checkpoint.projector_type == "aapool_mlp"
        else None,
        projector_bias=True,
        pad_to_square=checkpoint.pads_to_square,
        source_fields=identifying_fields(checkpoint.config),
    )
    return write_llava_folder(
        spec, tokenizer, renamed_shards, len(checkpoint.weight_files), Path(dst).expanduser(), target_dtype, checkpoint
    )


def load_original_tokenizer(path: Path, text_config):
    """The tokenizer as the original loader gets it: the class its tokenizer_config.json names.

    The original's transformers (4.4x) read config.json only when tokenizer_config.json names no class.
    transformers 5 always parses it, and an original config (``model_type`` llava_llama, Llama-3.2's
    ``llama3`` rope scaling) fails there (``'max_position_embeddings'``): a blank config keeps it out,
    as before. A config= hint of the LLM's own family would make transformers substitute that family's
    class, with its own pre-tokenizer; it is used only when tokenizer_config.json names no class.
    """
    from transformers import AutoTokenizer, PretrainedConfig

    if _named_tokenizer_class(path):
        try:
            return AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig(), trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise LlavaConversionError(f"cannot load the tokenizer of {path}: {exc}") from exc
    try:
        return AutoTokenizer.from_pretrained(str(path), config=text_config, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise LlavaConversionError(f"cannot load the tokenizer of {path}: {exc}") from exc


def _named_tokenizer_class(path: Path) -> str | None:
    file = Path(path) / "tokenizer_config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("tokenizer_class") or None
    except (OSError, ValueError):
        return None


def _tower_key(key: str, expected: dict[str, Any]) -> str:
    """A tower tensor's llava-hf name; checkpoints of older transformers nest CLIP/SigLIP keys under vision_model."""
    for candidate in ("model.vision_tower." + key, "model.vision_tower." + key.removeprefix("vision_model.")):
        if candidate in expected:
            return candidate
    raise LlavaConversionError(f"vision tower tensor {key!r} has no place in the converted model")


def tensor_rows(shard: dict[str, torch.Tensor]) -> int:
    embed = shard.get("model.language_model.embed_tokens.weight", shard.get("lm_head.weight"))
    return embed.shape[0] if embed is not None else 1 << 62


def _rename(key: str, layers: dict[str, str]) -> str | None:
    if _SKIPPED.search(key):
        return None
    for prefix, layer in layers.items():
        if key.startswith(prefix):
            return f"model.multi_modal_projector.{layer}.{key[len(prefix) :]}"
    if key.startswith("model.mm_projector."):
        raise LlavaConversionError(f"unexpected projector tensor {key!r}")
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    raise LlavaConversionError(f"unexpected tensor {key!r} in the checkpoint")
