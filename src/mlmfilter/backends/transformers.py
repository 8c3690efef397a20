"""The transformers backend of the MLM judge: this package's batched, prefix-sharing :class:`TransformersJudgeBackend`.

The model and processor are loaded by :func:`mlmfilter.models.vlm.load_vlm` (any supported
image-text-to-text model by hub id or path). Per micro-batch of pairs:

1. each prompt is put into the conversation format and tokenized; the processor runs ONCE per pair
   (on the first prompt) and its expansion of the image placeholder is spliced into the token ids of
   every other prompt (checked against the processor's own output for the first prompt);
2. the image is encoded ONCE (``get_image_features``) and its features are reused for all prompts;
3. the shared prefix (the longest common prefix of the token ids of the pair's prompts: system,
   image, caption ...) is run ONCE and its KV cache is reused by every prompt;
4. ``expected``: the prefix cache is copied once per prompt (rows = (pair, prompt)); one forward runs
   every prompt's own tokens (right-padded, causal) plus the first level of the score trie (the 10
   first digits) under a small tree mask; further trie levels (two-digit numbers, "100") run in one
   more forward each, only for nodes whose path probability reaches ``trie_threshold``
   (:class:`~mlmfilter.judge.readout.AdaptiveTrieReadout`: every P(s) within the threshold; 0 =
   the whole trie, exact). ``generate`` runs all branches of a pair side by side in one row with a
   4D mask, then greedy steps, one token per prompt per step, on the same cache.

Position ids are explicit everywhere, so right padding and tree layout never shift a pair's positions:
a pair's scores do not depend on its batch mates (up to float rounding). Qwen2-VL's M-RoPE gets its
3D prefix positions from the model's own ``get_rope_index``; text after the image advances all three
components together, so the branches and trie use ``last prefix position + 1 + offset``.

What each family gets (all checked against brute force on tiny models in tests/backends/test_mlm_backend.py):

==================  ==========================  ===============  ============  ===================
family              model_type                  image encoded    prefix KV     positions
==================  ==========================  ===============  ============  ===================
llava               llava                       once per pair    shared        1D
llava (pooled)      mlmfilter_pooled_llava      once per pair    shared        1D
qwen2_vl            qwen2_vl, qwen2_5_vl        once per pair    shared        M-RoPE (3D prefix)
idefics3            idefics3, smolvlm           once per pair    shared        1D (tiled images)
==================  ==========================  ===============  ============  ===================

SmolVLM (v1) checkpoints are ``idefics3``. ``smolvlm`` (SmolVLM2) is mapped to the same path but not
tested here: its processor needs the ``num2words`` package.

Attention runs with ``sdpa`` (tree masks need an explicit mask; flash-attention kernels take none).
Text models with sliding-window layers are refused once a prompt reaches the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mlmfilter.backends.base import BackendInfo, exact_readout_provenance
from mlmfilter.judge.backend import BackendCapabilities, JudgeRequest, RequestFailure
from mlmfilter.judge.conversations import AUTO, default_answer_prefix, validate_conversation
from mlmfilter.judge.readout import SCORES, AdaptiveTrieReadout, ScoreTrie, UnsupportedTokenizerError
from mlmfilter.models.common import resolve_device, resolve_dtype
from mlmfilter.models.tree_attention import (
    BranchBlock,
    DecodeSteps,
    PrefixLayout,
    PromptRows,
    gather_rows,
    length_groups,
)
from mlmfilter.models.vlm import LoadedVlm, inspect_vlm, load_vlm, vlm_provenance
from mlmfilter.models.vlm_encoding import TEXT_INPUT_KEYS, EncodedBatch, PromptEncoder

#: the trie readout computes float32 logits in blocks of rows x vocabulary (bounded memory at 128k+ tokens)
_LOGIT_ROWS = 512
_LOGIT_VOCAB = 32768
#: a trie's first level is computed with the branches when it is this small (digit tokenizers: 10);
#: larger first levels (one token per number) are expanded by probability like deeper ones
_EAGER_FIRST_LEVEL = 16
#: default of ``trie_threshold``: trie nodes below this path probability are not expanded
DEFAULT_TRIE_THRESHOLD = 1e-4


@dataclass
class _CachedPrefix:
    cache: Any  # the transformers KV cache, grown by every later block
    layout: PrefixLayout


def _select_rows(cache: Any, rows: list[int], device: torch.device) -> Any:
    """A new DynamicCache holding the given batch rows of ``cache`` (rows may repeat: one copy per prompt)."""
    from transformers import DynamicCache

    index = torch.as_tensor(rows, device=device)
    return DynamicCache(
        [(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in cache.layers]
    )


class TransformersJudgeBackend:
    """The JudgeBackend for Hugging Face models (see the module docstring for what is shared)."""

    def __init__(
        self,
        loaded: LoadedVlm,
        conversation: str = AUTO,
        answer_prefix: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        trie_threshold: float = DEFAULT_TRIE_THRESHOLD,
        stop_strings: Sequence[str] = (),
    ):
        self.loaded = loaded
        #: generate stops a prompt once its text contains one of these (AITQE's "<Overall>")
        self.stop_strings = tuple(s for s in stop_strings if s)
        if not 0.0 <= float(trie_threshold) < 1.0:
            raise ValueError(f"trie_threshold must be in [0, 1), got {trie_threshold}")
        self.trie_threshold = float(trie_threshold)
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.family = loaded.spec.family
        self.conversation = validate_conversation(conversation)
        self.answer_prefix = default_answer_prefix(self.conversation) if answer_prefix is None else answer_prefix
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length or loaded.spec.max_positions)
        self.encoder = PromptEncoder(
            self.processor,
            self.family,
            self.conversation,
            self.answer_prefix,
            loaded.spec.pixel_budget,
            self.max_length,
        )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.text_config = self.model.config.get_text_config()
        # converted LLaVA-Unified judges score over the trained vocabulary only (rows after it were added)
        self.scored_vocab = getattr(self.model.config, "mlmfilter_scored_vocab_size", None)
        self.eos_ids = self._eos_ids()
        self._trie: ScoreTrie | None = None

    # -- JudgeBackend -------------------------------------------------------------------------------

    def score_distributions(self, requests: Sequence[JudgeRequest]) -> list[np.ndarray | RequestFailure]:
        """Per request (n_prompts, 101) float64 log P(s): see :mod:`mlmfilter.judge.readout`."""
        trie = self.trie
        return self._serve(requests, extra_tokens=trie.max_depth, run=self._expected_batch)

    def generate(
        self, requests: Sequence[JudgeRequest], max_new_tokens: int | None = None
    ) -> list[list[str] | RequestFailure]:
        steps = int(max_new_tokens or self.default_max_new_tokens)
        return self._serve(requests, extra_tokens=steps, run=lambda batch: self._generate_batch(batch, steps))

    def describe(self) -> dict[str, Any]:
        return vlm_provenance(
            self.loaded.spec,
            self.conversation,
            self.answer_prefix,
            self.loaded.device,
            self.loaded.dtype,
            self.max_length,
        )

    def readout_provenance(self) -> dict[str, str]:
        """The expected readout this backend computes: its definition and error bound."""
        return exact_readout_provenance(self.trie_threshold)

    @property
    def capabilities(self) -> BackendCapabilities:
        # the full next-token distribution at every trie node: exact up to trie_threshold
        return BackendCapabilities("exact", self.loaded.spec.decode_side, self.batch_size)

    def close(self) -> None:
        # drop the weights (they go with the last reference); describe() still answers from the spec
        self.model = self.loaded.model = None

    @property
    def image_size(self) -> int:
        """Shorter side the pipeline should decode images to for this model."""
        return self.loaded.spec.decode_side

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

    def prompt_text(self, prompt: str) -> str:
        """The exact text the model reads for one prompt (image placeholder not yet expanded)."""
        return self.encoder.prompt_text(prompt)

    # -- running ------------------------------------------------------------------------------------

    def _serve(self, requests: Sequence[JudgeRequest], extra_tokens: int, run) -> list:
        results: list[Any] = [None] * len(requests)
        # bucket by length: similar prompts share a micro-batch, so little padding
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompts[0]) if requests[i].prompts else 0)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self.encoder.encode([requests[i] for i in chunk], chunk, extra_tokens)
            for pos, failure in batch.failures.items():
                results[pos] = failure
            if batch.items:
                with torch.inference_mode():
                    outputs = run(batch)
                for item, output in zip(batch.items, outputs):
                    results[item.position] = output
        return results

    def _vision_features(self, batch: EncodedBatch) -> list[torch.Tensor]:
        """Encode every processed image once; per item (in item order) its image features."""
        inputs = {}
        for key, value in batch.processed.items():
            if key in TEXT_INPUT_KEYS or not isinstance(value, torch.Tensor):
                continue
            value = value.to(self.loaded.device)
            inputs[key] = value.to(self.loaded.dtype) if value.is_floating_point() else value
        features = self.model.get_image_features(**inputs, return_dict=True).pooler_output
        return [features[item.row] for item in batch.items]

    def _run_prefix(self, batch: EncodedBatch) -> _CachedPrefix:
        """The shared prefixes (right-padded), image features scattered in; their KV cache."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        device = self.loaded.device
        items = batch.items
        prefixes = [item.full[0][: item.prefix_len] for item in items]
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for i, prefix in enumerate(prefixes):
            ids[i, : len(prefix)] = torch.tensor(prefix)
            attention[i, : len(prefix)] = 1
        ids, attention = ids.to(device), attention.to(device)
        if self.family.positions == "mrope":
            grid = batch.processed["image_grid_thw"][[item.row for item in items]].to(device)
            image_tokens = (ids == self.encoder.image_token_id).int()
            positions, _ = self.model.model.get_rope_index(
                ids, mm_token_type_ids=image_tokens, image_grid_thw=grid, attention_mask=attention
            )
            # text after the image advances all three M-RoPE components together
            next_positions = [int(positions[0, i, len(p) - 1]) + 1 for i, p in enumerate(prefixes)]
        else:
            positions = torch.arange(width, device=device).unsqueeze(0).expand(len(items), -1)
            next_positions = [len(p) for p in prefixes]
        out = self.model.model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=self._vision_features(batch))},
            use_cache=True,
        )
        return _CachedPrefix(out.past_key_values, PrefixLayout([len(p) for p in prefixes], next_positions, width))

    def _forward_block(self, prefix: _CachedPrefix, block: BranchBlock) -> torch.Tensor:
        """Run a block after the cached prefix with its tree mask and positions; its hidden states."""
        self._check_window(block.max_position)
        device = self.loaded.device
        mask = block.attention_mask(prefix.layout, self.loaded.dtype, device)
        if mask.shape[-1] != prefix.cache.get_seq_length() + block.ids.shape[1]:
            raise RuntimeError("attention mask and KV cache disagree on the number of columns")
        positions = block.positions.to(device)
        if self.family.positions == "mrope":
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        out = self.model.model(
            input_ids=block.ids.to(device),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=prefix.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    @staticmethod
    def _branches(batch: EncodedBatch) -> list[list[list[int]]]:
        return [[ids[item.prefix_len :] for ids in item.full] for item in batch.items]

    def _expected_batch(self, batch: EncodedBatch) -> list[np.ndarray]:
        """Prefix once per pair; then one row per prompt over a copy of its pair's prefix cache, rows of
        similar length together (a metric's prompts have near-equal suffixes, metrics differ 2x)."""
        prefix = self._run_prefix(batch)
        owner = [i for i, item in enumerate(batch.items) for _ in item.full]  # row -> pair
        branches = [ids[item.prefix_len :] for item in batch.items for ids in item.full]
        log_probs = np.zeros((len(owner), len(SCORES)))
        for group in length_groups([len(b) for b in branches]):
            pairs = [owner[r] for r in group]
            layout = PrefixLayout(
                [prefix.layout.lengths[i] for i in pairs],
                [prefix.layout.next_positions[i] for i in pairs],
                prefix.layout.width,
            )
            rows = _CachedPrefix(_select_rows(prefix.cache, pairs, self.loaded.device), layout)
            log_probs[group] = self._expected_rows(rows, [branches[r] for r in group])
        out, row = [], 0
        for item in batch.items:
            out.append(log_probs[row : row + len(item.full)])
            row += len(item.full)
        return out

    def _expected_rows(self, rows: _CachedPrefix, branches: list[list[int]]) -> np.ndarray:
        """Branches (one per cache row) with the trie's first level, then deeper trie levels only where
        their path probability reaches ``trie_threshold``; (rows, 101) log P(s)."""
        trie = self.trie
        grower = PromptRows(branches, rows.layout.next_positions, trie, self.pad_id)
        readout = AdaptiveTrieReadout(trie, len(branches), self.trie_threshold, self.loaded.device)
        first = [n for n, node in enumerate(trie.nodes) if node.depth == 1]
        eager = first if len(first) <= _EAGER_FIRST_LEVEL else []  # digit tokenizers: 10 first digits up front
        block = grower.block([eager] * len(branches), with_branch=True)
        while block is not None:
            contexts = block.contexts[:, 0]  # (R, K) block column per context, -1 where not computed here
            row_ids, ctx_ids = torch.nonzero(contexts >= 0, as_tuple=True)
            hidden = self._forward_block(rows, block)
            picked = hidden[row_ids.to(hidden.device), contexts[row_ids, ctx_ids].to(hidden.device)]
            readout.add(row_ids, ctx_ids, *self._reduce(picked, trie))
            block = grower.block(readout.to_expand())
        return readout.log_probs().double().cpu().numpy()

    def _reduce(self, hidden: torch.Tensor, trie: ScoreTrie):
        """lm_head in float32 -> per row: logsumexp, log P(next starts with a digit), logits of trie tokens.

        Chunked over rows and vocabulary, so a bf16 model's logits are never rounded to bf16 and no
        (rows x vocab) matrix of a 128k vocabulary is ever whole.
        """
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        if self.scored_vocab:
            weight = weight[: self.scored_vocab]
            bias = bias[: self.scored_vocab] if bias is not None else None
        device = hidden.device
        cont_mask = torch.zeros(weight.shape[0], dtype=torch.bool, device=device)
        cont_mask[torch.as_tensor(trie.continuation_ids, device=device)] = True
        tokens = torch.as_tensor(sorted(set(trie.edge_tokens)), device=device)
        parts = []
        for r0 in range(0, hidden.shape[0], _LOGIT_ROWS):
            h = hidden[r0 : r0 + _LOGIT_ROWS].float()
            lse = torch.full((h.shape[0],), -torch.inf, device=device)
            cont = torch.full((h.shape[0],), -torch.inf, device=device)
            for v0 in range(0, weight.shape[0], _LOGIT_VOCAB):
                logits = h @ weight[v0 : v0 + _LOGIT_VOCAB].float().T
                if bias is not None:
                    logits += bias[v0 : v0 + _LOGIT_VOCAB].float()
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
                digits = cont_mask[v0 : v0 + _LOGIT_VOCAB]
                if bool(digits.any()):
                    cont = torch.logaddexp(cont, torch.logsumexp(logits[:, digits], dim=-1))
            token_logits = h @ weight[tokens].float().T
            if bias is not None:
                token_logits += bias[tokens].float()
            parts.append((lse, cont - lse, token_logits))
        return tuple(torch.cat(p) for p in zip(*parts))

    def _generate_batch(self, batch: EncodedBatch, steps: int) -> list[list[str]]:
        prefix = self._run_prefix(batch)
        block = BranchBlock.build(self._branches(batch), prefix.layout, None, self.pad_id)
        head = self.model.get_output_embeddings()
        ends = block.contexts[:, :, 0]  # (B, M): last token of each branch; -1 where a row has fewer prompts
        last = head(gather_rows(self._forward_block(prefix, block), ends)).argmax(-1).cpu()
        tokens = [[[int(t)] for t in row] for row in last]
        done = (ends < 0) | torch.isin(last, torch.tensor(sorted(self.eos_ids)))
        decode = DecodeSteps(block)
        for _ in range(1, steps):
            if bool(done.all()):
                break
            last = head(self._forward_block(prefix, decode.next(last))).argmax(-1).cpu()
            for i, m in torch.nonzero(~done).tolist():
                tokens[i][m].append(int(last[i, m]))
            done |= torch.isin(last, torch.tensor(sorted(self.eos_ids)))
            if self.stop_strings:
                for i, m in torch.nonzero(~done).tolist():
                    text = self.tokenizer.decode(tokens[i][m][-8:])  # a stop string spans few tokens
                    done[i, m] = any(stop in text for stop in self.stop_strings)
        return [[self._decode(tokens[i][m]) for m in range(len(item.full))] for i, item in enumerate(batch.items)]

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
            raise RuntimeError(
                f"prompt reaches position {max_position}, beyond the sliding window {window}: not supported"
            )


# -- the description ----------------------------------------------------------------------------------


class TransformersBackendInfo(BackendInfo):
    name = "transformers"
    Options = None  # its settings are the scorer's own (device, dtype, batch_size, max_length ...)
    distribution = "exact"  # the full next-token distribution at every trie node, up to trie_threshold
    runs_in_process = True

    def image_size(self, options: Any) -> int:
        return _spec(options).decode_side

    def describe_settings(self, options: Any) -> dict[str, Any]:
        device = resolve_device(options.device)
        answer_prefix = (
            default_answer_prefix(options.conversation) if options.answer_prefix is None else options.answer_prefix
        )
        return vlm_provenance(
            _spec(options),
            options.conversation,
            answer_prefix,
            device,
            resolve_dtype(options.dtype, device),
            options.max_length,
        )

    def readout_provenance(self, options: Any) -> dict[str, str]:
        return exact_readout_provenance(options.trie_threshold)

    def build(self, options: Any, released: Any = None) -> TransformersJudgeBackend:
        o = options
        loaded = load_vlm(o.model, o.device, o.dtype, o.allow_random_fallback, o.max_image_pixels)
        if released is not None and hasattr(loaded.processor.image_processor, "do_pad"):
            # a released judge sees its images as in training: padded to a square, or not
            loaded.processor.image_processor.do_pad = released.settings.pad_to_square
        return TransformersJudgeBackend(
            loaded, o.conversation, o.answer_prefix, o.batch_size, o.max_length, o.trie_threshold
        )


def _spec(options: Any):
    """What the model's config files say (no weights): family, image size, context length."""
    return inspect_vlm(options.model, options.allow_random_fallback, options.max_image_pixels)


INFO = TransformersBackendInfo()
