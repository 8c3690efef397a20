"""Vision-encoder input tensors from decoded images, computed as the reference image processors do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def to_pixel_values(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop: bool = True,
    dtype: "torch.dtype | None" = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> "torch.Tensor":
    """(N, 3, size, size) tensor, normalised, as CLIPImageProcessor would give: float32, or
    ``dtype=torch.bfloat16`` for a bf16 model.

    ``crop=True``: images whose shorter side is not ``size`` are first resized (bicubic)
    so that it is; then the centre square is cut out. ``crop=False``: each image is
    squashed to size x size. Normalisation goes through a 256-entry table per channel
    built with the reference's arithmetic, so the values match it bit for bit. For bf16 the
    table itself is rounded (as casting the float32 tensor would round each value), so the
    tensor equals ``to_pixel_values(...).to(torch.bfloat16)`` with half the memory traffic
    and no float32 copy: on 2 cores at bf16 this step is a visible share of a CLIP forward.
    ``resample``: the PIL filter of the resize (the processor's own; SigLIP-2 ships bilinear).
    """
    import torch

    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = np.asarray(_square(image.convert("RGB") if image.mode != "RGB" else image, size, crop, resample))
    table = _normalisation_table(tuple(mean), tuple(std))
    bf16 = dtype == torch.bfloat16
    if bf16:  # bf16 bit patterns as int16: numpy has no bf16, torch reinterprets them below
        table = torch.from_numpy(table).to(torch.bfloat16).view(torch.int16).numpy()
    channels_first = batch.transpose(0, 3, 1, 2)
    out = np.empty(channels_first.shape, dtype=table.dtype)
    for c in range(3):
        np.take(table[c], channels_first[:, c], out=out[:, c])
    tensor = torch.from_numpy(out)
    return tensor.view(torch.bfloat16) if bf16 else tensor


def _square(
    image: Image.Image, size: int, crop: bool, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    if not crop:
        return image.resize((size, size), resample)
    width, height = image.size
    if min(width, height) != size:  # upscale small ones (the decoder never does), as CLIP does
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        width, height = (size, new_long) if width <= height else (new_long, size)
        image = image.resize((width, height), resample)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


_TABLES: dict[tuple, np.ndarray] = {}


def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: ((v * 1/255 in float64 -> float32) - mean) / std, as transformers computes it."""
    key = (mean, std)
    if key not in _TABLES:
        scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        _TABLES[key] = ((scaled[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)
    return _TABLES[key]


def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred on a square of the processor's mean colour
    (each channel ``int(mean * 255)``), the offset rounded down as the original does."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
