"""AITQE: a tiny checkpoint in the ORIGINAL MMForCausalLM layout (hanhuang22/AITQE modeling_mm.py),
converted through the public path, checked against the forward written by hand from the original
tensors; the request reaching the model is AITQE's raw prompt token for token."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.support.released import (
    SIGLIP_PATCH,
    SIGLIP_SIDE,
    config_fields,
    mlp,
    save_safetensors,
    siglip_pixels,
    spliced_logits,
    text_model,
    tiny_siglip,
    write_config,
)

TILE_TOKENS = (SIGLIP_SIDE // SIGLIP_PATCH) ** 2
QUESTION = (
    "Evaluate the caption: {caption}\nif score is low, give a short description of the image.\n"
    "Respond using a dictionary structure."
)


@pytest.fixture(scope="module")
def original(tmp_path_factory, smollm2_cache_dir):
    from tests.support.mlm import tokenizer as smollm2

    root = tmp_path_factory.mktemp("aitqe")
    src = root / "AITQE"
    src.mkdir()
    tokenizer = smollm2(smollm2_cache_dir)
    tokenizer.save_pretrained(src)
    lm = text_model("qwen2", len(tokenizer) + 64, seed=21)  # Qwen2's head has more rows than its tokenizer
    # MMForCausalLM builds its SigLIP from the config (and image processor) at vision_model_name_or_path;
    # the weights come from the checkpoint
    tower = tiny_siglip(root / "siglip-so400m-patch14-384", seed=22)
    state = {f"model.{k}": v.detach().clone() for k, v in lm.state_dict().items()}  # model.model.*, model.lm_head
    for key, value in tower.state_dict().items():  # MMForCausalLM.vision_model = SiglipVisionModel
        state[f"vision_model.vision_model.{key}"] = value
    gen = torch.Generator().manual_seed(23)
    state["mm_projector.0.weight"] = torch.randn(64, 32, generator=gen) * 0.2
    state["mm_projector.0.bias"] = torch.randn(64, generator=gen) * 0.1
    state["mm_projector.2.weight"] = torch.randn(64, 64, generator=gen) * 0.2  # bias=False
    state["image_newline"] = torch.randn(64, generator=gen)  # concatenated as a zero-length slice: no effect
    save_safetensors(src, state)
    fields = config_fields(lm)
    fields.update(
        architectures=["MMForCausalLM"],
        model_type="mm",
        torch_dtype="float32",
        transformers_version="4.41.2",
        language_model_name_or_path="/path/to/Qwen2-7B",
        vision_model_name_or_path=str(root / "siglip-so400m-patch14-384"),
        mm_projector_type="mlp",
        image_aspect_ratio="square",
        visual_hidden_dim=32,
        pesudo_img_size=SIGLIP_SIDE,
        pesudo_patch_size=SIGLIP_PATCH,
        image_tile_tokens=TILE_TOKENS,
        pooling_kernel=1,
        image_token_index=-1,
        pad_token_index=tokenizer.pad_token_id,
        eos_token_index=tokenizer.eos_token_id,
        IGNORE_INDEX=-100,
        image_pattern="<image>",
    )
    write_config(src, fields)
    return {"src": src, "lm": lm, "tower": tower, "state": state, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    from mlmfilter.api import convert_checkpoint

    layout, out = convert_checkpoint(original["src"], tmp_path_factory.mktemp("aitqe-hf") / "hf")
    assert layout == "aitqe"
    return out


def aitqe_ids(tokenizer, caption: str) -> list[int]:
    """MMDataProcessor(is_infra=True) on process_prompt(): the image span -> one marker; the newline the
    processor adds after <img_end> is encoded inside the no-loss part, the question apart."""
    return [-1] + tokenizer("\n").input_ids + tokenizer("\n" + QUESTION.format(caption=caption)).input_ids


def reference_logits(original, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """_merge_input_ids_with_image_features: SigLIP hidden_states[-2] -> mm_projector -> the -1 positions."""
    with torch.no_grad():
        features = original["tower"](pixels, output_hidden_states=True).hidden_states[-2]
        features = mlp(features, original["state"], "mm_projector.0", "mm_projector.2")[0]
    embed = original["state"]["model.model.embed_tokens.weight"]
    return spliced_logits(original["lm"], embed, ids, features, -1)


def test_converted_aitqe_matches_the_original_forward(original, converted, flickr_pairs):
    from mlmfilter.backends.transformers import TransformersJudgeBackend
    from mlmfilter.judge import aitqe
    from mlmfilter.judge.backend import JudgeRequest
    from mlmfilter.models.vlm import load_vlm

    loaded = load_vlm(str(converted), device="cpu", dtype="fp32")
    backend = TransformersJudgeBackend(loaded, "aitqe", "")
    image_path, caption = flickr_pairs[7]
    image = Image.open(image_path).convert("RGB")
    batch = backend.encoder.encode([JudgeRequest(image, [aitqe.prompt(caption)])], [0], 4)
    ours = batch.items[0].full[0]
    reference = aitqe_ids(original["tokenizer"], caption)
    image_id = loaded.model.config.image_token_index
    assert ours == [image_id] * TILE_TOKENS + reference[1:]  # no BOS, no chat template, "\n" "\n" apart
    assert reference[1:3] == original["tokenizer"]("\n").input_ids * 2 != original["tokenizer"]("\n\n").input_ids
    # the <image> id fits inside the head's existing rows: the softmax covers exactly the original rows
    assert image_id < original["lm"].config.vocab_size == loaded.model.config.text_config.vocab_size

    pixels = siglip_pixels(image, pad=False)  # SiglipImageProcessor: square resize, no pad, no crop
    torch.testing.assert_close(batch.processed["pixel_values"], pixels, atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ours]), pixel_values=pixels).logits[0]
    expected = reference_logits(original, reference, pixels)
    assert expected[-1].std() > 0.1
    torch.testing.assert_close(
        torch.log_softmax(logits.double(), -1), torch.log_softmax(expected.double(), -1), atol=1e-4, rtol=0
    )


def test_aitqe_scorer_generates_and_parses(original, converted, flickr_pairs):
    """Greedy generation through the scorer; the row keeps the raw text whether it parses or not."""
    from mlmfilter.core.sample import Sample
    from mlmfilter.judge.aitqe import parse_aitqe
    from mlmfilter.scorers.aitqe import AITQEOptions, AITQEScorer
    from mlmfilter.scorers.base import ScoreFailure

    scorer = AITQEScorer(AITQEOptions(model=str(converted), device="cpu", dtype="fp32", max_new_tokens=6))
    scorer.setup()
    image_path, caption = flickr_pairs[2]
    sample = Sample(uid="u", shard="s", key="k", caption=caption, image=Image.open(image_path).convert("RGB"))
    [row] = scorer.score_batch([sample])
    raw = row.partial["aitqe_raw"] if isinstance(row, ScoreFailure) else row["aitqe_raw"]
    assert isinstance(raw, str)
    assert isinstance(row, ScoreFailure) == (parse_aitqe(raw).overall is None)  # a random model rarely writes a dict
    assert json.dumps(scorer.provenance(), default=str)


def test_aitqe_scorer_answers_greedily_as_the_original(original, converted, flickr_pairs, tmp_path):
    """``mlmfilter score --scorer aitqe`` on a real shard writes the original's greedy answer, token for token:
    the shard's photo decoded as webdataset's pilrgb and resized once by the SigLIP processor, the raw prompt,
    the penultimate layer, greedy search without a cache (HF generate's result, written out)."""
    from mlmfilter import api
    from mlmfilter.runs.read import RunReader
    from tests.support.builders import write_shard
    from tests.support.released import greedy_tokens, pilrgb

    photo, caption = flickr_pairs[9]
    data = photo.read_bytes()
    shard = write_shard(tmp_path / "in" / "00000000.tar", [{"key": "00000009", "jpg": data, "txt": caption}])
    steps = 12
    options = {"model": str(converted), "device": "cpu", "dtype": "fp32", "max_new_tokens": steps}
    api.score([str(shard)], tmp_path / "run", [{"name": "aitqe", "options": options}], decode_workers=0)
    [row] = RunReader(tmp_path / "run").table("00000000", "score").to_pylist()

    tokenizer = original["tokenizer"]
    pixels = siglip_pixels(pilrgb(data), pad=False)
    with torch.no_grad():
        features = original["tower"](pixels, output_hidden_states=True).hidden_states[-2]
        features = mlp(features, original["state"], "mm_projector.0", "mm_projector.2")[0]
    ids = aitqe_ids(tokenizer, caption)
    embed = original["state"]["model.model.embed_tokens.weight"]
    prompt_embeds = torch.cat([features, embed[torch.tensor(ids[1:])]])  # the image span comes first
    eos = {original["lm"].config.eos_token_id, tokenizer.eos_token_id} - {None}
    expected = tokenizer.decode(
        greedy_tokens(original["lm"], prompt_embeds, embed, steps, eos), skip_special_tokens=True
    )
    assert expected.strip()
    assert row["aitqe_raw"] == expected


def test_the_image_size_without_the_tower_files_is_aitqes_own(original, tmp_path):
    """When the SigLIP folder named in vision_model_name_or_path is not on this machine, the image size is
    AITQE's pesudo_img_size: the patch grid alone would say 5 x 14 = 70 px where the processor resizes to 76
    (as so400m's 27 patches come from 384 px, not 378)."""
    import shutil

    from mlmfilter.api import convert_checkpoint
    from mlmfilter.models.vlm import inspect_vlm

    src = tmp_path / "AITQE"
    shutil.copytree(original["src"], src)
    config = json.loads((src / "config.json").read_text())
    config.update(vision_model_name_or_path="/nowhere/siglip-so400m-patch14-384", pesudo_img_size=76)
    (src / "config.json").write_text(json.dumps(config))
    _, out = convert_checkpoint(src, tmp_path / "hf")
    processor = json.loads((out / "processor_config.json").read_text())
    image = processor.get("image_processor", processor)
    assert image["size"] == {"height": 76, "width": 76} == image["crop_size"]
    spec = inspect_vlm(str(out))
    assert spec.image_size == 76
