"""The one decode path, on real photo bytes and on broken/odd files crafted here with PIL."""

from __future__ import annotations

import io
import itertools
import os
import struct
import time
import zlib

import numpy as np
import psutil
import pytest
from PIL import Image, JpegImagePlugin

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import (
    DecodeSpec,
    ImageDecodeError,
    decode_image,
    decode_sample,
    resized_size,
)
from mlmfilter.images.pixels import to_pixel_values
from mlmfilter.images.pool import decode_stream

SPEC_224 = DecodeSpec(shorter_side=224)


# -- helpers -------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(pixels(a) - pixels(b)).mean())


def reason_of(data: bytes, spec: DecodeSpec = SPEC_224) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, spec)
    return info.value.reason


@pytest.fixture(scope="module")
def photos(flickr_pairs) -> list[bytes]:
    return [path.read_bytes() for path, _ in flickr_pairs[:12]]


@pytest.fixture(scope="module")
def photo(photos) -> bytes:
    return photos[0]


@pytest.fixture(scope="module")
def upright(photo) -> Image.Image:
    return Image.open(io.BytesIO(photo)).convert("RGB")


def upscaled(image: Image.Image, shorter: int) -> Image.Image:
    scale = shorter / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)


@pytest.fixture
def draft_spy(monkeypatch):
    """Records (requested size, decoded size) of every JPEG draft call made in this process."""
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


# -- real photos ---------------------------------------------------------------------------------
def test_flickr_photos_decode_to_shorter_side_224_close_to_full_decode(photos):
    for data in photos:
        full = Image.open(io.BytesIO(data)).convert("RGB")
        image, width, height = decode_image(data, SPEC_224)
        assert (width, height) == full.size
        assert image.mode == "RGB"
        assert min(image.size) == 224
        assert max(image.size) == int(224 * max(full.size) / min(full.size))
        reference = full.resize(image.size, Image.Resampling.BICUBIC)
        assert mean_abs_diff(image, reference) < 1.5


def test_no_resize_spec_gives_the_exact_full_decode(photo, upright):
    image, width, height = decode_image(photo, DecodeSpec())
    assert (width, height) == upright.size
    assert np.array_equal(pixels(image), pixels(upright))


def test_never_upscales(photo, upright):
    image, width, height = decode_image(photo, DecodeSpec(shorter_side=1000))
    assert image.size == upright.size == (width, height)


