"""CLIPScore scorer: tiny random CLIP/SigLIP models of the real architectures, saved to disk and loaded
through load_clip, scoring real Flickr8k photos decoded by the pipeline's decoder."""

from __future__ import annotations

import logging
import math

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec, decode_image
from mlmfilter.models.clip import RANDOM_WEIGHTS_WARNING, inspect_clip, load_clip
from mlmfilter.models.common import ModelUnavailableError
from mlmfilter.scorers import build_scorer
from mlmfilter.scorers.clip import ClipScorer, clip_score
from tests.support.data import shared_path

N_PHOTOS = 12
LONG_CAPTION = " ".join(["a brown dog runs across the green grass near a lake while children watch"] * 12)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    folder = shared_path("models", "clip-tokenizer")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def photos(flickr_pairs) -> list[tuple[Image.Image, Image.Image, str]]:
    """(original image, pipeline-decoded image at 224, caption) for real Flickr8k photos."""
    out = []
    for path, caption in flickr_pairs[:N_PHOTOS]:
        decoded, _, _ = decode_image(path.read_bytes(), DecodeSpec(shorter_side=224))
        out.append((Image.open(path).convert("RGB"), decoded, caption))
    return out


def _samples(photos, captions=None) -> list[Sample]:
    captions = captions or [c for _, _, c in photos]
    return [
        Sample(uid=f"{i:032x}", shard="s0", key=str(i), caption=cap, image=img)
        for i, ((_, img, _), cap) in enumerate(zip(photos, captions))
    ]


def _scorer(model_dir, **options) -> ClipScorer:
    scorer = build_scorer("clip", {"model": str(model_dir), **options})
    assert isinstance(scorer, ClipScorer)
    return scorer


@pytest.fixture(scope="module")
def fp32_scorer(tiny_clip_dir) -> ClipScorer:
    scorer = _scorer(tiny_clip_dir, dtype="fp32")
    scorer.ensure_setup()
    return scorer


