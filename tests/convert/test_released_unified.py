"""LLaVA-Unified checkpoints (the 1.5B Qwen2.5 + SigLIP + aapool_mlp judge, the Llama-3.x + SigLIP
layout): tiny checkpoints in the ORIGINAL layout, converted through the public path, checked against
the forward pass written by hand from the original tensors, on a real Flickr8k photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.released import (
    IMAGE_MARKER,
    aapool,
    config_fields,
    mlp,
    save_safetensors,
    siglip_pixels,
    spliced_logits,
    text_model,
    tiny_siglip,
    tokenizer_image_token,
    write_config,
)

QWEN_INSTRUCT_HEAD = "<|im_start|>system\nYou are a helpful assistant<|im_end|><|im_start|>user\n"
QWEN_INSTRUCT_TAIL = "<|im_end|><|im_start|>assistant\n"

LAYOUTS = {
    # name: (text model, projector, pooled tokens, select layer, extra head rows beyond the tokenizer)
    "qwen2.5-aapool": ("qwen2", "aapool_mlp", 4, -1, 40),
    "llama3-siglip-mlp2x": ("llama", "mlp2x_gelu", None, -2, 0),
}


def unified_config(lm, layout: str, tower_name: str) -> dict:
    """config.json as LLaVA-Unified's train.py saves it (LlavaQwenConfig / LlavaConfig + mm_* fields)."""
    kind, projector, pooled, layer, _ = LAYOUTS[layout]
    fields = config_fields(lm)
    fields.update(
        architectures=["LlavaQwenForCausalLM" if kind == "qwen2" else "LlavaLlamaForCausalLM"],
        model_type="llava_qwen" if kind == "qwen2" else "llava_llama",
        torch_dtype="float32",
        transformers_version="4.51.2",
        image_aspect_ratio="pad",
        mm_hidden_size=32,
        mm_patch_merge_type="flat",
        mm_projector_lr=None,
        mm_projector_type=projector,
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        mm_vision_select_feature="patch",
        mm_vision_select_layer=layer,
        mm_vision_tower=tower_name,
        tokenizer_model_max_length=4096,
        tokenizer_padding_side="right",
        tune_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    if pooled:
        fields["mm_num_image_tokens"] = pooled
    return fields


@pytest.fixture(scope="module", params=list(LAYOUTS))
def original(request, tmp_path_factory, smollm2_cache_dir):
    from tests.support.mlm import tokenizer as smollm2

    layout = request.param
    kind, projector, pooled, layer, extra_rows = LAYOUTS[layout]
    root = tmp_path_factory.mktemp(f"unified-{layout}")
    src, tower_dir = root / "mlm-filter-tiny", root / "siglip-so400m-patch14-384"
    src.mkdir()
    tokenizer = smollm2(smollm2_cache_dir)
    if kind == "qwen2":  # train.py, version qwen_instruct: an added <s> becomes the BOS
        from transformers import AutoTokenizer

        tokenizer.save_pretrained(root / "base-tok")
        tokenizer = AutoTokenizer.from_pretrained(root / "base-tok")
        tokenizer.add_special_tokens({"additional_special_tokens": ["<s>"]})
        tokenizer.bos_token = "<s>"
    tokenizer.save_pretrained(src)
    lm = text_model(kind, len(tokenizer) + extra_rows, seed=11)
    tower = tiny_siglip(tower_dir, seed=12)
    state = {k: v.detach().clone() for k, v in lm.state_dict().items()}  # model.*, lm_head.weight
    gen = torch.Generator().manual_seed(13)
    names = (
        ("model.mm_projector.mlp_projector.0", "model.mm_projector.mlp_projector.2")
        if pooled
        else ("model.mm_projector.0", "model.mm_projector.2")
    )
    state[names[0] + ".weight"] = torch.randn(64, 32, generator=gen) * 0.2
    state[names[0] + ".bias"] = torch.randn(64, generator=gen) * 0.1
    state[names[1] + ".weight"] = torch.randn(64, 64, generator=gen) * 0.2
    state[names[1] + ".bias"] = torch.randn(64, generator=gen) * 0.1
    # the checkpoint also stores a tower copy (here: different weights): LLaVA-Unified never uses it
    stale = tiny_siglip(None, seed=99)
    for key, value in stale.state_dict().items():
        state[f"model.vision_tower.vision_tower.vision_model.{key}"] = value
    save_safetensors(src, state)
    write_config(src, unified_config(lm, layout, "google/siglip-so400m-patch14-384"))
    return {
        "layout": layout,
        "src": src,
        "tower_dir": tower_dir,
        "tower": tower,
        "state": state,
        "lm": lm,
        "tokenizer": tokenizer,
        "names": names,
    }


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    from mlmfilter.api import convert_checkpoint

    dst = tmp_path_factory.mktemp("converted") / "hf"
    layout, out = convert_checkpoint(original["src"], dst, vision_tower=str(original["tower_dir"]))
    assert layout == "llava-unified" and out == dst
    return dst


def trained_prompt(original, text: str) -> str:
    """The request text as trained (conv template + "<image>\n" + prompt), before the forced space token."""
    if LAYOUTS[original["layout"]][0] == "qwen2":  # conv_qwen_instruct (SeparatorStyle.MPT)
        return QWEN_INSTRUCT_HEAD + "<image>\n" + text + QWEN_INSTRUCT_TAIL
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    return system + " USER: <image>\n" + text + " ASSISTANT:"


def trained_ids(original, text: str) -> list[int]:
    """preprocess_qwen: tokenizer_image_token, then the added <s> id in front; the scripts' whitespace id last."""
    tokenizer = original["tokenizer"]
    ids = tokenizer_image_token(trained_prompt(original, text), tokenizer)
    if LAYOUTS[original["layout"]][0] == "qwen2" and ids[0] != tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    return ids + [tokenizer(" ")["input_ids"][-1]]


def reference_features(original, pixels: torch.Tensor) -> torch.Tensor:
    """encode_images: the NAMED tower's hidden_states[select_layer] (SigLIP "patch": every position) -> mm_projector."""
    kind, projector, pooled, layer, _ = LAYOUTS[original["layout"]]
    with torch.no_grad():
        features = original["tower"](pixels, output_hidden_states=True).hidden_states[layer]
        if pooled:
            features = aapool(features, pooled)
        return mlp(features, original["state"], *original["names"])[0]


def reference_log_probs(original, ids: list[int], pixels: torch.Tensor, features=None) -> torch.Tensor:
    """splice the image features at the marker -> LLM, vocabulary resized to len(tokenizer)."""
    features = reference_features(original, pixels) if features is None else features
    rows = len(original["tokenizer"])  # load_pretrained_model: resize_token_embeddings(len(tokenizer))
    embed = original["state"]["model.embed_tokens.weight"][:rows]
    logits = spliced_logits(original["lm"], embed, ids, features, IMAGE_MARKER)[:, :rows]
    return torch.log_softmax(logits.double(), dim=-1)


def test_converted_log_probs_match_the_original_forward(original, converted, flickr_pairs, reference_prompts):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    pooled = LAYOUTS[original["layout"]][2]
    assert type(model).__name__ == (
        "PooledLlavaForConditionalGeneration" if pooled else "LlavaForConditionalGeneration"
    )

    image_path, caption = flickr_pairs[3]
    image = Image.open(image_path).convert("RGB")
    assert image.width != image.height  # the pad-to-square path is exercised
    metric = "image_text_matching"
    text = reference_prompts["template_v2"].format(
        caption=caption, criteria=reference_prompts["criteria"][metric], aspect=metric.replace("_", " ")
    )
    ids = trained_ids(original, text)
    at = ids.index(IMAGE_MARKER)
    tokens = pooled or 25
    inputs = processor(images=image, text=trained_prompt(original, text), return_tensors="pt")
    image_ids = inputs["input_ids"][0].tolist()
    assert image_ids.count(model.config.image_token_index) == tokens  # the processor expands <image> as trained
    inputs["input_ids"] = torch.tensor([ids[:at] + [model.config.image_token_index] * tokens + ids[at + 1 :]])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    pixels = siglip_pixels(image, pad=True)
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-5, rtol=0)

    with torch.no_grad():
        logits = model(**inputs).logits[0]
    scored = model.config.mlmfilter_scored_vocab_size
    assert scored == len(original["tokenizer"]) < original["lm"].config.vocab_size + 1
    ours = torch.log_softmax(logits[:, :scored].double(), dim=-1)
    reference = reference_log_probs(original, ids, pixels)
    assert reference[-1].std() > 0.1  # not a comparison of near-constant tensors
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_judge_backend_expected_scores_match_the_original(original, converted, flickr_pairs, reference_prompts):
    """The whole path: registry settings -> backend -> exact score distribution == brute force over the
    hand-written original forward (101 answers, normalised over the original vocabulary)."""
    from mlmfilter.backends.transformers import TransformersJudgeBackend
    from mlmfilter.judge.backend import JudgeRequest
    from mlmfilter.judge.readout import ScoreTrie
    from mlmfilter.judge.registry import identify, read_config
    from mlmfilter.models.vlm import load_vlm

    judge = identify(read_config(str(converted)))
    expected_key = "mlm-filter-qwen2.5-1.5b" if LAYOUTS[original["layout"]][0] == "qwen2" else "mlm-filter-llama-3.2-3b"
    assert judge is not None and judge.key == expected_key
    settings = judge.settings("trained")
    loaded = load_vlm(str(converted), device="cpu", dtype="fp32")
    loaded.processor.image_processor.do_pad = settings.pad_to_square
    backend = TransformersJudgeBackend(loaded, settings.conversation, settings.answer_prefix, trie_threshold=0.0)
    image = Image.open(flickr_pairs[5][0]).convert("RGB")
    caption = flickr_pairs[5][1]
    metric = "object_detail_fulfillment"
    text = reference_prompts[f"template_{settings.template}"].format(
        caption=caption, criteria=reference_prompts["criteria"][metric], aspect=metric.replace("_", " ")
    )
    [dist] = backend.score_distributions([JudgeRequest(image, [text])])

    tokenizer = original["tokenizer"]
    base = trained_ids(original, text)
    pixels = siglip_pixels(image, pad=True)
    cont = torch.tensor(ScoreTrie.from_tokenizer(tokenizer).continuation_ids)
    features = reference_features(original, pixels)
    rows = len(tokenizer)
    embed = original["state"]["model.embed_tokens.weight"][:rows]
    at = base.index(IMAGE_MARKER)
    prompt_embeds = torch.cat([embed[torch.tensor(base[:at])], features, embed[torch.tensor(base[at + 1 :])]])
    answers = {s: tokenizer(str(s), add_special_tokens=False).input_ids for s in range(101)}
    brute = np.zeros(101)
    for k in sorted({len(a) for a in answers.values()}):  # one batched pass per answer length
        scores = [s for s, a in answers.items() if len(a) == k]
        batch = torch.stack([torch.cat([prompt_embeds, embed[torch.tensor(answers[s])]]) for s in scores])
        with torch.no_grad():
            hidden = original["lm"].model(inputs_embeds=batch).last_hidden_state[:, -(k + 1) :]
            logp = torch.log_softmax(original["lm"].lm_head(hidden)[..., :rows].double(), dim=-1)
        for row, s in enumerate(scores):
            total = sum(float(logp[row, j, t]) for j, t in enumerate(answers[s]))
            brute[s] = total + np.log1p(-float(torch.logsumexp(logp[row, k, cont], dim=-1).exp()))
    np.testing.assert_allclose(dist[0], brute, atol=1e-4)


