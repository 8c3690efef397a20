from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from tests.support.builders import build_tiny_clip
from tests.support.data import shared_path

# tests never reach a model hub; without this a missing model costs ~25 s of download retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    return shared_path("data", "flickr8k_dev")


@pytest.fixture(scope="session")
def flickr_pairs(flickr_dir) -> list[tuple[Path, str]]:
    """(image path, first human caption) for every Flickr8k dev photo, sorted by image name."""
    first: dict[str, str] = {}
    with open(flickr_dir / "captions.tsv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["caption_idx"] == "0":
                first[row["image"]] = row["caption"]
    return [(flickr_dir / "images" / name, first[name]) for name in sorted(first)]


@pytest.fixture(scope="session")
def reference_prompts() -> dict:
    import json

    return json.loads(shared_path("reference", "mlm_filter_prompts.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def smollm2_cache_dir(tmp_path_factory) -> str:
    """Where the SmolLM2 tokenizer, converted once from its GGUF, is kept for the session."""
    return str(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised CLIPModel of the real architecture, saved as a user's checkpoint would be."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
