"""The one decode path: encoded bytes -> RGB PIL image at the size the scorers need.

Every scorer reads pixels through here, so an image is decoded once per pair:

* the pixel limit is checked from the header, before any pixel is decoded;
* JPEGs decode at reduced size where the target allows (libjpeg DCT scaling via
  ``Image.draft``): a 2000 px photo aimed at 224 px decodes 1/8 of its pixels; the
  time saved comes from not decoding pixels that a resize would throw away;
* one bicubic resize (as CLIP preprocessing does) to "shorter side == target", never up;
* EXIF orientation, odd modes (CMYK, palette + transparency, alpha, 16-bit, bilevel)
  are normalised to 8-bit RGB, transparent areas composited on white.
* JPEG, PNG, WebP, GIF, BMP and TIFF are read alike; of an animated GIF/WebP or a multi-page
  TIFF the first frame is the image (what PIL opens).

Broken input never raises out of :func:`decode_sample`; it marks the sample with an
:mod:`mlmfilter.core.errors` reason. :func:`mlmfilter.images.pool.decode_stream` runs decoding in worker processes
so that a model in the parent does not wait on it, and :func:`to_pixel_values` turns
decoded images into the normalised tensor a vision encoder takes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image, JpegImagePlugin

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample

if TYPE_CHECKING:  # torch is heavy; worker processes that only decode never import it
    pass

__all__ = [
    "DecodeSpec",
    "ImageDecodeError",
    "decode_image",
    "decode_sample",
    "resized_size",
]

# EXIF orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose)
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
_WHITE = (255, 255, 255)


#: decompression-bomb limit (width * height from the header): PIL's default
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class DecodeSpec:
    """What the scorers need from the decoder."""

    #: resize so the shorter side equals this (never upscale); None keeps the decoded size
    shorter_side: int | None = None
    #: decompression-bomb limit (width * height from the header)
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: resampling filter for the one resize (CLIP preprocessing uses bicubic)
    resample: Image.Resampling = Image.Resampling.BICUBIC
    #: big non-JPEG images (PNG, WebP) first shrink by an integer box filter to within this factor
    #: of the target (PIL's ``reducing_gap``): 3x faster at 3000 px, < 0.25/255 mean difference
    reducing_gap: float | None = 3.0
    #: JPEGs decode at the smallest 1/2^k scale that keeps at least this multiple of the target
    #: size. 1.0 is fastest (mean difference to a full decode + resize ~1.6/255 on 1000-2000 px
    #: photos); 2.0 stays within ~0.4/255 at ~1.4x the decode time
    draft_gap: float = 1.0
    #: every shorter side a consumer wants (scorers, the enhance writer): the bytes are decoded at each
    #: of them on their own (``Sample.views``), so that what one scorer sees never depends on the
    #: sizes the others want. Empty: only ``shorter_side``
    sides: tuple[int, ...] = ()

    def at(self, side: int | None) -> "DecodeSpec":
        """This spec for one shorter side only."""
        return replace(self, shorter_side=side, sides=())

    @classmethod
    def for_sides(cls, sides: "Iterable[int | None]", **settings) -> "DecodeSpec":
        """One decode per distinct side wanted; the largest is ``Sample.image``."""
        wanted = tuple(sorted({int(s) for s in sides if s}))
        if not wanted:
            return cls(shorter_side=settings.pop("shorter_side", None), **settings)
        settings.pop("shorter_side", None)
        return cls(shorter_side=wanted[-1], sides=wanted if len(wanted) > 1 else (), **settings)


class ImageDecodeError(Exception):
    """An image that cannot be decoded; ``reason`` is an :mod:`mlmfilter.core.errors` code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def resized_size(width: int, height: int, shorter_side: int | None) -> tuple[int, int]:
    """(width, height) with the shorter side at ``shorter_side``, never upscaled.

    The longer side is truncated exactly as transformers' ``get_resize_output_image_size``
    does, so a crop of our output lines up with CLIPImageProcessor's pixel for pixel.
    """
    short, long = min(width, height), max(width, height)
    if shorter_side is None or short <= shorter_side:
        return width, height
    new_long = int(shorter_side * long / short)
    return (shorter_side, new_long) if width <= height else (new_long, shorter_side)


