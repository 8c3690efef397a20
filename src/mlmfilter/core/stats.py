"""Stats as one object that adds up: across chunks, shards, workers and resumed runs.

A shard's stats are written beside its table; a stage's totals are the sum of its shards'.
Counters are plain name -> number maps, grouped (``errors``, per block, free-form counters such
as ``requests``/``cache_hits``), so a new stage records what it does without a new schema.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


@dataclass
class BlockStats:
    """What one block (a scorer, a teacher client) did: samples seen/done, failures by reason, time."""

    seen: int = 0
    done: int = 0
    skipped: int = 0  # arrived already in error, or not selected for this block
    failed: Counter = field(default_factory=Counter)
    batches: int = 0
    seconds: float = 0.0

    @property
    def scored(self) -> int:  # a scorer's name for ``done``
        return self.done

    def __add__(self, other: "BlockStats") -> "BlockStats":
        return BlockStats(
            seen=self.seen + other.seen,
            done=self.done + other.done,
            skipped=self.skipped + other.skipped,
            failed=self.failed + other.failed,
            batches=self.batches + other.batches,
            seconds=self.seconds + other.seconds,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "done": self.done,
            "skipped": self.skipped,
            "failed": dict(sorted(self.failed.items())),
            "batches": self.batches,
            "seconds": round(self.seconds, 4),
            "per_second": round(self.done / self.seconds, 3) if self.seconds else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BlockStats":
        return cls(
            seen=int(data.get("seen", 0)),
            done=int(data.get("done", data.get("scored", 0))),
            skipped=int(data.get("skipped", 0)),
            failed=Counter(data.get("failed", {})),
            batches=int(data.get("batches", 0)),
            seconds=float(data.get("seconds", 0.0)),
        )


@dataclass
class ShardStats:
    """Rows of one shard (or the sum of many): read, ok, errors by reason, per-block stats, counters."""

    shards: int = 0
    rows: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    blocks: dict[str, BlockStats] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    # -- recording --------------------------------------------------------------------------------
    def add_rows(self, error_codes: Iterable[str | None]) -> None:
        """Count a chunk of output rows by their error column (None: the row is fine)."""
        for code in error_codes:
            self.rows += 1
            if code is None:
                self.ok += 1
            else:
                self.errors[code] += 1

    def count(self, name: str, n: int | float = 1) -> None:
        self.counters[name] += n

    def block(self, name: str) -> BlockStats:
        return self.blocks.setdefault(name, BlockStats())

    @property
    def errored(self) -> int:
        return sum(self.errors.values())

    # -- arithmetic -------------------------------------------------------------------------------
    def __add__(self, other: "ShardStats") -> "ShardStats":
        blocks = dict(self.blocks)
        for name, stats in other.blocks.items():
            blocks[name] = blocks[name] + stats if name in blocks else stats
        return ShardStats(
            shards=self.shards + other.shards,
            rows=self.rows + other.rows,
            ok=self.ok + other.ok,
            errors=self.errors + other.errors,
            blocks=blocks,
            counters=self.counters + other.counters,
            seconds=self.seconds + other.seconds,
        )

    @classmethod
    def total(cls, parts: Iterable["ShardStats"]) -> "ShardStats":
        out = cls()
        for part in parts:
            out = out + part
        return out

    # -- files ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "read": self.rows,
            "ok": self.ok,
            "errored": self.errored,
            "errors": dict(sorted(self.errors.items())),
            "blocks": {name: b.to_json() for name, b in sorted(self.blocks.items())},
            "counters": dict(sorted(self.counters.items())),
            "seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ShardStats":
        return cls(
            shards=int(data.get("shards", 1)),
            rows=int(data.get("read", 0)),
            ok=int(data.get("ok", 0)),
            errors=Counter(data.get("errors", {})),
            blocks={name: BlockStats.from_json(b) for name, b in data.get("blocks", {}).items()},
            counters=Counter(data.get("counters", {})),
            seconds=float(data.get("seconds", 0.0)),
        )


class Stopwatch:
    """Adds elapsed wall time to ``stats.seconds`` on exit."""

    def __init__(self, stats: ShardStats | BlockStats):
        self.stats = stats

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stats.seconds += time.perf_counter() - self._start
