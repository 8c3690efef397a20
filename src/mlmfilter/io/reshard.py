"""Write new WebDataset shards holding only the kept pairs.

Reads the original shards (any format :func:`read_shard` knows), tests each batch of uids
against the sorted ``keep`` halves with one vectorized binary search, and streams kept pairs to
:class:`TarShardWriter`. Memory: one batch of samples plus one byte per kept uid (to write a
uid only once when the input repeats it).

Output sample ``KEY`` is the pair's uid (unique across all input shards, unlike per-shard keys):
``KEY.<original image ext>``, ``KEY.txt`` (the caption, or its replacement from ``captions``) and
``KEY.json`` (the original json plus ``"uid"``, plus ``"original_caption"`` when replaced).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from itertools import islice
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from mlmfilter.io.readers import ReadOptions, read_shard, sniff_image_format
from mlmfilter.io.sources import ShardSource
from mlmfilter.io.uid import HALVES_DTYPE, is_sorted_halves, locate_sorted, sort_halves, uids_to_halves
from mlmfilter.io.writers import TarShardWriter
from mlmfilter.sample import Sample

BATCH_SIZE = 512


def reshard(
    sources: list[ShardSource],
    keep: np.ndarray,
    output_dir: str | os.PathLike,
    samples_per_shard: int = 10_000,
    captions: Mapping[str, str] | None = None,
    read_options: ReadOptions | None = None,
) -> dict[str, Any]:
    """Copy the pairs whose uid is in ``keep`` into new shards under ``output_dir``.

    ``keep`` is a structured (f0, f1) uid-halves array (see :mod:`mlmfilter.io.uid`), sorted
    (an unsorted one is sorted here). ``captions`` maps uid -> replacement caption. Rows read
    with an error are never written. Returns stats: ``read``, ``kept``, ``not_selected``,
    ``duplicates``, ``captions_replaced``, ``skipped_errors`` (code -> count),
    ``kept_uids_not_found``, ``written_shards`` and ``shards`` (paths).
    """
    keep = np.asarray(keep, dtype=HALVES_DTYPE)
    if not is_sorted_halves(keep):
        keep = sort_halves(keep)
    written = np.zeros(len(keep), dtype=bool)
    captions = captions or {}
    counts: Counter = Counter()
    skipped_errors: Counter = Counter()

    with TarShardWriter(output_dir, samples_per_shard=samples_per_shard) as writer:
        for source in sources:
            for batch in _batches(read_shard(source, read_options), BATCH_SIZE):
                counts["read"] += len(batch)
                good = []
                for sample in batch:
                    if sample.ok:
                        good.append(sample)
                    else:
                        skipped_errors[sample.error] += 1
                if not good:
                    continue
                found, position = locate_sorted(keep, uids_to_halves([s.uid for s in good]))
                counts["not_selected"] += int((~found).sum())
                for sample, hit, pos in zip(good, found, position):
                    if not hit:
                        continue
                    if written[pos]:
                        counts["duplicates"] += 1
                        continue
                    written[pos] = True
                    replacement = captions.get(sample.uid)
                    counts["captions_replaced"] += replacement is not None
                    writer.write(sample.uid, _output_files(sample, replacement))
                    counts["kept"] += 1
        shards = writer.close()

    return {
        "read": counts["read"],
        "kept": counts["kept"],
        "not_selected": counts["not_selected"],
        "duplicates": counts["duplicates"],
        "captions_replaced": counts["captions_replaced"],
        "skipped_errors": dict(skipped_errors),
        "kept_uids_not_found": int(len(keep) - written.sum()),
        "written_shards": len(shards),
        "shards": [str(path) for path in shards],
    }


def _output_files(sample: Sample, replacement: str | None) -> dict[str, bytes | str]:
    meta = dict(sample.meta)
    meta["uid"] = sample.uid
    caption = sample.caption
    if replacement is not None:
        meta["original_caption"] = caption
        caption = replacement
    image_ext = sample.image_format or sniff_image_format(sample.image_bytes) or "bin"
    return {
        image_ext: sample.image_bytes,
        "txt": caption,
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str),
    }


def _batches(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
