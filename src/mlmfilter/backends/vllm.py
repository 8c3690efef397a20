"""vLLM backend for the MLM judge (GPU): offline ``vllm.LLM``, images as multi-modal data, prefix caching.

Everything but the engine call is a plain function tested on CPU (tests/backends/test_backend_vllm_seams.py)
against outputs built in the shape of vLLM's ``RequestOutput`` / ``CompletionOutput`` / ``Logprob``:

- :func:`render_prompt`: the exact prompt text of the transformers backend (same conversation format,
  image placeholder, answer prefix), so vLLM's prefix cache shares image + caption between metrics;
- :func:`step_requests`: one vLLM input per (prompt, trie node): the prompt's token ids plus the node's
  canonical tokens, the image as ``multi_modal_data``;
- :func:`step_reductions`: the returned log-probabilities of the digit-starting tokens -> the
  reductions :class:`~mlmfilter.judge.readout.AdaptiveTrieReadout` takes (log-probs are already
  normalised, so logsumexp = 0), hence the same adaptive rule and the same bound as the transformers
  backend: every P(s) within ``trie_threshold`` of exact, exact when it is 0;
- :func:`map_error`: an engine exception -> a :class:`RequestFailure` for that request only.

:class:`VllmEngine` is the only code that touches vLLM (test marked ``gpu``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.backends.base import BackendInfo, exact_readout_provenance
from mlmfilter.core import errors
from mlmfilter.judge.backend import BackendCapabilities, JudgeRequest, LogprobsMissing, RequestFailure
from mlmfilter.judge.conversations import AUTO, FORMATS, default_answer_prefix, render_with_chat_template
from mlmfilter.judge.readout import ScoreTrie


class VllmOptions(BaseModel):
    """``backend_options`` of ``--backend vllm``."""

    model_config = ConfigDict(extra="forbid")
    #: settings that change speed and memory, not scores: not part of the run's identity
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"gpu_memory_utilization", "max_requests"})

    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    enable_prefix_caching: bool = True
    #: requests handed to ``LLM.generate`` at once (vLLM schedules within them)
    max_requests: int = Field(256, ge=1)


# -- plain functions (CPU-tested) ---------------------------------------------------------------------


def render_prompt(
    prompt: str, conversation: str, answer_prefix: str, image_placeholder: str, processor: Any = None
) -> str:
    """The text the model reads, identical to ``PromptEncoder.prompt_text`` of the transformers backend."""
    if conversation == AUTO:
        if processor is None:
            raise ValueError("conversation 'auto' needs the model's processor (its chat template)")
        text = render_with_chat_template(processor, prompt)
    else:
        text = FORMATS[conversation].render(prompt, image_placeholder)
    return text + answer_prefix


def answer_prefix_for(conversation: str, answer_prefix: str | None) -> str:
    return default_answer_prefix(conversation) if answer_prefix is None else answer_prefix


def step_requests(prompt_ids: Sequence[int], image: Any, nodes: Sequence[int], trie: ScoreTrie) -> list[dict[str, Any]]:
    """vLLM token prompts for trie contexts: -1 is the root (the prompt itself), else a node index."""
    out = []
    for node in nodes:
        path = [] if node < 0 else [trie.nodes[n].token_id for n in trie.ancestors(node)]
        out.append({"prompt_token_ids": list(prompt_ids) + path, "multi_modal_data": {"image": image}})
    return out


def requested_token_ids(trie: ScoreTrie) -> list[int]:
    """What each step asks log-probabilities of: every digit-starting token (the trie tokens are among them)."""
    return sorted(set(trie.continuation_ids) | set(trie.edge_tokens))


def step_reductions(output: Any, trie: ScoreTrie) -> tuple[float, float, list[float]]:
    """One vLLM RequestOutput of a 1-token step -> (lse, log P(continue), logits of the readout's tokens).

    ``output.outputs[0].logprobs[0]`` maps token id -> Logprob(logprob=...). A token the engine did not
    return counts as probability 0 (so a top-k answer can only under-count, never invent mass).
    """
    completion = output.outputs[0]
    if not completion.logprobs:
        raise LogprobsMissing("the engine returned no log-probabilities")
    step = completion.logprobs[0]
    logprob = {int(t): float(getattr(v, "logprob", v)) for t, v in step.items()}
    cont = [logprob[t] for t in trie.continuation_ids if t in logprob]
    log_continue = float(np.logaddexp.reduce(cont)) if cont else -math.inf
    tokens = sorted(set(trie.edge_tokens))
    return 0.0, min(log_continue, 0.0), [logprob.get(t, -math.inf) for t in tokens]


def map_error(exc: BaseException) -> RequestFailure:
    """An engine exception for one request -> its failure record (the other requests go on)."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "too long" in lowered or "max_model_len" in lowered or "maximum context" in lowered:
        return RequestFailure(errors.CAPTION_TOO_LONG, text)  # the encoder's code for an over-long prompt
    return RequestFailure(errors.SCORER_ERROR, text)


def expected_log_probs(request_outputs, trie: ScoreTrie, threshold: float, run_step) -> np.ndarray:
    """(prompts, 101) log P(s) with the adaptive trie.

    ``request_outputs``: the root step per prompt (RequestOutput, with ``prompt_token_ids``).
    ``run_step(list of (row, node)) -> list of RequestOutput``: one 1-token step per trie node.
    """
    import torch

    from mlmfilter.judge.readout import AdaptiveTrieReadout

    readout = AdaptiveTrieReadout(trie, len(request_outputs), threshold)
    for row, output in enumerate(request_outputs):
        lse, cont, toks = step_reductions(output, trie)
        readout.add([row], [0], torch.tensor([lse]), torch.tensor([cont]), torch.tensor([toks]))
    while True:
        wanted = [(row, node) for row, nodes in enumerate(readout.to_expand()) for node in nodes]
        if not wanted:
            break
        for (row, node), output in zip(wanted, run_step(wanted)):
            lse, cont, toks = step_reductions(output, trie)
            readout.add([row], [node + 1], torch.tensor([lse]), torch.tensor([cont]), torch.tensor([toks]))
    return readout.log_probs().double().numpy()


def refuse_pooled_projector(model: str) -> None:
    """The pooled-projector judges (LLaVA-Unified's ``aapool_mlp``: the released Qwen2.5-1.5B and
    Llama-3.2-3B layouts, original or converted) are refused with the reason and the backend that
    runs them. vLLM implements llava-hf's LlavaForConditionalGeneration (the 13B and 8B layouts once
    converted), not this package's pooled variant; its config.json says which one ``model`` is (read
    from the folder or the hub cache: nothing else is fetched)."""
    from mlmfilter.judge.registry import SOURCE_KEY, read_config
    from mlmfilter.models.pooled_llava import MODEL_TYPE as POOLED_MODEL_TYPE

    config = read_config(model) or {}
    source = config.get(SOURCE_KEY) if isinstance(config.get(SOURCE_KEY), dict) else config
    if config.get("model_type") == POOLED_MODEL_TYPE or source.get("mm_projector_type") == "aapool_mlp":
        raise ValueError(
            f"--backend vllm cannot run {model}: its projector average-pools the vision features "
            "(LLaVA-Unified's aapool_mlp, the layout of the released Qwen2.5-1.5B and Llama-3.2-3B judges), "
            "an architecture vLLM does not implement. Score it with --backend transformers (the default; "
            "batched, prefix-sharing, on GPU or CPU); vllm runs the llava-hf layouts (the 13B and 8B judges)."
        )


# -- the engine call (GPU) ----------------------------------------------------------------------------


class VllmEngine:
    """The one class that imports vLLM: builds ``vllm.LLM`` and runs lists of inputs."""

    def __init__(self, model: str, options: VllmOptions, token_ids: Sequence[int]):
        from vllm import LLM, SamplingParams

        self.llm = LLM(
            model=model,
            dtype=options.dtype,
            gpu_memory_utilization=options.gpu_memory_utilization,
            tensor_parallel_size=options.tensor_parallel_size,
            max_model_len=options.max_model_len,
            enable_prefix_caching=options.enable_prefix_caching,
            limit_mm_per_prompt={"image": 1},
        )
        fields = getattr(SamplingParams, "__struct_fields__", ())
        if "logprob_token_ids" in fields:  # exactly the digit tokens
            self.step_params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids))
        else:  # older vLLM: the whole vocabulary
            self.step_params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1)
        self._sampling = SamplingParams

    def step(self, inputs: list[dict[str, Any]]):
        return self.llm.generate(inputs, self.step_params, use_tqdm=False)

    def greedy(self, inputs: list[dict[str, Any]], max_new_tokens: int, stop: Sequence[str] = ()):
        params = self._sampling(max_tokens=max_new_tokens, temperature=0.0, stop=list(stop) or None)
        return self.llm.generate(inputs, params, use_tqdm=False)

    def tokenizer(self):
        return self.llm.get_tokenizer()

    def close(self) -> None:
        del self.llm


