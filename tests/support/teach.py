"""Teach-test builders: sampled pairs from real photos, a teach folder, and the no-secret-on-disk check."""

from __future__ import annotations

from pathlib import Path

from mlmfilter.core.sample import Sample
from mlmfilter.teach.folder import TeachFolder
from mlmfilter.teach.pairs import write_pair_table

SECRET = "sk-teach-SECRET-never-on-disk-0001"


def teach_pairs(flickr_pairs, captions: list[str]) -> list[Sample]:
    out = []
    for i, caption in enumerate(captions):
        image, _ = flickr_pairs[i]
        out.append(
            Sample(
                uid=f"{i:032x}",
                shard="s0",
                key=f"k{i}",
                caption=caption,
                image_bytes=image.read_bytes(),
                image_format="jpg",
            )
        )
    return out


def teach_folder(tmp_path, flickr_pairs, captions) -> TeachFolder:
    folder = TeachFolder(tmp_path / "teach")
    write_pair_table(folder.path / "sample.parquet", teach_pairs(flickr_pairs, captions))
    return folder


def assert_no_secret_under(folder: Path) -> None:
    holders = [p for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert holders == []
