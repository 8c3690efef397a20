"""Read chosen samples back from their shards by (shard id, key), streaming.

Score tables hold no captions or images, so whoever shows a pair (report, inspect) looks it up
here. Each shard is read once, front to back, through :func:`mlmfilter.io.readers.read_shard`;
only the wanted keys are kept, and each kept sample is turned into a small record at once by the
caller's ``keep`` function (e.g. caption + thumbnail), so no image bytes beyond the current
sample and no shard is ever held whole. A shard's read stops as soon as its last wanted key has
been seen.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Mapping, TypeVar

from mlmfilter.core.sample import Sample
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import ShardSource

T = TypeVar("T")
PairKey = tuple[str, str]  # (shard id, key inside the shard)


class LookupResult(dict):
    """(shard id, key) -> the caller's record; ``missing`` lists wanted pairs no shard yielded,
    ``shard_errors`` the shards that could not be found in the run's sources."""

    def __init__(self) -> None:
        super().__init__()
        self.missing: list[PairKey] = []
        self.shard_errors: dict[str, str] = {}


def lookup_samples(
    sources: Mapping[str, ShardSource],
    wanted: Iterable[PairKey],
    keep: Callable[[Sample], T],
    options: ReadOptions | None = None,
    threads: int = 4,
) -> LookupResult:
    """``keep(sample)`` for every wanted (shard, key), one streaming pass per shard.

    Shards are read in a few threads (reading is I/O-bound on object stores, and decoding in
    PIL releases the GIL). A sample is kept once: the first time its key appears in the shard.
    """
    by_shard: dict[str, set[str]] = defaultdict(set)
    for shard, key in wanted:
        by_shard[shard].add(key)
    result = LookupResult()
    jobs = {}
    for shard, keys in sorted(by_shard.items()):
        if shard not in sources:
            result.shard_errors[shard] = f"shard {shard!r} is not among the run's sources"
            result.missing.extend((shard, key) for key in sorted(keys))
            continue
        jobs[shard] = keys
    if not jobs:
        return result
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as pool:
        found_per_shard = pool.map(lambda shard: _scan_shard(sources[shard], jobs[shard], keep, options), jobs)
        for shard, found in zip(jobs, found_per_shard):
            for key, record in found.items():
                result[(shard, key)] = record
            result.missing.extend((shard, key) for key in sorted(jobs[shard] - found.keys()))
    return result


def _scan_shard(
    source: ShardSource, keys: set[str], keep: Callable[[Sample], T], options: ReadOptions | None
) -> dict[str, T]:
    found: dict[str, T] = {}
    samples = read_shard(source, options)
    try:
        for sample in samples:
            if sample.key in keys and sample.key not in found:
                found[sample.key] = keep(sample)
                if len(found) == len(keys):
                    break  # the rest of the shard is not needed
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()  # a generator closes its shard stream at once when the loop stopped early
    return found