def decode_image(data: bytes, spec: DecodeSpec) -> tuple[Image.Image, int, int]:
    """Decode ``data`` to an RGB image resized per ``spec``.

    Returns (image, original width, original height), the original size taken after the
    EXIF orientation is applied. Raises :class:`ImageDecodeError`.
    """
    if not data:
        raise ImageDecodeError(errors.EMPTY_IMAGE, "image has zero bytes")
    with warnings.catch_warnings():
        # the pixel limit is ours (spec.max_pixels); PIL's palette/bomb warnings are noise here
        warnings.simplefilter("ignore")
        try:
            return _decode(data, spec)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(errors.DECOMPRESSION_BOMB, str(exc)) from None
        except EOFError as exc:
            raise ImageDecodeError(errors.TRUNCATED_IMAGE, f"unexpected end of data: {exc}") from None
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error ...
            reason = errors.TRUNCATED_IMAGE if "truncat" in str(exc).lower() else errors.UNDECODABLE_IMAGE
            raise ImageDecodeError(reason, f"{type(exc).__name__}: {exc}") from None


def _decode(data: bytes, spec: DecodeSpec) -> tuple[Image.Image, int, int]:
    im = Image.open(io.BytesIO(data))  # reads the header only
    stored_w, stored_h = im.size
    if stored_w * stored_h > spec.max_pixels:
        raise ImageDecodeError(
            errors.DECOMPRESSION_BOMB,
            f"{stored_w}x{stored_h} = {stored_w * stored_h} pixels exceeds max_pixels={spec.max_pixels}",
        )
    draftable = isinstance(im, JpegImagePlugin.JpegImageFile)
    if not draftable:
        # nothing to gain by waiting, and PIL reads a PNG's EXIF only after its pixels: load now
        # so that a load error surfaces here rather than vanish inside the EXIF lookup
        im.load()
    orientation = _exif_orientation(im)
    swap = orientation in _SWAPS_AXES
    width, height = (stored_h, stored_w) if swap else (stored_w, stored_h)

    # the target in stored (pre-rotation) axes: the draft request and the resize work there
    target_w, target_h = resized_size(width, height, spec.shorter_side)
    if swap:
        target_w, target_h = target_h, target_w
    box = None
    if draftable and (target_w, target_h) != (stored_w, stored_h):
        # DCT-scaled decode to the smallest 1/2^k size still >= draft_gap x the target;
        # ``box`` is the original extent in drafted pixels, for exact registration
        request = (round(target_w * spec.draft_gap), round(target_h * spec.draft_gap))
        drafted = im.draft(None, request)
        if drafted is not None:
            box = drafted[1]
    im.load()
    im = _to_resizable_mode(im)
    if im.size != (target_w, target_h):
        im = im.resize((target_w, target_h), spec.resample, box=box, reducing_gap=spec.reducing_gap)
    im = _to_rgb(im)
    fix = _ORIENTATION_FIX.get(orientation)
    if fix is not None:  # rotate after the resize: fewer pixels to move
        im = im.transpose(fix)
    return im, width, height


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block must not cost us the picture
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_FIX else 1


def _to_resizable_mode(im: Image.Image) -> Image.Image:
    """8-bit L, LA, RGB or RGBA, the modes resized as they are (alpha premultiplied by PIL)."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode == "PA":
        return im.convert("RGBA")
    if mode == "La":
        return im.convert("LA")
    if mode == "RGBa":
        return im.convert("RGBA")
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_depth_to_l(im)
    return im.convert("RGB")  # CMYK (PIL undoes Adobe inversion), YCbCr, RGBX, LAB, HSV ...


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit gray to 8 bits by dropping the low byte (PIL's convert('L') would clip at 255)."""
    pixels = np.asarray(im)
    if im.mode == "F":
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    pixels = pixels.astype(np.int64)
    if im.mode == "I" and pixels.max(initial=0) <= 255:  # 32-bit container holding 8-bit values
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGB", im.size, _WHITE)
        background.paste(im.convert("RGBA"), mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def decode_sample(sample: Sample, spec: DecodeSpec) -> Sample:
    """Decode ``sample.image_bytes`` into ``sample.image`` (or mark the sample failed).

    Samples already in error pass through untouched; a sample that already holds a
    decoded image and no bytes is left as it is.
    """
    if not sample.ok or sample.skipped:
        return sample
    if sample.image_bytes is None:
        if sample.image is None:
            sample.fail(errors.MISSING_IMAGE, "no image bytes to decode")
        return sample
    try:
        image, width, height = decode_image(sample.image_bytes, spec.at(spec.shorter_side))
        views = {spec.shorter_side: image} if spec.sides else {}
        for side in spec.sides:
            if side in views:
                continue
            if min(width, height) <= side and spec.shorter_side is not None and side <= spec.shorter_side:
                views[side] = image  # neither decode resizes: the same pixels
            else:
                views[side] = decode_image(sample.image_bytes, spec.at(side))[0]
    except ImageDecodeError as exc:
        return sample.fail(exc.reason, exc.message)
    sample.image, sample.width, sample.height, sample.views = image, width, height, views
    sample.image_bytes = None
    return sample
