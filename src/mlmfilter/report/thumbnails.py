"""Pairs as they are shown: caption, a small inline thumbnail, and why there is no image.

A thumbnail is made from the sample's bytes as soon as the shard yields it (see
:mod:`mlmfilter.io.lookup`), through the one decode path (:func:`mlmfilter.images.decode.decode_image`,
so EXIF rotation, CMYK, palettes and bombs behave as in scoring), and kept only as a small JPEG
data URI: a page of thumbnails opens offline and stays small.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from mlmfilter.clients.chat import image_data_url
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec, ImageDecodeError, decode_image

THUMBNAIL_SIDE = 160  # longer side in pixels
JPEG_QUALITY = 80
MAX_SHOWN_CAPTION = 600  # characters; a 100k-character caption must not swamp the page


@dataclass(frozen=True)
class ShownSample:
    """What a gallery needs of one pair read back from its shard."""

    caption: str | None
    thumbnail: str | None  # data:image/jpeg;base64,... or None
    problem: str | None  # why there is no thumbnail / caption (reader or decode error)
    width: int | None = None
    height: int | None = None


def thumbnail_data_uri(data: bytes, side: int = THUMBNAIL_SIDE) -> tuple[str, int, int]:
    """(JPEG data URI with the longer side at most ``side``, original width, height).

    Raises :class:`mlmfilter.images.decode.ImageDecodeError` for bytes that do not decode."""
    # decode at about the thumbnail size (JPEG draft mode), then fit the longer side
    image, width, height = decode_image(data, DecodeSpec(shorter_side=side))
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return image_data_url(buffer.getvalue(), "jpeg"), width, height


class ThumbnailMaker:
    """The ``keep`` function for :func:`mlmfilter.io.lookup.lookup_samples`: Sample -> ShownSample."""

    def __init__(self, side: int = THUMBNAIL_SIDE):
        self.side = side

    def __call__(self, sample: Sample) -> ShownSample:
        caption = sample.caption
        if caption is not None and len(caption) > MAX_SHOWN_CAPTION:
            caption = caption[:MAX_SHOWN_CAPTION] + f"… ({len(sample.caption)} characters)"
        problem = f"{sample.error}: {sample.error_detail}" if sample.error else None
        if not sample.image_bytes:
            return ShownSample(caption, None, problem or "no image bytes")
        try:
            uri, width, height = thumbnail_data_uri(sample.image_bytes, self.side)
        except ImageDecodeError as exc:
            return ShownSample(caption, None, problem or f"{exc.reason}: {exc.message}")
        return ShownSample(caption, uri, problem, width, height)
