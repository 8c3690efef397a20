"""The checkpoint registry: identification from config.json, trained vs released-script settings, and
the exact request text of every entry (decoded input ids == the reference assembly, built here from
literal strings, independently of mlmfilter.judge)."""

from __future__ import annotations

import pytest

from mlmfilter.judge.registry import REGISTRY, identify, resolve_settings
from tests.support import mlm as mlm_support

VICUNA_SYSTEM = mlm_support.VICUNA_SYSTEM
LLAVA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
AITQE_QUESTION = (
    "Evaluate the caption: {caption}\nif score is low, give a short description of the image.\n"
    "Respond using a dictionary structure."
)


def reference_text(conversation: str, prompt: str) -> str:
    """What the original code assembles (conversation.py get_prompt / train.py / AITQE inference.py),
    with the forced whitespace token of the scoring scripts written as " "."""
    turn = "<image>\n" + prompt
    if conversation in ("vicuna_v1", "llama3"):  # SeparatorStyle.TWO
        return VICUNA_SYSTEM + " USER: " + turn + " ASSISTANT:" + " "
    if conversation == "llava_v0":  # SeparatorStyle.SINGLE, sep "###"
        return LLAVA_V0_SYSTEM + "###Human: " + turn + "###Assistant:" + " "
    if conversation in ("qwen_instruct", "qwen_instruct_train"):  # SeparatorStyle.MPT
        text = (
            "<|im_start|>system\nYou are a helpful assistant<|im_end|><|im_start|>user\n"
            + turn
            + "<|im_end|><|im_start|>assistant\n"
            + " "
        )
        return ("<s>" if conversation == "qwen_instruct_train" else "") + text
    if conversation == "aitqe":  # image span, the processor's newline, "\n" + question; no BOS
        return "<image>\n\n" + prompt
    raise ValueError(conversation)


