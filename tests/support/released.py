"""Tiny checkpoints in the ORIGINAL layouts of the released judges, and their forward passes by hand.

Written from the original repositories (Victorwz/LLaVA-Unified ``llava_arch.py``,
``multimodal_projector/builder.py``, ``siglip_encoder.py``, ``mm_utils.py``; hanhuang22/AITQE
``modeling_mm.py``, ``data_processor.py``), never from mlmfilter: weights are named and config
fields set as the original training code saves them, and the reference forward uses the original
tensors directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIGLIP_SIDE, SIGLIP_PATCH = 70, 14  # 5x5 patches: AdaptiveAvgPool2d to 2x2 has overlapping windows (as 27 -> 12)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGE_MARKER = -200  # LLaVA's IMAGE_TOKEN_INDEX


def randomize(module: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Random but not tiny weights: every layer must matter for a 1e-4 comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def tiny_siglip(folder: Path | None, seed: int, hidden: int = 32):
    """A SigLIP vision model (+ the SiglipImageProcessor config google ships) saved to ``folder``."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=SIGLIP_SIDE,
        patch_size=SIGLIP_PATCH,
    )
    model = SiglipVisionModel(config).eval()
    randomize(model, seed, std=0.1)
    if folder is not None:
        model.save_pretrained(folder)
        SiglipImageProcessor(size={"height": SIGLIP_SIDE, "width": SIGLIP_SIDE}, resample=3).save_pretrained(folder)
    return model


def text_model(kind: str, vocab_size: int, seed: int, tie: bool = False, rope_scaling: dict | None = None):
    """A tiny Qwen2 or Llama causal LM with random weights (Llama: optionally Llama-3.2's rope scaling)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072 if rope_scaling else 4096,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
    )
    if kind == "qwen2":
        config = Qwen2Config(**common, rope_theta=1000000.0, use_sliding_window=False)
        model = Qwen2ForCausalLM(config)
    else:
        rope = {"rope_type": "default", "rope_theta": 500000.0}
        if rope_scaling:
            rope = {**rope_scaling, "rope_theta": 500000.0}
        config = LlamaConfig(**common, rope_parameters=rope, bos_token_id=128000, eos_token_id=128001)
        model = LlamaForCausalLM(config)
    randomize(model.eval(), seed)
    return model


def config_fields(model) -> dict:
    """The text model's config as old transformers wrote it (rope fields flat, no v5-only keys)."""
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("rope_parameters", "dtype", "layer_types")}
    rope = dict(model.config.rope_parameters)
    fields["rope_theta"] = float(rope.pop("rope_theta"))
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = rope
    return fields


def save_safetensors(folder: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )


# -- reference preprocessing --------------------------------------------------------------------


