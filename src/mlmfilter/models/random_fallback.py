"""The random-weights fallback every loader offers (``allow_random_fallback``), written once.

When a model can be neither found nor downloaded and the user allowed it, a loader builds a tiny
model of the real architecture with random weights in its place (demos, tests, machines without a
hub), says so loudly in the log, marks its source as a random fallback and puts a warning into the
scorer's provenance, which the run folder collects. Every stand-in is drawn from :data:`RANDOM_SEED`,
so every worker process builds the same one and a run's scores are reproducible.

The stand-ins' tokenizers are byte-level BPEs trained here on a few sentences
(:func:`train_byte_level_bpe`): no download, deterministic.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

#: every stand-in's weights (and so its scores) come from this seed
RANDOM_SEED = 0


def random_weights_warning(scores: str = "scores") -> str:
    """The one-line warning a stand-in's provenance carries (``scores``: whose scores are meaningless)."""
    return f"WARNING: random weights, {scores} are meaningless"


def warn_stand_in(reason: Any, stand_in: str) -> None:
    """Say, when the model is inspected, that ``stand_in`` (e.g. "CLIP") replaces it and why."""
    log.warning("%s -- allow_random_fallback is set: using a tiny RANDOM %s instead", reason, stand_in)


def stand_in_source(name: str) -> dict[str, Any]:
    """The ``source`` of a model's provenance when a stand-in replaces it (part of the run's identity)."""
    return {"model": name, "random_fallback": True, "seed": RANDOM_SEED}


@contextlib.contextmanager
def seeded(seed: int = RANDOM_SEED) -> Iterator[None]:
    """Weights initialised inside are drawn from ``seed``; the caller's random state is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def train_byte_level_bpe(
    corpus: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str],
    *,
    lowercase: bool = False,
    split_digits: bool = False,
):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus`` (no download, deterministic).

    ``lowercase``: NFC then lower case before splitting (CLIP's tokenizer lower-cases);
    ``split_digits``: every digit its own pre-token, so numbers are spelt one digit per token.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    if lowercase:
        bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return bpe