def _reference_cosines(model_dir, images, captions, processor, padding="longest", use_mask=True):
    """Independent computation: the HF model's own feature functions on the HF processor's pixels."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = _clip_tokenizer()
    max_length = model.config.text_config.max_position_embeddings
    tokens = tokenizer(captions, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        kwargs = {"attention_mask": tokens["attention_mask"]} if use_mask else {}
        txt = model.get_text_features(input_ids=tokens["input_ids"], **kwargs).pooler_output
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1)


def test_image_size_and_provenance_come_from_config_files_before_setup(tiny_clip_dir):
    scorer = _scorer(tiny_clip_dir)
    assert scorer.image_size == 224
    prov = scorer.provenance()
    assert scorer.loaded is None  # neither needed the weights
    assert prov["local_path"] == str(tiny_clip_dir.resolve())
    assert prov["architecture"] == "CLIPModel"
    assert prov["preprocessing"]["center_crop"] == 224
    assert prov["preprocessing"]["resize"] == "shortest edge to 224, bicubic"
    assert prov["text"]["max_length"] == 77
    assert prov["libraries"]["torch"] == torch.__version__
    assert "2.5 * max(clip_cosine, 0)" in prov["clip_score_formula"]
    assert "warnings" not in prov


def test_clip_cosine_matches_hf_model_on_real_photos(tiny_clip_dir, fp32_scorer, photos):
    from transformers import CLIPImageProcessorPil

    rows = fp32_scorer.score(_samples(photos))
    ours = torch.tensor([r["clip_cosine"] for r in rows])
    captions = [c for _, _, c in photos]
    processor = CLIPImageProcessorPil.from_pretrained(str(tiny_clip_dir))
    # same decoded pixels through the HF processor and the HF model's feature functions: equal
    on_decoded = _reference_cosines(tiny_clip_dir, [dec for _, dec, _ in photos], captions, processor)
    assert torch.allclose(ours, on_decoded, atol=1e-5), (ours - on_decoded).abs().max()
    # the HF processor on the full original photos (what transformers alone computes): the decoder's
    # JPEG draft mode (DCT-scaled decode of photos >= 2x the target) moves cosines only slightly
    on_original = _reference_cosines(tiny_clip_dir, [orig for orig, _, _ in photos], captions, processor)
    assert torch.allclose(ours, on_original, atol=2e-3), (ours - on_original).abs().max()
    assert ours.std() > 1e-3  # the pairs really differ: a constant output would not prove anything
    assert fp32_scorer.stats.scored == len(photos)


def test_clip_score_is_hessel_formula(fp32_scorer, photos):
    rows = fp32_scorer.score(_samples(photos))
    for row in rows:
        assert -1.0 <= row["clip_cosine"] <= 1.0
        assert row["clip_score"] == pytest.approx(2.5 * max(row["clip_cosine"], 0.0), abs=1e-7)
    assert clip_score(-0.2) == 0.0 and clip_score(0.4) == pytest.approx(1.0)


def test_batched_equals_one_by_one(tiny_clip_dir, fp32_scorer, photos):
    batched = fp32_scorer.score(_samples(photos))
    single = _scorer(tiny_clip_dir, dtype="fp32", batch_size=1)
    single.loaded = fp32_scorer.loaded  # same weights, no second load
    single._ready = True
    one_by_one = single.score(_samples(photos))
    assert single.stats.batches == len(photos)
    for a, b in zip(batched, one_by_one):
        assert a["clip_cosine"] == pytest.approx(b["clip_cosine"], abs=1e-5)


def test_long_captions_are_truncated_to_77_tokens(fp32_scorer, photos):
    tokenizer = fp32_scorer.loaded.tokenizer
    assert len(tokenizer(LONG_CAPTION, verbose=False)["input_ids"]) > 77
    ids = fp32_scorer.loaded.tokenize([LONG_CAPTION, "a cat"])["input_ids"]
    assert ids.shape == (2, 77) and ids[0, -1].item() == tokenizer.eos_token_id  # cut, EOS kept
    two = photos[:2]
    rows = fp32_scorer.score(_samples(two, [LONG_CAPTION, LONG_CAPTION + " and then a cat appears"]))
    assert all(r["clip_cosine"] is not None for r in rows)
    # both texts agree on their first 77 tokens, so the text side is the same: only the image differs
    same_image = fp32_scorer.score(_samples([two[0], two[0]], [LONG_CAPTION, LONG_CAPTION + " and a cat"]))
    assert same_image[0]["clip_cosine"] == pytest.approx(same_image[1]["clip_cosine"], abs=1e-6)
    short = fp32_scorer.score(_samples([two[0]], ["a cat"]))
    assert short[0]["clip_cosine"] != pytest.approx(same_image[0]["clip_cosine"], abs=1e-6)


def test_bf16_close_to_fp32(tiny_clip_dir, fp32_scorer, photos):
    bf16 = _scorer(tiny_clip_dir, dtype="bf16")
    bf16.ensure_setup()
    assert next(bf16.loaded.model.parameters()).dtype == torch.bfloat16
    assert bf16.provenance()["dtype"] == "bf16"
    a = torch.tensor([r["clip_cosine"] for r in fp32_scorer.score(_samples(photos))])
    b = torch.tensor([r["clip_cosine"] for r in bf16.score(_samples(photos))])
    max_diff = (a - b).abs().max().item()
    print(f"bf16 vs fp32 max |cos diff| on tiny CLIP: {max_diff:.5f}")
    assert max_diff < 0.03


def test_sample_without_image_fails_alone(fp32_scorer, photos):
    samples = _samples(photos[:3])
    samples[1].image = None
    rows = fp32_scorer.score(samples)
    assert rows[1]["clip_cosine"] is None and samples[1].error == errors.MISSING_IMAGE
    assert rows[0]["clip_cosine"] is not None and rows[2]["clip_cosine"] is not None


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty hub cache (huggingface_hub reads these at import, so patch the constants)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    inspect_clip.cache_clear()
    yield cache
    inspect_clip.cache_clear()


def test_unavailable_model_fails_with_a_clear_error(offline):
    with pytest.raises(ModelUnavailableError) as info:
        load_clip("nonexistent-org/no-such-clip")
    message = str(info.value)
    assert "nonexistent-org/no-such-clip" in message and "HF_HUB_OFFLINE" in message and "local directory" in message


def test_random_fallback_is_loud_and_marked(offline, photos, caplog):
    scorer = _scorer("nonexistent-org/no-such-clip", allow_random_fallback=True)
    with caplog.at_level(logging.WARNING):
        assert scorer.image_size == 224
        scorer.ensure_setup()
    assert any("RANDOM" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert scorer.loaded.is_random
    assert RANDOM_WEIGHTS_WARNING in scorer.provenance()["warnings"]
    rows = scorer.score(_samples(photos[:4]))
    assert all(math.isfinite(r["clip_cosine"]) for r in rows)
    # seeded: every worker process builds the same random model, so scores agree across workers
    again = load_clip("nonexistent-org/no-such-clip", dtype=scorer.loaded.dtype, allow_random_fallback=True)
    for p, q in zip(scorer.loaded.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


def test_hub_id_loads_from_offline_cache_with_commit(offline, tiny_clip_dir, fp32_scorer, photos):
    """A hub id already in the HF cache loads offline, and provenance records its commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "models--tiny-org--tiny-clip"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in tiny_clip_dir.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_clip("tiny-org/tiny-clip", dtype="fp32")
    assert loaded.provenance["commit"] == commit and loaded.provenance["hub_id"] == "tiny-org/tiny-clip"
    scorer = _scorer("tiny-org/tiny-clip", dtype="fp32")
    scorer.loaded, scorer._ready = loaded, True
    assert [r["clip_cosine"] for r in scorer.score(_samples(photos[:3]))] == pytest.approx(
        [r["clip_cosine"] for r in fp32_scorer.score(_samples(photos[:3]))], abs=1e-6
    )