def siglip_pixels(image: Image.Image, pad: bool) -> torch.Tensor:
    """LLaVA-Unified process_images: expand2square (mean colour) when pad, then SiglipImageProcessor."""
    if pad:
        background = tuple(int(x * 255) for x in SIGLIP_MEAN)
        width, height = image.size
        side = max(width, height)
        square = Image.new(image.mode, (side, side), background)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    resized = image.resize((SIGLIP_SIDE, SIGLIP_SIDE), Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    array = (array - np.array(SIGLIP_MEAN, dtype=np.float32)) / np.array(SIGLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """llava/mm_utils.py: chunks around <image> encoded apart, a leading BOS kept once."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_MARKER)
        ids.extend(chunk[offset:])
    return ids


def spliced_logits(lm, embed: torch.Tensor, ids: list[int], features: torch.Tensor, marker: int) -> torch.Tensor:
    """prepare_inputs_labels_for_multimodal / _merge_input_ids_with_image_features: text embeddings
    around the marker, the image features in its place, then the language model on inputs_embeds."""
    at = ids.index(marker)
    before = embed[torch.tensor(ids[:at], dtype=torch.long)]
    after = embed[torch.tensor(ids[at + 1 :], dtype=torch.long)]
    inputs_embeds = torch.cat([before, features, after])[None]
    with torch.no_grad():
        return lm(inputs_embeds=inputs_embeds).logits[0]


def aapool(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """AvgPoolProjector's sampler: b (h w) d -> b d h w -> AdaptiveAvgPool2d -> b (h w) d, written out:
    window i covers [floor(i*n/k), ceil((i+1)*n/k)) in each direction."""
    b, length, d = features.shape
    n, k = int(round(length**0.5)), int(round(tokens**0.5))
    grid = features.reshape(b, n, n, d)
    out = torch.empty(b, k, k, d, dtype=features.dtype)
    for i in range(k):
        r0, r1 = (i * n) // k, -(-((i + 1) * n) // k)
        for j in range(k):
            c0, c1 = (j * n) // k, -(-((j + 1) * n) // k)
            out[:, i, j] = grid[:, r0:r1, c0:c1].mean(dim=(1, 2))
    return out.reshape(b, k * k, d)


def mlp(x: torch.Tensor, state: dict, first: str, second: str) -> torch.Tensor:
    x = F.linear(x, state[first + ".weight"], state.get(first + ".bias"))
    return F.linear(F.gelu(x), state[second + ".weight"], state.get(second + ".bias"))


def write_config(folder: Path, fields: dict) -> None:
    (folder / "config.json").write_text(json.dumps(fields, indent=2), encoding="utf-8")


# -- a Llama-3.x tokenizer in its released files -------------------------------------------------------

#: Llama-3's pre-tokenizer split (tokenizer.json of meta-llama/Llama-3.2-3B): numbers in groups of up to 3 digits
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_BASE_VOCAB = 128000  # <|begin_of_text|> is 128000, <|end_of_text|> 128001, ... 256 special tokens
_LLAMA3_NAMED = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}


def llama3_special_tokens() -> list[str]:
    out, reserved = [], 0
    for i in range(256):
        if i in _LLAMA3_NAMED:
            out.append(_LLAMA3_NAMED[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def llama3_tokenizer_files(folder: Path, corpus: list[str], trained_vocab: int = 1200) -> Path:
    """The files a LLaVA-Unified Llama-3.2 checkpoint ships: tokenizer.json (byte-level BPE with Llama-3's
    split, every number 0..999 one token, the 256 special tokens at 128000.., a TemplateProcessing that
    writes <|begin_of_text|>), tokenizer_config.json naming PreTrainedTokenizerFast, the pad token
    train.py sets for version v3. Only the learnt merges are few; ids and special tokens are Llama-3's."""
    import re

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = split
    trainer = trainers.BpeTrainer(
        vocab_size=trained_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    learner.train_from_iterator([re.sub(r"\d", " ", text) for text in corpus], trainer)  # numbers: below
    model = json.loads(learner.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    digits = "0123456789"
    for a in digits:
        for b in digits:
            vocab.setdefault(a + b, len(vocab))
            merges.append((a, b))
    for a in digits:
        for b in digits:
            for c in digits:
                vocab.setdefault(a + b + c, len(vocab))
                merges += [(a + b, c), (a, b + c)]
    filler = 0
    while len(vocab) < LLAMA3_BASE_VOCAB:  # never produced: they only put the special tokens at Llama-3's ids
        vocab[f"<unused{filler}>"] = len(vocab)
        filler += 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = split
    tokenizer.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = specials[0]
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, LLAMA3_BASE_VOCAB)]
            ),
        ]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {
        str(LLAMA3_BASE_VOCAB + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(specials)
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": bos,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 4096,
        "pad_token": "<|finetune_right_pad_id|>",  # train.py, version v3
        "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special_map = {"bos_token": bos, "eos_token": "<|end_of_text|>", "pad_token": "<|finetune_right_pad_id|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return folder


#: Llama-3.2-3B's rope scaling (config.json of meta-llama/Llama-3.2-3B), kept in the LLaVA-Unified config
LLAMA32_ROPE_SCALING = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


# -- what the original scripts do with a photo and a caption --------------------------------------------


def pilrgb(data: bytes) -> Image.Image:
    """webdataset's decode("pilrgb"), as the released scripts read a shard: PIL, full size, RGB."""
    import io

    with io.BytesIO(data) as stream:
        image = Image.open(stream)
        image.load()
        return image.convert("RGB")


def spliced_embeds(ids: list[int], marker: int, features: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """The prompt's token embeddings with the image features in place of its one image marker, as the
    original code builds its ``inputs_embeds``."""
    at = ids.index(marker)
    return torch.cat([embed[torch.tensor(ids[:at])], features, embed[torch.tensor(ids[at + 1 :])]])


def score_distribution(lm, prompt_embeds: torch.Tensor, embed: torch.Tensor, tokenizer, rows: int) -> np.ndarray:
    """log P(s) for s = 0..100 by brute force: the number's own tokens after the prompt, then anything
    but a token that starts with a digit; softmax over the model's first ``rows`` head rows. The prompt
    runs once (HF's own KV cache, as ``generate`` uses it); every number's tokens run after a copy of it."""
    import copy

    vocab = tokenizer.convert_ids_to_tokens(list(range(rows)))
    continuation = torch.tensor([i for i, token in enumerate(vocab) if token and token[0] in "0123456789"])
    answers = {s: number_tokens(tokenizer, s) for s in range(101)}
    with torch.no_grad():
        prompt = lm(inputs_embeds=prompt_embeds[None], use_cache=True)
    first = torch.log_softmax(prompt.logits[0, -1, :rows].double(), dim=-1)
    log_p = np.full(101, -np.inf)
    for k in sorted({len(a) for a in answers.values()}):
        scores = [s for s, a in answers.items() if len(a) == k]
        cache = copy.deepcopy(prompt.past_key_values)
        cache.batch_repeat_interleave(len(scores))
        batch = torch.stack([embed[torch.tensor(answers[s])] for s in scores])
        with torch.no_grad():
            after = torch.log_softmax(lm(inputs_embeds=batch, past_key_values=cache).logits[..., :rows].double(), -1)
        for row, s in enumerate(scores):
            steps = [first] + [after[row, j] for j in range(k)]  # the distribution before each token, then after
            spelled = sum(float(steps[j][t]) for j, t in enumerate(answers[s]))
            log_p[s] = spelled + np.log1p(-float(torch.logsumexp(steps[k][continuation], dim=-1).exp()))
    return log_p


def number_tokens(tokenizer, score: int) -> list[int]:
    """The tokens that write ``score`` after the scripts' space token: its encoding, less a leading
    whitespace-only piece (SentencePiece's dummy prefix "▁": the forced space is already there)."""
    ids = tokenizer(str(score), add_special_tokens=False).input_ids
    while ids and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]
    return ids


def summarize(log_p: np.ndarray) -> dict[str, float]:
    """mass = sum P(s); score = mean of s under P / mass; std its spread."""
    p = np.exp(log_p)
    mass = p.sum()
    q = p / mass
    s = np.arange(101)
    mean = float((q * s).sum())
    return {"score": mean, "mass": float(mass), "std": float(np.sqrt((q * (s - mean) ** 2).sum()))}


def greedy_tokens(lm, prompt_embeds: torch.Tensor, embed: torch.Tensor, steps: int, eos: set[int]) -> list[int]:
    """HF generate's greedy search, written out: the full sequence again at every step, no cache."""
    out: list[int] = []
    sequence = prompt_embeds
    for _ in range(steps):
        with torch.no_grad():
            token = int(lm(inputs_embeds=sequence[None]).logits[0, -1].argmax())
        if token in eos:
            break
        out.append(token)
        sequence = torch.cat([sequence, embed[token][None]])
    return out
