"""Turning a judge's next-token probabilities (or its generated text) into a 0..100 score.

Two readouts:

``expected`` (default). For every score s in 0..100 the exact probability that greedy-free
decoding writes the number s and then stops writing digits::

    P(s) = P(t_1 .. t_k | prompt) * P(next token does not start with a digit | prompt, t_1 .. t_k)

where t_1 .. t_k are the *canonical* tokens of ``str(s)`` for the tokenizer at hand (what
``tokenizer.encode(str(s))`` gives, less a leading whitespace-only token that SentencePiece's dummy
prefix adds). Other spellings of the same number ("0" "85", or "8" "5" where "85" is one token)
are not counted. The P(s) sum to ``mass`` <= 1, the probability that the answer is a canonical
number in range; the score is the mean of s under P(s) / mass, ``std`` its spread. A tokenizer
with one token per number (Llama-3: 0..999 are single tokens) needs the logits after the
prompt plus one step per number; a digit-by-digit tokenizer (SmolLM2, Qwen) needs the logits
after each node of the token trie {first digit, 90 second digits under 1..9, "1" "0" "0"}. The
backend computes all of them in one forward over the trie (see ``ScoreTrie``).

``generate`` (reference-compatible). Greedy decoding with enough new tokens to write "100" and
see it end; the first line of the stripped text is parsed with ``int()``; a value outside 0..100
or an unparseable line is a failure (``errors.UNPARSEABLE_SCORE``) and the raw text is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

SCORES = tuple(range(101))
DIGITS = "0123456789"


class UnsupportedTokenizerError(ValueError):
    """The tokenizer cannot spell every score 0..100 as a distinct token sequence."""


@dataclass(frozen=True)
class TrieNode:
    token_id: int
    parent: int  # index of the parent node, -1 for the root (the position after the prompt)
    depth: int  # 1 for a first token


@dataclass
class ScoreTrie:
    """The canonical token sequences of 0..100 as a trie, plus the tokens that continue a number.

    ``nodes`` are ordered parents first. ``terminal[s]`` is the node where the spelling of ``s`` ends.
    Contexts are numbered 0 (root: the logits after the prompt) and 1 + node index (the logits after
    that node's token): what a backend must produce, one logit row per context.
    """

    nodes: list[TrieNode]
    terminal: list[int]  # per score, node index
    continuation_ids: list[int]  # tokens whose text starts with a digit
    sequences: list[tuple[int, ...]] = field(default_factory=list)  # per score, the canonical tokens

    @property
    def n_contexts(self) -> int:
        return 1 + len(self.nodes)

    @property
    def max_depth(self) -> int:
        return max(node.depth for node in self.nodes)

    @property
    def max_new_tokens(self) -> int:
        """Greedy budget that can write "100" (or the longest score) and then one token to see it end."""
        return self.max_depth + 1

    def ancestors(self, index: int) -> list[int]:
        """Node indices from the first token down to ``index`` (inclusive)."""
        chain = []
        while index >= 0:
            chain.append(index)
            index = self.nodes[index].parent
        return chain[::-1]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ScoreTrie":
        sequences = [canonical_score_tokens(tokenizer, s) for s in SCORES]
        if len(set(sequences)) != len(sequences):
            raise UnsupportedTokenizerError("two scores share one token sequence")
        index: dict[tuple[int, ...], int] = {}
        nodes: list[TrieNode] = []
        for seq in sequences:
            for depth in range(1, len(seq) + 1):
                prefix = seq[:depth]
                if prefix not in index:
                    index[prefix] = len(nodes)
                    nodes.append(TrieNode(seq[depth - 1], index[prefix[:-1]] if depth > 1 else -1, depth))
        return cls(
            nodes=nodes,
            terminal=[index[seq] for seq in sequences],
            continuation_ids=continuation_token_ids(tokenizer),
            sequences=sequences,
        )

    @property
    def edge_contexts(self) -> list[int]:
        """Per node, the context whose logits give that node's token probability (its parent's)."""
        return [node.parent + 1 for node in self.nodes]

    @property
    def edge_tokens(self) -> list[int]:
        return [node.token_id for node in self.nodes]

    def reduce_logits(self, logits: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """One logit row per context (K, V) -> (logsumexp (K,), log P(continue) (K,), edge logits (N,)).

        Float32. A backend with a large vocabulary calls this on chunks of rows it gathered itself.
        """
        import torch

        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        cont_ids = torch.as_tensor(self.continuation_ids, device=logits.device)
        log_continue = torch.logsumexp(logits.index_select(-1, cont_ids), dim=-1) - lse
        ctx = torch.as_tensor(self.edge_contexts, device=logits.device)
        tok = torch.as_tensor(self.edge_tokens, device=logits.device)
        return lse, log_continue, logits[ctx, tok]

    def combine(
        self, lse: "torch.Tensor", log_continue: "torch.Tensor", edge_logits: "torch.Tensor"
    ) -> "torch.Tensor":
        """log P(s), s = 0..100, from per-context reductions (..., K) and edge logits (..., N)."""
        import torch

        device = edge_logits.device
        ctx = torch.as_tensor(self.edge_contexts, device=device)
        edge = edge_logits.float() - lse.float().index_select(-1, ctx)  # log P(token | parent context)
        stop = log1mexp(log_continue.float()[..., 1:])  # per node: log P(no digit follows)
        terminal = torch.as_tensor(self.terminal, device=device)
        return edge @ self.path_matrix(device).T + stop.index_select(-1, terminal)

    def score_log_probs(self, logits: "torch.Tensor") -> "torch.Tensor":
        """log P(s) for s in 0..100 from one logit row per context, shape (n_contexts, vocab)."""
        return self.combine(*self.reduce_logits(logits))

    def path_matrix(self, device: Any = None) -> "torch.Tensor":
        import torch

        path = torch.zeros(len(SCORES), len(self.nodes), device=device)
        for s, end in enumerate(self.terminal):
            path[s, self.ancestors(end)] = 1.0
        return path


def log1mexp(x: "torch.Tensor") -> "torch.Tensor":
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    import torch

    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def canonical_score_tokens(tokenizer: Any, score: int) -> tuple[int, ...]:
    """Token ids that spell ``str(score)`` when it follows the answer prefix (see module docstring)."""
    text = str(score)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    while ids and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]  # SentencePiece's dummy prefix "▁": the answer prefix already holds the space
    if not ids or tokenizer.decode(ids).strip() != text:
        raise UnsupportedTokenizerError(f"cannot spell the score {text!r} with this tokenizer (got {ids})")
    return tuple(ids)


def continuation_token_ids(tokenizer: Any) -> list[int]:
    """Tokens whose text starts with a digit: after a number, they would make it longer.

    Token strings are read raw (``get_vocab``): byte-level BPE and SentencePiece mark a leading
    space with a prefix character ("Ġ", "▁"), so " 5" is correctly not a continuation.
    """
    return sorted(i for token, i in tokenizer.get_vocab().items() if token[:1] in DIGITS)


@dataclass(frozen=True)
class ExpectedScore:
    """Summary of P(s): probability-weighted mean, spread and the mass before renormalising."""

    mean: float
    std: float
    mass: float

    @classmethod
    def from_log_probs(cls, log_probs: Sequence[float] | np.ndarray) -> "ExpectedScore | None":
        """None when no score has any probability (a judge that never answers with a number)."""
        logp = np.asarray(log_probs, dtype=np.float64)
        top = np.max(logp)
        if not np.isfinite(top):
            return None
        weights = np.exp(logp - top)
        total = weights.sum()
        q = weights / total
        scores = np.arange(len(q), dtype=np.float64)
        mean = float((q * scores).sum())
        std = float(math.sqrt(max(float((q * (scores - mean) ** 2).sum()), 0.0)))
        mass = float(np.exp(top) * total)
        return cls(mean=mean, std=std, mass=mass)


def parse_generated_score(text: str) -> int | None:
    """The reference parse: ``int()`` of the first line of the stripped text, kept if in 0..100."""
    stripped = (text or "").strip()
    if not stripped:
        return None
    first_line = stripped.splitlines()[0]
    try:
        value = int(first_line)
    except ValueError:
        return None
    return value if 0 <= value <= 100 else None
