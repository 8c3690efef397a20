"""AITQE (``HymanH/AITQE``, hanhuang22/AITQE ``modeling_mm.py``) -> a llava-hf folder.

AITQE's ``MMForCausalLM`` splices SigLIP features into a Qwen2 language model:

* ``vision_model`` (a ``SiglipVisionModel`` stored in the checkpoint), features
  ``hidden_states[-2]`` (penultimate layer, every patch: SigLIP has no CLS position);
* ``mm_projector`` = ``Linear(visual_hidden_dim, hidden) -> GELU -> Linear(hidden, hidden, bias=False)``;
* the ``image_tile_tokens`` placeholder positions (-1 ids) take the projected features in order.

That is exactly llava-hf's ``LlavaForConditionalGeneration`` with ``vision_feature_layer=-2``,
strategy ``full`` and a projector whose second bias is zero (a ``Linear`` without bias and one with
a zero bias compute the same), so AITQE converts to it instead of needing a model class of its own.
``image_newline`` is concatenated as a zero-length slice in the original (no effect) and is dropped.
The tokenizer gets ``<image>`` inside the existing vocabulary rows when there is room (Qwen2's head
has 152064 rows for 151646 tokens), so the softmax covers exactly the original rows.

The prompt (raw text, no chat template, no BOS) is the ``aitqe`` conversation format and
:mod:`mlmfilter.judge.aitqe`; image preprocessing is the SigLIP processor's square resize.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from mlmfilter.convert.original import LlavaConversionError, OriginalLlavaCheckpoint, resolve_target_dtype
from mlmfilter.convert.unified import (
    LlavaFolderSpec,
    Tower,
    load_original_tokenizer,
    siglip_image_settings,
    write_llava_folder,
)
from mlmfilter.judge.registry import identifying_fields

log = logging.getLogger(__name__)

_VISION_PREFIX = "vision_model."  # MMForCausalLM.vision_model (a SiglipVisionModel: its keys start vision_model.)
_LLM_PREFIX = "model.model."
#: SigLIP so400m's head count (its width 1152 is not a multiple of 64)
_KNOWN_HEADS = {1152: 16, 768: 12, 1024: 16}


class AitqeCheckpoint(OriginalLlavaCheckpoint):
    """An AITQE ``MMForCausalLM`` folder: config.json with ``image_tile_tokens``, weights, tokenizer."""

    WRAPPER_FIELDS = re.compile(
        r"^(mm_|image_|pesudo_|visual_|pooling_|language_model_name|vision_model_name|pad_token_index$|"
        r"eos_token_index$|IGNORE_INDEX$|architectures$|model_type$|_name_or_path$|auto_map$)"
    )

    def __init__(self, path: str | Path):
        config_file = self._read_config(path)
        if "image_tile_tokens" not in self.config or "visual_hidden_dim" not in self.config:
            raise LlavaConversionError(
                f"{config_file} has no image_tile_tokens/visual_hidden_dim: not an AITQE checkpoint"
            )
        if (
            self.config.get("mm_projector_type", "mlp") != "mlp"
            or self.config.get("image_aspect_ratio", "square") != "square"
        ):
            raise LlavaConversionError("only AITQE's mlp projector with square images is supported")
        pattern = self.config.get("image_pattern", "<image>")
        if pattern != "<image>":  # the processor would put this text around the image span: not reproduced
            raise LlavaConversionError(
                f"image_pattern {pattern!r} is not supported: the aitqe request format reproduces AITQE's "
                "processor for the default '<image>' (the image span, its newline, then the question)"
            )
        self.weight_files = self._find_weight_files()

    def text_config_class(self):
        from transformers import Qwen2Config

        return Qwen2Config


def _embedded_siglip_config(shapes: dict[str, tuple[int, ...]], image_size: int | None, layer_norm_eps: float = 1e-6):
    """The SigLIP config read off the stored weights. The image size is AITQE's ``pesudo_img_size`` when
    given: the patch grid alone cannot tell it (so400m: 27 patches of 14 px come from 384 px, not 378)."""
    from transformers import SiglipVisionConfig

    prefix = _VISION_PREFIX + "vision_model."
    hidden, _, patch, _ = shapes[prefix + "embeddings.patch_embedding.weight"]
    positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
    grid = math.isqrt(positions)
    if image_size is None or int(image_size) // patch != grid:
        image_size = grid * patch
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(layers),
        num_attention_heads=_KNOWN_HEADS.get(hidden, max(1, hidden // 64)),
        patch_size=patch,
        image_size=int(image_size),
        layer_norm_eps=layer_norm_eps,
        vision_use_head=any(k.startswith(prefix + "head.") for k in shapes),
    )


def convert_aitqe_checkpoint(
    src: str | Path, dst: str | Path, dtype: str = "auto", vision_tower: str | None = None
) -> Path:
    """Convert an AITQE checkpoint folder into a llava-hf folder ``dst``.

    ``vision_tower``: a local SigLIP folder whose config and preprocessor settings to use (normally
    what ``vision_model_name_or_path`` names); without it they are read off the stored weights and
    SigLIP's defaults (square 384 px bicubic resize, mean/std 0.5). The weights are always the
    checkpoint's own, as ``MMForCausalLM.from_pretrained`` loads them.
    """
    from transformers import AutoConfig

    checkpoint = AitqeCheckpoint(src)
    target_dtype = resolve_target_dtype(dtype, checkpoint)
    shapes = checkpoint.key_shapes()
    named = vision_tower or checkpoint.config.get("vision_model_name_or_path")
    vision_config, settings_source = None, None
    if named:
        try:
            loaded = AutoConfig.from_pretrained(named, local_files_only=True, trust_remote_code=False)
            vision_config, settings_source = getattr(loaded, "vision_config", loaded), named
        except (OSError, ValueError):
            if vision_tower:
                raise LlavaConversionError(f"cannot read the SigLIP config at {vision_tower!r}")
    if vision_config is None:
        vision_config = _embedded_siglip_config(shapes, checkpoint.config.get("pesudo_img_size"))
        log.info("AITQE vision config read off the stored weights: %s", vision_config.to_diff_dict())
    if shapes.get("mm_projector.0.weight", (0, 0))[1] != vision_config.hidden_size:
        raise LlavaConversionError("mm_projector.0.weight does not fit the vision tower's width")
    expected_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    if int(checkpoint.config["image_tile_tokens"]) != expected_tokens:
        raise LlavaConversionError(
            f"image_tile_tokens={checkpoint.config['image_tile_tokens']} but the tower gives {expected_tokens} patches"
        )
    text_config = checkpoint.text_config()
    tokenizer = load_original_tokenizer(checkpoint.path, text_config)

    def vision_tensors(dtype_: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for weight_file in checkpoint.weight_files:
            for key, tensor in checkpoint.iter_tensors(weight_file):
                if key.startswith(_VISION_PREFIX):
                    out[key[len(_VISION_PREFIX) :]] = tensor.to(dtype_).contiguous()
        return out  # "vision_model.vision_model.*" -> "vision_model.*", as SiglipVisionModel names them

    tower = Tower(vision_config, "siglip", siglip_image_settings(settings_source, vision_config), vision_tensors)

    def renamed_shards():
        for weight_file in checkpoint.weight_files:
            shard: dict[str, torch.Tensor] = {}
            for key, tensor in checkpoint.iter_tensors(weight_file):
                if key.startswith(_VISION_PREFIX) or key == "image_newline" or key.endswith("rotary_emb.inv_freq"):
                    continue
                if key == "model.lm_head.weight":
                    shard["lm_head.weight"] = tensor
                elif key.startswith(_LLM_PREFIX):
                    shard["model.language_model." + key[len(_LLM_PREFIX) :]] = tensor
                elif key in ("mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight"):
                    layer = "linear_1" if key.startswith("mm_projector.0") else "linear_2"
                    shard[f"model.multi_modal_projector.{layer}.{key.rsplit('.', 1)[1]}"] = tensor
                    if key == "mm_projector.2.weight":  # Linear(bias=False) == Linear with a zero bias
                        shard["model.multi_modal_projector.linear_2.bias"] = torch.zeros(
                            tensor.shape[0], dtype=tensor.dtype
                        )
                else:
                    raise LlavaConversionError(f"unexpected tensor {key!r} in the AITQE checkpoint")
            yield shard

    spec = LlavaFolderSpec(
        text_config=text_config,
        tower=tower,
        feature_layer=-2,
        scored_vocab=int(text_config.vocab_size),  # AITQE never resizes: the softmax covers every head row
        pooled_tokens=None,
        projector_bias=True,
        pad_to_square=False,
        source_fields=identifying_fields(checkpoint.config),
    )
    return write_llava_folder(
        spec, tokenizer, renamed_shards, len(checkpoint.weight_files), Path(dst).expanduser(), target_dtype
    )
