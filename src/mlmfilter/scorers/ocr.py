"""Text in the image (T-MARS): what is printed in the picture, how much of it, and whether the caption just repeats it.

Web alt-text often copies the words printed in the image (signs, posters, product shots, slides).
CLIP reads text well and rates such pairs highly although they teach little about the visual
world (T-MARS, Maini et al., ICLR 2024). This scorer reads the text with PP-OCR (the ONNX models
that ship in the ``rapidocr`` wheel, see :mod:`mlmfilter.models.ocr`) so that selections can drop
or down-weight those pairs, e.g. ``ocr_caption_overlap > 0.6`` finds "the caption is the printed text".

Columns (one row per pair; a line counts when its text is non-empty and its confidence
>= ``min_confidence``):

- ``ocr_n_boxes``: number of text lines read;
- ``ocr_text``: the lines in reading order (top to bottom, left to right), joined by newlines;
- ``ocr_texts`` / ``ocr_confidences``: each line's string and recognition confidence (mean CTC
  character probability, 0..1); ``ocr_confidence``: their mean (null when no line was read);
- ``ocr_boxes``: each line's quadrilateral ``[x1, y1, x2, y2, x3, y3, x4, y4]`` clockwise from
  top-left, in the ORIGINAL image's pixels (the decoded image's boxes scaled by width/height);
- ``ocr_text_area_fraction``: share of the image's area inside the union of the boxes, 0..1;
- ``ocr_caption_overlap``: share of the caption's words found in the text read, 0..1 (below).

Caption overlap (:data:`OVERLAP_FORMULA`): both texts are normalised by Unicode NFKC, case folding,
and turning every character that is not a letter or digit into a space; tokens are the
whitespace-separated pieces. An OCR token that is not a caption word but splits wholly into two or
more caption words is replaced by them (the recogniser sometimes drops a space: "SALE50%OFF" reads
as ``sale50 off``, and ``sale50`` -> ``sale 50`` when the caption has both). Then, with C the
caption's tokens and O the OCR tokens as multisets::

    ocr_caption_overlap = |C ∩ O| / |C|          (0 when C or O is empty)

so a caption word printed once matches one occurrence. 1.0 means every caption word is printed in
the image; an ordinary descriptive caption of a photo with a sign scores near 0.

Speed (CPU): detection dominates. The detector runs on a copy whose longer side is ``det_side``
(default 960, PP-OCR's usual detection size; 640 is 2-3x as fast and loses some of the smallest text,
see ``docs/benchmarks.md``), the recogniser reads only the boxes found, cut from the decoded image
(``image_size`` on the shorter side), and the lines of a whole batch go through it together.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Any, Sequence

import pyarrow as pa
from pydantic import Field

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.scorers.base import ScoreFailure, Scorer, ScorerOptions

OVERLAP_FORMULA = (
    "tokens = NFKC + casefold, non-letters/digits -> space, split on whitespace; an OCR token that is not "
    "a caption token but splits wholly into >= 2 caption tokens is replaced by them; "
    "ocr_caption_overlap = |C ∩ O| / |C| over multisets (0 if either is empty)"
)
AREA_DEFINITION = "pixels inside the union of the kept line boxes / all pixels, on the decoded image"


class OcrOptions(ScorerOptions):
    batch_size: int = 16
    #: shorter side the image is decoded to; recognition crops are cut from it (never upscaled)
    image_size: int = Field(default=960, ge=32)
    #: longer side of the detector's input (scaled up or down to it; multiples of 32)
    det_side: int = Field(default=960, ge=64, le=4096)
    #: DB box threshold: mean text probability inside a candidate box
    box_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    #: lines read with a lower recognition confidence are dropped (rapidocr's text_score)
    min_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    #: also run PP-OCR's 0/180 degree classifier on each line (upside-down text; one more model pass per line)
    angle_classifier: bool = False
    #: onnxruntime threads; None: OMP_NUM_THREADS (one per worker under the executor), else all cores
    threads: int | None = Field(default=None, ge=1)


class OcrScorer(Scorer):
    """Detects text lines per image, then recognises the lines of the whole batch in one go."""

    Options = OcrOptions
    name = "ocr"
    columns = {
        "ocr_n_boxes": pa.int32(),
        "ocr_text": pa.string(),
        "ocr_texts": pa.list_(pa.string()),
        "ocr_confidences": pa.list_(pa.float32()),
        "ocr_confidence": pa.float32(),
        "ocr_boxes": pa.list_(pa.list_(pa.float32())),
        "ocr_text_area_fraction": pa.float32(),
        "ocr_caption_overlap": pa.float32(),
    }

    options: OcrOptions

    def __init__(self, options: OcrOptions | None = None):
        super().__init__(options)
        self.engine = None  # OcrEngine after setup()

    @property
    def image_size(self) -> int:  # type: ignore[override]
        return self.options.image_size

    def setup(self) -> None:
        from mlmfilter.models.ocr import OcrEngine

        o = self.options
        self.engine = OcrEngine(
            det_side=o.det_side,
            box_threshold=o.box_threshold,
            threads=o.threads,
            angle_classifier=o.angle_classifier,
        )

    def score_batch(self, samples: Sequence[Sample]) -> list[dict[str, Any] | ScoreFailure]:
        import numpy as np

        results: list[dict[str, Any] | ScoreFailure | None] = [None] * len(samples)
        pixels: dict[int, Any] = {}
        found, crops = [], []  # (sample index, box) and its line crop, for the whole batch
        for i, sample in enumerate(samples):
            if sample.image is None:
                results[i] = ScoreFailure(errors.MISSING_IMAGE, "no decoded image reached the OCR scorer")
                continue
            image = sample.image_at(self.image_size)
            image = image if image.mode == "RGB" else image.convert("RGB")
            pixels[i] = np.asarray(image)
            for box in self.engine.detect(pixels[i]):
                crop = self.engine.crop(pixels[i], box)
                if min(crop.shape[:2]) > 0:  # a degenerate (zero-width) box has nothing to read
                    found.append((i, box))
                    crops.append(crop)
        lines = self.engine.recognize(crops)  # every line of the batch in one recogniser pass
        read: dict[int, list] = {i: [] for i in pixels}
        for (i, box), line in zip(found, lines):
            if line.text.strip() and line.confidence >= self.options.min_confidence:
                read[i].append((box, line))
        for i in pixels:
            results[i] = self._row(samples[i], pixels[i].shape, read[i])
        return results  # type: ignore[return-value]

    def _row(self, sample: Sample, shape: tuple[int, ...], read: list) -> dict[str, Any]:
        from mlmfilter.images.text_mask import text_area_fraction

        height, width = shape[:2]
        # boxes are reported in the original image's pixels, whatever size it was decoded to
        sx = (sample.width or width) / width
        sy = (sample.height or height) / height
        texts = [line.text for _, line in read]
        confidences = [line.confidence for _, line in read]
        return {
            "ocr_n_boxes": len(read),
            "ocr_text": "\n".join(texts),
            "ocr_texts": texts,
            "ocr_confidences": confidences,
            "ocr_confidence": sum(confidences) / len(confidences) if confidences else None,
            "ocr_boxes": [[round(float(v), 1) for v in (box.points * (sx, sy)).reshape(-1)] for box, _ in read],
            "ocr_text_area_fraction": text_area_fraction((width, height), [box.points for box, _ in read]),
            "ocr_caption_overlap": caption_overlap(sample.caption or "", texts),
        }

    def provenance(self) -> dict[str, Any]:
        from mlmfilter.models.ocr import CLASSIFIER_FILE, DETECTOR_FILE, RECOGNIZER_FILE, ocr_provenance

        files = [DETECTOR_FILE, RECOGNIZER_FILE] + ([CLASSIFIER_FILE] if self.options.angle_classifier else [])
        return {
            **super().provenance(),
            **ocr_provenance(files, self.options.det_side),
            "ocr_caption_overlap_formula": OVERLAP_FORMULA,
            "ocr_text_area_fraction_definition": AREA_DEFINITION,
            "ocr_boxes_coordinates": "original image pixels, [x1,y1,...,x4,y4] clockwise from top-left",
        }


# -- caption overlap -----------------------------------------------------------------------------


def tokens(text: str) -> list[str]:
    """NFKC + casefold; every character that is not a letter or digit separates tokens."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c if unicodedata.category(c)[0] in "LN" else " " for c in folded).split()


