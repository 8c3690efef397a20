"""Helpers the benchmarks share: where the real test data lives, Flickr8k pairs, machine load.

The data sits in ../shared beside the project root (never copied into the repository).
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FLICKR_DIR = SHARED / "data" / "flickr8k_dev"
CLIP_TOKENIZER_DIR = SHARED / "models" / "clip-tokenizer"


def require(path: Path) -> Path:
    if not path.exists():
        sys.exit(
            f"benchmark data missing: {path} (the benchmarks read ../shared beside the project root: "
            "data/flickr8k_dev with captions.tsv and images/, models/clip-tokenizer; see each benchmark's --help)"
        )
    return path


def flickr_captions(folder: Path = FLICKR_DIR) -> dict[Path, list[str]]:
    """Image path -> its human captions in caption_idx order, images sorted by name."""
    captions: dict[str, dict[int, str]] = {}
    with open(require(folder / "captions.tsv"), newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            captions.setdefault(row["image"], {})[int(row["caption_idx"])] = row["caption"]
    return {folder / "images" / name: [c[i] for i in sorted(c)] for name, c in sorted(captions.items())}


def flickr_pairs(n: int, folder: Path = FLICKR_DIR) -> list[tuple[Path, str]]:
    """``n`` (image path, caption) pairs: every photo with its first caption, then again with the
    next caption, and so on, so that no pair repeats until the captions run out."""
    photos = list(flickr_captions(folder).items())
    pairs = []
    for i in range(n):
        path, captions = photos[i % len(photos)]
        pairs.append((path, captions[(i // len(photos)) % len(captions)]))
    return pairs


def load_average() -> str:
    """The 1/5/15-minute load, to print beside timings taken on a shared machine."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"