def original_config(key: str) -> dict:
    """The identifying config.json fields of each released checkpoint, as its training code saves them."""
    llava = {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_use_im_patch_token": False}
    if key == "mlm-filter-llava-13b":
        return {
            **llava,
            "model_type": "llava_llama",
            "architectures": ["LlavaLlamaForCausalLM"],
            "vocab_size": 32000,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_size": 5120,
            "mm_hidden_size": 1024,
            "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        }
    if key == "mlm-filter-llama-3-8b":
        return {
            **llava,
            "model_type": "llava_llama",
            "architectures": ["LlavaLlamaForCausalLM"],
            "vocab_size": 128256,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "mm_hidden_size": 1024,
            "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        }
    if key == "mlm-filter-llama-3.2-3b":
        return {
            "model_type": "llava_llama",
            "architectures": ["LlavaLlamaForCausalLM"],
            "vocab_size": 128256,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "mm_hidden_size": 1152,
            "mm_projector_type": "aapool_mlp",
            "mm_num_image_tokens": 144,
            "mm_vision_tower": "google/siglip-so400m-patch14-384",
        }
    if key == "mlm-filter-qwen2.5-1.5b":
        return {
            "model_type": "llava_qwen",
            "architectures": ["LlavaQwenForCausalLM"],
            "vocab_size": 151936,
            "mm_hidden_size": 1152,
            "mm_projector_type": "aapool_mlp",
            "mm_num_image_tokens": 144,
            "mm_vision_select_layer": -1,
            "mm_vision_tower": "google/siglip-so400m-patch14-384",
        }
    if key == "aitqe":
        return {
            "model_type": "mm",
            "architectures": ["MMForCausalLM"],
            "image_tile_tokens": 729,
            "visual_hidden_dim": 1152,
            "vision_model_name_or_path": "/some/path/siglip",
        }
    raise KeyError(key)


@pytest.mark.parametrize("key", list(REGISTRY))
def test_each_checkpoint_is_identified_from_its_config(key):
    config = original_config(key)
    assert identify(config).key == key
    # a converted folder keeps the fields under mlmfilter_source and is identified the same way
    assert identify({"model_type": "llava", "mlmfilter_source": config}).key == key
    # renaming the model changes nothing: no name is looked at
    assert identify({**config, "_name_or_path": "my-own-judge"}).key == key


def test_unknown_models_are_not_guessed():
    assert identify({"model_type": "llava", "text_config": {}, "vision_config": {}}) is None
    assert identify({"model_type": "llava_qwen", "mm_projector_type": "mlp2x_gelu"}) is None


def test_released_script_settings_differ_where_the_scripts_differ():
    vicuna = REGISTRY["mlm-filter-llava-13b"]
    assert (vicuna.trained.conversation, vicuna.released_script.conversation) == ("vicuna_v1", "llava_v0")
    assert vicuna.trained.max_new_tokens == 2 and vicuna.trained.template == "v1"
    llama3 = REGISTRY["mlm-filter-llama-3-8b"]
    assert llama3.trained.max_new_tokens == llama3.released_script.max_new_tokens == 1
    assert llama3.released_script.conversation == "qwen_instruct" and llama3.released_script.template == "v2"
    qwen = REGISTRY["mlm-filter-qwen2.5-1.5b"]
    assert (qwen.trained.conversation, qwen.released_script.conversation) == ("qwen_instruct_train", "qwen_instruct")
    assert qwen.trained.pad_to_square and not qwen.released_script.pad_to_square
    assert qwen.released_script.dtype == "fp16" and qwen.trained.dtype == "bf16"
    assert REGISTRY["aitqe"].trained.max_new_tokens == 384


def test_overrides_warn_when_they_differ_from_training():
    judge = REGISTRY["mlm-filter-qwen2.5-1.5b"]
    same = resolve_settings(judge, "trained", {"template": "v2", "conversation": None}, judge.trained)
    assert same.settings == judge.trained and not same.warnings
    other = resolve_settings(judge, "released-script", {"template": "v1"}, judge.trained)
    assert other.settings.conversation == "qwen_instruct" and other.settings.template == "v1"
    assert any("template='v2'" in w for w in other.warnings)
    assert any("conversation" in w for w in other.describe()["warnings"]) is False
    with pytest.raises(ValueError, match="compatibility"):
        judge.settings("script")


@pytest.fixture(scope="module")
def encoder_for(smollm2_cache_dir):
    from transformers import AutoProcessor

    from mlmfilter.models.vlm_encoding import PromptEncoder
    from mlmfilter.models.vlm_families import FAMILIES

    processor = AutoProcessor.from_pretrained(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<s>"]})  # as LLaVA-Unified's train.py

    def build(conversation: str, answer_prefix: str):
        return PromptEncoder(processor, FAMILIES["llava"], conversation, answer_prefix, None, 4096)

    return build


@pytest.mark.parametrize("compatibility", ["trained", "released-script"])
@pytest.mark.parametrize("key", list(REGISTRY))
def test_request_text_of_every_entry_is_the_reference(encoder_for, reference_prompts, flickr_pairs, key, compatibility):
    from PIL import Image

    from mlmfilter.judge.backend import JudgeRequest

    settings = REGISTRY[key].settings(compatibility)
    encoder = encoder_for(settings.conversation, settings.answer_prefix)
    image_path, caption = flickr_pairs[0]
    if settings.template == "aitqe":
        prompt = AITQE_QUESTION.format(caption=caption)
    else:
        prompt = mlm_support.reference_prompt(reference_prompts, settings.template, "semantic_understanding", caption)
    batch = encoder.encode([JudgeRequest(Image.open(image_path).convert("RGB"), [prompt])], [0], 3)
    assert not batch.failures, batch.failures
    ids = batch.items[0].full[0]
    tokenizer = encoder.tokenizer
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert mlm_support.collapse_image_tokens(text) == reference_text(settings.conversation, prompt)
    if settings.answer_prefix:  # the scripts' forced space: tokenizer(" ")["input_ids"][-1], its own token
        assert ids[-1] == tokenizer(" ")["input_ids"][-1]
    if settings.conversation == "aitqe":  # the two newlines around the image span are two tokens
        after = ids[max(i for i, t in enumerate(ids) if t == encoder.image_token_id) + 1 :]
        assert after[:2] == tokenizer("\n").input_ids * 2


def test_convert_command_refuses_a_folder_without_config(tmp_path):
    from typer.testing import CliRunner

    from mlmfilter.cli.app import app

    result = CliRunner().invoke(app, ["convert", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "has no config.json" in result.output
    listing = CliRunner().invoke(app, ["judges"])
    assert listing.exit_code == 0 and "mlm-filter-qwen2.5-1.5b" in listing.output