def test_siglip_loads_and_scores(tmp_path, flickr_pairs):
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    tokenizer = _clip_tokenizer()
    text_length = 64
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=text_length,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=96,
            patch_size=16,
        ),
    )
    torch.manual_seed(2)
    SiglipModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    processor = SiglipImageProcessorPil(size={"height": 96, "width": 96})
    processor.save_pretrained(tmp_path)

    scorer = _scorer(tmp_path, dtype="fp32")
    assert scorer.image_size == 96
    # the pipeline decodes to the scorer's size; SigLIP then squashes to 96 x 96 (no crop)
    decoded = [(None, decode_image(p.read_bytes(), DecodeSpec(shorter_side=96))[0], c) for p, c in flickr_pairs[:6]]
    assert all(min(img.size) == 96 for _, img, _ in decoded)
    rows = scorer.score(_samples(decoded, [c for _, _, c in decoded[:5]] + [LONG_CAPTION]))
    assert scorer.loaded.spec.family == "siglip" and scorer.provenance()["preprocessing"]["center_crop"] is None
    ours = torch.tensor([r["clip_cosine"] for r in rows])
    reference = _reference_cosines(
        tmp_path,
        [d for _, d, _ in decoded],
        [c for _, _, c in decoded[:5]] + [LONG_CAPTION],
        processor,
        padding="max_length",
        use_mask=False,
    )
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    for row in rows:
        assert row["clip_score"] == pytest.approx(2.5 * max(row["clip_cosine"], 0.0), abs=1e-7)


def test_open_clip_without_the_extra_says_how_to_install():
    try:  # open_clip needs torchvision, absent here: the error must name the extra
        import open_clip  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("open_clip is installed")
    with pytest.raises(ImportError, match=r"mlmfilter\[open-clip\]"):
        load_clip("open_clip:ViT-B-32/laion2b_s34b_b79k")
