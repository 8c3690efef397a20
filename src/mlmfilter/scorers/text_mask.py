"""Text masking (T-MARS) as an option of pixel scorers: ``mask_text=True`` on ``clip`` or ``mlm``.

When set, the scorer first runs the PP-OCR text detector (detection only, no recognition) on the
image it was given and fills every detected box with the image's mean colour
(:func:`mlmfilter.images.text_mask.fill_text_regions`); its own preprocessing then starts from
that masked copy. The shared decoded image is never modified, so other scorers in the same run
(``ocr`` included) still see the original pixels. The setting and the detector (model hash,
detector input size) are recorded in the scorer's provenance.

The detector runs at ``MASK_DET_SIDE`` px on the longer side whatever size the scorer decodes to
(a CLIP image is 224 px on its shorter side: text is searched for on an upscaled copy, and the boxes
are mapped back to the scorer's image).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from mlmfilter.scorers.base import ScorerOptions

#: detector input, longer side in pixels (PP-OCR's DB detector is commonly run at 960)
MASK_DET_SIDE = 960
MASK_FILL = "every pixel inside a detected text box set to the mean RGB of the whole image (before masking), rounded"


class TextMaskOptions(ScorerOptions):
    """Options of a scorer that can mask text first (T-MARS)."""

    #: T-MARS (Maini et al., ICLR 2024): detect text (PP-OCR, detection only) and fill its boxes with
    #: the image's mean colour before this scorer's own preprocessing, so that the score cannot come
    #: from reading words printed in the image. Needs the `ocr` extra
    mask_text: bool = False


class TextMasker:
    """Detector-only OCR engine + fill: image in, masked copy out."""

    def __init__(self, det_side: int = MASK_DET_SIDE, threads: int | None = None):
        from mlmfilter.models.ocr import OcrEngine

        self.engine = OcrEngine(det_side=det_side, threads=threads, recognizer=False)

    def __call__(self, image: Image.Image) -> Image.Image:
        import numpy as np

        from mlmfilter.images.text_mask import fill_text_regions

        boxes = self.engine.detect(np.asarray(image.convert("RGB") if image.mode != "RGB" else image))
        return fill_text_regions(image, [box.points for box in boxes])


class TextMasking:
    """Mixin for a :class:`~mlmfilter.scorers.base.Scorer` whose ``Options`` subclass :class:`TextMaskOptions`."""

    _text_masker: TextMasker | None = None

    def masked(self, image: Image.Image) -> Image.Image:
        """``image`` with its text filled when ``mask_text`` is set, else ``image`` itself."""
        if not self.options.mask_text:  # type: ignore[attr-defined]
            return image
        if self._text_masker is None:  # loaded on first use, in the worker that scores
            self._text_masker = TextMasker()
        return self._text_masker(image)

    def text_mask_provenance(self) -> dict[str, Any]:
        """Nothing when masking is off (the provenance of unmasked runs stays as it was)."""
        if not self.options.mask_text:  # type: ignore[attr-defined]
            return {}
        from mlmfilter.models.ocr import DETECTOR_FILE, ocr_provenance

        return {
            "text_mask": {
                "method": "T-MARS text masking before this scorer's preprocessing (PP-OCR detection only)",
                "fill": MASK_FILL,
                **ocr_provenance([DETECTOR_FILE], MASK_DET_SIDE),
            }
        }
