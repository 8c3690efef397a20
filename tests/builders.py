"""Build real WebDataset tar shards for tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Iterable[dict]) -> Path:
    """samples: dicts with key and any of jpg/png (bytes), txt (str|bytes), json (dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["key"]
            for ext in ("jpg", "png", "webp"):
                if ext in sample:
                    add_member(tar, f"{key}.{ext}", sample[ext])
            if "txt" in sample:
                txt = sample["txt"]
                add_member(tar, f"{key}.txt", txt.encode("utf-8") if isinstance(txt, str) else txt)
            if "json" in sample:
                add_member(tar, f"{key}.json", json.dumps(sample["json"]).encode())
    return path


def flickr_shards(pairs: list[tuple[Path, str]], out_dir: Path, n_shards: int, per_shard: int) -> list[Path]:
    """n_shards tars of real Flickr8k JPEG bytes + captions, img2dataset-style keys."""
    paths = []
    for s in range(n_shards):
        chunk = [pairs[(s * per_shard + i) % len(pairs)] for i in range(per_shard)]
        samples = [
            {"key": f"{s:05d}{i:04d}", "jpg": img.read_bytes(), "txt": caption}
            for i, (img, caption) in enumerate(chunk)
        ]
        paths.append(write_shard(out_dir / f"{s:08d}.tar", samples))
    return paths
