"""OCR scorer: the real PP-OCR ONNX models from the rapidocr wheel reading text rendered (with a real
TTF font) into real Flickr8k photos, decoded by the pipeline's decoder; and through api.score on a
real tar shard with a broken JPEG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlmfilter import api
from mlmfilter.core.sample import Sample
from mlmfilter.evaluation.ocr_synthetic import TextStyle, jpeg_bytes, render_text
from mlmfilter.images.decode import DecodeSpec, decode_image
from mlmfilter.images.text_mask import text_region_mask
from mlmfilter.scorers import build_scorer
from mlmfilter.scorers.ocr import OcrScorer, caption_overlap, tokens
from tests.support.builders import scores_dataset, write_shard

PRINTED = "Fresh coffee daily"
SIGN = TextStyle(
    font="DejaVuSans-Bold.ttf", height_fraction=0.09, colour=(255, 221, 0), outline=(0, 0, 0), position=(0.4, 0.6)
)
#: photo 0 of flickr8k_dev (a girl climbing stairs) has no text of its own
PLAIN_INDEX = 0


@pytest.fixture(scope="module")
def scorer() -> OcrScorer:
    scorer = build_scorer("ocr", {"image_size": 480, "threads": 1})
    assert isinstance(scorer, OcrScorer)
    scorer.ensure_setup()
    return scorer


@pytest.fixture(scope="module")
def sign_photo(flickr_pairs):
    """Photo 1 upscaled to 2x (1000 px long side) with the printed string on it, and where it went."""
    photo = Image.open(flickr_pairs[1][0]).convert("RGB")
    photo = photo.resize((photo.width * 2, photo.height * 2), Image.Resampling.LANCZOS)
    return render_text(photo, PRINTED, SIGN)


def _sample(data: bytes, caption: str, key: str, shorter_side: int = 480) -> Sample:
    image, width, height = decode_image(data, DecodeSpec(shorter_side=shorter_side))
    return Sample(uid=key, shard="s", key=key, caption=caption, image=image, width=width, height=height)


def test_printed_caption_overlaps_fully_and_an_ordinary_caption_does_not(scorer, sign_photo, flickr_pairs):
    data = jpeg_bytes(sign_photo.image)
    printed, ordinary = _sample(data, PRINTED, "a"), _sample(data, flickr_pairs[1][1], "b")
    assert printed.image.size != sign_photo.image.size  # decoded smaller than the original
    rows = scorer.score([printed, ordinary])
    assert printed.error is None and ordinary.error is None
    row = rows[0]
    assert tokens(row["ocr_text"]) == tokens(PRINTED)
    assert row["ocr_n_boxes"] == 1 == len(row["ocr_boxes"]) == len(row["ocr_texts"]) == len(row["ocr_confidences"])
    assert row["ocr_confidence"] > 0.9
    assert row["ocr_caption_overlap"] == 1.0
    assert rows[1]["ocr_caption_overlap"] < 0.2
    assert rows[1]["ocr_text"] == row["ocr_text"]  # same pixels, same reading

    # the box is in the ORIGINAL image's pixels: it covers the rendered text there
    box = np.asarray(row["ocr_boxes"][0]).reshape(4, 2)
    found = text_region_mask(sign_photo.image.size, [box])
    assert found[sign_photo.region].mean() > 0.9
    assert found.sum() < 2.0 * sign_photo.region.sum()
    fraction = sign_photo.region.mean()
    assert 0.7 * fraction < row["ocr_text_area_fraction"] < 2.0 * fraction


def test_photo_without_text_has_no_boxes(scorer, flickr_pairs):
    path, caption = flickr_pairs[PLAIN_INDEX]
    row = scorer.score([_sample(path.read_bytes(), caption, "plain")])[0]
    assert row["ocr_n_boxes"] == 0 and row["ocr_boxes"] == [] and row["ocr_text"] == ""
    assert row["ocr_confidence"] is None
    assert row["ocr_text_area_fraction"] == 0.0 and row["ocr_caption_overlap"] == 0.0


def test_lines_of_a_batch_go_back_to_their_own_images(scorer, flickr_pairs):
    """The recogniser reads all lines of a batch at once (sorted by width): each image keeps its own."""
    phrases = ["Open 24 hours", "Grand opening Saturday"]
    samples = []
    for i, phrase in enumerate(phrases):
        rendered = render_text(Image.open(flickr_pairs[2 + i][0]), phrase, SIGN)
        samples.append(_sample(jpeg_bytes(rendered.image), phrase, f"t{i}"))
    samples.insert(1, _sample(flickr_pairs[PLAIN_INDEX][0].read_bytes(), "a girl", "plain"))
    rows = scorer.score(samples)
    assert [r["ocr_caption_overlap"] for r in rows] == [1.0, 0.0, 1.0]
    assert tokens(rows[0]["ocr_text"]) == tokens(phrases[0])
    assert tokens(rows[2]["ocr_text"]) == tokens(phrases[1])
    assert scorer.stats.batches >= 1


def test_caption_overlap_formula():
    assert tokens("SALE 50% OFF!") == ["sale", "50", "off"]
    assert caption_overlap("Sale: 50% off", ["SALE 50% OFF"]) == 1.0  # case and punctuation
    assert caption_overlap("SALE 50% OFF", ["SALE50%OFF"]) == 1.0  # a dropped space is split back
    assert caption_overlap("Happy Birthday Anna", ["HAPPYBIRTHDAY"]) == pytest.approx(2 / 3)
    assert caption_overlap("Fresh coffee daily", ["FRESHCOFFEED"]) == 0.0  # not wholly caption words
    assert caption_overlap("the dog and the cat", ["the"]) == pytest.approx(1 / 5)  # multisets
    assert caption_overlap("A dog runs on the grass", ["STOP"]) == 0.0
    assert caption_overlap("", ["STOP"]) == 0.0 and caption_overlap("a dog", []) == 0.0
    assert caption_overlap("Café ＯＰＥＮ", ["CAFÉ OPEN"]) == 1.0  # NFKC folds full-width letters


def test_options_and_provenance():
    scorer = build_scorer("ocr", {"det_side": 640})
    assert scorer.image_size == 960
    prov = scorer.provenance()
    assert prov["ocr_det_side"] == 640
    assert set(prov["ocr_models"]) == {"PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx"}
    assert all(len(m["sha256"]) == 64 for m in prov["ocr_models"].values())
    assert "|C ∩ O| / |C|" in prov["ocr_caption_overlap_formula"]
    with pytest.raises(ValueError):
        build_scorer("ocr", {"det_sid": 640})  # extra="forbid"


def test_rules_and_ocr_through_api_score_on_a_real_shard(tmp_path, flickr_pairs, sign_photo):
    plain = flickr_pairs[PLAIN_INDEX][0].read_bytes()
    shard = write_shard(
        tmp_path / "in" / "00000000.tar",
        [
            {"key": "sign", "jpg": jpeg_bytes(sign_photo.image), "txt": "FRESH COFFEE DAILY"},
            {"key": "plain", "jpg": plain, "txt": flickr_pairs[PLAIN_INDEX][1]},
            {"key": "broken", "jpg": plain[: len(plain) // 3], "txt": "a truncated photo"},
        ],
    )
    summary = api.score([str(shard)], tmp_path / "run", ["rules", {"name": "ocr", "options": {"threads": 1}}])
    assert summary.ok
    table = scores_dataset(summary.run_dir).to_table()
    assert {
        "ocr_text",
        "ocr_boxes",
        "ocr_confidence",
        "ocr_text_area_fraction",
        "ocr_caption_overlap",
        "ocr_n_boxes",
        "rules_ok",
    } <= set(table.column_names)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["sign"]["error"] is None and rows["sign"]["ocr_caption_overlap"] == 1.0
    assert len(rows["sign"]["ocr_boxes"][0]) == 8
    assert rows["plain"]["error"] is None and rows["plain"]["ocr_n_boxes"] == 0
    assert rows["broken"]["error"] == "truncated_image" and rows["broken"]["ocr_n_boxes"] is None


def test_angle_classifier_reads_upside_down_text(sign_photo):
    """Without the classifier this photo turned 180 degrees reads as garble ("Fre ceoefeh coiy")."""
    upside_down = jpeg_bytes(sign_photo.image.rotate(180))
    scorer = build_scorer("ocr", {"image_size": 480, "threads": 1, "angle_classifier": True})
    row = scorer.score([_sample(upside_down, PRINTED, "flipped")])[0]
    assert row["ocr_caption_overlap"] == 1.0
    assert "ch_ppocr_mobile_v2.0_cls_mobile.onnx" in scorer.provenance()["ocr_models"]
