"""Layout of the tokens that follow a cached shared prefix: many branches in one forward pass.

After the shared prefix of a pair (system prompt, image, caption) sits in the KV cache, every prompt
continues with its own branch (the rest of its text), and for the ``expected`` readout with the score
trie (the tokens of 0..100 as a tree). All of that goes into ONE forward pass per micro-batch, laid
out side by side in one sequence per pair, with

- a 4D attention mask: a branch token sees the pair's prefix and its branch up to itself; a trie node
  sees the prefix, its whole branch, its trie ancestors and itself; nothing sees another branch;
- explicit position ids: a branch token at offset j has position ``p + j`` (``p``: the position after
  the prefix), a trie node of depth d ``p + len(branch) + d - 1``, as if each branch and each path of
  the trie were the only continuation.

So each prompt is computed exactly as alone and the prefix KV cache is never copied. Greedy decoding
(the ``generate`` readout) uses this layout and continues on the same cache with :class:`DecodeSteps`:
one new token per prompt per step.

The ``expected`` readout uses :class:`PromptRows` instead: the prefix cache copied once per prompt,
one row per prompt (its branch, then trie levels grown on demand). Measured on SmolLM2 layers on CPU,
that is ~2x faster than the side-by-side row: attention over one long tree-masked row grows with the
square of 4 branches + 4 tries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mlmfilter.judge.readout import ScoreTrie


@dataclass
class PrefixLayout:
    """The cached prefixes of a micro-batch: right-padded, ``width`` cache columns."""

    lengths: list[int]  # real prefix tokens per row
    next_positions: list[int]  # position id of the first token after each row's prefix
    width: int


@dataclass
class BranchBlock:
    """Tokens after the prefix for a micro-batch.

    ``allowed[i, q, k]``: block token q of row i may attend to block column k (besides its prefix).
    ``contexts[i, m, k]``: block column whose logits are context k of prompt m (k = 0: the branch's
    last token, k >= 1: trie node k - 1); -1 for prompts a row does not have.
    """

    ids: torch.Tensor  # (B, Lb)
    positions: torch.Tensor  # (B, Lb); padding has position 0
    allowed: torch.Tensor  # (B, Lb, columns of the block area so far) bool
    contexts: torch.Tensor  # (B, M, K)
    segments: list[list[tuple[int, int]]]  # per row, per prompt: block columns [start, end) of its branch

    @property
    def max_position(self) -> int:
        return int(self.positions.max()) if self.positions.numel() else 0

    @classmethod
    def build(
        cls, branches: Sequence[Sequence[Sequence[int]]], prefix: PrefixLayout, trie: ScoreTrie | None, pad_id: int
    ) -> "BranchBlock":
        """``branches[i][m]``: the token ids of prompt m of row i after the shared prefix."""
        # laid out in numpy: slice assignment of bool blocks is ~15x faster there than in torch on CPU
        n_nodes = len(trie.nodes) if trie else 0
        n_rows, n_prompts = len(branches), max(len(b) for b in branches)
        width = max(sum(len(b) + n_nodes for b in row) for row in branches)
        ids = np.full((n_rows, width), pad_id, dtype=np.int64)
        positions = np.zeros((n_rows, width), dtype=np.int64)
        allowed = np.zeros((n_rows, width, width), dtype=bool)
        contexts = np.full((n_rows, n_prompts, 1 + n_nodes), -1, dtype=np.int64)
        longest = max((len(b) for row in branches for b in row), default=0)
        causal = np.tril(np.ones((longest, longest), dtype=bool))
        if trie:
            depth = np.array([node.depth for node in trie.nodes])
            trie_ids = np.array([node.token_id for node in trie.nodes])
            ancestor = np.zeros((n_nodes, n_nodes), dtype=bool)  # [n, a]: a is n or above n
            for n in range(n_nodes):
                ancestor[n, trie.ancestors(n)] = True
        segments = []
        for i, (row, start) in enumerate(zip(branches, prefix.next_positions)):
            row_segments, col = [], 0
            for m, branch in enumerate(row):
                b = len(branch)
                ids[i, col : col + b] = branch
                positions[i, col : col + b] = start + np.arange(b)
                allowed[i, col : col + b, col : col + b] = causal[:b, :b]  # a branch sees itself causally
                row_segments.append((col, col + b))
                contexts[i, m, 0] = col + b - 1
                if trie:
                    t0 = col + b
                    ids[i, t0 : t0 + n_nodes] = trie_ids
                    positions[i, t0 : t0 + n_nodes] = start + b + depth - 1
                    allowed[i, t0 : t0 + n_nodes, col : col + b] = True  # a trie node sees its whole branch
                    allowed[i, t0 : t0 + n_nodes, t0 : t0 + n_nodes] = ancestor  # ... and its own path
                    contexts[i, m, 1:] = t0 + np.arange(n_nodes)
                col += b + n_nodes
            pad = np.arange(col, width)
            allowed[i, pad, pad] = True  # padding sees itself only (no empty softmax rows)
            segments.append(row_segments)
        return cls(
            torch.from_numpy(ids),
            torch.from_numpy(positions),
            torch.from_numpy(allowed),
            torch.from_numpy(contexts),
            segments,
        )

    def attention_mask(
        self, prefix: PrefixLayout, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Additive 4D mask (B, 1, Lb, prefix width + block area): 0 where visible, dtype's min elsewhere.

        Additive floats work with every attention implementation (eager adds the mask, sdpa takes it).
        """
        n_rows, n_queries = self.ids.shape
        visible = np.zeros((n_rows, n_queries, prefix.width + self.allowed.shape[-1]), dtype=bool)
        for i, n in enumerate(prefix.lengths):
            visible[i, :, :n] = True
        visible[:, :, prefix.width :] = self.allowed.numpy()
        visible = to_device(torch.from_numpy(visible), device)  # moved as bool: 1 byte a cell
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask.unsqueeze(1)


