"""How candidates are written: one class per mode, all over the :class:`CaptionGenerator` interface.

- ``rewrite``: the VLM rewrites the caption (``prompts.rewrite``); ``n`` candidates by sampling.
- ``fuse`` (CapsFusion): the VLM describes the image (``prompts.describe``, ``n`` descriptions), then
  fuses the raw caption with each description (``prompts.fuse``) into one caption.
- ``aitqe``: the AITQE model's own answer (its prompt, greedy, :mod:`mlmfilter.judge.aitqe` parses
  it); its ``Recaption`` is the candidate, present only when AITQE judges the caption poor.

A mode returns per pair a :class:`Written`: the candidate texts, or why none could be written, and
what it generated on the way (fuse: the descriptions; aitqe: the raw answers) for the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image

from mlmfilter.backends.generation import CaptionGenerator, Generated, GenerationRequest, SamplingParams
from mlmfilter.enhance.prompts import EnhancePrompts
from mlmfilter.judge.backend import RequestFailure

MODES = ("rewrite", "fuse", "aitqe")


@dataclass
class Written:
    texts: list[Generated]
    failure: str | None = None  # why nothing could be written ("reason: detail")
    intermediate: list[str] | None = None


def _failure_text(failure: RequestFailure) -> str:
    return f"{failure.reason}: {failure.detail}" if failure.detail else failure.reason


class RewriteMode:
    name = "rewrite"

    def __init__(self, generator: CaptionGenerator, prompts: EnhancePrompts, params: SamplingParams):
        self.generator, self.prompts, self.params = generator, prompts, params

    def write(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[Written]:
        requests = [GenerationRequest(image, self.prompts.render_rewrite(c)) for image, c in zip(images, captions)]
        return [
            Written([], _failure_text(out)) if isinstance(out, RequestFailure) else Written(list(out))
            for out in self.generator.generate(requests, self.params)
        ]


class FuseMode:
    name = "fuse"

    def __init__(self, generator: CaptionGenerator, prompts: EnhancePrompts, params: SamplingParams):
        self.generator, self.prompts, self.params = generator, prompts, params

    def write(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[Written]:
        described = self.generator.generate(
            [GenerationRequest(image, self.prompts.render_describe()) for image in images], self.params
        )
        results: list[Written | None] = [None] * len(images)
        jobs, owners = [], []
        for i, out in enumerate(described):
            if isinstance(out, RequestFailure):
                results[i] = Written([], "describe: " + _failure_text(out))
                continue
            results[i] = Written([], intermediate=[g.text for g in out])
            for synthetic in out:
                jobs.append(GenerationRequest(images[i], self.prompts.render_fuse(captions[i], synthetic.text)))
                owners.append(i)
        fused = self.generator.generate(jobs, self.params.model_copy(update={"n": 1})) if jobs else []
        for i, out in zip(owners, fused):
            written = results[i]
            if isinstance(out, RequestFailure):
                written.failure = written.failure or "fuse: " + _failure_text(out)
            else:
                written.texts.extend(out)
        for written in results:  # a pair with some fused candidates keeps them; only all-failed is a failure
            if written.texts:
                written.failure = None
        return results  # type: ignore[return-value]


class AitqeMode:
    """Thin adapter over AITQE's answer: its ``Recaption`` is the one candidate."""

    name = "aitqe"

    def __init__(
        self, generator: CaptionGenerator, params: SamplingParams | None = None, parse: Callable | None = None
    ):
        from mlmfilter.judge import aitqe

        self.generator = generator
        self.aitqe = aitqe
        # greedy as released; AITQE writes the Recaption before the overall score, so stopping at the
        # score's marker (the released early-stop mode) loses nothing the enhancer reads
        self.params = params or SamplingParams(max_new_tokens=aitqe.MAX_NEW_TOKENS, stop=(aitqe.OVERALL_MARKER,))
        self.parse = parse or aitqe.parse_aitqe

    def write(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[Written]:
        requests = [GenerationRequest(image, self.aitqe.prompt(c)) for image, c in zip(images, captions)]
        results = []
        for out in self.generator.generate(requests, self.params):
            if isinstance(out, RequestFailure):
                results.append(Written([], _failure_text(out)))
                continue
            texts = []
            for raw in out:
                answer = self.parse(raw.text)
                if answer.recaption is not None:  # a recaption cut off at the token limit is checked as truncated
                    cut = "the recaption is cut off" in answer.problems
                    texts.append(Generated(answer.recaption, "length" if cut else "stop", raw.new_tokens))
            results.append(Written(texts, intermediate=[raw.text for raw in out]))
        return results
