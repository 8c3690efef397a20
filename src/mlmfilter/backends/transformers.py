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
    to_device,
)
from mlmfilter.models.vlm import LoadedVlm, inspect_vlm, load_vlm, vlm_provenance
from mlmfilter.models.vlm_encoding import TEXT_INPUT_KEYS, EncodedBatch, EncodedPair, PromptEncoder

#: the trie readout computes float32 logits in blocks of rows x vocabulary (bounded memory at 128k+ tokens)
_LOGIT_ROWS = 512
_LOGIT_VOCAB = 32768
#: a trie's first level is computed with the branches when it is this small (digit tokenizers: 10);
#: larger first levels (one token per number) are expanded by probability like deeper ones
_EAGER_FIRST_LEVEL = 16
#: default of ``trie_threshold``: trie nodes below this path probability are not expanded
DEFAULT_TRIE_THRESHOLD = 1e-4
#: with a token budget, pairs encoded together (one processor call, one vision pass), then split into
#: micro-batches by the budget; bounds host memory for pixels (64 x 3 x 384^2 fp32 = 113 MB)
BUDGET_ENCODE_PAIRS = 64
#: on CUDA the pairs of a call are encoded this many at a time, the next chunk in a thread while the model
#: computes the current one (the processor's resize and normalisation would otherwise idle the GPU)
PREFETCH_ENCODE_PAIRS = 32
#: the automatic budget on CUDA: at most this many LLM tokens per forward, and this share of free memory
AUTO_BUDGET_MAX_TOKENS = 65536
AUTO_BUDGET_MEMORY_SHARE = 0.4


