"""MLM-Filter prompts and conversation formats: the exact reference strings, no model needed."""

from __future__ import annotations

import pytest

from mlmfilter.judge import conversations, prompts
from tests.support.mlm import reference_prompt, reference_request


def test_packaged_prompts_equal_the_shared_reference(reference_prompts):
    assert prompts.reference_prompts() == reference_prompts
    assert set(prompts.METRICS) == set(reference_prompts["criteria"])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_rendered_prompt_is_the_reference_text(reference_prompts, version):
    template = prompts.resolve_template(version)
    caption = 'A "quoted" caption with {braces} and 100% odd text\nover two lines'
    for metric in prompts.METRICS:
        assert template.render(metric, caption) == reference_prompt(reference_prompts, version, metric, caption)
    # the only difference between v1 and v2 is the rounding sentence
    assert "multiples of 10.  Please" in reference_prompts["template_v1"]
    assert "multiples of 5 or 10. Please" in reference_prompts["template_v2"]


def test_metrics_accept_short_long_lists_and_all():
    assert prompts.resolve_metrics("itm,odf") == ["image_text_matching", "object_detail_fulfillment"]
    assert prompts.resolve_metrics(["semantic_understanding", "ctq", "su"]) == [
        "semantic_understanding",
        "caption_text_quality",
    ]
    assert prompts.resolve_metrics("all") == list(prompts.METRICS)
    with pytest.raises(ValueError, match="unknown metric"):
        prompts.resolve_metrics("itm,quality")
    with pytest.raises(ValueError):
        prompts.resolve_metrics("")


def test_custom_templates_are_validated():
    custom = prompts.resolve_template("Rate {aspect} of: {caption}")
    assert custom.name == "custom"
    assert custom.render("image_text_matching", "a dog") == "Rate image text matching of: a dog"
    for bad, message in [
        ("Rate {aspect} without the text", "must contain {caption}"),
        ("{caption} {score}", "unknown field"),
        ("{caption", "not a valid format string"),
    ]:
        with pytest.raises(ValueError, match=message):
            prompts.resolve_template(bad)


def test_prompt_fingerprint_tracks_the_exact_text():
    v1, v2 = prompts.resolve_template("v1"), prompts.resolve_template("v2")
    metrics = ["image_text_matching"]
    assert v1.sha256(metrics) != v2.sha256(metrics)
    assert v2.sha256(metrics) == prompts.resolve_template("v2").sha256(metrics)
    assert v2.sha256(metrics) != v2.sha256(["image_text_matching", "semantic_understanding"])


@pytest.mark.parametrize("name", ["vicuna_v1", "llama3", "llava_llama3", "qwen"])
def test_conversation_formats_render_the_reference_request(reference_prompts, name):
    prompt = reference_prompt(reference_prompts, "v2", "caption_text_quality", "two dogs play in the snow")
    fmt = conversations.FORMATS[name]
    rendered = fmt.render(prompt, "<image>") + conversations.default_answer_prefix(name)
    assert rendered == reference_request(name, "<image>\n" + prompt)


def test_conversation_names_are_checked():
    assert conversations.validate_conversation("Vicuna_V1") == "vicuna_v1"
    assert conversations.default_answer_prefix("auto") == ""
    with pytest.raises(ValueError, match="unknown conversation"):
        conversations.validate_conversation("chatml")
