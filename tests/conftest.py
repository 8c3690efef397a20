from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

# tests never reach a model hub; without this a missing model costs ~25 s of download retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path inside ../shared; fail loudly (not skip) when the folder is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test data missing: {path} (the tests need ../shared beside the project root)")
    return path


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
