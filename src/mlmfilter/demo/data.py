"""The bundled sample data: a few small WebDataset shards built from freely licensed photos.

Shards follow the img2dataset layout (``00000.tar`` holding ``KEY.jpg``, ``KEY.txt``,
``KEY.json``; the json carries ``uid`` (32 hex), ``url``, ``caption``, ``width``,
``height`` ...). Captions were written for this project and are of mixed quality on
purpose, so that a demo run has something to find; ``demo_label`` in each json says
what the caption is:

* ``good``: an accurate description of the photo;
* ``wrong``: the caption of another photo;
* ``lazy``: alt-text that says nothing ("IMG_0423.jpg", "image", "click here");
* ``empty``: no caption at all;
* ``non_english``: accurate, but not in English;
* ``broken_image``: a JPEG cut in half, to show an error row.

Photos are re-encoded as JPEG (quality 90); some are upscaled (Lanczos) past 1000 px
as much of a web crawl is, and one is stored sideways with an EXIF orientation tag.
The bytes are the same on every build in a given environment (fixed tar metadata,
sorted members); they may differ across Pillow/libjpeg versions.

Photos, their sources and licences (all ship inside the Python packages named):

* ``astronaut``: Eileen Collins, NASA Great Images database (https://flic.kr/p/r9qvLn);
  public domain. scikit-image ``skimage.data.astronaut``.
* ``coffee``: cup of espresso, courtesy of Pikolo Espresso Bar; CC0 by the photographer
  Rachel Michetti. scikit-image ``skimage.data.coffee``.
* ``chelsea``: Chelsea the cat; CC0 by the photographer Stefan van der Walt.
  scikit-image ``skimage.data.chelsea``.
* ``rocket``: launch of DSCOVR on Falcon 9 by SpaceX
  (https://www.flickr.com/photos/spacexphotos/16511594820/); released into the public
  domain by SpaceX. scikit-image ``skimage.data.rocket``.
* ``hubble``: Hubble eXtreme Deep Field, NASA (HubbleSite release 2012-37); public domain.
  scikit-image ``skimage.data.hubble_deep_field``.
* ``retina``: fundus photograph of a normal left eye, Mikael Häggström (Wikimedia Commons);
  CC0 1.0. scikit-image ``skimage.data.retina``.
* ``camera``: man with a camera on a tripod; CC0 by the photographer Lav Varshney.
  scikit-image ``skimage.data.camera``.
* ``coins``: Greek coins from Pompeii, Brooklyn Museum open collection; no known copyright
  restrictions. scikit-image ``skimage.data.coins``.
* ``horse``: silhouette of a horse by Andreas Preuss (marauder), openclipart; CC0.
  scikit-image ``skimage.data.horse``.
* ``china``: pagoda by a lake, by danielbuechele on Flickr
  (https://www.flickr.com/photos/danielbuechele/6061409035/); CC BY 2.0.
  scikit-learn ``sklearn.datasets.load_sample_image("china.jpg")``.
* ``flower``: dahlia, by vultilion on Flickr
  (https://www.flickr.com/photos/vultilion/6056698931/); CC BY 2.0.
  scikit-learn ``sklearn.datasets.load_sample_image("flower.jpg")``.
* ``grace_hopper``: official portrait of Grace Hopper, U.S. Navy photograph; public domain
  (work of the U.S. federal government). matplotlib ``mpl-data/sample_data/grace_hopper.jpg``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from mlmfilter.core.ids import uid_of
from mlmfilter.io.writers import add_tar_member

__all__ = ["PAIRS", "PHOTOS", "DemoPair", "Photo", "make_sample_shards"]

JPEG_QUALITY = 90
TAR_MTIME = 1_700_000_000  # fixed, so that the same pairs give the same bytes
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class Photo:
    load: Callable[[], Image.Image]
    url: str
    license: str
    caption: str  # accurate, written for this project
    long_side: int | None = None  # upscale to this long side (Lanczos); None keeps the size


def _skimage(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from skimage import data

        pixels = getattr(data, name)()
        if pixels.dtype == bool:  # the horse silhouette: True is the white background
            pixels = pixels.astype(np.uint8) * 255
        return Image.fromarray(pixels)

    return load


def _sklearn(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name))

    return load


def _matplotlib(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from matplotlib import cbook

        with cbook.get_sample_data(name) as fh:
            return Image.open(fh).convert("RGB")

    return load


PHOTOS: dict[str, Photo] = {
    "astronaut": Photo(
        _skimage("astronaut"),
        "https://flic.kr/p/r9qvLn",
        "public domain (NASA)",
        "Portrait of astronaut Eileen Collins in an orange flight suit, with an American flag "
        "and a space shuttle model behind her and a helmet beside her.",
        long_side=1024,
    ),
    "coffee": Photo(
        _skimage("coffee"),
        "https://example.org/mlmfilter-demo/coffee.jpg",
        "CC0 (Rachel Michetti)",
        "A red cup of espresso on a red saucer with a spoon, on a wooden table.",
        long_side=1500,
    ),
    "chelsea": Photo(
        _skimage("chelsea"),
        "https://example.org/mlmfilter-demo/chelsea.jpg",
        "CC0 (Stefan van der Walt)",
        "Close-up of the face of a tabby cat with green eyes.",
    ),
    "rocket": Photo(
        _skimage("rocket"),
        "https://www.flickr.com/photos/spacexphotos/16511594820/",
        "public domain (SpaceX)",
        "A SpaceX Falcon 9 rocket on its launch pad at dusk, between lightning towers and floodlights.",
    ),
    "hubble": Photo(
        _skimage("hubble_deep_field"),
        "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/",
        "public domain (NASA)",
        "The Hubble deep field: thousands of distant galaxies scattered across black space.",
    ),
    "retina": Photo(
        _skimage("retina"),
        "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg",
        "CC0 1.0 (Mikael Häggström)",
        "Fundus photograph of a healthy human retina, showing the optic disc and its blood vessels.",
    ),
    "camera": Photo(
        _skimage("camera"),
        "https://example.org/mlmfilter-demo/camera.jpg",
        "CC0 (Lav Varshney)",
        "Black and white photo of a man in a dark coat looking through a camera on a tripod on a lawn.",
    ),
    "coins": Photo(
        _skimage("coins"),
        "https://www.brooklynmuseum.org/opencollection/archives/image/51611",
        "no known copyright restrictions (Brooklyn Museum)",
        "Four rows of ancient Greek coins laid out on a dark background.",
    ),
    "horse": Photo(
        _skimage("horse"),
        "http://openclipart.org/detail/158377/horse-by-marauder",
        "CC0 (Andreas Preuss)",
        "Black silhouette of a standing horse on a white background.",
    ),
    "china": Photo(
        _sklearn("china.jpg"),
        "https://www.flickr.com/photos/danielbuechele/6061409035/",
        "CC BY 2.0 (danielbuechele)",
        "A tall Chinese pagoda with red and green painted eaves above a lake, framed by trees.",
        long_side=1500,
    ),
    "flower": Photo(
        _sklearn("flower.jpg"),
        "https://www.flickr.com/photos/vultilion/6056698931/",
        "CC BY 2.0 (vultilion)",
        "An orange dahlia in full bloom against a dark green background.",
        long_side=1200,
    ),
    "grace_hopper": Photo(
        _matplotlib("grace_hopper.jpg"),
        "https://example.org/mlmfilter-demo/grace_hopper.jpg",
        "public domain (U.S. Navy)",
        "Official portrait of Rear Admiral Grace Hopper in navy uniform and cap, in front of an American flag.",
        long_side=1200,
    ),
}


@dataclass(frozen=True)
class DemoPair:
    photo: str  # key into PHOTOS
    label: str  # good | wrong | lazy | empty | non_english | broken_image
    caption: str | None = None  # None: the photo's own caption
    note: str = ""
    exif_orientation: int | None = None  # store the pixels sideways and tag them (6 = rotate 90 CW to view)
    truncate: bool = False  # cut the JPEG in half


def _caption_of(photo: str) -> str:
    return PHOTOS[photo].caption


# 3 shards x 8 pairs, in shard order; labels are mixed so every shard shows a bit of everything
PAIRS: list[DemoPair] = [
    DemoPair("astronaut", "good"),
    DemoPair("coffee", "wrong", _caption_of("rocket"), "caption of the rocket photo"),
    DemoPair("rocket", "lazy", "IMG_0423.jpg", "a camera file name as alt-text"),
    DemoPair("chelsea", "good", note="stored sideways with EXIF orientation 6", exif_orientation=6),
    DemoPair("hubble", "broken_image", note="the JPEG is cut in half", truncate=True),
    DemoPair("camera", "good"),
    DemoPair("flower", "lazy", "image"),
    DemoPair("grace_hopper", "empty", ""),
    DemoPair("coffee", "good"),
    DemoPair("horse", "wrong", _caption_of("coffee"), "caption of the coffee photo"),
    DemoPair("coins", "lazy", "click here"),
    DemoPair("retina", "good"),
    DemoPair(
        "chelsea", "non_english", "Primer plano de la cara de un gato atigrado con ojos verdes.", "accurate, in Spanish"
    ),
    DemoPair("china", "good"),
    DemoPair("hubble", "wrong", _caption_of("grace_hopper"), "caption of the Grace Hopper portrait"),
    DemoPair("rocket", "good"),
    DemoPair("horse", "good"),
    DemoPair("astronaut", "wrong", _caption_of("flower"), "caption of the dahlia photo"),
    DemoPair("china", "lazy", "DSC_0042.JPG", "a camera file name as alt-text"),
    DemoPair("hubble", "good"),
    DemoPair("flower", "good"),
    DemoPair("retina", "wrong", _caption_of("camera"), "caption of the photographer photo"),
    DemoPair("coins", "good"),
    DemoPair("grace_hopper", "good"),
]


def make_sample_shards(out_dir: str | Path, samples_per_shard: int = 8) -> list[Path]:
    """Write the sample shards to ``out_dir`` (created if needed); return their paths in order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    photos: dict[str, Image.Image] = {}
    paths = []
    for shard_index, start in enumerate(range(0, len(PAIRS), samples_per_shard)):
        path = out_dir / f"{shard_index:05d}.tar"
        members: dict[str, bytes] = {}
        for index_in_shard, pair in enumerate(PAIRS[start : start + samples_per_shard]):
            if pair.photo not in photos:
                photos[pair.photo] = _prepared(PHOTOS[pair.photo])
            key = f"{shard_index:05d}{index_in_shard:04d}"
            members.update(_pair_members(key, pair, photos[pair.photo]))
        _write_tar(path, members)
        paths.append(path)
    return paths


