"""The narrow interface between the MLM scorer and whatever runs the judge model.

A request is one image and N prompt texts (one per metric, the filled templates without image
placeholder or conversation): everything model-family specific (image placeholder, conversation
format, tokenization, image preprocessing, KV-cache reuse) stays behind this interface, so a vLLM
or HTTP backend can be added without touching the scorer.

Both scoring methods return one entry per request, in order; a request that cannot be served yields
a :class:`RequestFailure` in its place and never sinks the other requests.

A backend declares what it can do (:class:`BackendCapabilities`): the scorer refuses a readout the
backend cannot give, decodes images to the size it wants and records the readout definition and its
error bound from the backend that produced the scores (``readout_provenance()``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

#: "exact": the distribution over 0..100 from the model's full next-token distributions (up to the
#: adaptive trie's stated threshold); "top_k": only the top-k log-probabilities the engine returns per
#: step, so part of the mass cannot be placed (stated per prompt, see :class:`TopKDistribution`);
#: "none": the backend can only generate text (the ``generate`` readout only)
Distribution = Literal["exact", "top_k", "none"]


@dataclass(frozen=True)
class BackendCapabilities:
    distribution: Distribution
    #: shorter image side the backend wants decoded images at (None: any size, it resizes itself)
    image_size: int | None
    #: requests it takes at once (a micro-batch, an engine batch, or in-flight HTTP requests)
    max_concurrency: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JudgeRequest:
    image: Image.Image
    prompts: Sequence[str]  # one filled template per metric


@dataclass
class RequestFailure:
    reason: str  # an mlmfilter.core.errors code
    detail: str = ""


@dataclass
class TopKDistribution:
    """What a ``top_k`` backend returns per request instead of a bare array.

    ``log_probs`` (n_prompts, 101) as for an exact backend; ``unplaced`` (n_prompts,) the probability
    mass the backend could not place: tokens outside the returned top-k and trie nodes it could not
    expand. Every P(s) is within ``unplaced`` of the exact value, and the L1 distance between the
    returned and the exact P (both unnormalised) is at most ``2 * unplaced``.
    """

    log_probs: np.ndarray
    unplaced: np.ndarray


class LogprobsMissing(RuntimeError):
    """The engine or server gave no log-probabilities: the expected readout is impossible on it.

    Not one request's fault: the scorer fails the shard with this message instead of writing error rows.
    """


@runtime_checkable
class JudgeBackend(Protocol):
    @property
    def capabilities(self) -> BackendCapabilities:
        """What this backend can do (see :class:`BackendCapabilities`)."""

    def score_distributions(
        self, requests: Sequence[JudgeRequest]
    ) -> list[np.ndarray | TopKDistribution | RequestFailure]:
        """Per request an array (n_prompts, 101): log P(s) for s = 0..100 (see judge.readout), or a
        :class:`TopKDistribution` from a ``top_k`` backend."""

    def generate(
        self, requests: Sequence[JudgeRequest], max_new_tokens: int | None = None
    ) -> list[list[str] | RequestFailure]:
        """Per request the greedy continuation of each prompt (special tokens removed).

        ``max_new_tokens=None`` lets the backend pick enough tokens to write "100" and see it end.
        """

    def describe(self) -> dict[str, Any]:
        """Provenance: model, family, conversation format, dtype, what is shared between prompts."""

    def readout_provenance(self) -> dict[str, str]:
        """``readout_definition`` and ``readout_bound`` of the expected readout it computes."""

    def close(self) -> None:
        """Release engines, clients, caches; the backend is not used afterwards."""


def capabilities_of(backend: Any) -> BackendCapabilities:
    """A backend's declared capabilities; one written before they existed is taken as exact."""
    declared = getattr(backend, "capabilities", None)
    if isinstance(declared, BackendCapabilities):
        return declared
    return BackendCapabilities(
        "exact", getattr(backend, "image_size", None), int(getattr(backend, "batch_size", 1) or 1)
    )


def refuse_unsupported_readout(readout: str, capabilities: BackendCapabilities, backend_name: str) -> None:
    """The one-line refusal of ``readout=expected`` on a backend that only generates."""
    if readout == "expected" and capabilities.distribution == "none":
        raise ValueError(
            f"the {backend_name} backend cannot give the expected readout (it returns no log-probabilities); "
            "use readout=generate"
        )


#: the expected readout as the exact backends compute it (see judge.readout)
EXACT_EXPECTED_DEFINITION = (
    "P(s) = P(canonical tokens of str(s) | prompt) * P(next token does not start with a digit); "
    "score = sum s P(s) / mass, mass = sum P(s) over s = 0..100, std = sqrt(sum (s - score)^2 P(s) / mass)"
)


def adaptive_trie_bound(threshold: float) -> str:
    """The error bound of :class:`~mlmfilter.judge.readout.AdaptiveTrieReadout` at ``threshold``."""
    if threshold == 0:
        return "exact: the whole score trie is computed"
    return (
        f"trie nodes whose path probability is below {threshold:g} are not expanded "
        f"(P(stop) taken as 1, nodes under them 0): every P(s) is within {threshold:g} of exact"
    )
