"""Text regions as pixels: rasterise detected text boxes, measure them, fill them (T-MARS masking).

Pure imaging, no models: the boxes come from :mod:`mlmfilter.models.ocr` (or anywhere else) as
(4, 2) corner arrays in the image's pixel coordinates.

Filling follows T-MARS (Maini et al., ICLR 2024), which masks text before CLIP scoring so that a
score cannot come from reading the printed words: every pixel inside a box takes the **mean colour
of the whole image** (per RGB channel, computed before masking, rounded to the nearest integer).
A flat fill of the image's own mean adds no edges a vision encoder could read and keeps the image's
overall colour statistics.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["text_region_mask", "text_area_fraction", "mean_colour", "fill_text_regions"]


def text_region_mask(size: tuple[int, int], boxes: Sequence[np.ndarray]) -> np.ndarray:
    """(height, width) bool array, True inside any of ``boxes`` (polygons, edges included)."""
    width, height = size
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
        points = [(float(x), float(y)) for x, y in np.asarray(box, dtype=np.float64).reshape(-1, 2)]
        if len(points) >= 3:
            draw.polygon(points, fill=255, outline=255)
    return np.asarray(canvas) > 0


def text_area_fraction(size: tuple[int, int], boxes: Sequence[np.ndarray]) -> float:
    """Share of the image's pixels inside the union of ``boxes`` (overlaps counted once), 0..1."""
    if not boxes:
        return 0.0
    return float(text_region_mask(size, boxes).mean())


def mean_colour(image: Image.Image) -> tuple[int, int, int]:
    """Mean RGB of the whole image, rounded to integers."""
    pixels = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    return tuple(int(round(float(v))) for v in pixels.reshape(-1, 3).mean(axis=0))  # type: ignore[return-value]


def fill_text_regions(image: Image.Image, boxes: Sequence[np.ndarray]) -> Image.Image:
    """A copy of ``image`` (RGB) with every pixel inside ``boxes`` set to the image's mean colour.

    Without boxes the image itself is returned (no copy): callers never modify images in place.
    """
    if not boxes:
        return image
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    pixels = np.array(rgb)  # a copy: the caller's image (shared with other scorers) stays as it is
    pixels[text_region_mask(rgb.size, boxes)] = mean_colour(rgb)
    return Image.fromarray(pixels)