def test_2000px_jpeg_aimed_at_224_decodes_at_one_eighth(upright, draft_spy):
    big = upscaled(upright, 2000)  # 2000 x 2667
    image, width, height = decode_image(encode(big, "JPEG", quality=90), SPEC_224)
    assert (width, height) == big.size
    [(requested, decoded)] = draft_spy
    assert requested == resized_size(*big.size, 224) == image.size
    assert decoded == ((big.width + 7) // 8, (big.height + 7) // 8)
    reference = big.resize(image.size, Image.Resampling.BICUBIC)
    assert mean_abs_diff(image, reference) < 4.0  # DCT-scaled decode: a little sharper than bicubic


def test_draft_gap_trades_speed_for_fidelity(upright, draft_spy):
    big = upscaled(upright, 2000)
    image, _, _ = decode_image(encode(big, "JPEG", quality=90), DecodeSpec(224, draft_gap=2.0))
    [(requested, decoded)] = draft_spy
    assert requested == tuple(2 * side for side in resized_size(*big.size, 224))
    assert decoded == ((big.width + 3) // 4, (big.height + 3) // 4)
    assert mean_abs_diff(image, big.resize(image.size, Image.Resampling.BICUBIC)) < 1.0


def test_large_png_resize_with_reducing_gap_matches_fair_resize(upright):
    big = upscaled(upright, 1200)
    image, width, height = decode_image(encode(big, "PNG", compress_level=1), SPEC_224)
    assert (width, height) == big.size
    assert mean_abs_diff(image, big.resize(image.size, Image.Resampling.BICUBIC)) < 0.5


def test_resized_size_matches_transformers():
    from transformers.image_transforms import get_resize_output_image_size

    for width, height in [(500, 375), (375, 500), (500, 198), (1500, 1001), (224, 300), (999, 1000), (640, 640)]:
        array = np.zeros((height, width, 3), dtype=np.uint8)
        h, w = get_resize_output_image_size(array, 224, default_to_square=False, input_data_format="channels_last")
        expected = (w, h) if min(width, height) > 224 else (width, height)
        assert resized_size(width, height, 224) == expected


# -- broken input --------------------------------------------------------------------------------
def test_zero_bytes():
    assert reason_of(b"") == errors.EMPTY_IMAGE


def test_random_garbage():
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert reason_of(garbage) == errors.UNDECODABLE_IMAGE
    assert reason_of(b"<html><body>404 Not Found</body></html>") == errors.UNDECODABLE_IMAGE


def test_jpeg_cut_in_half(photo):
    assert reason_of(photo[: len(photo) // 2]) == errors.TRUNCATED_IMAGE
    assert reason_of(photo[: len(photo) // 2], DecodeSpec()) == errors.TRUNCATED_IMAGE


def test_png_cut_in_half(upright):
    png = encode(upright, "PNG")
    assert reason_of(png[: len(png) // 2]) == errors.TRUNCATED_IMAGE


def _png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height gray pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header():
    bomb = _png_with_header(100_000, 100_000)
    assert len(bomb) < 200
    t0 = time.perf_counter()
    assert reason_of(bomb) == errors.DECOMPRESSION_BOMB
    assert reason_of(_png_with_header(10_000, 10_000)) == errors.DECOMPRESSION_BOMB  # 1e8 > 89_478_485
    assert time.perf_counter() - t0 < 1.0  # no pixel was decoded


def test_max_pixels_from_the_spec(photo, upright):
    pixels_in_photo = upright.width * upright.height
    assert reason_of(photo, DecodeSpec(224, max_pixels=pixels_in_photo - 1)) == errors.DECOMPRESSION_BOMB
    assert decode_image(photo, DecodeSpec(224, max_pixels=pixels_in_photo))[1:] == upright.size


# -- odd modes -----------------------------------------------------------------------------------
_QUADRANT_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


def _colour_blocks() -> Image.Image:
    """64x64: red, green / blue, white quadrants."""
    image = Image.new("RGB", (64, 64))
    for (x, y), colour in zip([(0, 0), (32, 0), (0, 32), (32, 32)], _QUADRANT_COLOURS):
        image.paste(colour, (x, y, x + 32, y + 32))
    return image


def test_cmyk_jpeg_has_correct_colours():
    data = encode(_colour_blocks().convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image, width, height = decode_image(data, DecodeSpec())
    assert (width, height) == (64, 64) and image.mode == "RGB"
    for (x, y), colour in zip([(8, 8), (40, 8), (8, 40), (40, 40)], _QUADRANT_COLOURS):
        assert np.abs(pixels(image)[y, x] - colour).max() <= 12, (x, y)


def test_palette_with_transparency_composites_on_white():
    image = Image.new("P", (40, 20), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    image.paste(1, (20, 0, 40, 20))
    data = encode(image, "PNG", transparency=0)
    decoded, _, _ = decode_image(data, DecodeSpec())
    assert tuple(decoded.getpixel((5, 10))) == (255, 255, 255)  # not black
    assert tuple(decoded.getpixel((30, 10))) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composites_on_white(mode):
    rgba = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 128), (10, 0, 20, 10))  # half-transparent black
    rgba.paste((0, 0, 0, 255), (20, 0, 30, 10))
    decoded, _, _ = decode_image(encode(rgba.convert(mode), "PNG"), DecodeSpec())
    assert tuple(decoded.getpixel((5, 5))) == (255, 255, 255)
    assert np.abs(pixels(decoded)[5, 15] - 127).max() <= 1
    assert tuple(decoded.getpixel((25, 5))) == (0, 0, 0)


def test_16_bit_png_is_scaled_not_clipped():
    levels = np.array([0, 16384, 32768, 65535], dtype=np.uint16)
    data = encode(Image.fromarray(np.repeat(levels, 8)[None, :].repeat(4, axis=0)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    decoded, width, height = decode_image(data, DecodeSpec())
    assert (width, height) == (32, 4)
    assert pixels(decoded)[0, ::8, 0].tolist() == [0, 64, 128, 255]
    assert (pixels(decoded)[..., 0] == pixels(decoded)[..., 2]).all()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_gives_first_frame(fmt):
    frames = [Image.new("RGB", (32, 24), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    decoded, width, height = decode_image(data, DecodeSpec())
    assert (width, height) == (32, 24)
    assert tuple(decoded.getpixel((16, 12))) == (255, 0, 0)


def test_grayscale_jpeg(upright):
    gray = upright.convert("L")
    decoded, width, height = decode_image(encode(gray, "JPEG", quality=95), DecodeSpec())
    assert (width, height) == gray.size and decoded.mode == "RGB"
    channels = pixels(decoded)
    assert (channels[..., 0] == channels[..., 1]).all() and (channels[..., 1] == channels[..., 2]).all()
    assert np.abs(channels[..., 0] - pixels(gray)).mean() < 2


# -- EXIF orientation ----------------------------------------------------------------------------
_STORE_AS = {  # orientation -> how a camera stores an upright picture before tagging it
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def _tagged(upright: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(_STORE_AS[orientation])
    return encode(stored, "JPEG", quality=95, subsampling=0, exif=exif)


@pytest.mark.parametrize("orientation", [6, 3, 8])
def test_exif_orientation_is_applied(upright, orientation):
    decoded, width, height = decode_image(_tagged(upright, orientation), DecodeSpec())
    assert decoded.size == (width, height) == upright.size  # 375x500 again, not 500x375
    assert mean_abs_diff(decoded, upright) < 3
    assert mean_abs_diff(decoded, upright.transpose(Image.Transpose.ROTATE_180)) > 20


def test_malformed_exif_is_ignored(upright):
    data = encode(upright, "JPEG", quality=95, subsampling=0, exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xffjunk")
    decoded, width, height = decode_image(data, DecodeSpec())
    assert (width, height) == decoded.size == upright.size
    assert mean_abs_diff(decoded, upright) < 3


def test_exif_rotation_and_draft_together(upright, draft_spy):
    big = upscaled(upright, 1125)  # 1125 x 1500 upright, stored sideways as 1500 x 1125
    decoded, width, height = decode_image(_tagged(big, 6), SPEC_224)
    assert (width, height) == big.size
    assert decoded.size == resized_size(*big.size, 224) == (224, 298)
    [(requested, drafted)] = draft_spy
    assert requested == (298, 224)  # asked in stored (sideways) axes
    assert drafted == (375, 282)  # 1/4 scale: 1/8 would fall below 224
    reference = big.resize(decoded.size, Image.Resampling.BICUBIC)
    assert mean_abs_diff(decoded, reference) < 3


# -- samples and streams -------------------------------------------------------------------------
def _sample(key: str, data: bytes | None) -> Sample:
    return Sample(uid=f"{int(key):032x}", shard="s", key=key, caption="c", image_bytes=data)


def test_decode_sample_sets_image_and_clears_bytes(photo, upright):
    sample = decode_sample(_sample("1", photo), SPEC_224)
    assert sample.ok and sample.image_bytes is None
    assert (sample.width, sample.height) == upright.size
    assert min(sample.image.size) == 224


def test_decode_sample_failures_and_passthrough(photo):
    broken = decode_sample(_sample("1", photo[:1000]), SPEC_224)
    assert broken.error == errors.TRUNCATED_IMAGE and broken.image is None
    assert "truncated" in broken.error_detail.lower()
    empty = decode_sample(_sample("2", b""), SPEC_224)
    assert empty.error == errors.EMPTY_IMAGE
    earlier = _sample("3", photo).fail(errors.BAD_METADATA, "json does not parse")
    assert decode_sample(earlier, SPEC_224) is earlier
    assert earlier.error == errors.BAD_METADATA and earlier.image is None and earlier.image_bytes == photo
    assert decode_sample(_sample("4", None), SPEC_224).error == errors.MISSING_IMAGE


def _mixed_samples(photos: list[bytes]) -> list[Sample]:
    samples = [_sample(str(i), data) for i, data in enumerate(photos)]
    samples[2] = _sample("2", photos[2][: len(photos[2]) // 3])
    samples[5] = _sample("5", b"")
    samples[7].fail(errors.BAD_METADATA, "earlier failure")
    return samples


def _expected_errors() -> dict[str, str]:
    return {"2": errors.TRUNCATED_IMAGE, "5": errors.EMPTY_IMAGE, "7": errors.BAD_METADATA}


def test_decode_stream_with_workers_keeps_order_and_error_rows(photos):
    inline = list(decode_stream(_mixed_samples(photos), SPEC_224, workers=0))
    pooled = list(decode_stream(_mixed_samples(photos), SPEC_224, workers=2, prefetch=4))
    assert [s.key for s in pooled] == [str(i) for i in range(len(photos))]
    assert {s.key: s.error for s in pooled if not s.ok} == _expected_errors()
    for a, b in zip(inline, pooled):
        assert (a.key, a.error, a.width, a.height) == (b.key, b.error, b.width, b.height)
        if a.ok:
            assert np.array_equal(pixels(a.image), pixels(b.image))


def _decoder_workers() -> set[int]:
    """Pids of pool worker processes below this one (forkserver children, or spawned children)."""
    workers = set()
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            parent = child.parent()
            parent_cmdline = " ".join(parent.cmdline()) if parent else ""
        except psutil.Error:
            continue
        if "forkserver" in parent_cmdline and parent.pid != os.getpid() or "spawn_main" in cmdline:
            workers.add(child.pid)
    return workers


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_decode_stream_early_stop_bounds_work_and_releases_the_pool(photo):
    before = _decoder_workers()
    pulled = itertools.count()

    def endless():
        for i in itertools.count():
            next(pulled)
            yield _sample(str(i), photo)

    stream = decode_stream(endless(), SPEC_224, workers=2, prefetch=4)
    first = [next(stream) for _ in range(3)]
    assert [s.key for s in first] == ["0", "1", "2"] and all(s.ok for s in first)
    assert next(pulled) <= 3 + 4 + 1  # bounded in-flight work: the input is not read ahead
    workers = _decoder_workers() - before
    assert len(workers) == 2
    t0 = time.perf_counter()
    stream.close()
    assert time.perf_counter() - t0 < 5
    assert _wait_until(lambda: not (workers & _decoder_workers()), 10), "pool workers outlived the stream"


class _KillsTheWorker(bytes):
    """Image bytes that end the worker process as they arrive, as a decoder crash on a hostile file would."""

    def __reduce__(self):
        return (os._exit, (70,))


def test_decode_stream_isolates_a_sample_that_kills_its_worker(photos):
    samples = [_sample(str(i), photos[i % len(photos)]) for i in range(24)]
    samples[9] = _sample("9", _KillsTheWorker(b"\xff\xd8\xff"))
    before = _decoder_workers()
    stream = decode_stream(samples, SPEC_224, workers=2, prefetch=6)
    results, seen_workers = [], set()
    for sample in stream:
        results.append(sample)
        seen_workers |= _decoder_workers() - before
    assert [s.key for s in results] == [str(i) for i in range(24)]
    assert {s.key: s.error for s in results if not s.ok} == {"9": errors.UNDECODABLE_IMAGE}
    assert "decoder process died" in results[9].error_detail
    assert all(min(s.image.size) == 224 for s in results if s.ok)
    assert len(seen_workers) > 2  # fresh pools replaced the broken ones


# -- pixel values --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_processor():
    try:  # transformers 5 without torchvision: what CLIPImageProcessor resolves to anyway
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class()


def test_pixel_values_equal_clip_processor_on_decoded_images(photos, clip_processor):
    images = [decode_image(data, SPEC_224)[0] for data in photos]
    images = [im for im in images if min(im.size) == 224]
    assert len(images) >= 8
    ours = to_pixel_values(images, 224, clip_processor.image_mean, clip_processor.image_std)
    theirs = clip_processor(images=images, do_resize=False, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (len(images), 3, 224, 224)
    assert ours.dtype == theirs.dtype
    assert float((ours - theirs).abs().max()) <= 1e-5


def test_bf16_pixel_values_equal_the_cast_float32_ones_bit_for_bit(photos, clip_processor):
    import torch

    images = [decode_image(data, SPEC_224)[0] for data in photos]
    mean, std = clip_processor.image_mean, clip_processor.image_std
    ours = to_pixel_values(images, 224, mean, std, dtype=torch.bfloat16)
    cast = to_pixel_values(images, 224, mean, std).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.shape == cast.shape
    assert torch.equal(ours.view(torch.int16), cast.view(torch.int16))


def test_pixel_values_resize_small_and_odd_images_like_clip_processor(upright, clip_processor):
    images = [upright.resize((150, 100)), upright.resize((100, 300)), upright.convert("L").resize((300, 260))]
    ours = to_pixel_values(images, 224, clip_processor.image_mean, clip_processor.image_std)
    theirs = clip_processor(images=images, return_tensors="pt")["pixel_values"]
    assert float((ours - theirs).abs().max()) <= 1e-5


def test_pixel_values_without_crop_squash_to_square(upright, clip_processor):
    image = decode_image(encode(upright, "JPEG"), SPEC_224)[0]
    ours = to_pixel_values([image], 112, clip_processor.image_mean, clip_processor.image_std, crop=False)
    theirs = clip_processor(
        images=[image], size={"height": 112, "width": 112}, do_center_crop=False, return_tensors="pt"
    )["pixel_values"]
    assert ours.shape == (1, 3, 112, 112)
    assert float((ours - theirs).abs().max()) <= 1e-5
