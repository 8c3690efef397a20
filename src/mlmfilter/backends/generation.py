"""Caption generation: image + prompt + sampling parameters + stop strings -> text.

The judge backend (:mod:`mlmfilter.backends.transformers`) is built to read a few score tokens; writing a
100-token caption is a different job, so it has its own narrow interface, :class:`CaptionGenerator`:
one :class:`GenerationRequest` (image, user prompt) in, ``n`` texts out, or a
:class:`~mlmfilter.judge.backend.RequestFailure` in its place that never sinks its batch mates.
A vLLM or OpenAI-compatible server backend implements the same two methods.

:class:`TransformersCaptionGenerator` runs the model's own KV-cached ``generate`` on micro-batches
of requests. Prompts are put into the conversation format (the processor's chat template for
``auto``, or one of the reference formats) and processed by the model's own processor with LEFT
padding, so every row's last prompt token sits in the last column and its new tokens follow
directly; transformers derives the positions (Qwen2-VL's M-RoPE included) from the attention mask.
Greedy outputs therefore do not depend on batch mates (tested against one-by-one generation on
tiny LLaVA, Qwen2-VL and Idefics3 models). Sampled outputs are seeded per micro-batch: the same
requests in the same order give the same texts.

The prompt's token ids are the judge's own (:class:`~mlmfilter.models.vlm_encoding.PromptEncoder`):
the same conversation formats, chunk-wise tokenization of the reference formats (LLaVA's
``tokenizer_image_token``, AITQE's newline after the image), the processor's image expansion spliced
in, and the same pixel budget; a prompt too long for ``max_length`` with its new tokens is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.core import errors
from mlmfilter.judge.backend import JudgeRequest, RequestFailure
from mlmfilter.judge.conversations import AUTO, FORMATS, validate_conversation
from mlmfilter.models.vlm import LoadedVlm, vlm_provenance
from mlmfilter.models.vlm_encoding import TEXT_INPUT_KEYS, PromptEncoder

log = logging.getLogger(__name__)


class SamplingParams(BaseModel):
    """How to decode. ``temperature == 0`` is greedy (``top_p``/``top_k``/``seed`` unused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=96, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    #: texts per request (several candidates need temperature > 0 to differ)
    n: int = Field(default=1, ge=1)
    seed: int = 0
    #: generation of a text ends at the first of these; the stop string itself is cut off
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Generated:
    """One generated text and why it ended: ``stop`` (end of sequence or a stop string) or ``length``
    (``max_new_tokens`` reached: the text is cut off), as vLLM and OpenAI servers report it."""

    text: str
    finish_reason: str
    new_tokens: int

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class GenerationRequest:
    image: Image.Image
    prompt: str  # the user's text, without image placeholder or conversation format


@runtime_checkable
class CaptionGenerator(Protocol):
    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[list[Generated] | RequestFailure]:
        """Per request ``params.n`` texts (special tokens removed, cut at stop strings, stripped)."""

    def describe(self) -> dict[str, Any]:
        """Provenance: backend, model, conversation format."""


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if 0 <= at < end:
                end = at
    return text[:end]


class TransformersCaptionGenerator:
    """:class:`CaptionGenerator` over a model loaded by :func:`mlmfilter.models.vlm.load_vlm`."""

    def __init__(self, loaded: LoadedVlm, conversation: str = AUTO, batch_size: int = 8, max_length: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.family = loaded.spec.family
        self.conversation = validate_conversation(conversation)
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length or loaded.spec.max_positions)
        # the judge's prompt rendering and image budget, so a prompt reads the same in both
        self.encoder = PromptEncoder(
            self.processor, self.family, self.conversation, "", loaded.spec.pixel_budget, self.max_length
        )
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        fmt = FORMATS.get(self.conversation)
        self.format_stops = (fmt.stop,) if fmt else ()

    # -- CaptionGenerator ---------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[list[Generated] | RequestFailure]:
        results: list[Any] = [None] * len(requests)
        # similar prompt lengths share a micro-batch: little padding
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, output in zip(chunk, self._generate_isolated([requests[i] for i in chunk], params)):
                results[i] = output
        return results

    def describe(self) -> dict[str, Any]:
        prov = vlm_provenance(
            self.loaded.spec, self.conversation, "", self.loaded.device, self.loaded.dtype, self.max_length
        )
        prov.update({"backend": "transformers-generate", "padding": "left (positions from the attention mask)"})
        for key in ("answer_prefix", "image_encoded_once_per_pair", "prefix_kv_shared"):
            prov.pop(key, None)
        return prov

    # -- running ------------------------------------------------------------------------------------

    def _generate_isolated(
        self, chunk: list[GenerationRequest], params: SamplingParams
    ) -> list[list[Generated] | RequestFailure]:
        """One micro-batch; when it fails as a whole, each request alone, so a bad one fails alone."""
        from mlmfilter.core.errors import is_infrastructure_failure

        try:
            return self._generate_chunk(chunk, params)
        except Exception as exc:
            if is_infrastructure_failure(exc):  # out of memory, a lost device: the shard fails and is retried
                raise
            if len(chunk) == 1:
                log.debug("generation failed", exc_info=True)
                return [RequestFailure(errors.SCORER_ERROR, f"generation: {type(exc).__name__}: {exc}")]
            log.warning("generation batch of %d failed (%s); retrying one by one", len(chunk), exc)
            return [out for item in chunk for out in self._generate_isolated([item], params)]

    def _generate_chunk(
        self, chunk: list[GenerationRequest], params: SamplingParams
    ) -> list[list[Generated] | RequestFailure]:
        outputs: list[Any] = [None] * len(chunk)
        judge_requests = [JudgeRequest(r.image, [r.prompt]) for r in chunk]
        batch = self.encoder.encode(judge_requests, list(range(len(chunk))), params.max_new_tokens)
        for j, failure in batch.failures.items():
            outputs[j] = failure
        if not batch.items:
            return outputs
        if len(batch.items) != int(batch.processed["input_ids"].shape[0]):
            # a request failed after the processor ran: its vision rows would still be in the batch
            rest = [item.position for item in batch.items]
            for j, out in zip(rest, self._generate_chunk([chunk[j] for j in rest], params)):
                outputs[j] = out
            return outputs
        inputs = self._left_padded(batch)
        width = inputs["input_ids"].shape[1]
        with torch.inference_mode(), torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(params.seed)
            sequences = self.model.generate(**inputs, **self._generate_kwargs(params))
        new_tokens = sequences[:, width:].cpu()
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        stops = (*params.stop, *self.format_stops)
        eos = torch.tensor(self._eos_ids())
        texts = []
        for ids, text in zip(new_tokens, decoded):
            ended = torch.isin(ids, eos).nonzero()
            n = int(ended[0, 0]) + 1 if len(ended) else len(ids)
            cut = cut_at_stop(text, stops)
            finished = bool(len(ended)) or len(cut) < len(text) or n < params.max_new_tokens
            texts.append(Generated(cut.strip(), "stop" if finished else "length", n))
        for row, item in enumerate(batch.items):  # generate returns a prompt's n sequences side by side
            outputs[item.position] = texts[row * params.n : (row + 1) * params.n]
        return outputs

    def _left_padded(self, batch) -> dict[str, torch.Tensor]:
        """The exact prompt ids (image tokens expanded) left-padded, and the processor's vision inputs."""
        ids = [item.full[0] for item in batch.items]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            attention[row, width - len(seq) :] = 1
        device = self.loaded.device
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
        if "mm_token_type_ids" in batch.processed:  # Qwen2-VL's M-RoPE: 1 marks image tokens
            inputs["mm_token_type_ids"] = (input_ids == self.encoder.image_token_id).long().to(device)
        for key, value in batch.processed.items():
            if key in inputs or key in TEXT_INPUT_KEYS or not isinstance(value, torch.Tensor):
                continue
            value = value.to(device)
            inputs[key] = value.to(self.loaded.dtype) if value.is_floating_point() else value
        return inputs

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        from transformers import GenerationConfig

        sampling = dict(do_sample=False)
        if not params.greedy:
            sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            repetition_penalty=params.repetition_penalty,
            pad_token_id=self.pad_id,
            eos_token_id=self._eos_ids(),
            stop_strings=list(params.stop) or None,
            **sampling,
        )
        kwargs: dict[str, Any] = {"generation_config": config}
        if params.stop:
            kwargs["tokenizer"] = self.tokenizer  # stop strings are matched on decoded text
        return kwargs

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        config = getattr(self.model, "generation_config", None)
        for source in (getattr(config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if source is not None:
                ids.update(source if isinstance(source, (list, tuple)) else [source])
        return sorted(int(i) for i in ids)

    def _rng_devices(self) -> list:
        device = self.loaded.device
        return [device.index or 0] if device.type == "cuda" else []


def load_caption_generator(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    conversation: str = AUTO,
    batch_size: int = 8,
    max_length: int | None = None,
    allow_random_fallback: bool = False,
    max_image_pixels: int | None = None,
) -> TransformersCaptionGenerator:
    """A transformers generator for ``model`` (hub id or path), loaded by the judge's loader."""
    from mlmfilter.models.vlm import load_vlm

    loaded = load_vlm(model, device, dtype, allow_random_fallback, max_image_pixels)
    return TransformersCaptionGenerator(loaded, conversation, batch_size, max_length)
