"""The teacher's paid requests as stages of the run layer: labels, and rewrites of the poor captions.

- ``teach_label``: one input shard is a teach pair table (``sample.parquet``, ``negatives.parquet``,
  :mod:`.pairs`); its table holds one label row per pair and metric (:data:`LABEL_SCHEMA`).
- ``teach_rewrite``: the input shard is ``rewrites.parquet`` (the enhancement task's samples, made by
  ``teach negatives``); its table is every sample again, the poor captions with the teacher's rewrite
  or an error (:mod:`.rewrites`). The images come from the pair table the options name.

The runner owns markers, atomic tables, stats and provenance, so every request is counted in the
shard's stats (``requests``, ``answered``, ``cache_hits``, ``retries``, tokens), a finished shard is
never asked again, and a killed run resumes at the shards without a marker. The request cache (an
sqlite file named in the options) makes a redone shard free for every answer it already has. The API
key is resolved in :meth:`setup` from the environment or the key file the options name: it is never
part of the options, the identity or anything the runner writes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mlmfilter.clients.cache import RequestCache
from mlmfilter.clients.chat import BAD_RESPONSE, NOT_IN_BATCH_OUTPUT, REQUEST_FAILED, ChatClient, ClientOptions
from mlmfilter.runs.stage import ProgressCallback, Stage, StageOptions, StageTask, identity_schema
from mlmfilter.teach.label import LABEL_SCHEMA, Labeler, LabelOptions, TeacherRequests, sort_label_rows
from mlmfilter.teach.pairs import read_pair_table
from mlmfilter.teach.rewrites import POOR, REWRITE_SCHEMA, Rewriter

#: errors a later run may fix by asking again (the cache holds no answer for them)
RETRYABLE = frozenset({REQUEST_FAILED, BAD_RESPONSE, NOT_IN_BATCH_OUTPUT})
#: what a teacher stage counts per shard (the client's counters over the shard's requests)
REQUEST_COUNTERS = ("requests", "answered", "cache_hits", "retries", "prompt_tokens", "completion_tokens")
#: the label options that decide a rewrite (the metrics, the judge template and its token limit do not)
REWRITE_SETTINGS = (
    "model",
    "mode",
    "describer_model",
    "describe_prompt",
    "text_only_template",
    "describe_max_tokens",
    "temperature",
    "seed",
    "rewrite_prompt",
    "rewrite_max_tokens",
)


class TeacherOptions(StageOptions):
    label: LabelOptions
    client: ClientOptions
    cache: str | None = None  # the request cache (sqlite path); None: no cache


class TeachLabelOptions(TeacherOptions):
    pass


class TeachRewriteOptions(TeacherOptions):
    pairs: str  # the pair table holding the samples' images (``sample.parquet``): where, not what


class TeacherStage(Stage):
    """What both teacher stages share: the request bodies, one client with its cache, the counters."""

    Options = TeacherOptions
    options: TeacherOptions

    def __init__(self, options: TeacherOptions, name: str | None = None):
        super().__init__(options, name)
        self.requests = TeacherRequests(options.label)  # checks metrics and template before anything runs
        self.client: ChatClient | None = None
        #: answers received for the shard in progress when it stopped (an interrupt), for the line it
        #: prints: they are in the request cache, so a re-run does not ask or pay for them again
        self.answers_in_progress = 0

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "teacher": self.options.label.model,
            "mode": self.options.label.mode,
            "endpoint": self.options.client.base_url,
            "template": self.requests.template.name,
        }

    def setup(self) -> None:
        """The client with its cache; the teacher is checked first (a wrong address or a missing key fails
        here in seconds, one line, instead of every request retrying for minutes). Set up only when a shard
        is still to do: a finished run asks nothing, so it needs no server."""
        if self.client is None:
            cache = RequestCache(self.options.cache) if self.options.cache else None
            client = ChatClient(self.options.client, cache=cache)
            if not self.options.client.cache_only:
                try:
                    client.check_endpoint(self.options.label.model)
                except BaseException:
                    client.close()
                    raise
            self.client = client

    @contextmanager
    def counting(self, task: StageTask) -> Iterator[None]:
        """The client's counters over the block, added to the shard's stats."""
        before = self.client.stats.as_dict()
        try:
            yield
        finally:
            after = self.client.stats.as_dict()
            for name in REQUEST_COUNTERS:
                task.stats.count(name, after[name] - before[name])
            self.answers_in_progress = sum(after[k] - before[k] for k in ("answered", "cache_hits"))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()  # and its cache
            self.client = None


class TeachLabelStage(TeacherStage):
    kind = "teach_label"
    Options = TeachLabelOptions

    def schema(self) -> pa.Schema:
        return LABEL_SCHEMA

    def identity(self) -> dict[str, Any]:
        # what decides the labels: the requests (teacher, prompts, parameters); not the endpoint or its limits
        return {"kind": self.kind, **self.requests.identity()}

    def process(self, task: StageTask, progress: ProgressCallback | None = None) -> Iterator[pa.RecordBatch]:
        self.setup()
        pairs = read_pair_table(task.source)
        for pair in pairs:
            pair.shard = task.shard_id  # the run's id of the shard, as every stage table has it
        labeler = Labeler(self.options.label, self.client)
        with self.counting(task):
            rows = sort_label_rows(list(labeler.label(pairs)), pairs, labeler.requests.metrics)
        if progress is not None:
            progress(len(rows), sum(r["error"] is not None for r in rows))
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=LABEL_SCHEMA)
        self.answers_in_progress = 0  # the shard's answers are its table's now


#: the rewrite stage's table: the rewrite samples' columns in the order every stage table has
REWRITE_TABLE_SCHEMA = identity_schema(
    [f for f in REWRITE_SCHEMA if f.name not in ("uid", "shard", "key", "error", "error_detail")]
)


class TeachRewriteStage(TeacherStage):
    """Every row of ``rewrites.parquet`` again, the poor captions with the teacher's rewrite or an error. A
    row keeps its own ``shard`` (the pool shard of the pair it was made from), as ``rewrites.parquet`` has it."""

    kind = "teach_rewrite"
    Options = TeachRewriteOptions
    options: TeachRewriteOptions

    def schema(self) -> pa.Schema:
        return REWRITE_TABLE_SCHEMA

    def identity(self) -> dict[str, Any]:
        label = self.options.label.model_dump(mode="json")
        return {"kind": self.kind, "rewrite": {name: label[name] for name in REWRITE_SETTINGS}}

    def process(self, task: StageTask, progress: ProgressCallback | None = None) -> Iterator[pa.RecordBatch]:
        self.setup()
        rows = pq.read_table(task.source.url, schema=REWRITE_SCHEMA).to_pylist()
        parents = {row["parent_uid"] for row in rows if row["kind"] == POOR}
        pairs = {pair.uid: pair for pair in read_pair_table(self.options.pairs) if pair.uid in parents}
        with self.counting(task):
            filled = Rewriter(self.options.label, self.client).fill(rows, pairs)
        if progress is not None:
            progress(len(filled), sum(r["error"] is not None for r in filled))
        if filled:
            yield pa.RecordBatch.from_pylist(filled, schema=REWRITE_TABLE_SCHEMA)
        self.answers_in_progress = 0
