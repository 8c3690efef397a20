"""A real run folder for report / inspect tests: real tar shards of Flickr8k photos (one broken
JPEG, one empty caption), read back with the project's reader, rows written through the run
layer's own folder API (RunFolder / StageFolder). The score columns are deterministic functions
of the caption and key, so tests know which pairs must come out on top."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from mlmfilter.core.ids import fingerprint_of
from mlmfilter.core.stats import ShardStats
from mlmfilter.images.decode import DecodeSpec, decode_sample
from mlmfilter.io.readers import read_shard
from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.folder import RunFolder
from tests.support.builders import write_shard

SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("rules_words", pa.int32()),
        ("rules_ok", pa.bool_()),
        ("clip_score", pa.float32()),
        ("clip_cosine", pa.float32()),
        ("itm", pa.float32()),
        ("itm_mass", pa.float32()),
        ("error", pa.string()),
        ("error_detail", pa.string()),
    ]
)
RANDOM_WARNING = "RANDOM WEIGHTS: test stand-in, scores mean nothing"


def _noise(key: str) -> float:
    return int(hashlib.blake2b(key.encode(), digest_size=4).hexdigest(), 16) / 2**32


def make_shards(
    flickr_pairs, out_dir: Path, n_shards: int = 2, per_shard: int = 6, cut_last: bool = False
) -> list[Path]:
    """``cut_last``: the last shard loses its tail mid-member (a truncated_shard row)."""
    paths = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            image, caption = flickr_pairs[(s * per_shard + i) % len(flickr_pairs)]
            samples.append({"key": f"{s:04d}{i:04d}", "jpg": image.read_bytes(), "txt": caption})
        if s == 0:
            samples[1]["jpg"] = samples[1]["jpg"][:300]  # a truncated JPEG
            samples[2]["txt"] = "   "  # an empty caption
        paths.append(write_shard(out_dir / f"{s:08d}.tar", samples))
    if cut_last:
        paths[-1].write_bytes(paths[-1].read_bytes()[:-5000])
    return paths


def score_row(sample) -> dict:
    row = {
        "uid": sample.uid,
        "shard": sample.shard,
        "key": sample.key,
        "error": sample.error,
        "error_detail": sample.error_detail,
    }
    if sample.error is None:
        words = len(sample.caption.split())
        clip = 10.0 + 3.0 * words + 5.0 * _noise(sample.key)
        row.update(
            rules_words=words,
            rules_ok=words >= 11,
            clip_score=clip,
            clip_cosine=clip / 250.0,
            itm=100.0 * _noise(sample.key + "itm"),
            itm_mass=0.9,
        )
    return row


def build_run(run_dir: Path, shard_paths: list[Path], warnings=(RANDOM_WARNING,)) -> Path:
    folder = RunFolder(run_dir)
    sources = folder.open([str(p) for p in shard_paths], expand_inputs([str(p) for p in shard_paths]), {})
    stage = folder.stage("score")
    stage.create()
    identity = {"kind": "score", "test": True}
    fingerprint = fingerprint_of(identity)
    stage.check_or_write_settings({"kind": "score", "identity": identity, "fingerprint": fingerprint})
    stage.write_provenance({"scorers": {"clip": {"model": "tiny-random-clip"}}, "warnings": list(warnings)})
    for source in sources:
        rows = [score_row(decode_sample(s, DecodeSpec(shorter_side=64))) for s in read_shard(source)]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        stage.finish_shard(source.id, table, ShardStats(), {"fingerprint": fingerprint})
    return run_dir


def scores_of(run_dir: Path) -> dict:
    from mlmfilter.runs.read import RunReader

    return RunReader(run_dir).dataset("score").to_table().to_pydict()
