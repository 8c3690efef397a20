"""The teach folder's pair table: sampled pairs and their negatives, images included.

One parquet file per step (``sample.parquet``, ``negatives.parquet``) with the ORIGINAL image bytes,
so labelling and export never go back to the pool. A pair is a :class:`~mlmfilter.core.sample.Sample`;
what a pair table holds beyond a sample's own fields (:data:`PAIR_META`: whose image it is, its
cluster, a negative's good pair and corruption) travels in ``Sample.meta``. The table is read back by
the parquet reader with its columns named (:data:`PAIR_COLUMNS`), like any parquet shard.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from mlmfilter.core import errors
from mlmfilter.core.ids import uid_of
from mlmfilter.core.sample import Sample
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import ShardSource
from mlmfilter.io.writers import atomic_write_parquet

PAIR_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("image_format", pa.string()),
        pa.field("image_uid", pa.string()),  # whose image this is: itself, or the good pair a negative came from
        pa.field("cluster", pa.int32()),
        pa.field("parent_uid", pa.string()),  # a negative's good pair
        pa.field("corruption", pa.string()),  # a negative's corruption kind; None for a sampled pair
        pa.field("corruption_detail", pa.string()),
    ]
)
#: the pair table's columns kept in ``Sample.meta`` (the others are the sample's own fields)
PAIR_META = ("image_uid", "cluster", "parent_uid", "corruption", "corruption_detail")
#: how the readers find a pair table's columns. A pair table is written from captions the pool reader
#: already checked and cut, so reading it back cuts nothing (a negative with typos may be a little longer).
PAIR_COLUMNS = ReadOptions(
    image_column="image", caption_column="caption", uid_column="uid", key_column="key", max_caption_chars=sys.maxsize
)
#: reader errors that stand for the whole table, not one pair: the table cannot be used
_TABLE_ERRORS = frozenset({errors.UNREADABLE_SHARD, errors.TRUNCATED_SHARD})


def image_uid(pair: Sample) -> str:
    """Whose image ``pair`` shows: its own uid, or the good pair's that a negative was made from."""
    return pair.meta.get("image_uid") or pair.uid


def negative_uid(parent_uid: str, kind: str, index: int = 0) -> str:
    """A negative's own uid: stable for its parent, kind and position, the same shape as a pair's."""
    return uid_of(f"{parent_uid}/negative/{kind}/{index}")


def write_pair_table(path: str | Path, pairs: Iterable[Sample]) -> int:
    rows = [
        {
            "uid": p.uid,
            "shard": p.shard,
            "key": p.key,
            "caption": p.caption,
            "image": p.image_bytes,
            "image_format": p.image_format,
            **{name: p.meta.get(name) for name in PAIR_META},
            "image_uid": image_uid(p),
        }
        for p in pairs
    ]
    atomic_write_parquet(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), path)
    return len(rows)


def read_pair_table(source: str | Path | ShardSource) -> list[Sample]:
    """The pairs of a pair table, in table order. ``shard`` and ``image_format`` are the table's own
    values (the pool shard a pair came from, the extension it came with). A table the reader cannot
    read at all raises: it is the teach folder's own file, not a pool shard with a bad row."""
    if not isinstance(source, ShardSource):
        source = ShardSource(id=Path(source).stem, url=str(source), format="parquet")
    if source.format != "parquet":
        raise ValueError(f"{source.url} is a {source.format} shard, not a teach pair table (parquet)")
    pairs = []
    for sample in read_shard(source, PAIR_COLUMNS):
        if sample.error in _TABLE_ERRORS:
            raise ValueError(f"{source.url} is not a readable pair table: {sample.error_detail}")
        columns = sample.meta
        sample.shard = columns.get("shard") or sample.shard
        sample.image_format = columns.get("image_format") or sample.image_format
        sample.meta = {name: columns.get(name) for name in PAIR_META}
        pairs.append(sample)
    return pairs
