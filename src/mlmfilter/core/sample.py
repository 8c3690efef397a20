"""The record that flows through a run: one image-text pair, raw or decoded.

Bad input never raises out of a reader or the decoder: it sets ``error`` (a short
reason code from :mod:`mlmfilter.core.errors`) and ``error_detail`` (a human message),
and the pair travels on so that it is counted and written like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Sample:
    uid: str  # 32 lowercase hex chars (128 bits), DataComp-compatible
    shard: str  # id of the shard it was read from
    key: str  # key inside the shard (WebDataset __key__, parquet row, file stem)
    caption: str | None = None
    image_bytes: bytes | None = None  # dropped once decoded
    image_format: str | None = None  # extension it came with: jpg, png, webp ...
    meta: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None  # decoded RGB, resized for the scorers (the largest size any wants)
    #: the same bytes decoded at each shorter side a scorer asked for (``DecodeSpec.sides``): a scorer's
    #: pixels never depend on which other scorers share the run
    views: dict[int, Image.Image] = field(default_factory=dict)
    width: int | None = None  # original size, before any draft/resize
    height: int | None = None
    error: str | None = None
    error_detail: str | None = None
    skipped: bool = False  # left out by a cascade (`--only`): no scores, and not an error

    def image_at(self, side: int | None) -> Image.Image | None:
        """The image decoded for a scorer that wants shorter side ``side``: its own view when the decoder
        made one, else the one decoded image (decoded for this scorer alone, or handed in decoded)."""
        return self.views.get(side, self.image) if side is not None else self.image

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, reason: str, detail: str = "") -> "Sample":
        """Mark the first failure only: later stages must not hide the root cause."""
        if self.error is None:
            self.error = reason
            self.error_detail = detail[:2000]
        return self