def auto_batch_tokens(text_config: Any, dtype: torch.dtype, free_bytes: int, prompts: int = 4) -> int:
    """LLM tokens per micro-batch that fit in ``AUTO_BUDGET_MEMORY_SHARE`` of ``free_bytes``.

    Per token: its KV cache in the prefix and in each prompt row's copy of it (``1 + prompts`` copies, an
    upper bound: only prefix tokens are copied), plus a few activations of the widest layer part (SDPA
    never holds a whole attention matrix on CUDA). At least 1024 tokens, at most ``AUTO_BUDGET_MAX_TOKENS``.
    """
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    width = torch.finfo(dtype).bits // 8
    kv = int(text_config.num_hidden_layers) * 2 * kv_heads * head_dim * width
    widest = max(int(getattr(text_config, "intermediate_size", 0) or 0), int(text_config.hidden_size))
    per_token = kv * (1 + prompts) + 4 * widest * width
    return int(max(1024, min(AUTO_BUDGET_MAX_TOKENS, free_bytes * AUTO_BUDGET_MEMORY_SHARE // per_token)))


def _encoded(chunks: Sequence[list[int]], encode, prefetch: bool):
    """``encode(chunk)`` of every chunk, in order; with ``prefetch`` the next one is encoded in a thread
    while the caller computes on this one (PIL's resize and the Rust tokenizer release the GIL)."""
    if not prefetch or len(chunks) < 2:
        for chunk in chunks:
            yield encode(chunk)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge-encode") as pool:
        pending = pool.submit(encode, chunks[0])
        for chunk in chunks[1:]:
            batch = pending.result()
            pending = pool.submit(encode, chunk)
            yield batch
        yield pending.result()


def micro_batches(costs: Sequence[tuple[int, int]], budget: int | None, max_pairs: int) -> list[list[int]]:
    """Indices (in order) cut into micro-batches: ``costs[i]`` = (shared prefix tokens, tokens after it) of
    pair i. A micro-batch holds at most ``max_pairs`` pairs and, with a ``budget``, at most that many tokens
    counting the right padding of the prefixes (one pair over the budget runs alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    widest = rest = 0
    for i, (prefix, after) in enumerate(costs):
        grown = max(widest, prefix) * (len(current) + 1) + rest + after
        if current and (len(current) >= max_pairs or (budget is not None and grown > budget)):
            batches.append(current)
            current, widest, rest = [], 0, 0
        current.append(i)
        widest, rest = max(widest, prefix), rest + after
    if current:
        batches.append(current)
    return batches


@dataclass
class _CachedPrefix:
    cache: Any  # the transformers KV cache, grown by every later block
    layout: PrefixLayout


def _select_rows(cache: Any, rows: list[int], device: torch.device) -> Any:
    """A new DynamicCache holding the given batch rows of ``cache`` (rows may repeat: one copy per prompt)."""
    from transformers import DynamicCache

    index = to_device(torch.as_tensor(rows), device)
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
        batch_tokens: int | None = None,
    ):
        self.loaded = loaded
        #: LLM tokens per micro-batch (prefixes with their padding, prompts, trie); None: automatic (a budget
        #: from free memory on CUDA, ``batch_size`` pairs elsewhere); 0: ``batch_size`` pairs everywhere
        self.batch_tokens = batch_tokens
        self._budget: int | None = None
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
        self._head_tables: dict[str, Any] = {}  # per device: what the lm_head reduction reads, built once
        #: encode the next chunk in a thread while the model runs (on CUDA: the host is otherwise idle)
        self.prefetch_encoding = loaded.device.type == "cuda"

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

    @property
    def token_budget(self) -> int | None:
        """LLM tokens per micro-batch, or None: ``batch_size`` pairs (see ``batch_tokens``)."""
        if self.batch_tokens is not None:
            return int(self.batch_tokens) or None
        if self.loaded.device.type != "cuda":
            return None
        if self._budget is None:
            free, _ = torch.cuda.mem_get_info(self.loaded.device)
            self._budget = auto_batch_tokens(self.text_config, self.loaded.dtype, free)
        return self._budget

    def _serve(self, requests: Sequence[JudgeRequest], extra_tokens: int, run) -> list:
        """Encode pairs a chunk at a time (one processor call, one vision pass), then run the language model
        on micro-batches: ``batch_size`` pairs, or as many as fit the token budget. A pair's numbers do not
        depend on its batch mates (explicit positions, masks), so any cut gives the same scores."""
        results: list[Any] = [None] * len(requests)
        budget = self.token_budget
        per_encode = self.batch_size if budget is None else max(self.batch_size, BUDGET_ENCODE_PAIRS)
        # only the expected readout: greedy decoding reads the tokenizer while the next chunk is encoded
        prefetch = self.prefetch_encoding and run == self._expected_batch
        if prefetch:
            per_encode = min(per_encode, PREFETCH_ENCODE_PAIRS)
        max_pairs = self.batch_size if budget is None else per_encode
        # bucket by length: similar prompts share a micro-batch, so little padding
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompts[0]) if requests[i].prompts else 0)
        chunks = [order[start : start + per_encode] for start in range(0, len(order), per_encode)]

        def encode(chunk: list[int]) -> EncodedBatch:
            return self.encoder.encode([requests[i] for i in chunk], chunk, extra_tokens)

        for batch in _encoded(chunks, encode, prefetch):
            for pos, failure in batch.failures.items():
                results[pos] = failure
            if not batch.items:
                continue
            with torch.inference_mode():
                features = self._vision_features(batch)  # every image of the chunk in one pass
                items = sorted(range(len(batch.items)), key=lambda i: len(batch.items[i].full[0]))
                costs = [self._token_cost(batch.items[i], extra_tokens) for i in items]
                for cut in micro_batches(costs, budget, max_pairs):
                    micro = EncodedBatch(
                        [batch.items[items[c]] for c in cut],
                        batch.processed,
                        features=[features[items[c]] for c in cut],
                    )
                    for item, output in zip(micro.items, run(micro)):
                        results[item.position] = output
        return results

    def _token_cost(self, item: EncodedPair, extra_tokens: int) -> tuple[int, int]:
        """(shared prefix tokens, tokens after it): every prompt's own tokens and its answer or trie tokens."""
        after = sum(len(ids) - item.prefix_len + extra_tokens for ids in item.full)
        return item.prefix_len, after

    def _vision_features(self, batch: EncodedBatch) -> list[torch.Tensor]:
        """Encode every processed image once; per item (in item order) its image features."""
        if batch.features is not None:
            return batch.features
        inputs = {}
        for key, value in batch.processed.items():
            if key in TEXT_INPUT_KEYS or not isinstance(value, torch.Tensor):
                continue
            value = to_device(value, self.loaded.device)
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
        ids, attention = to_device(ids, device), to_device(attention, device)
        if self.family.positions == "mrope":
            grid = to_device(batch.processed["image_grid_thw"][[item.row for item in items]], device)
            image_tokens = (ids == self.encoder.image_token_id).int()
            positions, _ = self.model.model.get_rope_index(
                ids, mm_token_type_ids=image_tokens, image_grid_thw=grid, attention_mask=attention
            )
            # text after the image advances all three M-RoPE components together; one read for all rows
            last = to_device(torch.tensor([len(p) - 1 for p in prefixes]), device)
            rows = torch.arange(len(prefixes), device=device)
            next_positions = (positions[0, rows, last] + 1).tolist()
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
        positions = to_device(block.positions, device)
        if self.family.positions == "mrope":
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        out = self.model.model(
            input_ids=to_device(block.ids, device),
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
        parts, order = [], []
        for group in length_groups([len(b) for b in branches]):
            pairs = [owner[r] for r in group]
            layout = PrefixLayout(
                [prefix.layout.lengths[i] for i in pairs],
                [prefix.layout.next_positions[i] for i in pairs],
                prefix.layout.width,
            )
            rows = _CachedPrefix(_select_rows(prefix.cache, pairs, self.loaded.device), layout)
            parts.append(self._expected_rows(rows, [branches[r] for r in group]))
            order += group
        # one read back for the whole micro-batch, not one per group
        log_probs = np.zeros((len(owner), len(SCORES)))
        log_probs[order] = torch.cat(parts).double().cpu().numpy()
        out, row = [], 0
        for item in batch.items:
            out.append(log_probs[row : row + len(item.full)])
            row += len(item.full)
        return out

    def _expected_rows(self, rows: _CachedPrefix, branches: list[list[int]]) -> torch.Tensor:
        """Branches (one per cache row) with the trie's first level, then deeper trie levels only where
        their path probability reaches ``trie_threshold``; (rows, 101) log P(s), on the model's device."""
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
            picked = hidden[to_device(row_ids, hidden.device), to_device(contexts[row_ids, ctx_ids], hidden.device)]
            readout.add(row_ids, ctx_ids, *self._reduce(picked, trie))
            block = grower.block(readout.to_expand())  # the one read back per trie level
        return readout.log_probs()

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
        digit_chunks, tokens = self._head_table(trie, weight.shape[0], device)
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
                digits = digit_chunks.get(v0)  # known on the host: no read back of a device mask
                if digits is not None:
                    cont = torch.logaddexp(cont, torch.logsumexp(logits[:, digits], dim=-1))
            token_logits = h @ weight[tokens].float().T
            if bias is not None:
                token_logits += bias[tokens].float()
            parts.append((lse, cont - lse, token_logits))
        return tuple(torch.cat(p) for p in zip(*parts))

    def _head_table(self, trie: ScoreTrie, vocab: int, device: torch.device) -> tuple[dict[int, torch.Tensor], Any]:
        """Per vocabulary chunk holding digit-led tokens, their columns in it; the trie's token ids. Built once
        per device, on the host, so the reduction never asks the GPU which chunks hold digits."""
        key = f"{device}:{vocab}"
        if key not in self._head_tables:
            ids = np.asarray([i for i in trie.continuation_ids if i < vocab], dtype=np.int64)
            chunks = {}
            for v0 in range(0, vocab, _LOGIT_VOCAB):
                inside = ids[(ids >= v0) & (ids < v0 + _LOGIT_VOCAB)] - v0
                if inside.size:
                    chunks[v0] = to_device(torch.from_numpy(inside), device)
            tokens = to_device(torch.as_tensor(sorted(set(trie.edge_tokens))), device)
            self._head_tables[key] = (chunks, tokens)
        return self._head_tables[key]

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
            loaded,
            o.conversation,
            o.answer_prefix,
            o.batch_size,
            o.max_length,
            o.trie_threshold,
            batch_tokens=getattr(o, "batch_tokens", None),
        )


def _spec(options: Any):
    """What the model's config files say (no weights): family, image size, context length."""
    return inspect_vlm(options.model, options.allow_random_fallback, options.max_image_pixels)


INFO = TransformersBackendInfo()
