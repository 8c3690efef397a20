"""Damaged .tar.gz shards: a flipped byte or a bad CRC-32 is found, and no pair of the damaged gzip member
is scored (they are truncated_shard rows); members before the damage, and healthy shards, read as before."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections import Counter

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.core import errors
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import expand_inputs


def _tar(pairs, start: int, end_marker: bool) -> bytes:
    """Real tar bytes of Flickr JPEGs and captions, keys start..; without the end marker it can be
    followed by more members (the next gzip member of a multi-member stream)."""
    buffer = io.BytesIO()
    tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT)
    for i, (image, caption) in enumerate(pairs, start=start):
        for ext, data in (("jpg", image.read_bytes()), ("txt", caption.encode())):
            info = tarfile.TarInfo(f"{i:05d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if end_marker:
        tar.close()
    return buffer.getvalue()


@pytest.fixture(scope="module")
def member_bytes(flickr_pairs):
    """Two gzip members: pairs 0-2, then pairs 3-5 and the end of the archive."""
    first = gzip.compress(_tar(flickr_pairs[:3], 0, end_marker=False), mtime=0)
    second = gzip.compress(_tar(flickr_pairs[3:6], 3, end_marker=True), mtime=0)
    return first, second


def _flip(data: bytes, at: float) -> bytes:
    damaged = bytearray(data)
    damaged[int(len(damaged) * at)] ^= 0x01
    return bytes(damaged)


def _bad_crc(member: bytes) -> bytes:
    damaged = bytearray(member)
    damaged[-8] ^= 0xFF  # the CRC-32 of the trailer: every data byte intact
    return bytes(damaged)


def _rows(path, allow_pipe=False):
    spec = f"pipe:cat {path}" if allow_pipe else str(path)
    return list(read_shard(expand_inputs([spec], allow_pipe=allow_pipe)[0], ReadOptions()))


def test_a_healthy_multi_member_tar_gz_reads_every_pair(tmp_path, member_bytes):
    path = tmp_path / "good.tar.gz"
    path.write_bytes(member_bytes[0] + member_bytes[1] + b"\0" * 1000)  # zero padding after the last member
    for pipe in (False, True):
        rows = _rows(path, allow_pipe=pipe)
        assert [r.key for r in rows] == [f"{i:05d}" for i in range(6)] and all(r.ok for r in rows)


@pytest.mark.parametrize("damage", ["flipped_byte", "bad_crc"])
def test_pairs_of_a_damaged_member_are_truncated_shard_rows_and_those_before_are_kept(tmp_path, member_bytes, damage):
    first, second = member_bytes
    second = _flip(second, 0.5) if damage == "flipped_byte" else _bad_crc(second)
    path = tmp_path / "damaged.tar.gz"
    path.write_bytes(first + second)
    rows = _rows(path)
    assert [r.key for r in rows[:3]] == ["00000", "00001", "00002"] and all(r.ok for r in rows[:3])
    damaged = rows[3:]
    assert damaged and all(r.error == errors.TRUNCATED_SHARD and r.image_bytes is None for r in damaged)
    assert "the gzip member holding decompressed bytes from" in damaged[0].error_detail
    assert "CRC-32" in damaged[0].error_detail or "corrupt" in damaged[0].error_detail


def test_a_one_member_shard_with_a_flipped_byte_in_a_jpeg_scores_nothing(tmp_path, flickr_pairs):
    """The user's case: a JPEG's stored (incompressible) deflate block with one flipped byte inflates
    without a zlib error; only the CRC-32 tells. tarfile alone read it as healthy."""
    data = gzip.compress(_tar(flickr_pairs[:4], 0, end_marker=True), mtime=0)
    path = tmp_path / "flipped.tar.gz"
    path.write_bytes(_flip(data, 0.6))
    with tarfile.open(path, "r|gz") as tar:  # the premise: tarfile reads it without a word
        assert len([m for m in tar]) == 8
    rows = _rows(path)
    assert rows and Counter(r.error for r in rows) == {errors.TRUNCATED_SHARD: len(rows)}

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["score", str(path), "-o", str(run), "--scorer", "rules"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "truncated_shard" in result.output
    table = pq.read_table(next((run / "score" / "tables").glob("*.parquet"))).to_pylist()
    assert table and all(row["error"] == errors.TRUNCATED_SHARD and row["rules_ok"] is None for row in table)


def test_a_pipe_is_checked_when_its_damaged_trailer_is_reached(tmp_path, member_bytes):
    """A pipe is read once: the pairs of the damaged member were read before its trailer, and the damage is
    reported there as one more truncated_shard row (never silently)."""
    first, second = member_bytes
    path = tmp_path / "damaged.tar.gz"
    path.write_bytes(first + _bad_crc(second))
    rows = _rows(path, allow_pipe=True)
    assert rows[-1].error == errors.TRUNCATED_SHARD and "CRC-32" in rows[-1].error_detail
    assert all(r.ok for r in rows[:3])
