"""The bundled sample shards: deterministic, img2dataset layout, and what their labels promise."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mlmfilter.core import errors
from mlmfilter.demo.data import PHOTOS, make_sample_shards
from mlmfilter.images.decode import DecodeSpec, ImageDecodeError, decode_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return make_sample_shards(tmp_path_factory.mktemp("demo") / "shards")


@pytest.fixture(scope="module")
def pairs(shards) -> list[dict]:
    """One dict per pair: the three members' bytes plus the parsed json, in tar order."""
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in members}):
            out.append(
                {
                    "shard": shard.name,
                    "key": key,
                    "jpg": members[f"{key}.jpg"],
                    "txt": members[f"{key}.txt"].decode("utf-8"),
                    "meta": json.loads(members[f"{key}.json"]),
                }
            )
    return out


def test_building_twice_gives_identical_bytes(shards, tmp_path):
    again = make_sample_shards(tmp_path / "again")
    assert [p.name for p in again] == [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    for a, b in zip(shards, again):
        assert a.read_bytes() == b.read_bytes()


def test_cli_script_writes_the_same_shards(shards, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_sample_data.py"), str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    written = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in written] == [p.name for p in shards]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(written, shards))


def test_tar_layout_is_img2dataset(shards):
    for shard_index, shard in enumerate(shards):
        with tarfile.open(shard) as tar:
            infos = tar.getmembers()
        names = [m.name for m in infos]
        keys = [f"{shard_index:05d}{i:04d}" for i in range(8)]
        assert names == [f"{key}.{ext}" for key in keys for ext in ("jpg", "json", "txt")]
        assert all(m.isfile() and m.mtime == infos[0].mtime and m.uid == 0 and m.gid == 0 for m in infos)


def test_json_fields(pairs):
    assert len(pairs) == 24
    uids = [p["meta"]["uid"] for p in pairs]
    assert len(set(uids)) == 24
    for pair in pairs:
        meta = pair["meta"]
        assert len(meta["uid"]) == 32 and int(meta["uid"], 16) >= 0 and meta["uid"] == meta["uid"].lower()
        assert meta["key"] == pair["key"]
        assert meta["caption"] == pair["txt"]
        assert meta["url"].startswith("http")
        assert meta["sha256"] == hashlib.sha256(pair["jpg"]).hexdigest()
        assert meta["demo_photo"] in PHOTOS and meta["license"]


def test_labels_say_what_the_captions_are(pairs):
    labels = Counter(p["meta"]["demo_label"] for p in pairs)
    assert labels == {"good": 12, "wrong": 5, "lazy": 4, "empty": 1, "non_english": 1, "broken_image": 1}
    own_caption = {name: photo.caption for name, photo in PHOTOS.items()}
    for pair in pairs:
        label, photo, caption = pair["meta"]["demo_label"], pair["meta"]["demo_photo"], pair["txt"]
        if label in ("good", "broken_image"):
            assert caption == own_caption[photo]
        elif label == "wrong":  # another photo's accurate caption
            assert caption in own_caption.values() and caption != own_caption[photo]
        elif label == "lazy":
            assert len(caption.split()) <= 2
        elif label == "empty":
            assert caption == ""
    assert {p["meta"]["demo_photo"] for p in pairs if p["meta"]["demo_label"] == "good"} == set(PHOTOS)


def test_images_decode_as_labelled(pairs):
    big = 0
    for pair in pairs:
        meta = pair["meta"]
        if meta["demo_label"] == "broken_image":
            with pytest.raises(ImageDecodeError) as info:
                decode_image(pair["jpg"], DecodeSpec(shorter_side=224))
            assert info.value.reason == errors.TRUNCATED_IMAGE
            continue
        image, width, height = decode_image(pair["jpg"], DecodeSpec(shorter_side=224))
        assert (width, height) == (meta["width"], meta["height"])  # EXIF-rotated one included
        assert min(image.size) == min(224, width, height)
        big += max(width, height) >= 1000
    assert big >= 8  # much of a web crawl is large


def test_one_photo_is_stored_sideways_with_exif_orientation(pairs):
    rotated = [p for p in pairs if "EXIF" in p["meta"]["demo_note"]]
    assert len(rotated) == 1
    stored = Image.open(io.BytesIO(rotated[0]["jpg"]))
    assert stored.getexif().get(0x0112) == 6
    assert stored.size == (rotated[0]["meta"]["height"], rotated[0]["meta"]["width"])
