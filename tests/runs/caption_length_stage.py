"""A stage that exists only in the tests: one file, found by its class path, named in no registry.

It measures each caption (no model, no pixels) and records the process that ran it, so a test can
tell where the run layer ran it.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pyarrow as pa

from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.runs.stage import ProgressCallback, Stage, StageOptions, StageTask, identity_schema


class CaptionLengthOptions(StageOptions):
    min_chars: int = 0  # captions shorter than this are flagged
    fail_shard: str | None = None  # this shard fails as a whole (a stand-in for a dead device)


class CaptionLengthStage(Stage):
    kind = "caption_length"
    Options = CaptionLengthOptions

    def __init__(self, options: CaptionLengthOptions | None = None, name: str | None = None):
        super().__init__(options, name)
        self.setups = 0

    def schema(self) -> pa.Schema:
        return identity_schema([pa.field("caption_chars", pa.int32()), pa.field("long_enough", pa.bool_())])

    def setup(self) -> None:
        self.setups += 1

    def wants_gpu(self) -> bool:
        return False

    def worker_info(self) -> dict[str, Any]:
        return {"stage_pid": os.getpid(), "setups": self.setups}

    def process(self, task: StageTask, progress: ProgressCallback | None = None) -> Iterator[pa.RecordBatch]:
        if task.shard_id == self.options.fail_shard:
            raise RuntimeError(f"shard {task.shard_id} cannot be measured\nsecond line of the message")
        rows = []
        for sample in read_shard(task.source, ReadOptions(**task.read_options)):
            chars = len(sample.caption) if sample.caption is not None else None
            rows.append(
                {
                    "uid": sample.uid,
                    "shard": sample.shard,
                    "key": sample.key,
                    "caption_chars": chars,
                    "long_enough": None if chars is None else chars >= self.options.min_chars,
                    "error": sample.error,
                    "error_detail": sample.error_detail,
                }
            )
        if progress:
            progress(len(rows), sum(1 for r in rows if r["error"]))
        yield pa.RecordBatch.from_pylist(rows, schema=self.schema())
