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
after each node of the token trie {first digit, 90 second digits under 1..9, "1" "0" "0"}.

Adaptive trie (``trie_threshold``, default 1e-4, :class:`AdaptiveTrieReadout`): the backend computes
the root and the first digits, then expands a deeper node only if its path probability
P(t_1 .. t_k | prompt) >= threshold. An unexpanded node is taken to stop there (P(stop) = 1) and the
numbers under it get P = 0, so EVERY P(s) IS WITHIN ``trie_threshold`` OF THE EXACT VALUE (both
errors are bounded by the unexpanded node's path probability). ``trie_threshold=0`` computes the
whole trie: exact.

``generate`` (reference-compatible). Greedy decoding with enough new tokens to write "100" and
see it end; the first line of the stripped text is parsed with ``int()``; a value outside 0..100
or an unparseable line is a failure (``errors.UNPARSEABLE_SCORE``) and the raw text is kept.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # torch only where a backend computes probabilities
    import torch

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

    def combine(self, lse: "torch.Tensor", log_continue: "torch.Tensor", edge_logits: "torch.Tensor") -> "torch.Tensor":
        """log P(s), s = 0..100, from per-context reductions (..., K) and edge logits (..., N)."""
        import torch

        device = edge_logits.device
        ctx = torch.as_tensor(self.edge_contexts, device=device)
        edge = edge_logits.float() - lse.float().index_select(-1, ctx)  # log P(token | parent context)
        stop = log1mexp(log_continue.float()[..., 1:])  # per node: log P(no digit follows)
        terminal = torch.as_tensor(self.terminal, device=device)
        return self.node_log_paths(edge).index_select(-1, terminal) + stop.index_select(-1, terminal)

    def node_log_paths(self, edge_log_probs: "torch.Tensor") -> "torch.Tensor":
        """Per node, log P(its tokens | prompt): the sum of the edge log-probs from the first token down.

        A gather-sum rather than a matmul with the 0/1 path matrix, so -inf edges (never computed) give
        -inf paths, not NaN.
        """
        import torch

        index = torch.as_tensor(self._ancestor_index, device=edge_log_probs.device)  # (N, depth), N = "none"
        padded = torch.cat([edge_log_probs, torch.zeros_like(edge_log_probs[..., :1])], dim=-1)
        return padded[..., index].sum(-1)

    @functools.cached_property
    def _ancestor_index(self) -> np.ndarray:
        n_nodes = len(self.nodes)
        index = np.full((n_nodes, self.max_depth), n_nodes, dtype=np.int64)
        for n in range(n_nodes):
            chain = self.ancestors(n)
            index[n, : len(chain)] = chain
        return index

    def descendants_closure(self, selected: "torch.Tensor") -> "torch.Tensor":
        """``selected`` (..., N) bool, plus every node under a selected node."""
        out = selected.clone()
        for n, node in enumerate(self.nodes):  # parents first
            if node.parent >= 0:
                out[..., n] |= out[..., node.parent]
        return out


class AdaptiveTrieReadout:
    """log P(s) for many rows (one per prompt) from trie contexts computed a level at a time.

    A backend first computes the root context (the logits after the prompt) and usually the first
    level; then, round by round, :meth:`to_expand` names the nodes worth a forward: those whose parent
    is computed and whose path probability P(t_1 .. t_k | prompt) is >= ``threshold`` (with every node
    under them, so "100" rides along with "10"). A node never computed counts as "the number stops
    here" (P(stop) = 1) and nodes under it get P = 0. Hence every P(s) is off by LESS than
    ``threshold`` (the unexpanded node's path probability bounds both errors); ``threshold`` 0
    computes the whole trie and is exact.
    """

    def __init__(self, trie: ScoreTrie, n_rows: int, threshold: float, device: Any = None):
        import torch

        self.trie = trie
        self.threshold = float(threshold)
        self.tokens = sorted(set(trie.edge_tokens))  # columns of the token logits a backend supplies
        k = trie.n_contexts
        self.lse = torch.zeros((n_rows, k), device=device)
        self.log_continue = torch.full((n_rows, k), -torch.inf, device=device)
        self.token_logits = torch.full((n_rows, k, len(self.tokens)), -torch.inf, device=device)
        self.done = torch.zeros((n_rows, k), dtype=torch.bool, device=device)
        self._columns = torch.as_tensor([self.tokens.index(t) for t in trie.edge_tokens], device=device)
        self._edge_contexts = torch.as_tensor(trie.edge_contexts, device=device)

    def add(self, rows, contexts, lse, log_continue, token_logits) -> None:
        """Reductions of computed contexts: ``rows``/``contexts`` (n,), lse/log_continue (n,), token_logits (n, T)."""
        rows = _long_tensor(rows, self.lse.device)
        contexts = _long_tensor(contexts, self.lse.device)
        self.lse[rows, contexts] = lse.float()
        self.log_continue[rows, contexts] = log_continue.float()
        self.token_logits[rows, contexts] = token_logits.float()
        self.done[rows, contexts] = True

    def edge_logits(self) -> "torch.Tensor":
        """(rows, N) logit of each node's token at its parent's context; -inf where that is not computed."""
        return self.token_logits[:, self._edge_contexts, self._columns]

    def to_expand(self) -> list[list[int]]:
        """Per row, the node indices (parents first) the next forward should compute; empty: finished."""
        import torch

        edge = self.edge_logits() - self.lse[:, self._edge_contexts]
        paths = self.trie.node_log_paths(edge)
        bound = math.log(self.threshold) if self.threshold > 0 else -math.inf
        pending = ~self.done[:, 1:]
        wanted = pending & self.done[:, self._edge_contexts] & (paths >= bound)
        wanted = self.trie.descendants_closure(wanted) & pending
        return [torch.nonzero(row).flatten().tolist() for row in wanted.cpu()]

    def log_probs(self) -> "torch.Tensor":
        """(rows, 101) log P(s), within ``threshold`` of the exact values (see the class docstring)."""
        return self.trie.combine(self.lse, self.log_continue, self.edge_logits())


def _long_tensor(values: Any, device: Any) -> "torch.Tensor":
    import torch

    tensor = torch.as_tensor(values, dtype=torch.long)
    if tensor.device.type == "cpu" and torch.device(device or "cpu").type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)  # no wait for the GPU's queue to drain
    return tensor.to(device)


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


