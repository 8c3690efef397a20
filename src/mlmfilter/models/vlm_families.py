"""What differs between the vision-language families the MLM judge runs: nothing else is family specific.

A family says which ``model_type`` values it covers, the text its processor expands into image tokens,
how positions are numbered (plain 1D, or Qwen2-VL's 3D M-RoPE), which image size to decode to, and
how to load its processor when the generic loader cannot (Qwen2-VL's processor insists on a video
processor, which needs torchvision; the judge never sends video).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VlmFamily:
    name: str
    model_types: tuple[str, ...]
    #: what a prompt holds where the image goes; the processor expands it into image tokens
    image_placeholder: str
    #: the one token the processor repeats (the reference's ``<image>`` split point)
    image_token: str
    #: "1d": position = index; "mrope": Qwen2-VL 3D positions (text after the image: all 3 equal)
    positions: str
    #: the processor resizes to a size that depends on the image (so a pixel budget matters)
    dynamic_resolution: bool

    def image_size(self, image_processor: Any, max_image_pixels: int | None) -> int:
        """Shorter side the pipeline should decode to: never less than what the processor uses."""
        if self.name == "llava":
            crop = getattr(image_processor, "crop_size", None) or {}
            size = getattr(image_processor, "size", None) or {}
            return int(crop.get("height") or size.get("shortest_edge") or size.get("height") or 336)
        if self.name == "qwen2_vl":
            budget = processor_max_pixels(image_processor)
            if max_image_pixels:
                budget = min(budget, max_image_pixels)
            return math.isqrt(int(budget))
        size = getattr(image_processor, "size", None) or {}
        longest = int(size.get("longest_edge") or 1536)
        return min(longest, math.isqrt(max_image_pixels)) if max_image_pixels else longest

    def default_pixel_budget(self, image_processor: Any) -> int | None:
        """Images above this many pixels are downscaled (aspect kept) before the processor sees them."""
        if not self.dynamic_resolution:
            return None  # the processor resizes to a fixed size anyway
        if self.name == "qwen2_vl":
            return min(processor_max_pixels(image_processor), QWEN2_VL_DEFAULT_MAX_PIXELS)
        longest = int((getattr(image_processor, "size", None) or {}).get("longest_edge") or 1536)
        return longest * longest


#: 1280 merged 28x28 tokens, the budget Qwen2-VL's model card suggests for memory
QWEN2_VL_DEFAULT_MAX_PIXELS = 1280 * 28 * 28

FAMILIES: dict[str, VlmFamily] = {
    "llava": VlmFamily("llava", ("llava", "mlmfilter_pooled_llava"), "<image>", "<image>", "1d", False),
    "qwen2_vl": VlmFamily(
        "qwen2_vl",
        ("qwen2_vl", "qwen2_5_vl"),
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|image_pad|>",
        "mrope",
        True,
    ),
    "idefics3": VlmFamily("idefics3", ("idefics3", "smolvlm"), "<image>", "<image>", "1d", True),
}


def family_for_model_type(model_type: str) -> VlmFamily:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"model_type {model_type!r} is not supported by the MLM judge; supported: {supported}")


def guess_family(name: str) -> VlmFamily:
    """For the random fallback only: the family a hub id most likely names."""
    lowered = name.lower()
    if "qwen" in lowered:
        return FAMILIES["qwen2_vl"]
    if "idefics" in lowered or "smolvlm" in lowered:
        return FAMILIES["idefics3"]
    return FAMILIES["llava"]


def processor_max_pixels(image_processor: Any) -> int:
    size = getattr(image_processor, "size", None) or {}
    value = size.get("longest_edge") or size.get("max_pixels") or getattr(image_processor, "max_pixels", None)
    return int(value or 12845056)


def image_only_processor_class(processor_class: type) -> type:
    """The family's processor without its video processor (which needs torchvision to exist).

    The class keeps its name so that a processor saved from it loads as the real one elsewhere.
    """

    class ImageOnlyProcessor(processor_class):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImageOnlyProcessor.__name__ = processor_class.__name__
    ImageOnlyProcessor.__qualname__ = processor_class.__qualname__
    return ImageOnlyProcessor
