"""Training a judge: readers of both export formats, training text = the judge's request + answer for
every conversation format, a LoRA smoke run whose loss falls and whose checkpoint the judge loads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mlmfilter.backends.transformers import TransformersJudgeBackend
from mlmfilter.judge.conversations import CONVERSATIONS, end_of_answer
from mlmfilter.judge.readout import canonical_score_tokens
from mlmfilter.models.vlm import load_vlm
from mlmfilter.training.collate import IGNORE_INDEX, JudgeCollator, TrainingEncoder
from mlmfilter.training.data import (
    BAD_RECORD,
    IMAGE_NOT_FIRST,
    MISSING_IMAGE_FILE,
    MULTI_TURN,
    NO_IMAGE,
    read_instruction_data,
)
from tests.support.mlm import collapse_image_tokens, reference_request, tiny_model_dir
from tests.support.train import HIGH, LOW, METRIC, judge_records, write_llava_json, write_prompt_completion_jsonl


@pytest.fixture(scope="module")
def records(flickr_pairs):
    return judge_records(flickr_pairs[:4], 8)


# -- readers ---------------------------------------------------------------------------------------


def test_both_export_formats_read_to_the_same_examples(tmp_path, records):
    llava = read_instruction_data([write_llava_json(tmp_path / "a" / "data.json", records)])
    chat = read_instruction_data([write_prompt_completion_jsonl(tmp_path / "b" / "data.jsonl", records)])
    plain = read_instruction_data([write_prompt_completion_jsonl(tmp_path / "c" / "data.jsonl", records, False)])
    assert not llava.skipped and not chat.skipped and not plain.skipped
    assert len(llava.examples) == 8
    assert llava.examples == chat.examples == plain.examples
    first = llava.examples[0]
    assert first.answer == HIGH and first.prompt == records[0]["conversations"][0]["value"][len("<image>\n") :]


def test_records_that_cannot_train_a_judge_are_skipped_with_their_reason(tmp_path, records, flickr_pairs):
    image = str(flickr_pairs[0][0])
    good = records[0]
    bad = [
        {**good, "id": "multi", "conversations": good["conversations"] * 2},
        {"id": "text-only", "conversations": good["conversations"]},
        {**good, "id": "gone", "image": "nowhere/missing.jpg"},
        {
            **good,
            "id": "late-image",
            "conversations": [{"from": "human", "value": "rate\n<image>"}, good["conversations"][1]],
        },
    ]
    path = write_llava_json(tmp_path / "data.json", [good, *bad])
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"prompt": "<image>\nrate it", "completion": "5", "images": [image]}) + "\n{not json\n")
    data = read_instruction_data([path, jsonl])
    assert [e.id for e in data.examples] == [good["id"], "0"]
    reasons = {s.id: s.reason for s in data.skipped}
    assert reasons == {
        "multi": MULTI_TURN,
        "text-only": NO_IMAGE,
        "gone": MISSING_IMAGE_FILE,
        "late-image": IMAGE_NOT_FIRST,
        "1": BAD_RECORD,
    }
    assert next(s for s in data.skipped if s.id == "1").source == "more.jsonl:2"


def test_a_folder_with_both_formats_is_refused(tmp_path, records):
    write_llava_json(tmp_path / "data.json", records)
    write_prompt_completion_jsonl(tmp_path / "data.jsonl", records)
    with pytest.raises(ValueError, match="name the instruction file"):
        read_instruction_data([tmp_path])


# -- training text = the judge's request + answer --------------------------------------------------


@pytest.fixture(scope="module")
def loaded_families(smollm2_cache_dir):
    return {f: load_vlm(str(tiny_model_dir(f, smollm2_cache_dir))) for f in ("llava", "qwen2_vl", "idefics3")}


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_training_text_is_the_judge_request_plus_answer_for_every_format(
    conversation, loaded_families, records, tmp_path
):
    example = read_instruction_data([write_llava_json(tmp_path / "d.json", records[:1])]).examples[0]
    for family, loaded in loaded_families.items():
        encoder = TrainingEncoder(loaded.processor, loaded.spec, conversation, None, 4096)
        judge = TransformersJudgeBackend(loaded, conversation)
        prompt, completion = encoder.training_text(example)
        assert prompt == judge.prompt_text(example.prompt)
        assert completion == example.answer + end_of_answer(conversation, loaded.processor)
        if family == "llava" and conversation in ("vicuna_v1", "llama3", "qwen", "llava_llama3"):
            user_turn = "<image>\n" + example.prompt
            assert prompt == reference_request(conversation, user_turn)  # assembled without mlmfilter.judge

        # token level: the prompt ids are exactly the judge's, the loss is on the answer tokens only
        from mlmfilter.judge.backend import JudgeRequest

        encoded, processed = encoder.encode([example])
        (item,) = encoded
        image = encoder.load_image(example)
        judge_ids = judge.encoder.encode([JudgeRequest(image, [example.prompt])], [0], 8).items[0].full[0]
        n = len(judge_ids)
        assert item.input_ids[:n] == judge_ids
        assert item.labels[:n] == [IGNORE_INDEX] * n
        answer = item.input_ids[n:]
        assert item.labels[n:] == answer
        score_tokens = list(canonical_score_tokens(loaded.processor.tokenizer, int(HIGH)))
        assert answer[: len(score_tokens)] == score_tokens  # the tokens the judge's readout scores
        assert answer[len(score_tokens) :] == encoder.end_ids and encoder.end_ids
        decoded = collapse_image_tokens(loaded.processor.tokenizer.decode(item.input_ids[:n]))
        bos = loaded.processor.tokenizer.bos_token or ""
        assert decoded.removeprefix(bos) == collapse_image_tokens(prompt).removeprefix(bos)


def test_collator_pads_masks_and_keeps_the_vision_inputs(loaded_families, records, tmp_path):
    examples = read_instruction_data([write_llava_json(tmp_path / "d.json", records[:3])]).examples
    for family, loaded in loaded_families.items():
        encoder = TrainingEncoder(loaded.processor, loaded.spec, "qwen", None, 4096)
        batch = JudgeCollator(encoder, examples)([{"index": i} for i in range(3)])
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert "pixel_values" in batch
        supervised = (batch["labels"] != IGNORE_INDEX).sum(1)
        answer_lengths = [len(encoder.answer_ids(e.answer)) for e in examples]
        assert supervised.tolist() == answer_lengths
        assert not bool((batch["labels"][batch["attention_mask"] == 0] != IGNORE_INDEX).any())
        model = loaded.model
        with torch.no_grad():
            loss = model(**batch).loss
        assert math.isfinite(float(loss))


# -- a LoRA smoke run, loaded back through the judge ------------------------------------------------


def _answer_mass(scorer, samples) -> float:
    """Mean probability the judge gives the two trained answers."""
    from mlmfilter.judge.backend import JudgeRequest

    requests = [JudgeRequest(s.image, [scorer.template.render(METRIC, s.caption)]) for s in samples]
    out = scorer.backend.score_distributions(requests)
    return float(np.mean([np.exp(o[0][int(HIGH)]) + np.exp(o[0][int(LOW)]) for o in out]))


@pytest.mark.slow
def test_lora_smoke_loss_falls_and_the_judge_loads_and_scores_a_shard(tmp_path, smollm2_cache_dir, flickr_pairs):
    from mlmfilter.images.decode import DecodeSpec, decode_sample
    from mlmfilter.io.readers import read_shard
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.scorers import build_scorer
    from mlmfilter.training.train import TrainOptions, train
    from tests.support.builders import flickr_shards

    base = str(tiny_model_dir("llava", smollm2_cache_dir))
    data = write_llava_json(tmp_path / "data" / "train.json", judge_records(flickr_pairs[:4], 8))
    out = tmp_path / "judge"
    options = TrainOptions(
        base=base, conversation="vicuna_v1", max_steps=8, batch_size=2, learning_rate=5e-3, logging_steps=2
    )
    result = train(data, out, options)

    assert result.global_step == 8 and result.resumed_from is None and result.examples == 8
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 4 and np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    record = json.loads((out / "mlmfilter_judge.json").read_text())
    assert record["conversation"] == "vicuna_v1" and record["template"] == "v2" and record["metrics"] == [METRIC]

    # the judge picks the trained request format without being told
    # min_mass 0: two smoke-training steps lift the answer's mass 100-fold, still far below the floor
    scorer = build_scorer("mlm", {"model": str(out), "min_mass": 0.0})
    assert scorer.options.conversation == "vicuna_v1" and scorer.short_names == ["ctq"]
    assert build_scorer("mlm", {"model": str(out), "conversation": "qwen"}).options.conversation == "qwen"
    scorer.setup()
    before = build_scorer("mlm", {"model": base, "conversation": "vicuna_v1", "metrics": "ctq"})
    before.setup()

    (shard,) = flickr_shards(flickr_pairs[:4], tmp_path / "shards", 1, 4)
    (source,) = expand_inputs([str(shard)])
    samples = [decode_sample(s, DecodeSpec(shorter_side=scorer.image_size)) for s in read_shard(source)]
    rows = scorer.score_batch(samples)
    assert all(isinstance(r, dict) and 0 <= r["ctq"] <= 100 for r in rows), rows
    # it learnt the answers of its data: far more probability on them than the base gave
    assert _answer_mass(scorer, samples) > 100 * _answer_mass(before, samples)

    # what it was trained on is what the judge scores: the judge's log P(85) lies between the training
    # sequence's log P("8", "5", end) and log P("8", "5"), from the model's plain forward on the batch
    exact = build_scorer("mlm", {"model": str(out), "trie_threshold": 0, "dtype": "fp32"})
    exact.setup()
    backend = exact.backend
    example = read_instruction_data([data]).examples[0]
    assert example.answer == HIGH
    encoder = TrainingEncoder(backend.processor, backend.loaded.spec, "vicuna_v1", None, 4096)
    batch = JudgeCollator(encoder, [example])([{"index": 0}])
    with torch.no_grad():
        logits = backend.model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].float()
    labels = batch["labels"][0]
    positions = torch.nonzero(labels != IGNORE_INDEX).flatten()
    token_lp = torch.log_softmax(logits[positions - 1], -1)[torch.arange(len(positions)), labels[positions]]
    from mlmfilter.judge.backend import JudgeRequest

    judged = backend.score_distributions([JudgeRequest(encoder.load_image(example), [example.prompt])])[0][0][int(HIGH)]
    assert len(token_lp) == 3  # "8", "5", end of answer
    assert float(token_lp.sum()) - 1e-3 <= judged <= float(token_lp[:2].sum()) + 1e-3


@pytest.mark.slow
def test_adapter_save_loads_through_transformers_and_equals_the_merged_save(tmp_path, smollm2_cache_dir, flickr_pairs):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mlmfilter.training.train import TrainOptions, train

    base = str(tiny_model_dir("llava", smollm2_cache_dir))
    data = write_llava_json(tmp_path / "train.json", judge_records(flickr_pairs[:2], 4))
    out = tmp_path / "adapter"
    common = dict(base=base, conversation="qwen", max_steps=2, batch_size=2, learning_rate=5e-3)
    train(data, out, TrainOptions(**common, save="adapter"))
    train(data, tmp_path / "merged", TrainOptions(**common))  # the same seed: the same run, saved merged
    assert (out / "adapter_config.json").exists() and (out / "mlmfilter_judge.json").exists()
    assert not (out / "model.safetensors").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()  # base + adapter, as transformers does it
    merged = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), out).merge_and_unload().eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        a, b = loaded(input_ids=ids).logits, merged(input_ids=ids).logits
        c = AutoModelForImageTextToText.from_pretrained(base)(input_ids=ids).logits
        d = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, d, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)  # training changed it

    # the judge loads the adapter folder as it is and scores like the merged save
    from PIL import Image as PILImage

    from mlmfilter.core.sample import Sample
    from mlmfilter.scorers import build_scorer

    photo = PILImage.open(flickr_pairs[0][0]).convert("RGB")
    scores = []
    for model in (out, tmp_path / "merged"):
        options = {"model": str(model), "metrics": "itm", "device": "cpu", "dtype": "fp32", "min_mass": 0.0}
        scorer = build_scorer("mlm", options)  # min_mass 0: a two-step adapter is no judge yet
        sample = Sample(
            uid="0" * 32, shard="s", key="k", caption=flickr_pairs[0][1], image=photo, width=500, height=375
        )
        (row,) = scorer.score([sample])
        scores.append(row["itm"])
    assert scores[0] is not None and abs(scores[0] - scores[1]) < 1e-3


def test_train_refuses_a_folder_it_did_not_make_and_other_settings(tmp_path, smollm2_cache_dir, flickr_pairs):
    from mlmfilter.training.train import TrainOptions, _check_output

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    options = TrainOptions(base="b", max_steps=3)
    with pytest.raises(ValueError, match="not an mlmfilter training folder"):
        _check_output(foreign, options)
    run = tmp_path / "run"
    assert _check_output(run, options) is None
    with pytest.raises(ValueError, match="other settings"):
        _check_output(run, TrainOptions(base="b", max_steps=4))
    assert _check_output(run, options) is None  # the same settings resume


def test_cli_train_without_the_extra_says_how_to_install(monkeypatch, tmp_path):
    import sys

    from typer.testing import CliRunner

    from mlmfilter.cli.app import app

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    result = CliRunner().invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "o"), "--base", "x"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # rich wraps long lines
    assert "pip install 'mlmfilter[train]'" in message and "missing: peft" in message


@pytest.mark.parametrize("method", ["lora", "full"])
def test_freeze_switches_decide_what_trains_in_every_family(method, smollm2_cache_dir):
    from mlmfilter.training.train import LANGUAGE_MODEL, PROJECTOR, VISION_TOWER, TrainOptions, _prepare_parameters

    for family in ("llava", "qwen2_vl", "idefics3"):
        for freeze_vision, freeze_projector in [(True, False), (False, True), (True, True)]:
            model = load_vlm(str(tiny_model_dir(family, smollm2_cache_dir))).model
            options = TrainOptions(
                base="b", method=method, freeze_vision=freeze_vision, freeze_projector=freeze_projector
            )
            prepared = _prepare_parameters(model, family, options)
            trainable = {n for n, p in prepared.named_parameters() if p.requires_grad}
            vision, projector = VISION_TOWER[family].split(".")[-1], PROJECTOR[family].split(".")[-1]
            in_projector = {n for n in trainable if f".{projector}." in n}
            in_vision = {n for n in trainable if f".{vision}." in n} - in_projector
            assert bool(in_projector) is not freeze_projector, (family, freeze_projector)
            assert bool(in_vision) is not freeze_vision, (family, freeze_vision)
            language = {n for n in trainable if f".{LANGUAGE_MODEL[family].split('.')[-1]}." in n}
            assert language and (method == "full" or all("lora_" in n for n in language))


def test_the_recorded_format_fills_only_what_the_user_left_unset(tmp_path):
    from mlmfilter.judge.trained_format import TrainedFormat, apply_recorded_format
    from mlmfilter.scorers.mlm import MLMOptions

    TrainedFormat("qwen", " ", "<|im_end|>", "v1", [METRIC], {"base": "b"}).write(tmp_path)
    applied = apply_recorded_format(MLMOptions(model=str(tmp_path)))
    assert (applied.conversation, applied.answer_prefix, applied.template, applied.metrics) == (
        "qwen",
        " ",
        "v1",
        "ctq",
    )
    mine = apply_recorded_format(MLMOptions(model=str(tmp_path), conversation="vicuna_v1", metrics="itm"))
    assert (mine.conversation, mine.template, mine.metrics) == ("vicuna_v1", "v1", "itm")
    unrecorded = MLMOptions(model=str(tmp_path / "elsewhere"))
    assert apply_recorded_format(unrecorded) is unrecorded


def test_prompts_are_traced_to_their_template_and_metric():
    from mlmfilter.judge.prompts import METRICS, resolve_template
    from mlmfilter.judge.trained_format import PromptIdentifier

    identifier = PromptIdentifier([resolve_template("v2"), resolve_template("v1")])
    for name in ("v1", "v2"):
        for metric in METRICS:
            match = identifier.identify(resolve_template(name).render(metric, "two dogs {play} in snow"))
            assert (match.template, match.metric, match.caption) == (name, metric, "two dogs {play} in snow")
    assert identifier.identify("Describe this image.") is None


@pytest.mark.slow
def test_a_run_shorter_than_the_logging_interval_reports_its_first_and_last_loss(
    tmp_path, smollm2_cache_dir, flickr_pairs
):
    """4 steps with losses logged every 5: the summary line still gives the measured losses, not nan."""
    import re

    from typer.testing import CliRunner

    from mlmfilter.cli.app import app

    base = str(tiny_model_dir("llava", smollm2_cache_dir))
    data = write_llava_json(tmp_path / "train.json", judge_records(flickr_pairs[:4], 8))
    out = tmp_path / "judge"
    args = ["train", str(data), "-o", str(out), "--base", base, "--conversation", "vicuna_v1"]
    result = CliRunner().invoke(app, [*args, "--max-steps", "4", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output
    first, last = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", result.output).groups())
    summary = json.loads((out / "training" / "summary.json").read_text())
    assert summary["losses"] == []  # nothing was logged at logging_steps 5 ...
    assert math.isfinite(first) and first == pytest.approx(summary["first_loss"], abs=1e-3)  # ... yet measured
    assert last == pytest.approx(summary["last_loss"], abs=1e-3)