#: a teacher's score line: ``85``, ``Score: 85``, ``**85**``, ``85/100`` (markup and a "score" label around the number)
_LENIENT_SCORE_LINE = re.compile(r"^\W*(?:score\s*[:=]?\s*)?(\d{1,3})(?:\s*/\s*100)?\W*$", re.IGNORECASE)


class ScoreLineError(ValueError):
    """The text does not start with a score line 0..100 (the message says why)."""


def read_score_line(text: str | None, lenient: bool = False) -> tuple[int, str]:
    """The score on the first line of the stripped text, and the text after that line (a rationale).

    The reference (``lenient=False``): ``int()`` of the first line, as the released MLM-Filter scripts
    and Open-Qwen2VL's ``apply_filter.py`` parse a judge's answer. ``lenient``: a teacher's reply may
    dress the number (``Score: 85``, ``**85**``, ``85/100``). Either way the score must be in 0..100;
    otherwise :class:`ScoreLineError` says why.
    """
    lines = (text or "").strip().splitlines()
    if not lines:
        raise ScoreLineError("empty reply")
    first = lines[0]
    if lenient:
        match = _LENIENT_SCORE_LINE.match(first.strip())
        score = int(match.group(1)) if match else None
    else:
        try:
            score = int(first)
        except ValueError:
            score = None
    if score is None:
        raise ScoreLineError(f"first line is not a score: {first[:100]!r}")
    if not 0 <= score <= 100:
        raise ScoreLineError(f"score {score} is outside 0..100")
    return score, "\n".join(lines[1:]).strip()


def parse_generated_score(text: str | None) -> int | None:
    """The reference parse of a generated answer (:func:`read_score_line`); None when it is no score."""
    try:
        return read_score_line(text)[0]
    except ScoreLineError:
        return None
