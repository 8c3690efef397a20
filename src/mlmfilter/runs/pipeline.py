"""One shard, start to finish: read -> decode (worker processes) -> scorers -> one parquet table."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pyarrow as pa

from mlmfilter.imaging import DecodeSpec, decode_stream
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import ShardSource
from mlmfilter.io.writers import atomic_write_parquet
from mlmfilter.runs.folder import RunFolder
from mlmfilter.sample import Sample
from mlmfilter.scorers.base import Scorer, iter_batches

#: the shorter side decoded for runs whose scorers look at no pixels: draft mode makes it cheap
#: and decoding still proves the image is readable and yields its size
HEADER_ONLY_SIDE = 64

#: reports (pairs, errors) as a shard advances, for progress bars
ProgressCallback = Callable[[int, int], None]


@dataclass
class ShardTask:
    """Everything a worker needs to score one shard; picklable."""

    source: ShardSource
    run_dir: str
    read_options: dict[str, Any] = field(default_factory=dict)
    decode_workers: int = 1
    chunk_size: int = 64
    max_pixels: int = 89_478_485


def table_schema(scorers: Sequence[Scorer]) -> pa.Schema:
    fields = [pa.field("uid", pa.string()), pa.field("shard", pa.string()), pa.field("key", pa.string())]
    for scorer in scorers:
        fields.extend(scorer.schema_fields())
    fields += [pa.field("error", pa.string()), pa.field("error_detail", pa.string())]
    return pa.schema(fields)


def decode_spec(scorers: Sequence[Scorer], max_pixels: int) -> DecodeSpec:
    """Decode once, at the largest size any scorer wants; each scorer crops/normalises from there."""
    sizes = [s.image_size for s in scorers if s.image_size]
    return DecodeSpec(shorter_side=max(sizes) if sizes else HEADER_ONLY_SIDE, max_pixels=max_pixels)


def score_chunk(samples: list[Sample], scorers: Sequence[Scorer]) -> list[dict[str, Any]]:
    """Rows for a chunk of decoded samples: identity columns, every scorer's columns, the first error."""
    rows = [{"uid": s.uid, "shard": s.shard, "key": s.key} for s in samples]
    for scorer in scorers:
        for row, scored in zip(rows, scorer.score(samples)):
            row.update(scored)
    for row, sample in zip(rows, samples):
        row["error"] = sample.error
        row["error_detail"] = sample.error_detail
    return rows


def process_shard(task: ShardTask, scorers: Sequence[Scorer], progress: ProgressCallback | None = None) -> dict:
    """Score one shard and write its table, stats and completion marker (in that order)."""
    folder = RunFolder(task.run_dir)
    started = time.perf_counter()
    scorer_stats_before = {s.name: s.stats.as_dict() for s in scorers}
    schema = table_schema(scorers)
    samples = read_shard(task.source, ReadOptions(**task.read_options))
    # keep the decoders a whole chunk ahead of the scorers, so the model never waits on them
    spec = decode_spec(scorers, task.max_pixels)
    decoded = decode_stream(samples, spec, workers=task.decode_workers, prefetch=2 * task.chunk_size)

    batches: list[pa.RecordBatch] = []
    errors: Counter = Counter()
    read = 0
    for chunk in iter_batches(decoded, task.chunk_size):
        for sample in chunk:
            sample.image_bytes = None  # decoded or failed: the bytes are no longer needed
        rows = score_chunk(chunk, scorers)
        chunk_errors = [r["error"] for r in rows if r["error"]]
        errors.update(chunk_errors)
        read += len(rows)
        batches.append(pa.RecordBatch.from_pylist(rows, schema=schema))
        if progress:
            progress(len(rows), len(chunk_errors))

    atomic_write_parquet(pa.Table.from_batches(batches, schema=schema), folder.score_path(task.source.id))
    stats = {
        "shard": task.source.id,
        "url": task.source.url,
        "read": read,
        "ok": read - sum(errors.values()),
        "errored": sum(errors.values()),
        "errors": dict(sorted(errors.items())),
        "seconds": round(time.perf_counter() - started, 4),
        "scorers": {s.name: _stats_delta(scorer_stats_before[s.name], s.stats.as_dict()) for s in scorers},
    }
    folder.mark_done(task.source.id, stats)
    return stats


def _stats_delta(before: dict, after: dict) -> dict:
    """A worker's scorer stats accumulate over shards; a shard's stats are the difference."""
    delta: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, (int, float)) and key != "pairs_per_second":
            delta[key] = round(value - before.get(key, 0), 4)
        elif isinstance(value, dict):
            delta[key] = {k: v - before.get(key, {}).get(k, 0) for k, v in value.items()}
            delta[key] = {k: v for k, v in delta[key].items() if v}
    if delta.get("seconds"):
        delta["pairs_per_second"] = round(delta.get("scored", 0) / delta["seconds"], 3)
    return delta