def split_into_words(token: str, vocabulary: set[str]) -> list[str] | None:
    """``token`` written wholly as two or more words of ``vocabulary`` (fewest pieces), else None."""
    n = len(token)
    best: list[list[str] | None] = [None] * (n + 1)  # best[i]: fewest-piece split of token[:i]
    best[0] = []
    longest = max((len(w) for w in vocabulary), default=0)
    for end in range(1, n + 1):
        for start in range(max(0, end - longest), end):
            head = best[start]
            if head is not None and token[start:end] in vocabulary:
                if best[end] is None or len(head) + 1 < len(best[end]):  # type: ignore[arg-type]
                    best[end] = head + [token[start:end]]
    pieces = best[n]
    return pieces if pieces is not None and len(pieces) >= 2 else None


def caption_overlap(caption: str, ocr_lines: Sequence[str]) -> float:
    """Share of the caption's tokens (as a multiset) found among the OCR tokens; see :data:`OVERLAP_FORMULA`."""
    caption_tokens = tokens(caption)
    vocabulary = set(caption_tokens)
    ocr_tokens: list[str] = []
    for token in tokens(" ".join(ocr_lines)):
        pieces = None if token in vocabulary else split_into_words(token, vocabulary)
        ocr_tokens.extend(pieces or [token])
    if not caption_tokens or not ocr_tokens:
        return 0.0
    matched = Counter(caption_tokens) & Counter(ocr_tokens)
    return sum(matched.values()) / len(caption_tokens)
