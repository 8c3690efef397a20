"""The teach folder's pair table: sampled pairs and their negatives, images included.

One parquet file per step (``sample.parquet``, ``negatives.parquet``) with the ORIGINAL image bytes,
so labelling and export never go back to the pool. It is also a parquet shard the readers accept
(``uid``, ``key``, ``caption``, ``image`` columns), so a run stage can take it as its input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from mlmfilter.core.ids import uid_of
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


@dataclass
class TeachPair:
    uid: str
    shard: str
    key: str
    caption: str
    image: bytes | None
    image_format: str | None
    image_uid: str | None = None
    cluster: int | None = None
    parent_uid: str | None = None
    corruption: str | None = None
    corruption_detail: str | None = None

    def __post_init__(self) -> None:
        if self.image_uid is None:
            self.image_uid = self.uid


def negative_uid(parent_uid: str, kind: str, index: int = 0) -> str:
    """A negative's own uid: stable for its parent, kind and position, the same shape as a pair's."""
    return uid_of(f"{parent_uid}/negative/{kind}/{index}")


def write_pairs(path: str | Path, pairs: Iterable[TeachPair]) -> int:
    rows = [asdict(p) for p in pairs]
    table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)
    atomic_write_parquet(table, path)
    return len(rows)


def read_pairs(path: str | Path) -> list[TeachPair]:
    return [TeachPair(**row) for row in pq.read_table(path, schema=PAIR_SCHEMA).to_pylist()]
