"""Teacher labelling as a stage of the run layer: one label table per input shard.

An input shard is a teach pair table (``sample.parquet``, ``negatives.parquet``: read as pairs, with
their negative tags) or any pool shard the readers take (tar, parquet, folder: labelled as it is).
The runner owns markers, atomic tables, stats and provenance; the request cache (an sqlite file
named in the options) makes a redone shard free for every answer it already has. The API key is
resolved in :meth:`setup` from the environment or the key file the options name: it is never part
of the options, the identity or anything the runner writes.
"""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mlmfilter.clients.cache import RequestCache
from mlmfilter.clients.chat import BAD_RESPONSE, NOT_IN_BATCH_OUTPUT, REQUEST_FAILED, ChatClient, ClientOptions
from mlmfilter.runs.stage import ProgressCallback, Stage, StageOptions, StageTask
from mlmfilter.teach.label import LABEL_SCHEMA, Labeler, LabelOptions, TeacherRequests, sort_label_rows
from mlmfilter.teach.pairs import PAIR_SCHEMA, TeachPair, read_pairs

#: errors a later run may fix by asking again (the cache holds no answer for them)
RETRYABLE = frozenset({REQUEST_FAILED, BAD_RESPONSE, NOT_IN_BATCH_OUTPUT})


class TeachLabelOptions(StageOptions):
    label: LabelOptions
    client: ClientOptions
    cache: str | None = None  # the request cache (sqlite path); None: no cache


class TeachLabelStage(Stage):
    kind = "teach_label"
    Options = TeachLabelOptions
    options: TeachLabelOptions

    def __init__(self, options: TeachLabelOptions, name: str | None = None):
        super().__init__(options, name)
        self.requests = TeacherRequests(options.label)  # checks metrics and template before anything runs
        self.client: ChatClient | None = None

    def schema(self) -> pa.Schema:
        return LABEL_SCHEMA

    def identity(self) -> dict[str, Any]:
        # what decides the labels: the requests (teacher, prompts, parameters); not the endpoint or its limits
        return {"kind": self.kind, **self.requests.identity()}

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "teacher": self.options.label.model,
            "mode": self.options.label.mode,
            "endpoint": self.options.client.base_url,
            "template": self.requests.template.name,
        }

    def setup(self) -> None:
        if self.client is None:
            cache = RequestCache(self.options.cache) if self.options.cache else None
            self.client = ChatClient(self.options.client, cache=cache)

    def process(self, task: StageTask, progress: ProgressCallback | None = None) -> Iterator[pa.RecordBatch]:
        self.setup()
        pairs = _read_pairs(task)
        before = self.client.stats.as_dict()
        labeler = Labeler(self.options.label, self.client)
        rows = sort_label_rows(list(labeler.label(pairs)), pairs, labeler.requests.metrics)
        after = self.client.stats.as_dict()
        for name in ("requests", "answered", "cache_hits", "retries", "prompt_tokens", "completion_tokens"):
            task.stats.count(name, after[name] - before[name])
        if progress is not None:
            progress(len(rows), sum(r["error"] is not None for r in rows))
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=LABEL_SCHEMA)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            if self.client.cache is not None:
                self.client.cache.close()
            self.client = None


def _read_pairs(task: StageTask) -> list[TeachPair]:
    if task.source.format == "parquet" and _is_pair_table(task.source.url):
        pairs = read_pairs(task.source.url)
    else:
        from mlmfilter.io.readers import ReadOptions, read_shard

        pairs = [
            TeachPair(
                uid=s.uid,
                shard=s.shard,
                key=s.key,
                caption=s.caption or "",
                image=s.image_bytes,
                image_format=s.image_format,
            )
            for s in read_shard(task.source, ReadOptions(**task.read_options))
        ]
    for pair in pairs:
        pair.shard = task.shard_id  # the run's id of the shard, as every stage table has it
    return pairs


def _is_pair_table(url: str) -> bool:
    try:
        names = set(pq.read_schema(url).names)
    except Exception:  # not readable as parquet here: the readers will say why, as rows
        return False
    return set(PAIR_SCHEMA.names) <= names
