"""Scripted stand-ins for the enhancer's two models: a writer that returns chosen rewrites and a
judge that returns chosen scores, so every decision path can be driven on purpose."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pyarrow as pa

from mlmfilter.backends.generation import Generated, GenerationRequest, SamplingParams
from mlmfilter.core import errors
from mlmfilter.judge.backend import RequestFailure
from mlmfilter.scorers.base import ScoreFailure, Scorer

FAIL = "fail"


class ScriptedJudge(Scorer):
    """Scores by caption: ``scores[caption]`` is a number (every column), a dict per column, or FAIL."""

    name = "mlm"
    columns = {"itm": pa.float32(), "odf": pa.float32()}
    image_size = 32

    def __init__(self, scores: dict[str, Any], default: float = 50.0):
        super().__init__()
        self.scores = scores
        self.default = default
        self.seen: list[str] = []

    def score_batch(self, samples):
        out = []
        for sample in samples:
            assert sample.image is not None  # the judge always sees the decoded image
            self.seen.append(sample.caption)
            value = self.scores.get(sample.caption, self.default)
            if value == FAIL:
                out.append(ScoreFailure(errors.SCORER_ERROR, "scripted failure"))
            elif isinstance(value, dict):
                out.append({c: float(value[c]) for c in self.columns})
            else:
                out.append({c: float(value) for c in self.columns})
        return out

    def provenance(self):
        return {"scorer": self.name, "columns": list(self.columns), "scripted": True}


class ScriptedWriter:
    """A CaptionGenerator whose answer to a prompt is ``respond(prompt)``: a list of texts (or
    ``(text, finish_reason)`` pairs), or a RequestFailure. ``crash_on`` raises for prompts containing it."""

    def __init__(self, respond: Callable[[str], Any], crash_on: str | None = None):
        self.respond = respond
        self.crash_on = crash_on
        self.prompts: list[str] = []

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams):
        out = []
        for request in requests:
            assert request.image is not None and request.image.mode == "RGB"
            if self.crash_on and self.crash_on in request.prompt:
                raise RuntimeError("scripted crash: the worker dies mid-shard")
            self.prompts.append(request.prompt)
            answer = self.respond(request.prompt)
            if isinstance(answer, RequestFailure):
                out.append(answer)
                continue
            texts = [a if isinstance(a, tuple) else (a, "stop") for a in answer]
            out.append([Generated(t, reason, len(t.split())) for t, reason in texts])
        return out

    def describe(self):
        return {"backend": "scripted", "model": "scripted-writer"}


def by_caption(rewrites: dict[str, list]) -> Callable[[str], list]:
    """respond(prompt): the rewrites of the original caption that the prompt quotes (longest match first)."""

    def respond(prompt: str):
        for caption in sorted(rewrites, key=len, reverse=True):
            if caption in prompt:
                return rewrites[caption]
        return []

    return respond


def one_torch_thread():
    """Generator fixture body: tiny models run fastest on one thread, and the 2-core test machine is
    shared by other processes (two threads each spinning against them cost 10-50x here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
