"""Teach-test builders: sampled pairs from real photos, a teach folder, and the no-secret-on-disk check."""

from __future__ import annotations

from pathlib import Path

from mlmfilter.teach.folder import TeachFolder
from mlmfilter.teach.pairs import TeachPair, write_pairs

SECRET = "sk-teach-SECRET-never-on-disk-0001"


def teach_pairs(flickr_pairs, captions: list[str]) -> list[TeachPair]:
    out = []
    for i, caption in enumerate(captions):
        image, _ = flickr_pairs[i]
        out.append(
            TeachPair(
                uid=f"{i:032x}", shard="s0", key=f"k{i}", caption=caption, image=image.read_bytes(), image_format="jpg"
            )
        )
    return out


def teach_folder(tmp_path, flickr_pairs, captions) -> TeachFolder:
    folder = TeachFolder(tmp_path / "teach")
    write_pairs(folder.path / "sample.parquet", teach_pairs(flickr_pairs, captions))
    return folder


def assert_no_secret_under(folder: Path) -> None:
    holders = [p for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert holders == []