class PromptRows:
    """One row per prompt over the prefix cache expanded to (pair, prompt) rows; the score trie grown
    a level at a time on the same cache.

    :meth:`block` lays out one forward: with ``with_branch``, each row's branch (right-padded, causal)
    then the trie nodes named for it; later calls add only trie nodes. A trie node sees its row's prefix
    and branch, its ancestors (wherever they were computed) and itself, at position
    ``p + len(branch) + depth - 1``; padding sees itself only. ``contexts[r, 0, k]`` is the block
    column holding context k of row r (0: the branch's last token, 1 + n: node n), -1 if not here.
    Only this row's small trie block needs a tree mask; the prompts' branches no longer share a row.
    """

    def __init__(self, branches: Sequence[Sequence[int]], next_positions: Sequence[int], trie: ScoreTrie, pad_id: int):
        self.branches = [list(b) for b in branches]
        self.starts = list(next_positions)
        self.trie = trie
        self.pad_id = pad_id
        self.columns = np.full((len(self.branches), len(trie.nodes)), -1, dtype=np.int64)  # block-area column of a node
        self.branch_columns = [(0, 0)] * len(self.branches)
        self.width = 0  # block-area columns (branches + trie nodes + padding) already in the cache

    def block(self, nodes: Sequence[Sequence[int]], with_branch: bool = False) -> BranchBlock | None:
        n_rows, n_nodes = len(self.branches), len(self.trie.nodes)
        lengths = [(len(b) if with_branch else 0) + len(ns) for b, ns in zip(self.branches, nodes)]
        n_queries = max(lengths, default=0)
        if n_queries == 0:
            return None
        w0 = self.width
        total = w0 + n_queries
        ids = np.full((n_rows, n_queries), self.pad_id, dtype=np.int64)
        positions = np.zeros((n_rows, n_queries), dtype=np.int64)
        allowed = np.zeros((n_rows, n_queries, total), dtype=bool)
        contexts = np.full((n_rows, 1, 1 + n_nodes), -1, dtype=np.int64)
        for r, (branch, row_nodes) in enumerate(zip(self.branches, nodes)):
            q = 0
            if with_branch:
                b = len(branch)
                ids[r, :b] = branch
                positions[r, :b] = self.starts[r] + np.arange(b)
                allowed[r, :b, w0 : w0 + b] = np.tril(np.ones((b, b), dtype=bool))
                self.branch_columns[r] = (w0, w0 + b)
                contexts[r, 0, 0] = b - 1
                q = b
            b0, b1 = self.branch_columns[r]
            for n in sorted(row_nodes):  # parents first
                node = self.trie.nodes[n]
                self.columns[r, n] = w0 + q
                ids[r, q] = node.token_id
                positions[r, q] = self.starts[r] + (b1 - b0) + node.depth - 1
                allowed[r, q, b0:b1] = True
                seen = self.columns[r, self.trie.ancestors(n)]
                if (seen < 0).any():
                    raise ValueError(f"trie node {n} is laid out before its parent")
                allowed[r, q, seen] = True
                contexts[r, 0, 1 + n] = q
                q += 1
            pad = np.arange(q, n_queries)
            allowed[r, pad, w0 + pad] = True  # padding sees itself only (no empty softmax rows)
        self.width = total
        return BranchBlock(
            torch.from_numpy(ids),
            torch.from_numpy(positions),
            torch.from_numpy(allowed),
            torch.from_numpy(contexts),
            [],
        )


