"""Loading the MLM judge's model: any supported image-text-to-text model by hub id or path.

:func:`inspect_vlm` reads config files only (family, image size, limits: what the pipeline and
provenance need before any weights); :func:`load_vlm` loads ``AutoModelForImageTextToText`` and
``AutoProcessor``. With ``allow_random_fallback`` an unavailable model is replaced by a tiny random
model of the family its name suggests (:mod:`mlmfilter.models.tiny_vlm`), loudly
(:mod:`mlmfilter.models.random_fallback`). :func:`vlm_provenance` says what a reader of the scores
needs to know about the model and its request format.

What runs the loaded model is a backend: :mod:`mlmfilter.backends.transformers` (the judge) and
:mod:`mlmfilter.backends.generation` (captions); training fine-tunes it (:mod:`mlmfilter.training`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from mlmfilter.judge.conversations import AUTO, FORMATS
from mlmfilter.models.common import (
    ModelUnavailableError,
    check_model_path,
    dtype_name,
    library_versions,
    model_source,
    refuse_pickle_only_folder,
    resolve_device,
    resolve_dtype,
    safe_pretrained_kwargs,
    safe_weights_kwargs,
    unavailable_message,
)
from mlmfilter.models.random_fallback import RANDOM_SEED, random_weights_warning, stand_in_source, warn_stand_in
from mlmfilter.models.vlm_families import VlmFamily, family_for_model_type, guess_family, image_only_processor_class

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = random_weights_warning("MLM judge scores")


# -- inspecting and loading -------------------------------------------------------------------------


@dataclass(frozen=True)
class VlmSpec:
    """What is known from config files alone."""

    name: str
    family: VlmFamily
    model_type: str
    architecture: str
    image_size: int  # the processor's image size (fixed-size processors: the checkpoint's)
    pixel_budget: int | None  # larger images are downscaled before the processor
    max_positions: int  # text model context length
    source: dict[str, Any]
    is_random: bool = False
    decode_side: int = 0  # shorter side the pipeline decodes to (VlmFamily.decode_side)


@functools.lru_cache(maxsize=16)
def inspect_vlm(name_or_path: str, allow_random_fallback: bool = False, max_image_pixels: int | None = None) -> VlmSpec:
    """Read config files only (cached per process). Raises ModelUnavailableError unless falling back."""
    from transformers import AutoConfig, AutoImageProcessor

    import mlmfilter.models.pooled_llava  # noqa: F401  (registers the aapool_mlp LLaVA with the Auto classes)

    try:
        check_model_path(name_or_path)
        config_source, processor_source = _adapter_sources(name_or_path)
        config = AutoConfig.from_pretrained(config_source, **safe_pretrained_kwargs())
        image_processor = AutoImageProcessor.from_pretrained(processor_source, **safe_pretrained_kwargs())
    except ValueError as exc:  # a config transformers does not know, e.g. an original LLaVA checkpoint
        raise ValueError(
            f"{name_or_path!r} is not a transformers image-text-to-text model ({str(exc).splitlines()[0]}). "
            "Original LLaVA-layout checkpoints (the MLM-Filter LLaVA judges) must first be converted: "
            "`mlmfilter convert SRC DST`."
        ) from exc
    except (OSError, ModelUnavailableError) as exc:  # transformers' word for "not local, not cached, not downloadable"
        if not allow_random_fallback:
            if isinstance(exc, ModelUnavailableError):  # a path that does not exist: say just that
                raise
            raise ModelUnavailableError(unavailable_message(name_or_path, exc)) from exc
        warn_stand_in(unavailable_message(name_or_path, exc), f"{guess_family(name_or_path).name} judge")
        return _random_spec(name_or_path, max_image_pixels)
    family = family_for_model_type(config.model_type)
    return _spec(name_or_path, config, image_processor, family, model_source(name_or_path), max_image_pixels)


def _adapter_sources(name_or_path: str) -> tuple[str, str]:
    """(config source, processor source): a PEFT adapter folder (``mlmfilter train --save adapter``)
    has no config.json; its config is the base model's, named in adapter_config.json. transformers
    loads base + adapter from the folder itself (with peft installed)."""
    import json
    import os

    folder = os.path.expanduser(name_or_path)
    adapter = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(adapter) or os.path.isfile(os.path.join(folder, "config.json")):
        return name_or_path, name_or_path
    with open(adapter, encoding="utf-8") as fh:
        base = json.load(fh).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter} does not name its base model (base_model_name_or_path)")
    has_processor = os.path.isfile(os.path.join(folder, "preprocessor_config.json"))
    return base, (name_or_path if has_processor else base)


def _spec(name, config, image_processor, family: VlmFamily, source, max_image_pixels, is_random=False) -> VlmSpec:
    budget = max_image_pixels or family.default_pixel_budget(image_processor)
    text_config = config.get_text_config()
    image_size = family.image_size(image_processor, budget)
    return VlmSpec(
        name=name,
        family=family,
        model_type=config.model_type,
        architecture=(getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "")])[0],
        image_size=image_size,
        decode_side=family.decode_side(image_size),
        pixel_budget=budget,
        max_positions=int(getattr(text_config, "max_position_embeddings", 0) or 4096),
        source=source,
        is_random=is_random,
    )


def _random_spec(name: str, max_image_pixels: int | None) -> VlmSpec:
    model, processor = _random_model(name)
    source = stand_in_source(name)
    family = guess_family(name)
    return _spec(name, model.config, processor.image_processor, family, source, max_image_pixels, is_random=True)


@functools.lru_cache(maxsize=4)
def _random_model(name: str):
    from mlmfilter.models.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(guess_family(name).name, seed=RANDOM_SEED)


@dataclass
class LoadedVlm:
    model: Any
    processor: Any
    spec: VlmSpec
    device: torch.device
    dtype: torch.dtype


def load_vlm(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    allow_random_fallback: bool = False,
    max_image_pixels: int | None = None,
) -> LoadedVlm:
    """Model + processor on ``device`` in ``dtype`` ("auto", "fp32", "bf16", "fp16")."""
    spec = inspect_vlm(name_or_path, allow_random_fallback, max_image_pixels)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if spec.is_random:
        import copy

        model, processor = copy.deepcopy(_random_model(name_or_path))
        log.warning("%s (%s stands in for %s)", RANDOM_WEIGHTS_WARNING, spec.family.name, name_or_path)
    else:
        from transformers import AutoModelForImageTextToText

        refuse_pickle_only_folder(name_or_path)
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                name_or_path, **safe_weights_kwargs(dtype=torch_dtype, attn_implementation="sdpa")
            )
        except OSError as exc:
            raise ModelUnavailableError(unavailable_message(name_or_path, exc)) from exc
        processor = _load_processor(name_or_path, spec)
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    return LoadedVlm(model, processor, spec, torch_device, torch_dtype)


def _load_processor(name_or_path: str, spec: VlmSpec):
    import transformers
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        return AutoProcessor.from_pretrained(name_or_path, **safe_pretrained_kwargs())
    except (OSError, ValueError, ImportError) as exc:
        # Qwen2-VL's (and SmolVLM2's) processor also loads a video processor, which needs torchvision;
        # the judge sends no video
        class_name = PROCESSOR_MAPPING_NAMES.get(spec.model_type)
        if class_name is None or "video" not in str(exc).lower():
            raise
        log.info("loading %s without its video processor (%s)", class_name, exc)
        processor_class = image_only_processor_class(getattr(transformers, class_name))
        return processor_class.from_pretrained(name_or_path, **safe_pretrained_kwargs())


def vlm_provenance(
    spec: VlmSpec,
    conversation: str,
    answer_prefix: str,
    device: torch.device | str,
    dtype: torch.dtype,
    max_length: int | None,
) -> dict[str, Any]:
    """What a reader of judge scores needs: model, family, exact request format, what is shared. No weights."""
    fmt = FORMATS.get(conversation)
    prov: dict[str, Any] = {
        "backend": "transformers",
        **spec.source,
        "family": spec.family.name,
        "model_type": spec.model_type,
        "architecture": spec.architecture,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "conversation": fmt.describe() if fmt else {"name": AUTO, "source": "the processor's chat template"},
        "answer_prefix": answer_prefix,
        "image_placeholder": spec.family.image_placeholder,
        "tokenization": (
            "split at the image token, chunks encoded apart (LLaVA tokenizer_image_token)" if fmt else "whole prompt"
        ),
        "image_encoded_once_per_pair": True,
        "prefix_kv_shared": True,
        "positions": "M-RoPE (3D) from get_rope_index for the prefix" if spec.family.positions == "mrope" else "1D",
        "pixel_budget": spec.pixel_budget,
        "image_size": spec.image_size,
        "decoded_shorter_side_up_to": spec.decode_side,
        "max_length": int(max_length or spec.max_positions),
        "libraries": library_versions(),
    }
    if spec.is_random:  # "warnings" is the key the run folder collects into its own warnings
        prov["warnings"] = [RANDOM_WEIGHTS_WARNING]
    return prov
