"""Transformers backend for the MLM judge: any supported image-text-to-text model by hub id or path.

Loading: :func:`inspect_vlm` reads config files only (family, image size, limits: what the pipeline
and provenance need before any weights); :func:`load_vlm` loads ``AutoModelForImageTextToText`` and
``AutoProcessor``. With ``allow_random_fallback`` an unavailable model is replaced by a tiny random
model of the family its name suggests (:mod:`mlmfilter.models.tiny_vlm`), loudly.

Serving (:class:`TransformersJudgeBackend`, the :class:`~mlmfilter.judge.backend.JudgeBackend` of
this package), per micro-batch of pairs:

1. each prompt is put into the conversation format and tokenized; the processor runs ONCE per pair
   (on the first prompt) and its expansion of the image placeholder is spliced into the token ids of
   every other prompt (checked against the processor's own output for the first prompt);
2. the image is encoded ONCE (``get_image_features``) and its features are reused for all prompts;
3. the shared prefix (the longest common prefix of the token ids of the pair's prompts: system,
   image, caption ...) is run ONCE and its KV cache is reused by every prompt;
4. one more forward runs, for every prompt, the tokens after the prefix followed by the score trie
   (``expected``: every node whose logits P(s) needs) with a 4D attention mask (each token sees the
   prefix, its own branch and its trie ancestors) and explicit position ids; ``generate`` runs the
   branches and then greedy steps, one token per prompt per step, on the same cache.

Position ids are explicit everywhere, so right padding and tree layout never shift a pair's positions:
a pair's scores do not depend on its batch mates (up to float rounding). Qwen2-VL's M-RoPE gets its
3D prefix positions from the model's own ``get_rope_index``; text after the image advances all three
components together, so the branches and trie use ``last prefix position + 1 + offset``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from mlmfilter import errors
from mlmfilter.judge.backend import JudgeRequest, RequestFailure
from mlmfilter.judge.conversations import AUTO, FORMATS, default_answer_prefix, render_with_chat_template, validate_conversation
from mlmfilter.judge.readout import ScoreTrie, UnsupportedTokenizerError
from mlmfilter.models.common import (
    ModelUnavailableError,
    dtype_name,
    library_versions,
    model_source,
    resolve_device,
    resolve_dtype,
    unavailable_message,
)
from mlmfilter.models.vlm_families import VlmFamily, family_for_model_type, guess_family, image_only_processor_class

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = "WARNING: random weights, MLM judge scores are meaningless"
_RANDOM_SEED = 0
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"})
#: logits rows per lm_head call when reading out the trie (bounds memory for 128k-token vocabularies)
_LOGIT_CHUNK = 512


# -- inspecting and loading -------------------------------------------------------------------------


@dataclass(frozen=True)
class VlmSpec:
    """What is known from config files alone."""

    name: str
    family: VlmFamily
    model_type: str
    architecture: str
    image_size: int  # shorter side the pipeline decodes to
    pixel_budget: int | None  # larger images are downscaled before the processor
    max_positions: int  # text model context length
    source: dict[str, Any]
    is_random: bool = False


@functools.lru_cache(maxsize=16)
def inspect_vlm(name_or_path: str, allow_random_fallback: bool = False, max_image_pixels: int | None = None) -> VlmSpec:
    """Read config files only (cached per process). Raises ModelUnavailableError unless falling back."""
    from transformers import AutoConfig, AutoImageProcessor

    try:
        config = AutoConfig.from_pretrained(name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    except ValueError as exc:  # a config transformers does not know, e.g. an original LLaVA checkpoint
        raise ValueError(
            f"{name_or_path!r} is not a transformers image-text-to-text model ({str(exc).splitlines()[0]}). "
            "Original LLaVA-layout checkpoints (the MLM-Filter LLaVA judges) must first be converted: "
            "`mlmfilter convert-llava SRC DST`."
        ) from exc
    except OSError as exc:  # transformers' word for "not local, not cached, not downloadable"
        if not allow_random_fallback:
            raise ModelUnavailableError(unavailable_message(name_or_path, exc)) from exc
        log.warning(
            "%s -- allow_random_fallback is set: using a tiny RANDOM %s judge instead",
            unavailable_message(name_or_path, exc),
            guess_family(name_or_path).name,
        )
        return _random_spec(name_or_path, max_image_pixels)
    family = family_for_model_type(config.model_type)
    return _spec(name_or_path, config, image_processor, family, model_source(name_or_path), max_image_pixels)


def _spec(name, config, image_processor, family: VlmFamily, source, max_image_pixels, is_random=False) -> VlmSpec:
    budget = max_image_pixels or family.default_pixel_budget(image_processor)
    text_config = config.get_text_config()
    return VlmSpec(
        name=name,
        family=family,
        model_type=config.model_type,
        architecture=(getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "")])[0],
        image_size=family.image_size(image_processor, budget),
        pixel_budget=budget,
        max_positions=int(getattr(text_config, "max_position_embeddings", 0) or 4096),
        source=source,
        is_random=is_random,
    )


def _random_spec(name: str, max_image_pixels: int | None) -> VlmSpec:
    model, processor = _random_model(name)
    source = {"model": name, "random_fallback": True, "seed": _RANDOM_SEED}
    family = guess_family(name)
    return _spec(name, model.config, processor.image_processor, family, source, max_image_pixels, is_random=True)


@functools.lru_cache(maxsize=4)
def _random_model(name: str):
    from mlmfilter.models.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(guess_family(name).name, seed=_RANDOM_SEED)


@dataclass
class LoadedVlm:
    model: Any
    processor: Any
    spec: VlmSpec
    device: torch.device
    dtype: torch.dtype


def load_vlm(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    allow_random_fallback: bool = False,
    max_image_pixels: int | None = None,
) -> LoadedVlm:
    """Model + processor on ``device`` in ``dtype`` ("auto", "fp32", "bf16", "fp16")."""
    spec = inspect_vlm(name_or_path, allow_random_fallback, max_image_pixels)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if spec.is_random:
        import copy

        model, processor = copy.deepcopy(_random_model(name_or_path))
        log.warning("%s (%s stands in for %s)", RANDOM_WEIGHTS_WARNING, spec.family.name, name_or_path)
    else:
        from transformers import AutoModelForImageTextToText

        try:
            model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype, attn_implementation="sdpa")
        except OSError as exc:
            raise ModelUnavailableError(unavailable_message(name_or_path, exc)) from exc
        processor = _load_processor(name_or_path, spec)
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    return LoadedVlm(model, processor, spec, torch_device, torch_dtype)


def _load_processor(name_or_path: str, spec: VlmSpec):
    import transformers
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        return AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, ImportError) as exc:
        # Qwen2-VL's (and SmolVLM2's) processor also loads a video processor, which needs torchvision;
        # the judge sends no video
        class_name = PROCESSOR_MAPPING_NAMES.get(spec.model_type)
        if class_name is None or "video" not in str(exc).lower():
            raise
        log.info("loading %s without its video processor (%s)", class_name, exc)
        return image_only_processor_class(getattr(transformers, class_name)).from_pretrained(name_or_path)


def vlm_provenance(
    spec: VlmSpec,
    conversation: str,
    answer_prefix: str,
    device: torch.device | str,
    dtype: torch.dtype,
    max_length: int | None,
) -> dict[str, Any]:
    """What a reader of judge scores needs: model, family, exact request format, what is shared. No weights."""
    fmt = FORMATS.get(conversation)
    prov: dict[str, Any] = {
        "backend": "transformers",
        **spec.source,
        "family": spec.family.name,
        "model_type": spec.model_type,
        "architecture": spec.architecture,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "conversation": fmt.describe() if fmt else {"name": AUTO, "source": "the processor's chat template"},
        "answer_prefix": answer_prefix,
        "image_placeholder": spec.family.image_placeholder,
        "tokenization": (
            "split at the image token, chunks encoded apart (LLaVA tokenizer_image_token)" if fmt else "whole prompt"
        ),
        "image_encoded_once_per_pair": True,
        "prefix_kv_shared": True,
        "positions": "M-RoPE (3D) from get_rope_index for the prefix" if spec.family.positions == "mrope" else "1D",
        "pixel_budget": spec.pixel_budget,
        "image_size": spec.image_size,
        "max_length": int(max_length or spec.max_positions),
        "libraries": library_versions(),
    }
    if spec.is_random:  # "warnings" is the key the run folder collects into its own warnings
        prov["warnings"] = [RANDOM_WEIGHTS_WARNING]
    return prov


# -- serving ----------------------------------------------------------------------------------------


@dataclass
class _Encoded:
    """One request after tokenization: full token ids per prompt (image tokens expanded)."""

    position: int  # index into the caller's request list
    row: int  # row of its image in the processor batch
    full: list[list[int]]
    prefix_len: int


@dataclass
class _Prepared:
    items: list[_Encoded]
    processed: Any  # the processor's BatchFeature (vision inputs of every row)
    failures: dict[int, RequestFailure] = field(default_factory=dict)


@dataclass
class _PrefixState:
    cache: Any
    prefix_lens: list[int]
    next_positions: list[int]  # position of the first token after each row's prefix
    width: int  # padded prefix length (cache columns before the block)


class TransformersJudgeBackend:
    """The JudgeBackend for Hugging Face models (see the module docstring for what is shared)."""

    def __init__(
        self,
        loaded: LoadedVlm,
        conversation: str = AUTO,
        answer_prefix: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.family = loaded.spec.family
        self.conversation = validate_conversation(conversation)
        self.answer_prefix = default_answer_prefix(self.conversation) if answer_prefix is None else answer_prefix
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length or loaded.spec.max_positions)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.family.image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.family.image_token!r} token")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.text_config = self.model.config.get_text_config()
        self.eos_ids = self._eos_ids()
        self._trie: ScoreTrie | None = None
        probe = list(self.tokenizer("a").input_ids)
        bos = self.tokenizer.bos_token_id
        self._tokenizer_adds_bos = bos is not None and bool(probe) and probe[0] == bos

    # -- JudgeBackend -------------------------------------------------------------------------------

    def score_distributions(self, requests: Sequence[JudgeRequest]) -> list[np.ndarray | RequestFailure]:
        """Per request (n_prompts, 101) float64 log P(s): see :mod:`mlmfilter.judge.readout`."""
        trie = self.trie
        return self._serve(requests, extra_tokens=trie.max_depth, run=self._expected_batch)

    def generate(
        self, requests: Sequence[JudgeRequest], max_new_tokens: int | None = None
    ) -> list[list[str] | RequestFailure]:
        steps = int(max_new_tokens or self.default_max_new_tokens)
        return self._serve(requests, extra_tokens=steps, run=lambda prepared: self._generate_batch(prepared, steps))

    def describe(self) -> dict[str, Any]:
        return vlm_provenance(
            self.loaded.spec, self.conversation, self.answer_prefix, self.loaded.device, self.loaded.dtype, self.max_length
        )

    @property
    def trie(self) -> ScoreTrie:
        if self._trie is None:
            self._trie = ScoreTrie.from_tokenizer(self.tokenizer)
        return self._trie

    @property
    def default_max_new_tokens(self) -> int:
        try:
            return self.trie.max_new_tokens
        except UnsupportedTokenizerError:
            return 4

    # -- request preparation ------------------------------------------------------------------------

    def prompt_text(self, prompt: str) -> str:
        """The exact text the model reads for one prompt (image placeholder not yet expanded)."""
        if self.conversation == AUTO:
            text = render_with_chat_template(self.processor, prompt)
        else:
            text = FORMATS[self.conversation].render(prompt, self.family.image_placeholder)
        return text + self.answer_prefix

    def _add_special_tokens(self, text: str) -> bool:
        """Let the tokenizer add BOS unless the text already starts with it (chat templates often write it)."""
        bos = self.tokenizer.bos_token
        return not (self.conversation == AUTO and bos and text.startswith(bos))

    def _token_ids(self, text: str) -> list[int]:
        if self.conversation == AUTO:
            return list(self.tokenizer(text, add_special_tokens=self._add_special_tokens(text)).input_ids)
        # LLaVA's tokenizer_image_token: chunks around the image token are encoded apart, BOS kept once
        # (LLaVA drops a first token equal to BOS from later chunks; here only a BOS the tokenizer added,
        # so a template that starts with the BOS string, as ChatML with SmolLM2's tokenizer, is kept whole)
        chunks = [list(self.tokenizer(chunk).input_ids) for chunk in text.split(self.family.image_token)]
        offset = 1 if self._tokenizer_adds_bos else 0
        ids = [chunks[0][0]] if offset else []
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(self.image_token_id)
            ids.extend(chunk[offset:])
        return ids

    def _fit_budget(self, image: Image.Image) -> Image.Image:
        image = image if image.mode == "RGB" else image.convert("RGB")
        budget = self.loaded.spec.pixel_budget
        width, height = image.size
        if budget and width * height > budget:
            scale = math.sqrt(budget / (width * height))
            size = (max(1, int(width * scale)), max(1, int(height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        return image

    def _process(self, texts: list[str], images: list[Image.Image]):
        return self.processor(
            text=texts,
            images=[[image] for image in images],
            return_tensors="pt",
            padding=True,
            add_special_tokens=self._add_special_tokens(texts[0]),
        )

    def _prepare(self, requests: Sequence[JudgeRequest], positions: Sequence[int], extra_tokens: int) -> _Prepared:
        failures: dict[int, RequestFailure] = {}
        texts: list[list[str]] = []
        images: list[Image.Image] = []
        live: list[int] = []
        for pos, request in zip(positions, requests):
            try:
                if not request.prompts:
                    raise ValueError("a request needs at least one prompt")
                if any(self.family.image_token in p for p in request.prompts):
                    raise ValueError(f"the prompt contains the image token {self.family.image_token!r}")
                texts.append([self.prompt_text(p) for p in request.prompts])
                images.append(self._fit_budget(request.image))
                live.append(pos)
            except Exception as exc:
                failures[pos] = RequestFailure(errors.SCORER_ERROR, f"{type(exc).__name__}: {exc}")
        processed, rows = self._process_isolated([t[0] for t in texts], images, live, failures)
        items = []
        for row, (pos, prompt_texts) in enumerate(zip(live, texts)):
            if pos in failures:
                continue
            try:
                full = self._expand(processed, rows[pos], prompt_texts)
                items.append(self._encoded(pos, rows[pos], full, extra_tokens))
            except _TooLong as exc:
                failures[pos] = RequestFailure(errors.CAPTION_TOO_LONG, str(exc))
            except Exception as exc:
                failures[pos] = RequestFailure(errors.SCORER_ERROR, f"{type(exc).__name__}: {exc}")
        return _Prepared(items, processed, failures)

    def _process_isolated(self, first_texts, images, live, failures):
        """Processor output for all live requests; a request the processor rejects fails alone."""
        if not live:
            return None, {}
        try:
            return self._process(first_texts, images), {pos: row for row, pos in enumerate(live)}
        except Exception as exc:
            if len(live) == 1:
                failures[live[0]] = RequestFailure(errors.SCORER_ERROR, f"image preprocessing: {type(exc).__name__}: {exc}")
                return None, {}
        keep = []
        for text, image, pos in zip(first_texts, images, live):
            try:
                self._process([text], [image])
                keep.append((text, image, pos))
            except Exception as exc:
                failures[pos] = RequestFailure(errors.SCORER_ERROR, f"image preprocessing: {type(exc).__name__}: {exc}")
        if not keep:
            return None, {}
        processed = self._process([k[0] for k in keep], [k[1] for k in keep])
        return processed, {pos: row for row, (_, _, pos) in enumerate(keep)}

    def _expand(self, processed, row: int, texts: list[str]) -> list[list[int]]:
        """Splice the processor's image-token expansion (checked on the first prompt) into every prompt."""
        mask = processed["attention_mask"][row].bool()
        proc_ids = processed["input_ids"][row][mask].tolist()
        whole = list(self.tokenizer(texts[0], add_special_tokens=self._add_special_tokens(texts[0])).input_ids)
        k = _single_index(whole, self.image_token_id)
        head, tail = whole[:k], whole[k + 1 :]
        end = len(proc_ids) - len(tail)
        if proc_ids[:k] != head or proc_ids[end:] != tail or end <= k:
            raise RuntimeError("the processor's output does not match the tokenizer's around the image")
        block = proc_ids[k:end]
        full = []
        for text in texts:
            ids = self._token_ids(text)
            j = _single_index(ids, self.image_token_id)
            full.append(ids[:j] + block + ids[j + 1 :])
        return full

    def _encoded(self, pos: int, row: int, full: list[list[int]], extra_tokens: int) -> _Encoded:
        longest = max(len(ids) for ids in full)
        if longest + extra_tokens > self.max_length:
            raise _TooLong(
                f"prompt of {longest} tokens + {extra_tokens} answer tokens exceeds max_length={self.max_length} "
                "(refused rather than cutting off the assistant cue)"
            )
        common = _common_prefix_length(full)
        prefix_len = min(common, min(len(ids) for ids in full) - 1)  # every prompt keeps >= 1 token of its own
        last_image = max(i for i, t in enumerate(full[0]) if t == self.image_token_id)
        if prefix_len <= last_image:
            raise RuntimeError("the prompts do not share the image: put the image before the prompt text")
        return _Encoded(pos, row, full, prefix_len)

    # -- running ------------------------------------------------------------------------------------

    def _serve(self, requests: Sequence[JudgeRequest], extra_tokens: int, run) -> list:
        results: list[Any] = [None] * len(requests)
        # bucket by length: similar prompts share a micro-batch, so little padding
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompts[0]) if requests[i].prompts else 0)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            prepared = self._prepare([requests[i] for i in chunk], chunk, extra_tokens)
            for pos, failure in prepared.failures.items():
                results[pos] = failure
            if prepared.items:
                with torch.inference_mode():
                    outputs = run(prepared)
                for item, output in zip(prepared.items, outputs):
                    results[item.position] = output
        return results

    def _vision_features(self, prepared: _Prepared) -> list[torch.Tensor]:
        """Encode every processed image once; per item (in item order) its image features."""
        inputs = {}
        for key, value in prepared.processed.items():
            if key in _TEXT_KEYS or not isinstance(value, torch.Tensor):
                continue
            value = value.to(self.loaded.device)
            inputs[key] = value.to(self.loaded.dtype) if value.is_floating_point() else value
        features = self.model.get_image_features(**inputs, return_dict=True).pooler_output
        return [features[item.row] for item in prepared.items]

    def _run_prefix(self, prepared: _Prepared) -> _PrefixState:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        device = self.loaded.device
        items = prepared.items
        prefixes = [item.full[0][: item.prefix_len] for item in items]
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for i, prefix in enumerate(prefixes):
            ids[i, : len(prefix)] = torch.tensor(prefix)
            attention[i, : len(prefix)] = 1
        ids, attention = ids.to(device), attention.to(device)
        if self.family.positions == "mrope":
            grid = prepared.processed["image_grid_thw"][[item.row for item in items]].to(device)
            positions, _ = self.model.model.get_rope_index(
                ids, mm_token_type_ids=(ids == self.image_token_id).int(), image_grid_thw=grid, attention_mask=attention
            )
            next_positions = [int(positions[0, i, len(p) - 1]) + 1 for i, p in enumerate(prefixes)]
        else:
            positions = torch.arange(width, device=device).unsqueeze(0).expand(len(items), -1)
            next_positions = [len(p) for p in prefixes]
        features = self._vision_features(prepared)
        out = self.model.model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
            use_cache=True,
        )
        return _PrefixState(out.past_key_values, [len(p) for p in prefixes], next_positions, width)

    def _forward_block(self, state: _PrefixState, block: "_Block"):
        """Run tokens after the prefix with the block's tree mask and positions; returns hidden states."""
        self._check_window(max(block.max_position, 0))
        device = self.loaded.device
        allowed = block.allowed_with_past(state)  # (B, Lb, cache length + Lb) bool
        if allowed.shape[-1] != state.cache.get_seq_length() + block.ids.shape[1]:
            raise RuntimeError("attention mask and KV cache disagree on the number of columns")
        mask = torch.zeros(allowed.shape, dtype=self.loaded.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.loaded.dtype).min)
        positions = block.positions.to(device)
        if self.family.positions == "mrope":
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        out = self.model.model(
            input_ids=block.ids.to(device),
            attention_mask=mask.unsqueeze(1).to(device),
            position_ids=positions,
            past_key_values=state.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def _expected_batch(self, prepared: _Prepared) -> list[np.ndarray]:
        trie = self.trie
        state = self._run_prefix(prepared)
        block = _Block.build(prepared.items, state, trie, self.pad_id)
        hidden = self._forward_block(state, block)
        index = block.contexts.to(hidden.device)  # (B, M_max, K) columns; -1 where a row has fewer prompts
        rows = hidden.gather(1, index.clamp(min=0).flatten(1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        lse, log_continue, token_logits = self._reduce(rows.flatten(0, 1), trie)
        shape = index.shape
        lse, log_continue = lse.view(shape), log_continue.view(shape)
        token_logits = token_logits.view(*shape, -1)
        ctx = torch.as_tensor(trie.edge_contexts, device=lse.device)
        col = torch.as_tensor(block.token_columns, device=lse.device)
        edge_logits = token_logits[:, :, ctx, col]  # (B, M, N)
        log_probs = trie.combine(lse, log_continue, edge_logits).double().cpu().numpy()
        return [log_probs[i, : len(item.full)] for i, item in enumerate(prepared.items)]

    def _reduce(self, hidden: torch.Tensor, trie: ScoreTrie):
        """lm_head in chunks -> per row: logsumexp, log P(next starts with a digit), logits of trie tokens."""
        head = self.model.get_output_embeddings()
        cont = torch.as_tensor(trie.continuation_ids, device=hidden.device)
        tokens = torch.as_tensor(sorted(set(trie.edge_tokens)), device=hidden.device)
        parts = []
        for start in range(0, hidden.shape[0], _LOGIT_CHUNK):
            logits = head(hidden[start : start + _LOGIT_CHUNK]).float()
            lse = torch.logsumexp(logits, dim=-1)
            parts.append((lse, torch.logsumexp(logits.index_select(-1, cont), dim=-1) - lse, logits.index_select(-1, tokens)))
        return tuple(torch.cat(p) for p in zip(*parts))

    def _generate_batch(self, prepared: _Prepared, steps: int) -> list[list[str]]:
        state = self._run_prefix(prepared)
        block = _Block.build(prepared.items, state, None, self.pad_id)
        hidden = self._forward_block(state, block)
        head = self.model.get_output_embeddings()
        index = block.contexts[:, :, 0].to(hidden.device)  # (B, M): last token of each branch
        last = head(hidden.gather(1, index.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))).argmax(-1)
        n_rows, n_prompts = index.shape
        live = (index >= 0).cpu()
        tokens = [[[int(last[i, m])] for m in range(n_prompts)] for i in range(n_rows)]
        done = torch.tensor([[int(last[i, m]) in self.eos_ids for m in range(n_prompts)] for i in range(n_rows)]) | ~live
        step_block = _StepBlock(block, state)
        for _ in range(1, steps):
            if bool(done.all()):
                break
            hidden = self._forward_block(state, step_block.next(last.cpu()))
            last = head(hidden).argmax(-1)
            for i in range(n_rows):
                for m in range(n_prompts):
                    if not done[i, m]:
                        token = int(last[i, m])
                        tokens[i][m].append(token)
                        done[i, m] = token in self.eos_ids
        texts = []
        for i, item in enumerate(prepared.items):
            texts.append([self._decode(tokens[i][m]) for m in range(len(item.full))])
        return texts

    def _decode(self, ids: list[int]) -> str:
        for n, token in enumerate(ids):
            if token in self.eos_ids:
                ids = ids[:n]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        config = getattr(self.model, "generation_config", None)
        for source in (getattr(config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if source is None:
                continue
            ids.update(source if isinstance(source, (list, tuple)) else [source])
        return {int(i) for i in ids}

    def _check_window(self, max_position: int) -> None:
        window = getattr(self.text_config, "sliding_window", None)
        layer_types = getattr(self.text_config, "layer_types", None) or []
        if window and any("sliding" in t for t in layer_types) and max_position >= window:
            raise RuntimeError(f"prompt reaches position {max_position}, beyond the sliding window {window}: not supported")


class _TooLong(ValueError):
    pass


def _single_index(ids: list[int], token: int) -> int:
    hits = [i for i, t in enumerate(ids) if t == token]
    if len(hits) != 1:
        raise ValueError(f"expected one image token in the prompt, found {len(hits)}")
    return hits[0]


def _common_prefix_length(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


@dataclass
class _Block:
    """Tokens after the prefix for a batch: per row, per prompt, its branch then (optionally) the trie.

    ``allowed[i, q, k]``: block token q of row i may attend to block column k (besides the prefix):
    a branch token sees its branch up to itself, a trie node the whole branch and its trie ancestors
    and itself. ``contexts[i, m, k]``: block column whose logits are context k of prompt m (k = 0:
    the branch's last token, k >= 1: trie node k - 1), -1 for absent prompts.
    """

    ids: torch.Tensor  # (B, Lb)
    positions: torch.Tensor  # (B, Lb)
    allowed: torch.Tensor  # (B, Lb, Lb) bool, block-to-block visibility
    contexts: torch.Tensor  # (B, M_max, K)
    segments: list[list[tuple[int, int]]]  # per row, per prompt: (start, end) block columns of the branch
    token_columns: list[int]  # per trie node, its token's column in the reduced logits
    max_position: int

    @classmethod
    def build(cls, items: list[_Encoded], state: _PrefixState, trie: ScoreTrie | None, pad_id: int) -> "_Block":
        n_nodes = len(trie.nodes) if trie else 0
        n_prompts = max(len(item.full) for item in items)
        if trie:
            depth = torch.tensor([node.depth for node in trie.nodes])
            trie_ids = torch.tensor([node.token_id for node in trie.nodes])
            ancestor = torch.zeros((n_nodes, n_nodes), dtype=torch.bool)  # [n, a]: a is n or above n
            for n in range(n_nodes):
                ancestor[n, trie.ancestors(n)] = True
            unique = sorted(set(trie.edge_tokens))
            token_columns = [unique.index(t) for t in trie.edge_tokens]
        else:
            token_columns = []
        rows = []
        for item, start_pos in zip(items, state.next_positions):
            ids, pos, seg, index, is_trie, segs = [], [], [], [], [], []
            ctx = torch.full((n_prompts, 1 + n_nodes), -1, dtype=torch.long)
            length = 0
            for m, full in enumerate(item.full):
                branch = torch.tensor(full[item.prefix_len :])
                b = len(branch)
                ids.append(branch)
                pos.append(start_pos + torch.arange(b))
                seg.append(torch.full((b,), m))
                index.append(torch.arange(b))
                is_trie.append(torch.zeros(b, dtype=torch.bool))
                segs.append((length, length + b))
                ctx[m, 0] = length + b - 1
                length += b
                if trie:
                    ids.append(trie_ids)
                    pos.append(start_pos + b + depth - 1)
                    seg.append(torch.full((n_nodes,), m))
                    index.append(torch.arange(n_nodes))
                    is_trie.append(torch.ones(n_nodes, dtype=torch.bool))
                    ctx[m, 1:] = length + torch.arange(n_nodes)
                    length += n_nodes
            rows.append((torch.cat(ids), torch.cat(pos), torch.cat(seg), torch.cat(index), torch.cat(is_trie), ctx, segs))
        width = max(len(r[0]) for r in rows)
        ids_t = torch.full((len(items), width), pad_id, dtype=torch.long)
        pos_t = torch.zeros((len(items), width), dtype=torch.long)
        allowed = torch.zeros((len(items), width, width), dtype=torch.bool)
        for i, (ids, pos, seg, index, is_trie, _, _) in enumerate(rows):
            n = len(ids)
            ids_t[i, :n], pos_t[i, :n] = ids, pos
            same = seg[:, None] == seg[None, :]
            branch_q, branch_k = ~is_trie[:, None], ~is_trie[None, :]
            causal_branch = branch_q & branch_k & (index[None, :] <= index[:, None])
            trie_sees_branch = is_trie[:, None] & branch_k
            visible = causal_branch | trie_sees_branch
            if trie:
                node_q = torch.where(is_trie, index, 0)
                trie_sees_ancestors = is_trie[:, None] & is_trie[None, :] & ancestor[node_q][:, node_q]
                visible = visible | trie_sees_ancestors
            allowed[i, :n, :n] = same & visible
            pad = torch.arange(n, width)
            allowed[i, pad, pad] = True  # padding sees itself only (no empty softmax rows)
        return cls(
            ids=ids_t,
            positions=pos_t,
            allowed=allowed,
            contexts=torch.stack([r[5] for r in rows]),
            segments=[r[6] for r in rows],
            token_columns=token_columns,
            max_position=int(pos_t.max()) if pos_t.numel() else 0,
        )

    def allowed_with_past(self, state: _PrefixState) -> torch.Tensor:
        """Visibility over all cache columns: a row's real prefix, then the block area's own pattern."""
        n_rows, width = self.ids.shape
        prefix = torch.zeros((n_rows, width, state.width), dtype=torch.bool)
        for i, n in enumerate(state.prefix_lens):
            prefix[i, :, :n] = True
        return torch.cat([prefix, self.allowed], dim=-1)


class _StepBlock:
    """Greedy steps after a branch-only block: one new token per prompt per step, on the same cache."""

    def __init__(self, block: _Block, state: _PrefixState):
        self.block = block
        self.state = state
        self.step = 0
        self.generated_columns: list[int] = []  # cache columns of earlier steps (relative to the block start)
        n_rows = block.ids.shape[0]
        self.n_prompts = block.contexts.shape[1]
        self.next_pos = torch.zeros((n_rows, self.n_prompts), dtype=torch.long)
        for i, segs in enumerate(block.segments):
            for m, (s, e) in enumerate(segs):
                self.next_pos[i, m] = block.positions[i, e - 1] + 1

    def next(self, last_tokens: torch.Tensor) -> "_Block":
        n_rows, width = self.block.ids.shape
        m_count = self.n_prompts
        offset = width + self.step * m_count  # block columns used so far (branches + earlier steps)
        # visibility of the new M tokens over [branch block | earlier steps | these M tokens]
        allowed = torch.zeros((n_rows, m_count, offset + m_count), dtype=torch.bool)
        for i, segs in enumerate(self.block.segments):
            for m in range(m_count):
                if m < len(segs):
                    s, e = segs[m]
                    allowed[i, m, s:e] = True
                for t in range(self.step):
                    allowed[i, m, width + t * m_count + m] = True
                allowed[i, m, offset + m] = True
        positions = self.next_pos + self.step
        self.step += 1
        return _Block(
            ids=last_tokens.reshape(n_rows, m_count).long(),
            positions=positions,
            allowed=allowed,
            contexts=self.block.contexts,
            segments=self.block.segments,
            token_columns=[],
            max_position=int(positions.max()),
        )