class DecodeSteps:
    """Greedy steps after a branch-only block: one new token per prompt per step, on the same cache."""

    def __init__(self, block: BranchBlock):
        self.block = block
        self.step = 0
        n_rows, self.n_prompts = block.contexts.shape[:2]
        self.next_positions = torch.zeros((n_rows, self.n_prompts), dtype=torch.long)
        for i, segments in enumerate(block.segments):
            for m, (_, end) in enumerate(segments):
                self.next_positions[i, m] = block.positions[i, end - 1] + 1

    def next(self, last_tokens: torch.Tensor) -> BranchBlock:
        """The block of this step's tokens (``last_tokens``: (B, M), the previous step's choices)."""
        n_rows, width = self.block.ids.shape
        m_count = self.n_prompts
        offset = width + self.step * m_count  # block-area columns used so far: branches + earlier steps
        allowed = np.zeros((n_rows, m_count, offset + m_count), dtype=bool)
        for i, segments in enumerate(self.block.segments):
            for m, (start, end) in enumerate(segments):
                allowed[i, m, start:end] = True  # its own branch
        for t in range(self.step + 1):  # its own earlier steps and itself
            allowed[:, np.arange(m_count), width + t * m_count + np.arange(m_count)] = True
        positions = self.next_positions + self.step
        self.step += 1
        return BranchBlock(
            last_tokens.reshape(n_rows, m_count).long(),
            positions,
            torch.from_numpy(allowed),
            self.block.contexts,
            self.block.segments,
        )


def length_groups(lengths: Sequence[int], slack: float = 0.15, extra: int = 8) -> list[list[int]]:
    """Indices grouped by similar length (sorted): a group's longest is at most ``(1 + slack) x`` its
    shortest ``+ extra``, so right padding wastes little. One forward per group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= lengths[groups[-1][0]] * (1 + slack) + extra:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``. To a GPU through pinned memory, asynchronously: the host goes
    on laying out the next block instead of waiting for the GPU to drain its queue (a pageable copy waits)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def gather_rows(hidden: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, H) at block columns (B, ...) -> (B, ..., H); negative columns read column 0."""
    flat = columns.clamp(min=0).flatten(1).to(hidden.device)
    picked = hidden.gather(1, flat.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return picked.view(*columns.shape, hidden.shape[-1])


__all__ = ["PrefixLayout", "BranchBlock", "PromptRows", "DecodeSteps", "gather_rows", "length_groups", "to_device"]
