"""The vLLM backend's plain functions on CPU: prompt text identical to the transformers backend's, the
adaptive trie over log-probabilities in vLLM's output types equal to brute force (exact at threshold 0,
within the threshold otherwise), failures per request, a refusal when no log-probabilities come back.

The engine is a stand-in that runs a tiny real causal LM (SmolLM2 tokenizer) and answers with objects
mirroring vLLM's RequestOutput / CompletionOutput / Logprob fields; the real engine call is tested
only where vLLM and CUDA exist (``gpu`` marker)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mlmfilter.backends.vllm import (
    LogprobsMissing,
    VllmJudgeBackend,
    render_prompt,
    requested_token_ids,
    step_reductions,
)
from mlmfilter.core import errors
from mlmfilter.judge.backend import JudgeRequest, RequestFailure
from mlmfilter.judge.prompts import resolve_template
from mlmfilter.judge.readout import ScoreTrie

METRICS = ["image_text_matching", "object_detail_fulfillment"]


# -- stand-ins with vLLM's field names (vllm.logprobs.Logprob, vllm.outputs.CompletionOutput/RequestOutput)
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = "length"


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class TinyEngine:
    """Answers 1-token steps with the exact log-probs of the requested tokens, like logprob_token_ids."""

    model: Any
    tokenizer: Any
    token_ids: list[int]
    with_logprobs: bool = True
    fail_on: str | None = None
    calls: list[int] = field(default_factory=list)

    def _ids(self, inp):
        if "prompt_token_ids" in inp:
            return list(inp["prompt_token_ids"])
        if self.fail_on and self.fail_on in inp["prompt"]:
            raise RuntimeError("input too long for max_model_len")
        return self.tokenizer(inp["prompt"]).input_ids

    def step(self, inputs):
        self.calls.append(len(inputs))
        out = []
        for n, inp in enumerate(inputs):
            ids = self._ids(inp)
            with torch.no_grad():
                logp = torch.log_softmax(self.model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].double(), -1)
            top = int(logp.argmax())
            lp = {t: Logprob(float(logp[t])) for t in self.token_ids} if self.with_logprobs else None
            out.append(
                RequestOutput(
                    str(n), inp.get("prompt"), ids, [CompletionOutput(0, "", [top], None, [lp] if lp else None)]
                )
            )
        return out

    def greedy(self, inputs, max_new_tokens, stop=()):
        out = []
        for n, inp in enumerate(inputs):
            ids = torch.tensor([self._ids(inp)])
            gen = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :]
            text = self.tokenizer.decode(gen, skip_special_tokens=True)
            out.append(
                RequestOutput(
                    str(n), inp.get("prompt"), ids[0].tolist(), [CompletionOutput(0, text, gen.tolist(), None, None)]
                )
            )
        return out


@pytest.fixture(scope="module")
def tokenizer(smollm2_cache_dir):
    from mlmfilter.models.tiny_vlm import smollm2_tokenizer

    return smollm2_tokenizer(smollm2_cache_dir)


@pytest.fixture(scope="module")
def lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper than init so the digits carry real, uneven mass
        model.lm_head.weight.mul_(40)
    return model


def _backend(tokenizer, engine, threshold=0.0):
    return VllmJudgeBackend("tiny", tokenizer, None, "<image>", "vicuna_v1", None, threshold, engine)


def _requests(flickr_pairs, n=2):
    tpl = resolve_template("v2")
    return [
        JudgeRequest(Image.open(p).convert("RGB"), [tpl.render(m, c) for m in METRICS]) for p, c in flickr_pairs[:n]
    ]


def _brute_force(lm, tokenizer, prompt_text):
    trie = ScoreTrie.from_tokenizer(tokenizer)
    ids = tokenizer(prompt_text).input_ids
    cont = torch.tensor(trie.continuation_ids)
    out = []
    for seq in trie.sequences:
        with torch.no_grad():  # logits at the last prompt token and after each score token
            logp = torch.log_softmax(
                lm(torch.tensor([ids + list(seq)]), logits_to_keep=len(seq) + 1).logits[0].double(), -1
            )
        path = sum(float(logp[k, t]) for k, t in enumerate(seq))
        stop = math.log1p(-float(torch.exp(torch.logsumexp(logp[-1, cont], 0))))
        out.append(path + stop)
    return np.array(out)


def test_prompt_text_equals_transformers_backend(smollm2_cache_dir, flickr_pairs):
    from mlmfilter.backends.transformers import TransformersJudgeBackend
    from mlmfilter.models.vlm import load_vlm
    from tests.support import mlm as mlm_support

    loaded = load_vlm(str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir)), device="cpu", dtype="fp32")
    for conversation in ("vicuna_v1", "llava_llama3", "auto"):
        reference = TransformersJudgeBackend(loaded, conversation)
        for prompt in _requests(flickr_pairs, 1)[0].prompts:
            ours = render_prompt(
                prompt, conversation, reference.answer_prefix, loaded.spec.family.image_placeholder, loaded.processor
            )
            assert ours == reference.prompt_text(prompt)


def test_expected_exact_at_threshold_zero(lm, tokenizer, flickr_pairs):
    trie = ScoreTrie.from_tokenizer(tokenizer)
    engine = TinyEngine(lm, tokenizer, requested_token_ids(trie))
    backend = _backend(tokenizer, engine, threshold=0.0)
    requests = _requests(flickr_pairs, 1)
    requests[0].prompts = requests[0].prompts[:1]  # 111 engine steps + 101 brute-force passes: one prompt
    (log_probs,) = backend.score_distributions(requests)
    assert log_probs.shape == (1, 101)
    for row, prompt in enumerate(requests[0].prompts):
        exact = _brute_force(lm, tokenizer, backend.prompt_text(prompt))
        np.testing.assert_allclose(np.exp(log_probs[row]), np.exp(exact), atol=1e-6)
    assert sum(engine.calls) == trie.n_contexts  # every node computed


def test_adaptive_within_threshold_and_cheaper(lm, tokenizer, flickr_pairs):
    trie = ScoreTrie.from_tokenizer(tokenizer)
    exact_engine = TinyEngine(lm, tokenizer, requested_token_ids(trie))
    engine = TinyEngine(lm, tokenizer, requested_token_ids(trie))
    requests = _requests(flickr_pairs, 1)
    (exact,) = _backend(tokenizer, exact_engine, 0.0).score_distributions(requests)
    (approx,) = _backend(tokenizer, engine, 0.05).score_distributions(requests)
    assert np.max(np.abs(np.exp(approx) - np.exp(exact))) < 0.05
    assert sum(engine.calls) < sum(exact_engine.calls)
    described = _backend(tokenizer, engine, 0.05).describe()
    assert described["backend"] == "vllm" and "within 0.05" in described["readout_bound"]


def test_failure_stays_with_its_request(lm, tokenizer, flickr_pairs):
    trie = ScoreTrie.from_tokenizer(tokenizer)
    requests = _requests(flickr_pairs, 2)
    poison = flickr_pairs[1][1]  # the second pair's caption
    engine = TinyEngine(lm, tokenizer, requested_token_ids(trie), fail_on=poison)
    first, second = _backend(tokenizer, engine, 0.01).score_distributions(requests)
    assert isinstance(first, np.ndarray) and isinstance(second, RequestFailure)
    assert second.reason == errors.CAPTION_TOO_LONG and "max_model_len" in second.detail


def test_no_logprobs_is_refused(lm, tokenizer, flickr_pairs):
    trie = ScoreTrie.from_tokenizer(tokenizer)
    engine = TinyEngine(lm, tokenizer, requested_token_ids(trie), with_logprobs=False)
    with pytest.raises(LogprobsMissing):
        _backend(tokenizer, engine).score_distributions(_requests(flickr_pairs, 1))


def test_top_k_answer_only_undercounts(tokenizer):
    trie = ScoreTrie.from_tokenizer(tokenizer)
    first = trie.nodes[0].token_id
    output = RequestOutput("0", "p", [1], [CompletionOutput(0, "", [first], None, [{first: Logprob(-0.5)}])])
    lse, cont, toks = step_reductions(output, trie)
    assert lse == 0.0 and cont == pytest.approx(-0.5)
    assert sum(1 for t in toks if math.isfinite(t)) == 1


def test_generate_returns_texts(lm, tokenizer, flickr_pairs):
    trie = ScoreTrie.from_tokenizer(tokenizer)
    engine = TinyEngine(lm, tokenizer, requested_token_ids(trie))
    (texts,) = _backend(tokenizer, engine).generate(_requests(flickr_pairs, 1), max_new_tokens=3)
    assert len(texts) == len(METRICS) and all(isinstance(t, str) for t in texts)


@pytest.mark.gpu
def test_vllm_engine_on_gpu(tokenizer):
    vllm = pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from mlmfilter.backends.vllm import VllmEngine, VllmOptions

    trie = ScoreTrie.from_tokenizer(tokenizer)
    engine = VllmEngine(
        "HuggingFaceTB/SmolVLM-256M-Instruct", VllmOptions(gpu_memory_utilization=0.3), requested_token_ids(trie)
    )
    (out,) = engine.step([{"prompt": "The answer is", "multi_modal_data": {"image": Image.new("RGB", (64, 64))}}])
    assert out.outputs[0].logprobs and out.prompt_token_ids
    assert vllm is not None


def test_scorer_option_and_provenance(lm, tokenizer, flickr_pairs):
    from pydantic import ValidationError

    from mlmfilter.core.sample import Sample
    from mlmfilter.scorers.mlm import MLMOptions, MLMScorer

    with pytest.raises(ValidationError, match="gpu_memory_utilisation"):
        MLMOptions(backend="vllm", backend_options={"gpu_memory_utilisation": 0.5})  # a typo is refused by name
    with pytest.raises(ValidationError, match="takes no backend_options"):
        MLMOptions(backend_options={"tensor_parallel_size": 2})
    options = MLMOptions(
        model="tiny",
        metrics="itm",
        conversation="vicuna_v1",
        backend="vllm",
        backend_options={"tensor_parallel_size": 2},
        trie_threshold=0.05,
        min_mass=0.0,  # a tiny random LM puts almost nothing on numbers; the floor is not tested here
    )
    assert options.backend_options["tensor_parallel_size"] == 2
    trie = ScoreTrie.from_tokenizer(tokenizer)
    backend = _backend(tokenizer, TinyEngine(lm, tokenizer, requested_token_ids(trie)), 0.05)
    scorer = MLMScorer(options, backend=backend)
    path, caption = flickr_pairs[0]
    sample = Sample(uid="0" * 32, shard="s", key="k", caption=caption, image=Image.open(path).convert("RGB"))
    (row,) = scorer.score_batch([sample])
    assert 0 <= row["itm"] <= 100 and 0 < row["itm_mass"] <= 1
    prov = scorer.provenance()
    assert prov["model"]["backend"] == "vllm" and prov["readout_bound"] == backend.describe()["readout_bound"]
