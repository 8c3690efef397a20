"""The transformers judge backend on tiny random models of each family (real SmolLM2 tokenizer, real
processors, real Flickr photos): the exact request text reaches the model, the expected readout equals
101 brute-force forward passes, batching does not change a pair's scores, greedy decoding equals
transformers' generate, one image pass per pair, failures stay with their request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlmfilter.backends.transformers import TransformersJudgeBackend
from mlmfilter.core import errors
from mlmfilter.images.decode import DecodeSpec, decode_image
from mlmfilter.judge.backend import JudgeBackend, JudgeRequest, RequestFailure
from mlmfilter.judge.prompts import resolve_template
from mlmfilter.models.vlm import load_vlm
from tests.support import mlm as mlm_support
from tests.support.mlm import PLACEHOLDERS

METRICS = ["image_text_matching", "object_detail_fulfillment", "caption_text_quality", "semantic_understanding"]
CONVERSATION = {"llava": "vicuna_v1", "qwen2_vl": "qwen", "idefics3": "auto"}


@pytest.fixture(scope="module")
def cache_dir(smollm2_cache_dir) -> str:
    return smollm2_cache_dir


@pytest.fixture(scope="module")
def loaded(cache_dir):
    models = {}

    def get(family: str):
        if family not in models:
            models[family] = load_vlm(str(mlm_support.tiny_model_dir(family, cache_dir)), device="cpu", dtype="fp32")
        return models[family]

    return get


@pytest.fixture(scope="module")
def photos(flickr_pairs):
    """Real JPEGs decoded like the pipeline does, at a few sizes and aspect ratios."""
    out = []
    for path, caption in flickr_pairs[:4]:
        image, _, _ = decode_image(path.read_bytes(), DecodeSpec(shorter_side=112))
        out.append((image, caption))
    out[1] = (out[1][0].crop((0, 0, 112, 40)), out[1][1])  # a wide strip: other tiling / grid
    return out


def requests_for(photos, template="v2", metrics=METRICS, n=None):
    tpl = resolve_template(template)
    return [JudgeRequest(img, [tpl.render(m, cap) for m in metrics]) for img, cap in photos[:n]]


def backend(loaded, family, conversation=None, **kwargs):
    return TransformersJudgeBackend(loaded(family), conversation or CONVERSATION[family], **kwargs)


@pytest.mark.parametrize(
    "family, conversation, template",
    [
        ("llava", "vicuna_v1", "v1"),
        ("llava", "vicuna_v1", "v2"),
        ("qwen2_vl", "qwen", "v2"),
        ("qwen2_vl", "llama3", "v1"),
        ("idefics3", "llava_llama3", "v2"),
        ("idefics3", "auto", "v1"),
    ],
)
def test_exact_request_text_reaches_the_model(loaded, photos, reference_prompts, family, conversation, template):
    judge = backend(loaded, family, conversation)
    model = judge.model
    image, caption = photos[0]
    recorder = mlm_support.ForwardRecorder(model)
    try:
        out = judge.generate(requests_for(photos, template, n=1), max_new_tokens=1)
    finally:
        recorder.close()
    assert not isinstance(out[0], RequestFailure), out[0]
    prefix_call, block_call = recorder.calls[:2]
    seen = mlm_support.seen_sequences(prefix_call, block_call, row=0)
    assert len(seen) == len(METRICS)
    tok = judge.tokenizer
    for metric, ids in zip(METRICS, seen):
        prompt = mlm_support.reference_prompt(reference_prompts, template, metric, caption)
        if conversation == "auto":  # the model's own chat template, rendered by transformers
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            expected = judge.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            expected = mlm_support.reference_request(conversation, PLACEHOLDERS[family] + "\n" + prompt)
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert mlm_support.collapse_image_tokens(text) == mlm_support.collapse_image_tokens(expected)
    # the prefix shared by the four prompts runs once and ends right after the caption
    prefix = prefix_call["input_ids"][0].tolist()
    assert tok.decode(prefix).endswith(caption + "\n\n")
    if family != "qwen2_vl":  # 1D positions: every prompt sees itself at 0 .. n-1
        assert prefix_call["position_ids"][0].tolist() == list(range(len(prefix)))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_expected_readout_equals_brute_force(loaded, photos, family):
    judge = backend(loaded, family, trie_threshold=0.0)  # the whole trie: exact
    request = requests_for(photos, metrics=["semantic_understanding", "image_text_matching"], n=1)[0]
    fast = judge.score_distributions([request])[0]
    assert fast.shape == (2, 101)
    # the second prompt: its own branch after the prefix shared with the first, then its score trie
    text = judge.prompt_text(request.prompts[1])
    brute = mlm_support.brute_force_log_probs(
        judge.model,
        judge.processor,
        text,
        judge.encoder.fit_budget(request.image),
        judge.trie.sequences,
        judge.trie.continuation_ids,
        add_special_tokens=judge.encoder.add_special_tokens(text),
    )
    np.testing.assert_allclose(fast[1], brute, atol=2e-4, rtol=0)
    assert np.ptp(brute) > 0.5  # the model is random but far from flat: the comparison has teeth

    # adaptive trie: thresholds that expand none, some, or all of the two-digit nodes; every P(s)
    # stays within the threshold of brute force, and what was expanded is exact
    two_digit = np.exp(brute[10:100])
    for threshold in (1e-4, float(np.median(two_digit)), float(two_digit.min()) / 2):
        adaptive = backend(loaded, family, trie_threshold=threshold).score_distributions([request])[0][1]
        rounding = 2e-4 * np.exp(brute)  # the float tolerance of the exact comparison above, in P units
        assert (np.abs(np.exp(adaptive) - np.exp(brute)) < threshold + rounding).all()
        np.testing.assert_allclose(adaptive[:10], brute[:10], atol=2e-4, rtol=0)  # first level: always exact
        expanded = np.abs(adaptive - brute) < 2e-4
        if threshold == float(np.median(two_digit)):  # some expanded, some not: the bound is what holds
            assert 0 < expanded[10:100].sum() < 90
        if threshold < two_digit.min():  # every path is above it: exact
            np.testing.assert_allclose(adaptive, brute, atol=2e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_batched_equals_single_and_greedy_equals_transformers(loaded, photos, family):
    judge = backend(loaded, family, batch_size=4)
    alone = backend(loaded, family, batch_size=1)
    requests = requests_for(photos, metrics=["image_text_matching", "caption_text_quality"], n=3)
    batched = judge.score_distributions(requests)
    single = [alone.score_distributions([r])[0] for r in requests]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert not np.allclose(batched[0], batched[1], atol=1e-3)  # different pairs really differ
    texts = judge.generate(requests)
    assert texts[:2] == [alone.generate([r])[0] for r in requests[:2]]

    # every greedy step: our logits (prefix cache + branch + step tokens) == a plain forward
    request, model, processor = requests[1], judge.model, judge.processor
    steps = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: steps.append(out[0].float()))
    try:
        ours = judge.generate([request])[0]
    finally:
        hook.remove()
    assert len(steps) == judge.default_max_new_tokens  # "100" and one more: no early stop on random weights
    chosen = torch.stack([step.argmax(-1) for step in steps], dim=-1)  # (prompts, steps)
    for m in [1]:  # the prompt whose branch follows the prefix it shares with the first
        text = judge.prompt_text(request.prompts[m])
        enc = processor(
            text=[text],
            images=[[judge.encoder.fit_budget(request.image)]],
            return_tensors="pt",
            add_special_tokens=judge.encoder.add_special_tokens(text),
        )
        plain = dict(enc)
        plain["input_ids"] = torch.cat([enc["input_ids"], chosen[m : m + 1, :-1]], dim=1)
        plain["attention_mask"] = torch.ones_like(plain["input_ids"])
        if "mm_token_type_ids" in enc:
            plain["mm_token_type_ids"] = torch.cat(
                [enc["mm_token_type_ids"], torch.zeros_like(chosen[m : m + 1, :-1])], 1
            )
        with torch.no_grad():
            logits = model(**plain, logits_to_keep=len(steps)).logits[0].float()
        torch.testing.assert_close(torch.stack([step[m] for step in steps]), logits, atol=2e-3, rtol=1e-4)
        # and the text equals transformers' own greedy generate
        out = model.generate(**enc, max_new_tokens=judge.default_max_new_tokens, do_sample=False)
        assert ours[m] == processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_one_image_pass_and_one_prefix_pass_per_pair(loaded, photos):
    judge = backend(loaded, "llava", batch_size=8)
    assert isinstance(judge, JudgeBackend)
    model = judge.model
    seen_images = []
    original = model.get_image_features

    def counting(**kwargs):
        seen_images.append(int(kwargs["pixel_values"].shape[0]))
        return original(**kwargs)

    model.get_image_features = counting
    recorder = mlm_support.ForwardRecorder(model)
    try:
        out = judge.score_distributions(requests_for(photos))
    finally:
        recorder.close()
        del model.get_image_features
    assert all(o.shape == (4, 101) for o in out)
    assert seen_images == [len(photos)]  # one vision pass, every image once, for 4 metrics each
    # the shared prefixes; then, per group of prompts of similar length, one row per prompt (branch +
    # first digits) and deeper trie levels only where a path is likely enough (<= 2 more for 0..100)
    assert recorder.calls[0]["input_ids"].shape[0] == len(photos)
    rows = [call["input_ids"].shape[0] for call in recorder.calls[1:]]
    assert 1 <= len(rows) <= 4 * judge.trie.max_depth
    assert all(r <= 4 * len(photos) for r in rows) and sum(rows) >= 4 * len(photos)


def test_failures_stay_with_their_request(loaded, photos):
    judge = backend(loaded, "qwen2_vl", batch_size=4)
    tpl = resolve_template("v2")
    good = requests_for(photos, metrics=["image_text_matching"], n=2)
    sliver = JudgeRequest(Image.new("RGB", (1, 300), (90, 20, 200)), [tpl.render("image_text_matching", "a line")])
    smuggled = JudgeRequest(photos[0][0], [tpl.render("image_text_matching", "see <|image_pad|> here")])
    out = judge.score_distributions([good[0], sliver, smuggled, good[1]])
    assert isinstance(out[1], RequestFailure) and out[1].reason == errors.SCORER_ERROR
    assert "aspect ratio" in out[1].detail
    assert isinstance(out[2], RequestFailure) and "image token" in out[2].detail
    for got, request in zip((out[0], out[3]), good):
        np.testing.assert_allclose(got, judge.score_distributions([request])[0], atol=1e-4, rtol=0)


def test_over_long_prompts_are_refused_not_cut(loaded, photos):
    judge = backend(loaded, "llava", max_length=420)
    pairs = [(photos[0][0], "a dog"), (photos[0][0], "a dog " * 200)]
    short, long = requests_for(pairs, metrics=["caption_text_quality"])
    out = judge.score_distributions([short, long])
    assert out[0].shape == (1, 101)
    assert isinstance(out[1], RequestFailure) and out[1].reason == errors.CAPTION_TOO_LONG
    assert "max_length=420" in out[1].detail


def test_bf16_weights_read_out_in_float32(cache_dir, photos):
    """A bf16 model: masks, image features and positions follow its dtype; the trie logits are float32."""
    folder = str(mlm_support.tiny_model_dir("llava", cache_dir))
    request = requests_for(photos, metrics=["image_text_matching"], n=1)
    full = TransformersJudgeBackend(load_vlm(folder, device="cpu", dtype="fp32"), "vicuna_v1")
    half = TransformersJudgeBackend(load_vlm(folder, device="cpu", dtype="bf16"), "vicuna_v1")
    assert half.model.dtype == torch.bfloat16
    np.testing.assert_allclose(half.score_distributions(request)[0], full.score_distributions(request)[0], atol=0.05)
