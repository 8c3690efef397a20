"""The "mlm" scorer end to end: real Flickr JPEG bytes through the pipeline's decoder, tiny judges saved
and loaded through the public loader, error rows, both readouts, provenance and the random fallback."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from mlmfilter.backends.transformers import TransformersJudgeBackend
from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec, decode_sample
from mlmfilter.judge.prompts import resolve_template
from mlmfilter.models.common import ModelUnavailableError
from mlmfilter.models.vlm import RANDOM_WEIGHTS_WARNING, load_vlm
from mlmfilter.scorers import build_scorer
from mlmfilter.scorers.mlm import MLMOptions, MLMScorer
from tests.support import mlm as mlm_support


@pytest.fixture(scope="module")
def cache_dir(smollm2_cache_dir) -> str:
    return smollm2_cache_dir


@pytest.fixture(scope="module")
def llava_dir(cache_dir) -> str:
    return str(mlm_support.tiny_model_dir("llava", cache_dir))


def scorer_for(model: str, **options) -> MLMScorer:
    # min_mass 0: a tiny random judge puts ~0.02% on numbers; the floor has tests of its own
    defaults = dict(model=model, conversation="vicuna_v1", device="cpu", dtype="fp32", metrics="itm,su", min_mass=0.0)
    return build_scorer("mlm", {**defaults, **options})


def samples_from(pairs, scorer, extra=()):
    """Samples as a reader makes them (raw bytes), decoded as the pipeline does."""
    samples = [
        Sample(uid=f"{i:032x}", shard="00000", key=f"{i:04d}", caption=caption, image_bytes=path.read_bytes())
        for i, (path, caption) in enumerate(pairs)
    ]
    samples += list(extra)
    spec = DecodeSpec(shorter_side=scorer.image_size)
    return [decode_sample(s, spec) for s in samples]


def test_expected_readout_scores_real_pairs_and_isolates_bad_ones(llava_dir, flickr_pairs):
    scorer = scorer_for(llava_dir, metrics="image_text_matching,su", batch_size=4)
    assert list(scorer.columns) == ["itm", "itm_mass", "itm_std", "su", "su_mass", "su_std"]
    # decoded whole up to max(4 x the tiny processor's 28 px, 1024) so that its resize is the only one;
    # read from config files, before any weights load
    assert scorer.image_size == 1024
    assert not scorer._ready
    good = flickr_pairs[:5]
    jpeg = good[0][0].read_bytes()
    bad = [
        Sample(uid="e" * 32, shard="00000", key="flagged", caption="", image_bytes=jpeg, error=errors.EMPTY_CAPTION),
        Sample(uid="f" * 32, shard="00000", key="blank", caption="   \n", image_bytes=jpeg),
        Sample(uid="a" * 32, shard="00000", key="cut", caption="a dog", image_bytes=jpeg[: len(jpeg) // 3]),
    ]
    samples = samples_from(good, scorer, bad)
    rows = scorer.score(samples)
    for sample, row in zip(samples[:5], rows[:5]):
        assert sample.ok, sample.error_detail
        for m in ("itm", "su"):
            assert 0.0 <= row[m] <= 100.0 and 0.0 < row[f"{m}_mass"] <= 1.0 and row[f"{m}_std"] > 0.0
    assert len({round(row["itm"], 6) for row in rows[:5]}) == 5  # different pairs, different scores
    assert rows[5] == scorer.empty_row() and samples[5].error == errors.EMPTY_CAPTION  # skipped by the base
    assert rows[6] == scorer.empty_row() and samples[6].error == errors.EMPTY_CAPTION  # caught by the scorer
    assert rows[7] == scorer.empty_row() and samples[7].error == errors.TRUNCATED_IMAGE
    assert scorer.stats.scored == 5 and scorer.stats.skipped == 2
    table = pa.Table.from_pylist(rows, schema=pa.schema(scorer.schema_fields()))
    assert table.schema.field("itm").type == pa.float32() and table.num_rows == 8


def test_a_pair_the_backend_cannot_serve_becomes_an_error_row(cache_dir, flickr_pairs):
    scorer = scorer_for(str(mlm_support.tiny_model_dir("qwen2_vl", cache_dir)), conversation="qwen", metrics="itm")
    sliver = io.BytesIO()
    Image.new("RGB", (2, 900), (200, 30, 30)).save(sliver, format="PNG")  # aspect ratio Qwen2-VL refuses
    odd = Sample(uid="b" * 32, shard="00000", key="sliver", caption="a red line", image_bytes=sliver.getvalue())
    samples = samples_from(flickr_pairs[:2], scorer, [odd])
    rows = scorer.score(samples)
    assert rows[0]["itm"] is not None and rows[1]["itm"] is not None
    assert rows[2]["itm"] is None and samples[2].error == errors.SCORER_ERROR
    assert "aspect ratio" in samples[2].error_detail


def test_generate_readout_keeps_the_raw_text_of_unparseable_answers(llava_dir, flickr_pairs):
    scorer = scorer_for(llava_dir, readout="generate", metrics="itm")
    assert list(scorer.columns) == ["itm", "itm_raw"] and scorer.columns["itm_raw"] == pa.string()
    samples = samples_from(flickr_pairs[:2], scorer)
    rows = scorer.score(samples)
    for sample, row in zip(samples, rows):  # random weights answer words, not numbers
        assert sample.error == errors.UNPARSEABLE_SCORE and row["itm"] is None
        assert row["itm_raw"] and row["itm_raw"] in sample.error_detail


def test_a_judge_that_answers_100_scores_100_in_both_readouts(llava_dir, flickr_pairs, tmp_path):
    """Greedy decoding must be able to write "100" with a tokenizer that spells it "1" "0" "0"."""
    loaded = load_vlm(llava_dir, device="cpu", dtype="fp32")
    judge = TransformersJudgeBackend(loaded, "vicuna_v1")
    path, caption = flickr_pairs[3]
    sample = samples_from([(path, caption)], scorer_for(llava_dir))[0]
    template = resolve_template("v2")
    texts = [
        judge.prompt_text(template.render(m, caption)) for m in ("image_text_matching", "object_detail_fulfillment")
    ]
    mlm_support.teach_answers(
        loaded.model, loaded.processor, texts, judge.encoder.fit_budget(sample.image), ["100\n", "7\n"]
    )
    loaded.model.save_pretrained(tmp_path)
    loaded.processor.save_pretrained(tmp_path)

    def score(readout: str) -> dict:
        scorer = scorer_for(str(tmp_path), metrics="itm,odf", readout=readout)
        return scorer.score(samples_from([(path, caption)], scorer))[0]

    generated = score("generate")
    assert generated["itm"] == 100.0 and generated["odf"] == 7.0
    assert generated["itm_raw"].startswith("100\n")
    expected = score("expected")
    assert expected["itm"] == pytest.approx(100.0, abs=0.5) and expected["odf"] == pytest.approx(7.0, abs=0.5)
    assert expected["itm_mass"] > 0.99 and expected["odf_std"] < 1.0


def test_options_are_validated():
    with pytest.raises(ValidationError, match="unknown metric"):
        MLMOptions(metrics="itm,bogus")
    with pytest.raises(ValidationError, match="caption"):
        MLMOptions(template="Rate this image from 0 to 100.")
    with pytest.raises(ValidationError, match="conversation"):
        MLMOptions(conversation="chatml")
    with pytest.raises(ValidationError):
        MLMOptions(readout="logits")
    with pytest.raises(ValidationError):
        MLMOptions(trie_threshold=-0.1)
    options = MLMOptions(metrics=["semantic_understanding", "itm"], template="{caption} -> {aspect}?")
    scorer = MLMScorer(options)
    assert [c for c in scorer.columns if "_" not in c] == ["su", "itm"]


def test_provenance_names_model_prompts_and_format_without_loading(llava_dir):
    scorer = scorer_for(llava_dir, metrics="itm,odf,ctq,su", template="v1")
    prov = scorer.provenance()
    assert not scorer._ready  # cheap: config files only
    assert prov["scorer"] == "mlm" and prov["readout"] == "expected" and "P(s)" in prov["readout_definition"]
    assert prov["template"] == {"name": "v1", "sha256": resolve_template("v1").sha256(scorer.metrics)}
    model = prov["model"]
    assert model["family"] == "llava" and model["local_path"] and model["dtype"] == "fp32"
    assert model["conversation"]["name"] == "vicuna_v1" and model["answer_prefix"] == " "
    assert model["libraries"]["transformers"] and "warnings" not in prov
    assert prov["trie_threshold"] == 1e-4 and "within 0.0001" in prov["readout_bound"]
    scorer.ensure_setup()
    assert scorer.backend.trie_threshold == 1e-4  # the option reaches the backend
    assert scorer.provenance()["model"] == model | {"libraries": scorer.provenance()["model"]["libraries"]}


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_random_fallback_is_loud_and_marked(offline, flickr_pairs, caplog):
    with pytest.raises(ModelUnavailableError, match="nobody/no-such-judge"):
        scorer_for("nobody/no-such-judge").image_size
    scorer = scorer_for("nobody/no-such-judge", allow_random_fallback=True, metrics="itm", conversation="auto")
    prov = scorer.provenance()
    assert prov["warnings"] == [RANDOM_WEIGHTS_WARNING]
    assert prov["model"]["random_fallback"] is True and prov["model"]["family"] == "llava"
    rows = scorer.score(samples_from(flickr_pairs[:1], scorer))
    assert 0.0 <= rows[0]["itm"] <= 100.0
    assert RANDOM_WEIGHTS_WARNING in caplog.text


def test_models_the_judge_cannot_load_are_named_with_the_fix(tmp_path):
    original = tmp_path / "llava-original"
    original.mkdir()
    (original / "config.json").write_text('{"model_type": "llava_llama", "mm_vision_tower": "openai/clip"}')
    with pytest.raises(ValueError, match="`mlmfilter convert SRC DST`"):
        scorer_for(str(original)).image_size
    clip = tmp_path / "clip"
    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(clip)
    (clip / "preprocessor_config.json").write_text('{"image_processor_type": "CLIPImageProcessor"}')
    with pytest.raises(ValueError, match="not supported by the MLM judge"):
        scorer_for(str(clip)).image_size
