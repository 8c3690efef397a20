"""How well the OCR scorer finds printed text and flags "caption = printed text" pairs, on real photos.

Known strings are rendered into the real Flickr8k photos (fonts that ship with matplotlib, varied
sizes, colours, outlines, plates, positions and rotations; seeded, so every run draws the same
set), JPEG-encoded, decoded and scored the way a run does. Three kinds of pairs per photo:

- positive: the photo with text, captioned with the printed string itself ("caption = printed text");
- hard negative: the same photo with text, captioned with its human Flickr caption;
- negative: the untouched photo with its human caption.

Reported:

- detection recall: share of rendered strings whose region (the rotated text rectangle) is at least
  half covered by the boxes the scorer kept; detection precision: share of kept boxes on the text
  photos with at least half of their area inside a rendered region (grown by a third of the text
  height, as detector boxes are looser than the glyphs' box); boxes found on the untouched photos
  are counted separately (some Flickr photos hold real text: jerseys, signs);
- word recall: mean ``ocr_caption_overlap`` of the positives (share of printed words read back);
- AUC of ``ocr_caption_overlap`` for positives against all negatives and against the hard
  negatives only, and the true / false positive rates of the rule ``ocr_caption_overlap > 0.6``;
- seconds per image with and without text.

Run: ``python -m mlmfilter.evaluation.ocr_synthetic --det-side 960 --det-side 640`` (needs the
``ocr`` and ``test`` extras: rapidocr, matplotlib's fonts, scikit-learn for the AUC).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

#: sign, poster, product and slide text of the kind alt-text repeats
PHRASES = [
    "Fresh coffee daily",
    "SALE 50% OFF",
    "Welcome to Portland",
    "Happy Birthday Anna",
    "Keep calm and carry on",
    "Grand opening Saturday",
    "No parking any time",
    "Best pizza in town",
    "Live music tonight",
    "Open 24 hours",
    "Summer collection 2024",
    "Free Wi-Fi inside",
    "Mountain View Trail",
    "Organic farm market",
    "Vote for change",
    "Thank you for visiting",
    "Main Street Bakery",
    "Exit only",
    "Closed on Mondays",
    "Buy one get one free",
    "Hotel California",
    "Danger high voltage",
    "Save the planet",
    "World Cup final",
    "Introduction to machine learning",
    "Quarterly results",
    "Lost dog reward",
    "Ice cold beer",
    "Handmade jewelry",
    "Park closes at dusk",
    "Merry Christmas",
    "Slow down children at play",
    "Fish and chips",
    "The best is yet to come",
    "Rooftop bar",
    "Books for sale",
    "Clearance event",
    "Tickets available here",
    "Enjoy the ride",
    "Green energy now",
]

#: fonts that ship with matplotlib (so every machine renders the same glyphs)
FONTS = [
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Oblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
]
_PALETTE = [(255, 255, 255), (0, 0, 0), (255, 221, 0), (220, 20, 20), (20, 60, 200), (30, 160, 60), (255, 140, 0)]


def font_path(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


@dataclass(frozen=True)
class TextStyle:
    font: str
    #: text height as a share of the photo's shorter side
    height_fraction: float
    colour: tuple[int, int, int]
    outline: tuple[int, int, int] | None = None
    plate: tuple[int, int, int] | None = None
    #: degrees, counter-clockwise
    angle: float = 0.0
    #: where the text's layer goes, as a share of the free room (0 = left/top, 1 = right/bottom)
    position: tuple[float, float] = (0.5, 0.5)
    upper: bool = False


def random_style(rng: random.Random, height: tuple[float, float] = (0.05, 0.14)) -> TextStyle:
    """A random look; ``height``: range of the text height as a share of the photo's shorter side."""
    colour = rng.choice(_PALETTE)
    contrast = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
    look = rng.choice(["plain", "outline", "plate"])
    return TextStyle(
        font=rng.choice(FONTS),
        height_fraction=rng.uniform(*height),
        colour=colour,
        outline=contrast if look == "outline" else None,
        plate=contrast if look == "plate" else None,
        angle=0.0 if rng.random() < 0.5 else rng.uniform(-25.0, 25.0),
        position=(rng.random(), rng.random()),
        upper=rng.random() < 0.3,
    )


