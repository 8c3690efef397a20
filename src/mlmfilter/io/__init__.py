"""Reading shards, uids, atomic writes and resharding."""

from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import ShardSource, expand_inputs
from mlmfilter.io.uid import derive_uid, halves_to_uids, normalize_uid, uids_to_halves

__all__ = [
    "ReadOptions",
    "ShardSource",
    "derive_uid",
    "expand_inputs",
    "halves_to_uids",
    "normalize_uid",
    "read_shard",
    "uids_to_halves",
]
