"""T-MARS text masking: filling boxes changes the pixels inside them only; ``mask_text`` on the CLIP
scorer (a tiny random CLIP of the real architecture) and the MLM scorer (a recording backend) makes
them see the masked image while the shared decoded image stays as it was."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlmfilter.core.sample import Sample
from mlmfilter.evaluation.ocr_synthetic import TextStyle, render_text
from mlmfilter.images.text_mask import fill_text_regions, mean_colour, text_area_fraction, text_region_mask
from mlmfilter.judge.backend import JudgeRequest
from mlmfilter.scorers import build_scorer
from mlmfilter.scorers.mlm import MLMScorer
from mlmfilter.scorers.text_mask import TextMasker

STYLE = TextStyle(
    font="DejaVuSerif-Bold.ttf",
    height_fraction=0.1,
    colour=(255, 255, 255),
    outline=(0, 0, 0),
    angle=12.0,
    position=(0.3, 0.3),
)


@pytest.fixture(scope="module")
def photos(flickr_pairs):
    """(photo with rendered text, the rendering, the untouched photo)."""
    plain = Image.open(flickr_pairs[0][0]).convert("RGB")
    rendered = render_text(plain, "Keep calm and carry on", STYLE)
    return rendered.image, rendered, plain


@pytest.fixture(scope="module")
def masker() -> TextMasker:
    return TextMasker(threads=1)


def test_fill_changes_only_pixels_inside_the_boxes(flickr_pairs):
    photo = Image.open(flickr_pairs[3][0]).convert("RGB")
    box = np.array([[40, 30], [200, 50], [190, 110], [30, 90]], dtype=np.float32)  # a tilted quadrilateral
    before = np.asarray(photo).copy()
    masked = fill_text_regions(photo, [box])
    inside = text_region_mask(photo.size, [box])
    after = np.asarray(masked)
    assert np.array_equal(np.asarray(photo), before)  # the input is not modified
    assert np.array_equal(after[~inside], before[~inside])
    assert (after[inside] == mean_colour(photo)).all()
    assert mean_colour(photo) == tuple(int(round(v)) for v in before.reshape(-1, 3).mean(axis=0))
    assert 0 < text_area_fraction(photo.size, [box]) == pytest.approx(inside.mean())
    assert fill_text_regions(photo, []) is photo


def test_masker_hides_the_rendered_text_and_nothing_else(masker, photos):
    text_photo, rendered, plain = photos
    masked = masker(text_photo)
    before, after = np.asarray(text_photo), np.asarray(masked)
    changed = (before != after).any(axis=-1)
    assert changed[rendered.region].mean() > 0.8  # the text is covered ...
    boxes = masker.engine.detect(before)
    inside = text_region_mask(text_photo.size, [b.points for b in boxes])
    assert not changed[~inside].any()  # ... and only pixels inside detected boxes moved
    assert changed.sum() < 3 * rendered.region.sum()
    assert masker(plain) is plain  # no text found: the very same image back


def test_clip_scorer_sees_the_masked_image(tiny_clip_dir, photos):
    text_photo, _, plain = photos

    def samples():
        return [
            Sample(uid=f"{i:032x}", shard="s", key=str(i), caption="keep calm and carry on", image=im)
            for i, im in enumerate([text_photo, plain])
        ]

    scores = {}
    for mask in (False, True):
        scorer = build_scorer("clip", {"model": str(tiny_clip_dir), "dtype": "fp32", "mask_text": mask})
        batch = samples()
        scores[mask] = [r["clip_cosine"] for r in scorer.score(batch)]
        assert batch[0].image is text_photo  # the shared decoded image is left as it was
        prov = scorer.provenance()
        assert ("text_mask" in prov) is mask
    assert scores[True][0] != pytest.approx(scores[False][0], abs=1e-6)  # text masked: another image
    assert scores[True][1] == pytest.approx(scores[False][1], abs=1e-6)  # nothing to mask: same score
    assert "mean RGB of the whole image" in prov["text_mask"]["fill"]
    assert list(prov["text_mask"]["ocr_models"]) == ["PP-OCRv6_det_small.onnx"]


class RecordingBackend:
    """Keeps the images it is asked about; answers a flat distribution."""

    image_size = 336

    def __init__(self):
        self.images: list[Image.Image] = []

    def score_distributions(self, requests: list[JudgeRequest]):
        self.images.extend(r.image for r in requests)
        return [np.full((len(r.prompts), 101), np.log(1 / 101)) for r in requests]

    def generate(self, requests, max_new_tokens=None):
        raise NotImplementedError

    def describe(self):
        return {"model": "recording"}


def test_mlm_scorer_sends_the_masked_image_to_its_backend(photos):
    text_photo, rendered, _ = photos
    backend = RecordingBackend()
    scorer = MLMScorer(MLMScorer.Options(metrics="itm", mask_text=True), backend=backend)
    sample = Sample(uid="0" * 32, shard="s", key="k", caption="a girl on the stairs", image=text_photo)
    row = scorer.score([sample])[0]
    assert row["itm"] == pytest.approx(50.0)
    sent = np.asarray(backend.images[0])
    assert sample.image is text_photo
    assert (sent != np.asarray(text_photo)).any(axis=-1)[rendered.region].mean() > 0.8
    assert scorer.provenance()["text_mask"]["ocr_det_side"] == 960
    assert "text_mask" not in MLMScorer(MLMScorer.Options(metrics="itm"), backend=backend).provenance()
