"""Shared by the MLM judge tests: the real SmolLM2 tokenizer, tiny saved models, independent references.

Everything here is built once per test session (module-level caches), so the test files can share it.
The reference helpers deliberately do NOT use mlmfilter.judge: the expected request text is assembled
from the shared reference JSON and literal strings written below, and the brute-force scores come
from the model's plain forward pass.
"""

from __future__ import annotations

import atexit
import functools
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from mlmfilter.models.tiny_vlm import save_tiny_vlm, smollm2_tokenizer

INIT_STD = 0.1  # large enough that every position and attention link moves the logits


def no_mass_floor() -> dict:
    """MLM options that let a tiny random judge score (it puts ~0.02% of its probability on numbers):
    the score-mass floor is off; its own tests test it."""
    return {"min_mass": 0.0}


_SESSION_DIR = Path(tempfile.mkdtemp(prefix="mlmfilter-tiny-vlm-"))
atexit.register(shutil.rmtree, _SESSION_DIR, True)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PLACEHOLDERS = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "idefics3": "<image>"}


@functools.lru_cache(maxsize=1)
def tokenizer(cache_dir: str | None = None):
    return smollm2_tokenizer(cache_dir)


@functools.lru_cache(maxsize=None)
def tiny_model_dir(family: str, cache_dir: str | None = None, seed: int = 0) -> Path:
    """A tiny random model of ``family`` with the real SmolLM2 tokenizer, saved like a hub checkpoint."""
    return save_tiny_vlm(_SESSION_DIR / f"{family}-{seed}", family, tokenizer(cache_dir), seed=seed, init_std=INIT_STD)


def reference_prompt(ref: dict, template: str, metric: str, caption: str) -> str:
    """Reference step 1-2 inputs: the filled template (``aspect`` = metric with spaces)."""
    return ref[f"template_{template}"].format(
        caption=caption, criteria=ref["criteria"][metric], aspect=metric.replace("_", " ")
    )


def reference_request(conversation: str, user_turn: str) -> str:
    """The reference request text (conversation + one whitespace after the assistant cue)."""
    if conversation in ("vicuna_v1", "llama3"):  # SeparatorStyle.TWO, sep " ", empty assistant
        return VICUNA_SYSTEM + " USER: " + user_turn + " ASSISTANT:" + " "
    if conversation == "qwen":  # SeparatorStyle.CHATML
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n" + user_turn + "<|im_end|>\n<|im_start|>assistant\n" + " "
        )
    if conversation == "llava_llama3":  # Llama-3 Instruct chat template, LLaVA system prompt
        system = (
            "You are a helpful language and vision assistant. You are able to understand the visual content "
            "that the user provides, and assist the user with a variety of tasks using natural language."
        )
        return (
            "<|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n" + user_turn + "<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n" + " "
        )
    raise ValueError(conversation)


def collapse_image_tokens(text: str) -> str:
    """Undo the processor's image expansion in decoded text, back to one placeholder."""
    text = re.sub(r"(<image>)+", "<image>", text)
    text = re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", text)
    return re.sub(r"<fake_token_around_image>.*<fake_token_around_image>", "<image>", text, flags=re.S)


class ForwardRecorder:
    """Records the inputs of every call of the backbone (``model.model``): what reaches the model."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self._handle = model.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    def close(self):
        self._handle.remove()


def seen_sequences(prefix_call: dict, block_call: dict, row: int) -> list[list[int]]:
    """Per branch end (a block token whose next column belongs to another branch), the token ids it
    attends to, in order: the row's unpadded prefix, then the block columns its 4D mask allows."""
    prefix_ids = prefix_call["input_ids"][row][prefix_call["attention_mask"][row].bool()].tolist()
    block_ids = block_call["input_ids"][row].tolist()
    positions = block_call["position_ids"]
    positions = positions[0] if positions.dim() == 3 else positions  # M-RoPE: text rows are equal
    real = (positions[row] > 0).tolist()  # padding columns have position 0
    mask = block_call["attention_mask"][row, 0]  # (Lb, prefix width + Lb), 0 = visible
    visible = mask[:, prefix_call["input_ids"].shape[1] :] == 0
    n = sum(real)
    ends = [q for q in range(n) if q + 1 == n or not visible[q + 1, q]]
    return [prefix_ids + [block_ids[c] for c in torch.nonzero(visible[q]).flatten().tolist()] for q in ends]


def brute_force_log_probs(model, processor, text: str, image, sequences, continuation_ids, add_special_tokens=True):
    """log P(s) for s = 0..100 by running the model's ordinary forward on prompt + the tokens of s.

    101 full passes (batched by answer length, no padding):
    sum of log P(token | prefix) + log(1 - P(next token starts with a digit)).
    """
    enc = processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=add_special_tokens)
    base = enc["input_ids"][0].tolist()
    out = np.zeros(len(sequences))
    by_length: dict[int, list[int]] = {}
    for s, seq in enumerate(sequences):
        by_length.setdefault(len(seq), []).append(s)
    cont = torch.tensor(continuation_ids)
    for k, scores in by_length.items():
        ids = torch.tensor([base + list(sequences[s]) for s in scores])
        inputs = {key: value for key, value in enc.items()}
        n = len(scores)
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones_like(ids)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat(
                [enc["mm_token_type_ids"].repeat(n, 1), torch.zeros((n, k), dtype=enc["mm_token_type_ids"].dtype)], 1
            )
        for key in ("pixel_values", "image_grid_thw", "pixel_attention_mask"):
            if key in enc:  # n copies of the one image (Qwen2-VL's 2D patches concatenate along dim 0)
                inputs[key] = enc[key].repeat(n, *([1] * (enc[key].dim() - 1)))
        with torch.no_grad():
            logits = model(**inputs, logits_to_keep=k + 1).logits.float()
        logp = torch.log_softmax(logits, dim=-1)  # (n, k + 1, V): positions L-1 .. L-1+k
        for row, s in enumerate(scores):
            seq = sequences[s]
            total = sum(float(logp[row, j, t]) for j, t in enumerate(seq))
            p_continue = float(torch.logsumexp(logp[row, k, cont], dim=-1).exp())
            out[s] = total + np.log1p(-p_continue)
    return out


def teach_answers(model, processor, texts: list[str], image, answers: list[str], margin: float = 20.0) -> None:
    """Make greedy decoding of ``texts[i]`` write ``answers[i]``: solve the lm_head rows of the answer
    tokens by least squares on the hidden states the model has at each answer position.

    The transformer itself stays random; only the output rows of a few tokens are set, so the hidden
    states (and every code path that computes them) are untouched.
    """
    tok = processor.tokenizer
    answer_ids = [tok.encode(a, add_special_tokens=False) for a in answers]
    targets = sorted({t for ids in answer_ids for t in ids})
    hidden, wanted = [], []
    for text, ids in zip(texts, answer_ids):
        enc = processor(text=[text], images=[[image]], return_tensors="pt")
        length = enc["input_ids"].shape[1]
        enc["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([ids])], 1)
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        if "mm_token_type_ids" in enc:
            extra = torch.zeros((1, len(ids)), dtype=enc["mm_token_type_ids"].dtype)
            enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], extra], 1)
        with torch.no_grad():
            states = model.model(**enc).last_hidden_state[0]
        for j, token in enumerate(ids):
            hidden.append(states[length - 1 + j])
            wanted.append([margin if token == t else -margin for t in targets])
    solution = torch.linalg.lstsq(torch.stack(hidden).float(), torch.tensor(wanted)).solution.T
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[targets] = solution.to(head.dtype)
