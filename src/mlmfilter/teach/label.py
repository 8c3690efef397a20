"""Teacher labels: one request per pair and metric, answered as a score line followed by a rationale.

The request is the judge's own: the metric's MLM-Filter prompt (:mod:`mlmfilter.judge.prompts`, which
asks for "a single line containing the value" and then an explanation), with the image as a base64
data URL of the pair's ORIGINAL bytes placed before the text, as the reference puts ``<image>\\n``
before the prompt. The text-only variant (the paper's GPT-4 teacher) first asks a VLM, through the
same client, for a detailed description of the image, and then shows the teacher that description
in place of the image.

A reply parses when its first non-empty line is an integer 0..100 (optionally ``Score: 85``,
``**85**`` or ``85/100``); the rest is the rationale. Anything else is an error row that keeps the
raw reply: never dropped, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlmfilter.clients.chat import ChatClient, ChatRequest, ChatResult, image_data_url, message_text, user_message
from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.enhance.prompts import REWRITE_PROMPT, EnhancePrompts
from mlmfilter.judge.conversations import reference_user_turn
from mlmfilter.judge.prompts import resolve_metrics, resolve_template, short_name
from mlmfilter.judge.readout import ScoreLineError as ReplyParseError
from mlmfilter.judge.readout import read_score_line
from mlmfilter.runs.stage import identity_schema

DESCRIBE_PROMPT = (
    "Describe this image in detail: every visible object with its color, size, shape, material and position, "
    "the people and what they do, any text in the image, the setting and the overall scene."
)
#: what the text-only teacher reads instead of the image (the paper's prompt is not published)
TEXT_ONLY_TEMPLATE = "Image Description: {description}\n\n{prompt}"

LABEL_SCHEMA = identity_schema(
    [
        pa.field("metric", pa.string()),  # short name: itm, odf, ctq, su
        pa.field("score", pa.int16()),
        pa.field("rationale", pa.string()),
        pa.field("reply", pa.string()),  # the teacher's raw text, also for rows that did not parse
        pa.field("description", pa.string()),  # text-only mode: what the teacher saw instead of the image
        pa.field("teacher", pa.string()),
        pa.field("mode", pa.string()),
        pa.field("parent_uid", pa.string()),
        pa.field("corruption", pa.string()),
        pa.field("request_key", pa.string()),
        pa.field("cached", pa.bool_()),
    ]
)


class LabelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str  # the teacher, as the endpoint names it
    metrics: list[str] = Field(default_factory=lambda: ["all"])
    template: str = "v2"
    mode: str = Field("image", pattern="^(image|text)$")
    describer_model: str | None = None  # text mode: the VLM that writes the description (default: ``model``)
    describe_prompt: str = DESCRIBE_PROMPT
    text_only_template: str = TEXT_ONLY_TEMPLATE
    max_tokens: int = Field(512, ge=1)
    describe_max_tokens: int = Field(512, ge=1)
    temperature: float = 0.0
    seed: int | None = None
    # the enhancement task's poor-caption targets (teach/rewrites.py): the enhancer's rewrite prompt
    rewrite_prompt: str = REWRITE_PROMPT
    rewrite_max_tokens: int = Field(256, ge=1)

    @field_validator("rewrite_prompt")
    @classmethod
    def _rewrite_template(cls, value: str) -> str:
        EnhancePrompts(rewrite=value)  # must use {caption} and nothing else
        return value

    def resolved_metrics(self) -> list[str]:
        return resolve_metrics(self.metrics)


def parse_reply(text: str | None) -> tuple[int, str]:
    """``"85\\nThe caption ..."`` -> (85, "The caption ..."); raises ReplyParseError otherwise."""
    return read_score_line(text, lenient=True)


@dataclass(frozen=True)
class PendingLabel:
    pair: Sample
    metric: str  # long name
    description: str | None = None


class TeacherRequests:
    """The exact request bodies: a pair's image + the metric prompt, a description request, or text-only."""

    def __init__(self, options: LabelOptions):
        self.options = options
        self.template = resolve_template(options.template)
        self.metrics = options.resolved_metrics()

    def prompt(self, metric: str, caption: str) -> str:
        return self.template.render(metric, caption)

    def judge_turn(self, metric: str, caption: str) -> str:
        """The student's request text (human turn of the export): ``<image>\\n`` + the prompt."""
        return reference_user_turn(self.prompt(metric, caption))

    def params(self, max_tokens: int) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": self.options.temperature}
        if self.options.seed is not None:
            params["seed"] = self.options.seed
        return params

    def message(self, prompt: str, pair: Sample, description: str | None = None) -> dict[str, Any]:
        """The teacher's user turn for ``prompt`` about ``pair``: the image and the prompt, or in text mode
        the description of the image in its place."""
        if self.options.mode == "text":
            return user_message(self.options.text_only_template.format(description=description, prompt=prompt))
        return user_message(prompt, image_data_url(pair.image_bytes, pair.image_format))

    def label(self, pending: PendingLabel) -> ChatRequest:
        prompt = self.prompt(pending.metric, pending.pair.caption)
        body = {
            "model": self.options.model,
            "messages": [self.message(prompt, pending.pair, pending.description)],
            **self.params(self.options.max_tokens),
        }
        return ChatRequest(body, tag=pending)

    def describe(self, pair: Sample) -> ChatRequest:
        url = image_data_url(pair.image_bytes, pair.image_format)
        body = {
            "model": self.options.describer_model or self.options.model,
            "messages": [user_message(self.options.describe_prompt, url)],
            **self.params(self.options.describe_max_tokens),
        }
        return ChatRequest(body, tag=pair)

    def identity(self) -> dict[str, Any]:
        return {
            "options": self.options.model_dump(mode="json"),
            "metrics": self.metrics,
            "template": self.template.name,
            "prompt_sha256": self.template.sha256(self.metrics),
        }


