"""Score readouts: the token trie of 0..100 for real tokenizers, the P(s) algebra, the generate parser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlmfilter.judge.readout import (
    AdaptiveTrieReadout,
    ExpectedScore,
    ScoreLineError,
    ScoreTrie,
    UnsupportedTokenizerError,
    canonical_score_tokens,
    log1mexp,
    parse_generated_score,
    read_score_line,
)
from mlmfilter.models.tiny_vlm import fallback_tokenizer
from tests.support import mlm as mlm_support


@pytest.fixture(scope="module")
def smollm2(smollm2_cache_dir):
    return mlm_support.tokenizer(smollm2_cache_dir)


def test_digit_by_digit_tokenizer_gives_the_101_node_trie(smollm2):
    trie = ScoreTrie.from_tokenizer(smollm2)
    # 10 first digits, 90 second digits under 1..9, and "100"
    assert len(trie.nodes) == 101
    assert [sum(n.depth == d for n in trie.nodes) for d in (1, 2, 3)] == [10, 90, 1]
    assert trie.max_new_tokens == 4  # "1" "0" "0" and one token to see the number end
    for score, seq in enumerate(trie.sequences):
        assert smollm2.decode(list(seq)) == str(score)
    assert trie.sequences[100] == tuple(smollm2.convert_tokens_to_ids(list("100")))
    continuation = set(trie.continuation_ids)
    assert set(smollm2.convert_tokens_to_ids(list("0123456789"))) <= continuation
    assert smollm2.convert_tokens_to_ids("Ġ") not in continuation  # " 5" starts a new word, not a longer number
    assert all(smollm2.convert_ids_to_tokens(i)[0].isdigit() for i in continuation)


def _multi_digit_tokenizer():
    """A byte-level BPE that learned merges for many numbers (like Llama-3's single-token numbers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [str(i) for i in range(101)] * 3 + [str(i) for i in range(0, 101, 5)] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def _exact_log_probs(trie: ScoreTrie, logits: torch.Tensor) -> torch.Tensor:
    """log P(s) from one full logit row per context (K, V): the reductions a backend computes, then combine()."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    log_continue = torch.logsumexp(logits[:, trie.continuation_ids], dim=-1) - lse
    edge_logits = logits[trie.edge_contexts, trie.edge_tokens]
    return trie.combine(lse, log_continue, edge_logits)


def test_trie_combines_exactly_like_walking_each_number():
    tok = _multi_digit_tokenizer()
    trie = ScoreTrie.from_tokenizer(tok)
    assert any(len(seq) == 1 for seq in trie.sequences[10:])  # some multi-digit numbers are one token
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(trie.n_contexts, len(tok), generator=generator) * 3
    fast = _exact_log_probs(trie, logits).double().numpy()
    logp = torch.log_softmax(logits.double(), dim=-1)
    cont = torch.tensor(trie.continuation_ids)
    index = {}
    for n in range(len(trie.nodes)):  # context of a node = 1 + its index, found by its token path
        index[tuple(trie.nodes[a].token_id for a in trie.ancestors(n))] = 1 + n
    for score, seq in enumerate(trie.sequences):
        context, total = 0, 0.0
        for depth, token in enumerate(seq):
            total += float(logp[context, token])
            context = index[tuple(seq[: depth + 1])]
        total += math.log1p(-float(logp[context, cont].exp().sum()))
        assert fast[score] == pytest.approx(total, abs=1e-5)


def _adaptive(trie, logits, threshold, eager_first_level):
    """Drive AdaptiveTrieReadout like a backend does, reading contexts from full logits (rows, K, V)."""
    rows = logits.shape[0]
    readout = AdaptiveTrieReadout(trie, rows, threshold)
    first = [1 + n for n, node in enumerate(trie.nodes) if node.depth == 1] if eager_first_level else []
    wanted = [[0, *first] for _ in range(rows)]
    computed = 0
    while any(wanted):
        r = [i for i, ctx in enumerate(wanted) for _ in ctx]
        k = [c for ctx in wanted for c in ctx]
        picked = logits[r, k].float()
        lse = torch.logsumexp(picked, -1)
        cont = torch.logsumexp(picked[:, trie.continuation_ids], -1) - lse
        readout.add(r, k, lse, cont, picked[:, readout.tokens])
        computed += len(k)
        wanted = [[1 + n for n in nodes] for nodes in readout.to_expand()]
    return readout.log_probs().double(), computed


@pytest.mark.parametrize("tokenizer", ["smollm2", "multi_digit"])
def test_adaptive_trie_is_exact_at_zero_and_within_the_threshold_above(tokenizer, smollm2):
    tok = smollm2 if tokenizer == "smollm2" else _multi_digit_tokenizer()
    trie = ScoreTrie.from_tokenizer(tok)
    generator = torch.Generator().manual_seed(1)
    vocab = max(max(trie.continuation_ids), max(trie.edge_tokens)) + 50
    logits = torch.randn(3, trie.n_contexts, vocab, generator=generator) * 4
    digits = torch.tensor(sorted(set(trie.edge_tokens)))
    logits[..., digits] += 6.0  # an answer that is mostly a number, as a judge's should be
    exact = torch.stack([_exact_log_probs(trie, row) for row in logits]).double()
    eager = tokenizer == "smollm2"
    full, computed = _adaptive(trie, logits, 0.0, eager)
    torch.testing.assert_close(full, exact, atol=1e-5, rtol=0)
    assert computed == 3 * trie.n_contexts
    for threshold in (1e-4, 1e-2):
        approx, computed = _adaptive(trie, logits, threshold, eager)
        error = (approx.exp() - exact.exp()).abs().max()
        assert float(error) < threshold
        assert computed < 3 * trie.n_contexts  # fewer contexts than the whole trie
    assert computed < 3 * trie.n_contexts / 2  # at 1e-2 most of the trie is skipped
    assert float(error) > 0  # ... and it shows: the bound is what holds, not exactness


def test_fallback_tokenizer_spells_every_score():
    trie = ScoreTrie.from_tokenizer(fallback_tokenizer())
    assert trie.max_depth == 3 and len(trie.nodes) == 101


def test_a_tokenizer_without_digits_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "yes": 1, "no": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    with pytest.raises(UnsupportedTokenizerError):
        canonical_score_tokens(tok, 7)


def test_expected_score_statistics():
    logp = np.full(101, -np.inf)
    logp[30], logp[60] = math.log(0.5), math.log(0.25)
    summary = ExpectedScore.from_log_probs(logp)
    assert summary.mean == pytest.approx(40.0)
    assert summary.mass == pytest.approx(0.75)
    assert summary.std == pytest.approx(math.sqrt((2 / 3) * 100 + (1 / 3) * 400))
    assert ExpectedScore.from_log_probs(np.full(101, -np.inf)) is None
    tiny = ExpectedScore.from_log_probs(np.full(101, -800.0))  # far below float64's smallest: still a mean
    assert tiny.mean == pytest.approx(50.0) and tiny.mass == 0.0


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-12, -0.5, -50.0, 0.0], dtype=torch.float64)
    out = log1mexp(x)
    assert float(out[0]) == pytest.approx(math.log(1e-12), rel=1e-6)
    assert float(out[1]) == pytest.approx(math.log(1 - math.exp(-0.5)))
    assert float(out[2]) == pytest.approx(-math.exp(-50.0), rel=1e-6)
    assert float(out[3]) == -math.inf


@pytest.mark.parametrize(
    "text, value",
    [
        ("100\nThe caption matches", 100),
        (" 85 ", 85),
        ("\n42\nrationale", 42),
        ("0", 0),
        ("1000", None),
        ("85.5", None),
        ("-3", None),
        ("eighty", None),
        ("", None),
        ("85 points", None),
    ],
)
def test_generated_answers_parse_like_the_reference(text, value):
    assert parse_generated_score(text) == value


@pytest.mark.parametrize(
    "text, reference, lenient",
    [
        ("85\nThe caption matches.", (85, "The caption matches."), (85, "The caption matches.")),
        ("  7 \n\nwhy", (7, "why"), (7, "why")),
        ("+85\nx", (85, "x"), (85, "x")),
        ("8_5\nx", (85, "x"), None),  # int() reads Python's digit separators; the teacher's line is plain digits
        ("Score: 7\nwhy", None, (7, "why")),
        ("**100**\nok", None, (100, "ok")),
        ("64/100\nfine", None, (64, "fine")),
        ("101\nx", None, None),
        ("about 80\nx", None, None),
        ("8 5\nx", None, None),
        ("excellent\n90", None, None),
        ("", None, None),
    ],
)
def test_one_score_line_parser_with_a_lenient_mode_for_teachers(text, reference, lenient):
    for mode, expected in ((False, reference), (True, lenient)):
        if expected is None:
            with pytest.raises(ScoreLineError):
                read_score_line(text, lenient=mode)
        else:
            assert read_score_line(text, lenient=mode) == expected
    assert parse_generated_score(text) == (reference[0] if reference else None)


def test_score_line_errors_say_why():
    with pytest.raises(ScoreLineError, match="empty reply"):
        read_score_line("  \n ")
    with pytest.raises(ScoreLineError, match=r"first line is not a score: 'about 80'"):
        read_score_line("about 80\nx", lenient=True)
    with pytest.raises(ScoreLineError, match="score 101 is outside 0..100"):
        read_score_line("101")