def _prepared(photo: Photo) -> Image.Image:
    try:
        image = photo.load()
    except ImportError as exc:
        raise ImportError(
            f"the sample data needs scikit-image, scikit-learn and matplotlib ({exc}); "
            "install them with `pip install 'mlmfilter[demo]'`"
        ) from exc
    if photo.long_side is not None:
        scale = photo.long_side / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _pair_members(key: str, pair: DemoPair, image: Image.Image) -> dict[str, bytes]:
    photo = PHOTOS[pair.photo]
    jpeg = _encode(image, pair.exif_orientation)
    if pair.truncate:
        jpeg = jpeg[: len(jpeg) // 2]
    caption = photo.caption if pair.caption is None else pair.caption
    meta = {
        "uid": uid_of(f"mlmfilter-demo/{key}"),
        "key": key,
        "url": photo.url,
        "caption": caption,
        "status": "success",
        "width": image.width,
        "height": image.height,
        "original_width": image.width,
        "original_height": image.height,
        "sha256": hashlib.sha256(jpeg).hexdigest(),
        "license": photo.license,
        "demo_photo": pair.photo,
        "demo_label": pair.label,
        "demo_note": pair.note,
    }
    return {
        f"{key}.jpg": jpeg,
        f"{key}.txt": caption.encode("utf-8"),
        f"{key}.json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def _encode(image: Image.Image, orientation: int | None) -> bytes:
    out = io.BytesIO()
    if orientation is None:
        image.save(out, "JPEG", quality=JPEG_QUALITY)
    else:
        if orientation != 6:
            raise ValueError("only orientation 6 (stored rotated 90 degrees counter-clockwise) is used")
        exif = Image.Exif()
        exif[_ORIENTATION_TAG] = orientation
        image.transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", quality=JPEG_QUALITY, exif=exif)
    return out.getvalue()


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            add_tar_member(tar, name, members[name], mtime=TAR_MTIME)
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()  # the same shard: left untouched, so a run over it resumes instead of seeing a new file
        return
    tmp.replace(path)