def cached_description(requests: TeacherRequests, cache, pair: Sample) -> tuple[ChatRequest, str]:
    """A pair's describe request and its cached description ("" when not answered yet), for batch plans."""
    describe = requests.describe(pair)
    answer = cache.get(describe.key) if cache is not None else None
    return describe, (message_text(answer) or "").strip() if answer else ""


class Labeler:
    """Labels pairs through a :class:`ChatClient`; yields one row (:data:`LABEL_SCHEMA`) per pair and metric."""

    def __init__(self, options: LabelOptions, client: ChatClient):
        self.options = options
        self.client = client
        self.requests = TeacherRequests(options)

    def plan(self, pairs: Iterable[Sample]) -> Iterator[ChatRequest]:
        """The requests a live run would send next, for a batch file. Text mode goes in two rounds:
        descriptions not in the cache yet, then the label requests of pairs whose description is."""
        cache = self.client.cache
        for pair in pairs:
            if not pair.image_bytes:
                continue
            if self.options.mode == "text":
                describe, text = cached_description(self.requests, cache, pair)
                if not text:
                    yield describe
                    continue
                yield from (self.requests.label(PendingLabel(pair, m, text)) for m in self.requests.metrics)
            else:
                yield from (self.requests.label(PendingLabel(pair, m)) for m in self.requests.metrics)

    def label(self, pairs: Iterable[Sample]) -> Iterator[dict[str, Any]]:
        pairs = list(pairs)
        metrics = self.requests.metrics
        usable = []
        for pair in pairs:
            if pair.image_bytes:
                usable.append(pair)
            else:  # no image: nothing to show the teacher; every metric is an error row
                for metric in metrics:
                    yield self._row(
                        PendingLabel(pair, metric), None, errors.MISSING_IMAGE, "the pair has no image bytes"
                    )
        if self.options.mode == "text":
            pending: list[PendingLabel] = []
            # one request per distinct image: a pair and its negatives share one description (asked once,
            # not once per pair in flight at the same time)
            describe: dict[str, tuple[ChatRequest, list[Sample]]] = {}
            for pair in usable:
                request = self.requests.describe(pair)
                describe.setdefault(request.key, (request, []))[1].append(pair)
            for result in self.client.complete_many(request for request, _ in describe.values()):
                for pair in describe[result.key][1]:
                    if result.ok and (result.text or "").strip():
                        pending.extend(PendingLabel(pair, m, result.text.strip()) for m in metrics)
                    else:
                        reason = result.error or errors.SCORER_ERROR
                        detail = f"describing the image: {result.error_detail or 'empty description'}"
                        for metric in metrics:
                            yield self._row(PendingLabel(pair, metric), result, reason, detail)
        else:
            pending = [PendingLabel(p, m) for p in usable for m in metrics]
        for result in self.client.complete_many(self.requests.label(p) for p in pending):
            if not result.ok:
                yield self._row(result.tag, result, result.error, result.error_detail)
                continue
            try:
                score, rationale = parse_reply(result.text)
            except ReplyParseError as exc:
                yield self._row(result.tag, result, errors.UNPARSEABLE_SCORE, str(exc))
                continue
            yield self._row(result.tag, result, None, None, score=score, rationale=rationale)

    def _row(
        self,
        pending: PendingLabel,
        result: ChatResult | None,
        error: str | None,
        detail: str | None,
        score: int | None = None,
        rationale: str | None = None,
    ) -> dict[str, Any]:
        pair = pending.pair
        return {
            "uid": pair.uid,
            "shard": pair.shard,
            "key": pair.key,
            "metric": short_name(pending.metric),
            "score": score,
            "rationale": rationale,
            "reply": result.text if result is not None else None,
            "description": pending.description,
            "teacher": self.options.model,
            "mode": self.options.mode,
            "parent_uid": pair.meta.get("parent_uid"),
            "corruption": pair.meta.get("corruption"),
            "request_key": result.key if result is not None else None,
            "cached": bool(result.cached) if result is not None else False,
            "error": error,
            "error_detail": detail,
        }


def sort_label_rows(rows: list[dict[str, Any]], pairs: list[Sample], metrics: list[str]) -> list[dict[str, Any]]:
    """Pair order, then metric order: the table does not depend on which answer came back first."""
    pair_index = {p.uid: i for i, p in enumerate(pairs)}
    metric_index = {short_name(m): i for i, m in enumerate(metrics)}
    return sorted(rows, key=lambda r: (pair_index.get(r["uid"], len(pairs)), metric_index.get(r["metric"], 99)))
