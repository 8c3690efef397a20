"""The vicuna_v1 conversation is written once (judge/conversations.py): the Python renderer the judge sends
and the Jinja chat template a converted LLaVA-1.5 checkpoint carries give the same bytes."""

from __future__ import annotations

import pytest

from mlmfilter.judge import conversations
from mlmfilter.judge.conversations import VICUNA_V1, end_of_answer
from tests.support import mlm as mlm_support


@pytest.fixture(scope="module")
def tokenizer(smollm2_cache_dir):
    """A real tokenizer: transformers renders the template in its own sandboxed Jinja environment."""
    return mlm_support.tokenizer(smollm2_cache_dir)


def _real_prompts(reference_prompts, flickr_pairs) -> list[str]:
    """Every reference template and metric over real Flickr8k captions (quotes, commas, full stops)."""
    captions = [caption for _, caption in flickr_pairs[:3]] + ['A sign reads "don\'t\\walk" {sic}']
    return [
        mlm_support.reference_prompt(reference_prompts, template, metric, caption)
        for template in ("v1", "v2")
        for metric in reference_prompts["criteria"]
        for caption in captions
    ]


def _messages(prompt: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def test_the_chat_template_renders_the_judges_request_byte_for_byte(tokenizer, reference_prompts, flickr_pairs):
    template = VICUNA_V1.chat_template()
    fmt = conversations.FORMATS["vicuna_v1"]
    prompts = _real_prompts(reference_prompts, flickr_pairs)
    assert len(prompts) > 20
    for prompt in prompts:
        python = fmt.render(prompt, conversations.REFERENCE_IMAGE_TOKEN)
        jinja = tokenizer.apply_chat_template(
            _messages(prompt), chat_template=template, add_generation_prompt=True, tokenize=False
        )
        assert jinja == python
        # the reference text itself, written out independently of judge/
        assert python + " " == mlm_support.reference_request("vicuna_v1", "<image>\n" + prompt)


@pytest.mark.parametrize("answer", ["85", "100", "7\nThe caption names both dogs and the snow."])
def test_with_the_answer_the_template_renders_the_training_text(tokenizer, reference_prompts, flickr_pairs, answer):
    """Training text = the request + the answer prefix + the answer + the end of the answer (judge/)."""
    template = VICUNA_V1.chat_template()
    fmt = conversations.FORMATS["vicuna_v1"]
    for prompt in _real_prompts(reference_prompts, flickr_pairs)[:8]:
        python = fmt.render(prompt, "<image>") + fmt.answer_prefix + answer + end_of_answer("vicuna_v1")
        jinja = tokenizer.apply_chat_template(
            _messages(prompt, answer), chat_template=template, add_generation_prompt=False, tokenize=False
        )
        assert jinja == python
        assert jinja.endswith(" ASSISTANT: " + answer + "</s>")


def test_the_template_ends_answers_with_the_tokenizers_eos_and_takes_a_system_message(tokenizer):
    template = VICUNA_V1.chat_template(eos_token="<|endoftext|>")
    messages = [{"role": "system", "content": "Be brief."}, *_messages("Rate it.", "50")]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert text == "Be brief. USER: <image>\nRate it. ASSISTANT: 50<|endoftext|>"
