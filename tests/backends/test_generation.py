"""Caption generation on tiny random models of the real families: batching, sampling, stops, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlmfilter.backends.generation import (
    CaptionGenerator,
    GenerationRequest,
    SamplingParams,
    TransformersCaptionGenerator,
    cut_at_stop,
)
from mlmfilter.core import errors
from mlmfilter.judge.backend import RequestFailure
from mlmfilter.models.vlm import load_vlm
from tests.support import mlm as mlm_support
from tests.support.enhance import one_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

PROMPTS = [
    "Rewrite the caption so that it matches the image: a dog",
    "Describe the image in one sentence.",
    "Rewrite the caption so that it matches the image, keeping every name: two children playing football in Paris",
    "Caption?",
]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    sizes = [(40, 60), (64, 48), (90, 70), (33, 57)]  # different sizes: Qwen2-VL / Idefics3 token counts differ
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def generators(smollm2_cache_dir):
    cache = {}

    def get(family: str, **kwargs) -> TransformersCaptionGenerator:
        if family not in cache:
            cache[family] = load_vlm(
                str(mlm_support.tiny_model_dir(family, smollm2_cache_dir)), device="cpu", dtype="fp32"
            )
        return TransformersCaptionGenerator(cache[family], **kwargs)

    return get


def _requests(n: int = 4) -> list[GenerationRequest]:
    return [GenerationRequest(image, prompt) for image, prompt in zip(_images()[:n], PROMPTS[:n])]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_batched_generation_equals_one_by_one(generators, family):
    params = SamplingParams(max_new_tokens=16)
    batched = generators(family, batch_size=4)
    alone = generators(family, batch_size=1)
    assert isinstance(batched, CaptionGenerator)
    together = batched.generate(_requests(), params)
    one_by_one = [alone.generate([r], params)[0] for r in _requests()]
    assert all(isinstance(t, list) and len(t) == 1 for t in together)
    assert together == one_by_one
    assert len({t[0].text for t in together}) == len(PROMPTS)  # the prompts really lead to different texts
    assert all(t[0].text for t in together)
    # random weights never write the end of sequence: every text is cut off at max_new_tokens
    assert all(t[0].finish_reason == "length" and t[0].truncated and t[0].new_tokens == 16 for t in together)


def test_right_padding_would_change_the_answers(generators):
    """The equality above is not trivially true: padding on the wrong side changes the batched answers."""
    generator = generators("llava", batch_size=4)
    params = SamplingParams(max_new_tokens=8)
    reference = generator.generate(_requests(), params)
    left_padded = generator._left_padded

    def right_padded(batch):
        inputs = left_padded(batch)
        for row, item in enumerate(batch.items):
            n = len(item.full[0])
            for key in ("input_ids", "attention_mask"):
                inputs[key][row] = torch.roll(inputs[key][row], -(inputs[key].shape[1] - n))
        return inputs

    generator._left_padded = right_padded
    try:
        assert generator.generate(_requests(), params) != reference
    finally:
        generator._left_padded = left_padded


def test_prompt_ids_are_the_judge_encoders(generators):
    """Generation reads exactly the ids the judge reads for the same prompt (reference format: chunk-wise)."""
    generator = generators("llava", conversation="vicuna_v1")
    request = _requests(1)[0]
    seen = {}
    original = generator.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    generator.model.generate = spy
    try:
        generator.generate([request], SamplingParams(max_new_tokens=2))
    finally:
        generator.model.generate = original
    text = generator.encoder.prompt_text(request.prompt)
    assert text.startswith("A chat between a curious user") and text.endswith("ASSISTANT:")
    decoded = generator.tokenizer.decode(seen["input_ids"][0])
    assert mlm_support.collapse_image_tokens(decoded).replace("<|im_start|>", "", 1) == text


def test_sampling_gives_n_seeded_candidates(generators):
    generator = generators("qwen2_vl", batch_size=2)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=11)
    first = generator.generate(_requests(2), params)
    again = generator.generate(_requests(2), params)
    other_seed = generator.generate(_requests(2), params.model_copy(update={"seed": 12}))
    assert [len(texts) for texts in first] == [3, 3]
    assert first == again
    assert first != other_seed
    assert len({g.text for g in first[0]}) > 1  # sampled candidates differ


def test_stop_strings_end_and_are_cut(generators):
    generator = generators("idefics3", batch_size=2)
    full = generator.generate(_requests(2), SamplingParams(max_new_tokens=16))
    text = full[0][0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[len(words) // 2]
    stopped = generator.generate(_requests(2), SamplingParams(max_new_tokens=16, stop=(stop,)))
    assert stopped[0][0].text == cut_at_stop(text, [stop]).strip()
    assert stop not in stopped[0][0].text
    assert len(stopped[0][0].text) < len(text)
    assert stopped[0][0].finish_reason == "stop" and not stopped[0][0].truncated


def test_bad_requests_fail_alone(generators):
    generator = generators("llava", batch_size=4, max_length=60)
    requests = _requests(3) + [GenerationRequest(_images()[0], "look at <image> twice")]
    long_prompt = "Rewrite this caption: " + "word " * 80
    requests.append(GenerationRequest(_images()[1], long_prompt))
    out = generator.generate(requests, SamplingParams(max_new_tokens=8))
    assert all(isinstance(o, list) and len(o) == 1 for o in out[:3])
    assert isinstance(out[3], RequestFailure) and "image token" in out[3].detail
    assert isinstance(out[4], RequestFailure) and out[4].reason == errors.CAPTION_TOO_LONG
    # the others are what they would be without the bad ones
    assert out[:3] == generators("llava", batch_size=4).generate(_requests(3), SamplingParams(max_new_tokens=8))


def test_cut_at_stop():
    assert cut_at_stop("a dog.\nUSER: hi", ["\nUSER:", "###"]) == "a dog."
    assert cut_at_stop("a dog", []) == "a dog"
    assert cut_at_stop("x###y\nUSER:", ["\nUSER:", "###"]) == "x"


def test_describe_names_the_generator(generators):
    info = generators("llava").describe()
    assert info["backend"] == "transformers-generate"
    assert info["family"] == "llava"
    assert "left" in info["padding"]


def test_out_of_memory_is_not_a_request_failure(generators):
    """A machine failure must fail the shard (to be retried), not become error rows."""
    generator = generators("llava")
    original = generator.model.generate

    def oom(**kwargs):
        raise MemoryError("scripted out of memory")

    generator.model.generate = oom
    try:
        with pytest.raises(MemoryError):
            generator.generate(_requests(2), SamplingParams(max_new_tokens=2))
    finally:
        generator.model.generate = original