class VllmJudgeBackend:
    """The JudgeBackend on vLLM. ``engine`` is injectable (tests give a CPU stand-in with vLLM's output types)."""

    def __init__(
        self,
        model: str,
        tokenizer: Any,
        processor: Any,
        image_placeholder: str,
        conversation: str,
        answer_prefix: str | None,
        trie_threshold: float,
        engine: Any,
        image_size: int | None = None,
        options: VllmOptions | None = None,
    ):
        self.model = model
        self.processor = processor
        self.conversation = conversation
        self.answer_prefix = answer_prefix_for(conversation, answer_prefix)
        self.image_placeholder = image_placeholder
        self.trie_threshold = float(trie_threshold)
        self.trie = ScoreTrie.from_tokenizer(tokenizer)
        self.engine = engine
        self.image_size = image_size
        self.options = options or VllmOptions()

    @property
    def capabilities(self) -> BackendCapabilities:
        # log-probabilities of exactly the digit tokens at every trie step: exact up to trie_threshold
        return BackendCapabilities("exact", self.image_size, self.options.max_requests)

    def prompt_text(self, prompt: str) -> str:
        return render_prompt(prompt, self.conversation, self.answer_prefix, self.image_placeholder, self.processor)

    def _inputs(self, request: JudgeRequest) -> list[dict[str, Any]]:
        return [{"prompt": self.prompt_text(p), "multi_modal_data": {"image": request.image}} for p in request.prompts]

    def score_distributions(self, requests: Sequence[JudgeRequest]) -> list[np.ndarray | RequestFailure]:
        """All prompts of a chunk of requests in each engine call (vLLM batches and shares cached
        prefixes); a chunk the engine rejects is redone request by request, so a failure stays with its request."""
        results: list[Any] = []
        per_chunk = max(1, self.options.max_requests // max(1, max((len(r.prompts) for r in requests), default=1)))
        for start in range(0, len(requests), per_chunk):
            chunk = list(requests[start : start + per_chunk])
            try:
                results.extend(self._expected_chunk(chunk))
            except LogprobsMissing:
                raise
            except Exception:  # noqa: BLE001 - find the request that sank the chunk
                for request in chunk:
                    try:
                        results.extend(self._expected_chunk([request]))
                    except LogprobsMissing:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        results.append(map_error(exc))
        return results

    def _expected_chunk(self, chunk: list[JudgeRequest]) -> list[np.ndarray]:
        inputs = [inp for request in chunk for inp in self._inputs(request)]
        images = [request.image for request in chunk for _ in request.prompts]
        roots = self.engine.step(inputs)

        def run_step(wanted):
            return self.engine.step(
                [step_requests(roots[row].prompt_token_ids, images[row], [node], self.trie)[0] for row, node in wanted]
            )

        log_probs = expected_log_probs(roots, self.trie, self.trie_threshold, run_step)
        out, row = [], 0
        for request in chunk:
            out.append(log_probs[row : row + len(request.prompts)])
            row += len(request.prompts)
        return out

    def generate(
        self, requests: Sequence[JudgeRequest], max_new_tokens: int | None = None
    ) -> list[list[str] | RequestFailure]:
        steps = int(max_new_tokens or self.trie.max_new_tokens)
        results: list[Any] = []
        for request in requests:
            try:
                outputs = self.engine.greedy(self._inputs(request), steps)
                results.append([o.outputs[0].text for o in outputs])
            except Exception as exc:  # noqa: BLE001
                results.append(map_error(exc))
        return results

    def describe(self) -> dict[str, Any]:
        fmt = FORMATS.get(self.conversation)
        return {
            "backend": "vllm",
            "model": self.model,
            "conversation": fmt.describe() if fmt else {"name": AUTO, "source": "the processor's chat template"},
            "answer_prefix": self.answer_prefix,
            "image_placeholder": self.image_placeholder,
            "prefix_caching": self.options.enable_prefix_caching,
            "distribution": "exact log-probabilities of the digit-starting tokens per trie step",
            **self.readout_provenance(),
            "options": self.options.model_dump(),
        }

    def readout_provenance(self) -> dict[str, str]:
        return exact_readout_provenance(self.trie_threshold)

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()


# -- the description ----------------------------------------------------------------------------------


class VllmBackendInfo(BackendInfo):
    name = "vllm"
    Options = VllmOptions
    distribution = "exact"  # log-probabilities of exactly the digit tokens at every trie step
    runs_in_process = True

    def wants_gpu(self, options: Any) -> bool:
        return True  # vLLM runs on GPUs, whatever ``device`` says

    def check(self, options: Any) -> None:
        """Refuse, before anything is downloaded or converted, a judge vLLM has no architecture for."""
        refuse_pooled_projector(options.model)

    def image_size(self, options: Any) -> int:
        from mlmfilter.models.vlm import inspect_vlm

        return inspect_vlm(options.model, options.allow_random_fallback, options.max_image_pixels).decode_side

    def describe_settings(self, options: Any) -> dict[str, Any]:
        # before the engine starts: the model as its config files describe it, in the transformers
        # backend's words (its "backend" key included), as runs recorded it so far: their fingerprints still match
        from mlmfilter.backends.transformers import INFO as TRANSFORMERS

        return TRANSFORMERS.describe_settings(options)

    def readout_provenance(self, options: Any) -> dict[str, str]:
        return exact_readout_provenance(options.trie_threshold)

    def build(self, options: Any, released: Any = None) -> VllmJudgeBackend:
        from transformers import AutoProcessor

        from mlmfilter.models.common import safe_pretrained_kwargs
        from mlmfilter.models.vlm import inspect_vlm

        settings = self.settings(options)
        spec = inspect_vlm(options.model, False, options.max_image_pixels)
        processor = AutoProcessor.from_pretrained(options.model, **safe_pretrained_kwargs())
        trie = ScoreTrie.from_tokenizer(processor.tokenizer)
        engine = VllmEngine(options.model, settings, requested_token_ids(trie))
        return VllmJudgeBackend(
            options.model,
            processor.tokenizer,
            processor,
            spec.family.image_placeholder,
            options.conversation,
            options.answer_prefix,
            options.trie_threshold,
            engine,
            image_size=spec.decode_side,
            options=settings,
        )


INFO = VllmBackendInfo()
