"""The narrow interface between the MLM scorer and whatever runs the judge model.

A request is one image and N prompt texts (one per metric, the filled templates without image
placeholder or conversation): everything model-family specific (image placeholder, conversation
format, tokenization, image preprocessing, KV-cache reuse) stays behind this interface, so a vLLM
or HTTP backend can be added without touching the scorer.

Both methods return one entry per request, in order; a request that cannot be served yields a
:class:`RequestFailure` in its place and never sinks the other requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image


@dataclass
class JudgeRequest:
    image: Image.Image
    prompts: Sequence[str]  # one filled template per metric


@dataclass
class RequestFailure:
    reason: str  # an mlmfilter.errors code
    detail: str = ""


@runtime_checkable
class JudgeBackend(Protocol):
    def score_distributions(self, requests: Sequence[JudgeRequest]) -> list[np.ndarray | RequestFailure]:
        """Per request an array (n_prompts, 101): log P(s) for s = 0..100 (see judge.readout)."""

    def generate(self, requests: Sequence[JudgeRequest], max_new_tokens: int | None = None) -> list[list[str] | RequestFailure]:
        """Per request the greedy continuation of each prompt (special tokens removed).

        ``max_new_tokens=None`` lets the backend pick enough tokens to write "100" and see it end.
        """

    def describe(self) -> dict[str, Any]:
        """Provenance: model, family, conversation format, dtype, what is shared between prompts."""
