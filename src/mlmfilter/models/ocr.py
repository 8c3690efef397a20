"""PP-OCR text detection and recognition (the ONNX models inside the ``rapidocr`` wheel), on onnxruntime.

The model room for OCR: loading and running, no scoring logic. The three model files ship in the
wheel (``rapidocr/models/``) and are named here explicitly, so nothing is ever downloaded: a missing
file is a clear error, never a download attempt (rapidocr would otherwise fetch models it lacks).

- detector: PP-OCRv6 small DB text detector -> text-line quadrilaterals;
- recogniser: PP-OCRv6 small multilingual CRNN/CTC -> a string and a confidence per line crop,
  batched over all crops of many images at once;
- angle classifier (optional): PP-OCR mobile 0/180 degree classifier for upside-down lines.

Pixel arrays are RGB uint8 (the project's convention); the PP-OCR models were trained on BGR
(OpenCV) input, so the conversion happens here, in one place.

The detector input is the image scaled so that its longer side is ``det_side`` (rounded to a
multiple of 32 as the DB network needs), up or down: text small enough to fool CLIP in a 224 px
image is too small for the detector at that size, and a 4000 px photo need not be searched at 4000 px.
Boxes come back in the given image's pixels; recognition crops are cut from the given image, so a
caller that holds a larger image than the detector needs reads small text at full resolution.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlmfilter.core.errors import ModelUnavailableError

DETECTOR_FILE = "PP-OCRv6_det_small.onnx"
RECOGNIZER_FILE = "PP-OCRv6_rec_small.onnx"
CLASSIFIER_FILE = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"
#: the DB network downsamples by 32: its input sides must be multiples of it
_DET_STRIDE = 32


class OcrUnavailableError(ModelUnavailableError):
    """rapidocr / onnxruntime is not installed, or its wheel lacks a model file."""


@dataclass(frozen=True)
class DetectedBox:
    #: (4, 2) float32 corners, clockwise from top-left, in the pixels of the image given to ``detect``
    points: np.ndarray
    #: the detector's mean text probability inside the box
    score: float


@dataclass(frozen=True)
class RecognizedLine:
    text: str
    confidence: float  # mean CTC character probability, 0..1


def model_dir() -> Path:
    try:
        import rapidocr
    except ImportError as exc:  # the `ocr` extra
        raise OcrUnavailableError(
            "the OCR scorer needs rapidocr and onnxruntime: pip install 'mlmfilter[ocr]'"
        ) from exc
    return Path(rapidocr.__file__).resolve().parent / "models"


def model_file(name: str) -> Path:
    path = model_dir() / name
    if not path.is_file():
        raise OcrUnavailableError(f"{path} is missing: this rapidocr wheel does not ship {name}")
    return path


@lru_cache(maxsize=None)
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ocr_provenance(files: Sequence[str], det_side: int) -> dict[str, Any]:
    """Which model files (by content hash) and library versions produced the boxes and strings."""
    versions = {}
    for dist in ("rapidocr", "onnxruntime", "opencv-python-headless"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "ocr_models": {name: {"sha256": _sha256(str(model_file(name)))} for name in files},
        "ocr_det_side": det_side,
        "ocr_det_resize": f"longer side scaled to {det_side} (up or down), sides rounded to multiples of 32",
        "ocr_versions": versions,
    }


def resolve_threads(threads: int | None) -> int:
    """onnxruntime intra-op threads: the option, else OMP_NUM_THREADS (set per worker by the
    executor), else -1 (onnxruntime's default: every core)."""
    if threads is not None:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else -1


def detector_input_size(width: int, height: int, det_side: int) -> tuple[int, int]:
    """(width, height) the detector runs at: longer side ~ det_side, both sides multiples of 32."""
    scale = det_side / max(width, height)
    return (
        max(_DET_STRIDE, int(round(width * scale / _DET_STRIDE)) * _DET_STRIDE),
        max(_DET_STRIDE, int(round(height * scale / _DET_STRIDE)) * _DET_STRIDE),
    )


class OcrEngine:
    """Detector (+ recogniser, + angle classifier when asked), loaded once per process."""

    def __init__(
        self,
        det_side: int = 960,
        box_threshold: float = 0.5,
        unclip_ratio: float = 1.6,
        threads: int | None = None,
        recognizer: bool = True,
        angle_classifier: bool = False,
        rec_batch_size: int = 16,
    ):
        try:
            from rapidocr.ch_ppocr_det import TextDetector
            from rapidocr.ch_ppocr_rec import TextRecognizer
            from rapidocr.utils.log import logger as rapidocr_logger
            from rapidocr.utils.parse_parameters import ParseParams
        except ImportError as exc:
            raise OcrUnavailableError(
                "the OCR scorer needs rapidocr and onnxruntime: pip install 'mlmfilter[ocr]'"
            ) from exc
        import rapidocr

        self.det_side = det_side
        self.threads = resolve_threads(threads)
        rapidocr_logger.setLevel("WARNING")  # it logs every model path it opens at INFO
        cfg = ParseParams.load(Path(rapidocr.__file__).resolve().parent / "config.yaml")
        engine_cfg = cfg.EngineConfig.onnxruntime
        engine_cfg.intra_op_num_threads = self.threads
        engine_cfg.inter_op_num_threads = 1

        # the detector sees an image already scaled to det_side; its own resize only rounds to 32
        cfg.Det.update(
            model_path=str(model_file(DETECTOR_FILE)),
            engine_cfg=engine_cfg,
            limit_type="max",
            limit_side_len=max(det_side, _DET_STRIDE) + _DET_STRIDE,
            box_thresh=box_threshold,
            unclip_ratio=unclip_ratio,
        )
        self._detector = TextDetector(cfg.Det)
        self.files = [DETECTOR_FILE]
        self._recognizer = None
        self._classifier = None
        if recognizer:
            cfg.Rec.update(
                model_path=str(model_file(RECOGNIZER_FILE)),
                engine_cfg=engine_cfg,
                rec_batch_num=rec_batch_size,
                font_path=None,  # only for rapidocr's drawing helpers
            )
            self._recognizer = TextRecognizer(cfg.Rec)
            self.files.append(RECOGNIZER_FILE)
        if angle_classifier:
            from rapidocr.ch_ppocr_cls import TextClassifier

            cfg.Cls.update(
                model_path=str(model_file(CLASSIFIER_FILE)), engine_cfg=engine_cfg, cls_batch_num=rec_batch_size
            )
            self._classifier = TextClassifier(cfg.Cls)
            self.files.append(CLASSIFIER_FILE)

    def detect(self, rgb: np.ndarray) -> list[DetectedBox]:
        """Text-line boxes in reading order (top to bottom, then left to right), in ``rgb``'s pixels."""
        import cv2

        height, width = rgb.shape[:2]
        det_w, det_h = detector_input_size(width, height, self.det_side)
        interpolation = cv2.INTER_AREA if det_w < width else cv2.INTER_LINEAR
        small = cv2.resize(np.ascontiguousarray(rgb[..., ::-1]), (det_w, det_h), interpolation=interpolation)
        found = self._detector(small)
        if found.boxes is None or len(found.boxes) == 0:
            return []
        scale = np.array([width / det_w, height / det_h], dtype=np.float32)
        return [
            DetectedBox(points=(np.asarray(points, dtype=np.float32) * scale), score=float(score))
            for points, score in zip(found.boxes, found.scores)
        ]

    @staticmethod
    def crop(rgb: np.ndarray, box: DetectedBox) -> np.ndarray:
        """The line under ``box``, perspective-rectified to an upright strip (tall ones turned 90 degrees)."""
        from rapidocr.utils.process_img import get_rotate_crop_image

        return get_rotate_crop_image(rgb, box.points.copy())

    def recognize(self, crops: Sequence[np.ndarray]) -> list[RecognizedLine]:
        """One string per RGB line crop; crops of many images go in one call (batched by width)."""
        if self._recognizer is None:
            raise RuntimeError("this OcrEngine was built without its recogniser (detection only)")
        if not crops:
            return []
        from rapidocr.ch_ppocr_rec import TextRecInput

        bgr = [np.ascontiguousarray(c[..., ::-1]) for c in crops]
        if self._classifier is not None:  # turns upside-down lines the right way up
            bgr = list(self._classifier(bgr).img_list)
        out = self._recognizer(TextRecInput(img=bgr))
        return [RecognizedLine(text=t, confidence=float(s)) for t, s in zip(out.txts, out.scores)]

    def provenance(self) -> dict[str, Any]:
        return ocr_provenance(self.files, self.det_side)