@dataclass
class RenderedText:
    image: Image.Image
    #: (height, width) bool: the rotated rectangle around the printed glyphs
    region: np.ndarray
    printed: str
    font_px: int
    angle: float


def render_text(photo: Image.Image, text: str, style: TextStyle) -> RenderedText:
    """``photo`` with ``text`` drawn on it per ``style`` (shrunk until it fits), and where it went."""
    photo = photo.convert("RGB")
    printed = text.upper() if style.upper else text
    size = max(8, round(style.height_fraction * min(photo.size)))
    while True:
        layer, region = _text_layer(printed, style, size)
        if (layer.width <= photo.width and layer.height <= photo.height) or size <= 8:
            break
        size = max(8, int(size * 0.85))
    x = round(style.position[0] * max(0, photo.width - layer.width))
    y = round(style.position[1] * max(0, photo.height - layer.height))
    out = photo.copy()
    out.paste(layer, (x, y), layer)
    full = Image.new("L", photo.size, 0)
    full.paste(region, (x, y))
    return RenderedText(out, np.asarray(full) > 127, printed, size, style.angle)


def _text_layer(text: str, style: TextStyle, size: int) -> tuple[Image.Image, Image.Image]:
    font = ImageFont.truetype(str(font_path(style.font)), size)
    stroke = max(1, size // 15) if style.outline else 0
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox(
        (0, 0), text, font=font, stroke_width=stroke
    )
    pad = max(2, size // 4)
    width, height = right - left + 2 * pad, bottom - top + 2 * pad
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if style.plate:
        draw.rounded_rectangle((0, 0, width - 1, height - 1), radius=pad, fill=(*style.plate, 255))
    draw.text(
        (pad - left, pad - top),
        text,
        font=font,
        fill=(*style.colour, 255),
        stroke_width=stroke,
        stroke_fill=(*style.outline, 255) if style.outline else None,
    )
    region = Image.new("L", (width, height), 0)
    ImageDraw.Draw(region).rectangle((pad, pad, width - pad - 1, height - pad - 1), fill=255)
    if style.angle:
        layer = layer.rotate(style.angle, resample=Image.Resampling.BICUBIC, expand=True)
        region = region.rotate(style.angle, resample=Image.Resampling.NEAREST, expand=True)
    return layer, region


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def flickr_pairs(folder: Path) -> list[tuple[Path, str]]:
    """(photo, first human caption) for every photo of a flickr8k_dev-style folder, sorted by name."""
    first: dict[str, str] = {}
    with open(folder / "captions.tsv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["caption_idx"] == "0":
                first[row["image"]] = row["caption"]
    return [(folder / "images" / name, first[name]) for name in sorted(first)]


# -- evaluation ----------------------------------------------------------------------------------


def _box_mask(size: tuple[int, int], flat_boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
    from mlmfilter.images.text_mask import text_region_mask

    return [text_region_mask(size, [np.asarray(b, dtype=np.float64).reshape(4, 2)]) for b in flat_boxes]


def evaluate(
    pairs: Sequence[tuple[Path, str]],
    det_side: int = 960,
    image_size: int = 960,
    threads: int | None = 1,
    seed: int = 0,
    batch_size: int = 16,
    text_height: tuple[float, float] = (0.05, 0.14),
    upscale: float = 1.0,
) -> dict[str, Any]:
    """Render, score and measure; see the module docstring for the definitions.

    ``text_height``: range of the rendered text's height as a share of the photo's shorter side;
    ``upscale``: photos are first enlarged by this factor (Lanczos), to stand in for larger web images.
    """
    from sklearn.metrics import roc_auc_score

    from mlmfilter.core.sample import Sample
    from mlmfilter.images.decode import DecodeSpec, decode_image
    from mlmfilter.scorers.ocr import OcrScorer, caption_overlap

    scorer = OcrScorer(
        OcrScorer.Options(det_side=det_side, image_size=image_size, threads=threads, batch_size=batch_size)
    )
    scorer.ensure_setup()
    spec = DecodeSpec(shorter_side=image_size)

    def decoded(data: bytes, caption: str, key: str) -> Sample:
        image, width, height = decode_image(data, spec)
        return Sample(uid=key, shard="synthetic", key=key, caption=caption, image=image, width=width, height=height)

    rendered, text_samples, plain_samples = [], [], []
    for i, (path, flickr_caption) in enumerate(pairs):
        photo = Image.open(path).convert("RGB")
        if upscale != 1.0:
            photo = photo.resize(
                (round(photo.width * upscale), round(photo.height * upscale)), Image.Resampling.LANCZOS
            )
        phrase = PHRASES[i % len(PHRASES)]
        r = render_text(photo, phrase, random_style(random.Random(f"{seed}/{i}"), text_height))
        rendered.append((r, phrase, flickr_caption))
        text_samples.append(decoded(jpeg_bytes(r.image), phrase, f"text{i}"))
        plain_samples.append(
            decoded(path.read_bytes() if upscale == 1.0 else jpeg_bytes(photo), flickr_caption, f"plain{i}")
        )

    t0 = time.perf_counter()
    text_rows = scorer.score(text_samples)
    t_text = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain_rows = scorer.score(plain_samples)
    t_plain = time.perf_counter() - t0

    recalled, correct_boxes, text_boxes = 0, 0, 0
    recall_by: dict[str, list[int]] = {"upright": [], "rotated": [], "small": [], "large": []}
    positives, hard_negatives = [], []
    for (r, phrase, flickr_caption), row in zip(rendered, text_rows):
        boxes = _box_mask(r.image.size, row["ocr_boxes"] or [])
        union = np.logical_or.reduce(boxes) if boxes else np.zeros_like(r.region)
        hit = int(union[r.region].mean() >= 0.5)
        recalled += hit
        recall_by["rotated" if r.angle else "upright"].append(hit)
        recall_by["small" if r.font_px < 28 else "large"].append(hit)
        grown = _grow(r.region, max(3, r.font_px // 3))
        text_boxes += len(boxes)
        correct_boxes += sum(int(grown[b].mean() >= 0.5) for b in boxes if b.any())
        positives.append(row["ocr_caption_overlap"])
        hard_negatives.append(caption_overlap(flickr_caption, row["ocr_texts"] or []))
    negatives = hard_negatives + [row["ocr_caption_overlap"] for row in plain_rows]

    def auc(pos, neg):
        return float(roc_auc_score([1] * len(pos) + [0] * len(neg), list(pos) + list(neg)))

    n = len(pairs)
    return {
        "photos": n,
        "det_side": det_side,
        "image_size": image_size,
        "threads": threads,
        "text_height": list(text_height),
        "upscale": upscale,
        "detection_recall": recalled / n,
        "detection_precision": correct_boxes / text_boxes if text_boxes else None,
        "recall_upright": _mean(recall_by["upright"]),
        "recall_rotated": _mean(recall_by["rotated"]),
        "recall_small_text": _mean(recall_by["small"]),
        "recall_large_text": _mean(recall_by["large"]),
        "plain_photos_with_boxes": sum(1 for row in plain_rows if row["ocr_n_boxes"]) / n,
        "word_recall": float(np.mean(positives)),
        "auc_all_negatives": auc(positives, negatives),
        "auc_hard_negatives": auc(positives, hard_negatives),
        "tpr_at_0.6": float(np.mean([p > 0.6 for p in positives])),
        "fpr_at_0.6": float(np.mean([v > 0.6 for v in negatives])),
        "seconds_per_image_text": t_text / n,
        "seconds_per_image_plain": t_plain / n,
        "errors": sum(1 for s in text_samples + plain_samples if s.error),
    }


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    size = 2 * pixels + 1
    grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))
    return np.asarray(grown) > 0


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[4] / "shared" / "data" / "flickr8k_dev"
    )
    parser.add_argument("--det-side", type=int, action="append", help="detector sizes to compare (repeatable)")
    parser.add_argument("--image-size", type=int, default=960)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="first N photos only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text-height",
        type=float,
        nargs=2,
        default=(0.05, 0.14),
        metavar=("MIN", "MAX"),
        help="text height range, as a share of the photo's shorter side",
    )
    parser.add_argument("--upscale", type=float, default=1.0, help="enlarge the photos first (larger web images)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args(argv)
    pairs = flickr_pairs(args.data)[: args.limit]
    results = [
        evaluate(
            pairs,
            det_side=side,
            image_size=args.image_size,
            threads=args.threads,
            seed=args.seed,
            text_height=tuple(args.text_height),
            upscale=args.upscale,
        )
        for side in (args.det_side or [960])
    ]
    for result in results:
        print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
