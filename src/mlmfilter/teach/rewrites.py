"""The enhancement task's contrastive samples (after AITQE): a caption, the image, and the rewrite to learn.

For each sampled (good) pair, :meth:`NegativeGenerator.rewrite_pairs` gives up to two samples:

- ``unrelated_caption``: another pair's caption; its target is the pair's own caption (a caption that
  does not belong to the image is replaced by one that does);
- ``poor_caption``: one of the generator's corruptions of the caption; its target is the teacher's
  rewrite of it, asked for with the enhancer's rewrite prompt (:data:`mlmfilter.enhance.prompts.REWRITE_PROMPT`,
  AITQE's "minimal adjustment") and the image, as a base64 data URL of its original bytes. In text
  mode the teacher reads the VLM's description of the image instead (the same describe request as
  labelling, so it is a cache hit).

The teacher's rewrite goes through the teacher client (request cache, retries, stats). A rewrite that
fails (request error, bad response) or fails the enhancer's acceptance checks that apply to a target
(:mod:`mlmfilter.enhance.checks`: empty, cut off at the token limit, chat template / JSON / prompt
leak, talk about the task, refusal, a copy of the poor caption) is an error row keeping its raw reply:
never exported, never dropped, asked again (or answered from the cache) by the next ``teach label``.

Files: ``DIR/rewrites.parquet`` (the samples, made by ``teach negatives``) and
``DIR/rewrite_targets.parquet`` (the same rows with their targets or errors, made by ``teach label``).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa

from mlmfilter.clients.chat import ChatClient, ChatRequest, ChatResult
from mlmfilter.core.sample import Sample
from mlmfilter.enhance.checks import CaptionChecker, CheckOptions
from mlmfilter.enhance.prompts import EnhancePrompts
from mlmfilter.judge.conversations import reference_user_turn
from mlmfilter.teach.label import LabelOptions, TeacherRequests, cached_description
from mlmfilter.teach.pairs import negative_uid

UNRELATED = "unrelated_caption"
POOR = "poor_caption"
#: error reason of a teacher rewrite that fails an acceptance check (the check's own code is in error_detail)
REWRITE_REJECTED = "teacher_rewrite_rejected"
DESCRIBE_FAILED = "teacher_describe_failed"

REWRITE_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),  # the sample's own id (stable for its pair and kind)
        pa.field("parent_uid", pa.string()),  # the good pair: its image is the sample's image
        pa.field("shard", pa.string()),
        pa.field("key", pa.string()),
        pa.field("kind", pa.string()),  # unrelated_caption | poor_caption
        pa.field("caption", pa.string()),  # what the student is asked to rewrite
        pa.field("target", pa.string()),  # the rewrite it learns; None until labelled (poor) or on error
        pa.field("original", pa.string()),  # the good pair's caption
        pa.field("detail", pa.string()),  # how the caption was made (corruption kind and what changed)
        pa.field("teacher", pa.string()),  # poor_caption: the model that wrote the target
        pa.field("reply", pa.string()),  # the teacher's raw text
        pa.field("description", pa.string()),  # text mode: what the teacher saw instead of the image
        pa.field("request_key", pa.string()),
        pa.field("cached", pa.bool_()),
        pa.field("error", pa.string()),
        pa.field("error_detail", pa.string()),
    ]
)


def make_rewrites(pairs: Sequence[Sample], generator) -> list[dict[str, Any]]:
    """The contrastive samples of every pair (a :class:`NegativeGenerator`: deterministic for its seed)."""
    captions = [p.caption for p in pairs]
    rows = []
    for pair in pairs:  # its own caption is never picked as the unrelated one
        for sample in generator.rewrite_pairs(pair.caption, uid=pair.uid, other_captions=captions):
            rows.append(
                {
                    "uid": negative_uid(pair.uid, "rewrite_" + sample.kind),
                    "parent_uid": pair.uid,
                    "shard": pair.shard,
                    "key": f"{pair.key}#rewrite_{sample.kind}",
                    "kind": sample.kind,
                    "caption": sample.caption,
                    "target": sample.target,
                    "original": sample.original,
                    "detail": sample.detail,
                    "teacher": None,
                    "reply": None,
                    "description": None,
                    "request_key": None,
                    "cached": False,
                    "error": None,
                    "error_detail": None,
                }
            )
    return rows


def rewrite_prompts(options: LabelOptions) -> EnhancePrompts:
    """The enhancer's prompts with the label options' rewrite template (checked: it must use ``{caption}``)."""
    return EnhancePrompts(rewrite=options.rewrite_prompt)


def student_turn(options: LabelOptions, caption: str) -> str:
    """The human turn of an exported rewrite sample: ``<image>\\n`` + the rewrite prompt for ``caption``."""
    return reference_user_turn(rewrite_prompts(options).render_rewrite(caption))


class Rewriter:
    """Fills the targets of ``poor_caption`` samples with the teacher's rewrites, through ``client``."""

    def __init__(self, options: LabelOptions, client: ChatClient):
        self.options = options
        self.client = client
        self.requests = TeacherRequests(options)  # the describe request of text mode, the sampling parameters
        self.prompts = rewrite_prompts(options)
        # the checks that make sense for a target: a rewrite of a poor caption may change its numbers,
        # names, language and length (that is the point), so those checks are off
        self.checker = CaptionChecker(
            CheckOptions(
                min_length_ratio=0.0,
                max_length_ratio=1e9,
                check_language=False,
                keep_numbers=False,
                keep_entities=False,
            ),
            instructions=self.prompts.instruction_texts("rewrite"),
        )

    def request(self, row: dict[str, Any], pair: Sample, description: str | None = None) -> ChatRequest:
        prompt = self.prompts.render_rewrite(row["caption"])
        body = {
            "model": self.options.model,
            "messages": [self.requests.message(prompt, pair, description)],
            **self.requests.params(self.options.rewrite_max_tokens),
        }
        return ChatRequest(body, tag=row)

    def plan(self, rows: Iterable[dict[str, Any]], pairs: dict[str, Sample]) -> Iterator[ChatRequest]:
        """The requests a batch file needs next: descriptions not cached yet (text mode), then rewrites."""
        cache = self.client.cache
        for row in rows:
            pair = pairs.get(row["parent_uid"])
            if row["kind"] != POOR or pair is None or not pair.image_bytes:
                continue
            description = None
            if self.options.mode == "text":
                describe, description = cached_description(self.requests, cache, pair)
                if not description:
                    yield describe
                    continue
            yield self.request(row, pair, description)

    def fill(self, rows: Sequence[dict[str, Any]], pairs: dict[str, Sample]) -> list[dict[str, Any]]:
        """Every row again, in the same order: ``poor_caption`` rows with a target or an error."""
        out = [dict(row) for row in rows]
        todo: list[dict[str, Any]] = []
        for row in out:
            if row["kind"] != POOR:
                continue
            row.update(
                target=None,
                teacher=self.options.model,
                reply=None,
                description=None,
                request_key=None,
                cached=False,
                error=None,
                error_detail=None,
            )
            pair = pairs.get(row["parent_uid"])
            if pair is None or not pair.image_bytes:
                row.update(
                    error="missing_image", error_detail="the sample's pair has no image bytes in the teach folder"
                )
            else:
                todo.append(row)
        descriptions: dict[str, str] = {}
        if self.options.mode == "text":
            wanted = {row["parent_uid"]: pairs[row["parent_uid"]] for row in todo}
            for result in self.client.complete_many(self.requests.describe(p) for p in wanted.values()):
                text = (result.text or "").strip() if result.ok else ""
                if text:
                    descriptions[result.tag.uid] = text
                else:
                    for row in todo:
                        if row["parent_uid"] == result.tag.uid:
                            row.update(
                                error=result.error or DESCRIBE_FAILED,
                                reply=result.text,
                                error_detail=f"describing the image: {result.error_detail or 'empty description'}",
                            )
            todo = [row for row in todo if row["error"] is None]
        requests = (self.request(row, pairs[row["parent_uid"]], descriptions.get(row["parent_uid"])) for row in todo)
        for result in self.client.complete_many(requests):
            self._settle(result.tag, result, descriptions.get(result.tag["parent_uid"]))
        return out

    def _settle(self, row: dict[str, Any], result: ChatResult, description: str | None) -> None:
        row.update(reply=result.text, description=description, request_key=result.key, cached=bool(result.cached))
        if not result.ok:
            row.update(error=result.error, error_detail=result.error_detail)
            return
        text = (result.text or "").strip()
        choice = ((result.response or {}).get("choices") or [{}])[0]
        truncated = choice.get("finish_reason") == "length"
        check = self.checker.check(self.checker.facts([row["caption"]])[0], text, truncated=truncated)
        if not check.passed:
            row.update(error=REWRITE_REJECTED, error_detail=f"{check.reason}: {check.detail}")
            return
        row["target"] = text