def test_vision_tower_named_in_config_is_required(original, tmp_path):
    from mlmfilter.convert.llava import LlavaConversionError
    from mlmfilter.convert.unified import convert_unified_checkpoint

    with pytest.raises(LlavaConversionError, match="--vision-tower"):
        convert_unified_checkpoint(original["src"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mlm_scorer_asks_a_released_judge_as_it_was_trained(original, converted):
    from mlmfilter.scorers.mlm import MLMOptions, MLMScorer

    qwen = LAYOUTS[original["layout"]][0] == "qwen2"
    trained = MLMScorer(MLMOptions(model=str(converted), device="cpu"))
    assert trained.options.conversation == ("qwen_instruct_train" if qwen else "llama3")
    assert trained.template.name == "v2" if qwen else trained.template.name == "v1"
    prov = trained.provenance()
    assert prov["checkpoint"]["released_judge"] == trained.released.judge.key
    assert prov["model"]["conversation"]["name"] == trained.options.conversation
    script = MLMScorer(
        MLMOptions(model=str(converted), device="cpu", checkpoint_settings="released-script", readout="generate")
    )
    assert script.options.conversation == "qwen_instruct" and script.options.max_new_tokens == (2 if qwen else 1)
    assert script.template.name == "v2"
    overridden = MLMScorer(MLMOptions(model=str(converted), device="cpu", template="v1" if qwen else "v2"))
    assert any("was trained with template" in w for w in overridden.provenance()["warnings"])
    off = MLMScorer(MLMOptions(model=str(converted), device="cpu", checkpoint_settings="off"))
    assert off.options.conversation == "auto" and off.released is None
