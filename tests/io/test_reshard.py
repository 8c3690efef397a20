from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlmfilter.core import errors
from mlmfilter.io.readers import read_shard
from mlmfilter.io.reshard import reshard
from mlmfilter.io.sources import expand_inputs
from mlmfilter.io.uid import sort_halves, uids_to_halves
from mlmfilter.io.writers import (
    TarShardWriter,
    add_tar_member,
    atomic_write,
    atomic_write_json,
    atomic_write_parquet,
)


def uid_of(i: int) -> str:
    return hashlib.md5(str(i).encode()).hexdigest()  # any 32-hex uid, spread over the range


@pytest.fixture
def input_shards(tmp_path, flickr_pairs):
    """40 real pairs in three tar shards (written by TarShardWriter) plus a parquet part,
    with one broken pair (no caption) whose uid is in every keep set."""
    pairs = flickr_pairs[:40]
    with TarShardWriter(tmp_path / "in", samples_per_shard=12) as writer:
        for i, (image_path, caption) in enumerate(pairs[:36]):
            meta = json.dumps({"uid": uid_of(i), "url": f"http://example.com/{i}.jpg"})
            writer.write(f"{i:09d}", {"jpg": image_path.read_bytes(), "txt": caption, "json": meta})
        writer.write("broken", {"jpg": pairs[0][0].read_bytes(), "json": json.dumps({"uid": uid_of(999)})})
    table = pa.table(
        {
            "image": [p.read_bytes() for p, _ in pairs[36:]],
            "caption": [c for _, c in pairs[36:]],
            "uid": [uid_of(i) for i in range(36, 40)],
        }
    )
    pq.write_table(table, tmp_path / "in" / "extra.parquet")
    sources = expand_inputs([str(tmp_path / "in" / "*.tar"), str(tmp_path / "in" / "*.parquet")])
    assert [s.id for s in sources] == ["00000000", "00000001", "00000002", "00000003", "extra"]
    return sources, pairs


def read_output(directory):
    sources = expand_inputs([str(directory / "*.tar")])
    return [s for source in sources for s in read_shard(source)]


def test_reshard_keeps_exactly_the_selected_uids_with_replacement_captions(tmp_path, input_shards):
    sources, pairs = input_shards
    chosen = [0, 3, 5, 11, 12, 20, 35, 37, 39]
    keep_uids = [uid_of(i) for i in chosen] + [uid_of(999), uid_of(12345)]  # broken, absent
    keep = sort_halves(uids_to_halves(keep_uids))
    new_caption = {uid_of(5): "A rewritten caption for pair five .", uid_of(37): "Parquet pair, rewritten ."}

    stats = reshard(sources, keep, tmp_path / "out", samples_per_shard=4, captions=new_caption)

    assert stats["read"] == 41 and stats["kept"] == len(chosen)
    assert stats["skipped_errors"] == {errors.MISSING_CAPTION: 1}
    assert stats["not_selected"] == 40 - len(chosen) and stats["kept_uids_not_found"] == 2
    assert stats["captions_replaced"] == 2 and stats["written_shards"] == 3
    assert [os.path.basename(p) for p in stats["shards"]] == ["00000000.tar", "00000001.tar", "00000002.tar"]

    out = read_output(tmp_path / "out")
    assert [s.uid for s in out] == [uid_of(i) for i in chosen]  # input order, every kept uid once
    for sample, i in zip(out, chosen):
        image_path, caption = pairs[i]
        assert sample.ok and sample.key == uid_of(i)
        assert sample.image_bytes == image_path.read_bytes() and sample.image_format == "jpg"
        assert sample.meta["uid"] == uid_of(i)
        if uid_of(i) in new_caption:
            assert sample.caption == new_caption[uid_of(i)] and sample.meta["original_caption"] == caption
        else:
            assert sample.caption == caption and "original_caption" not in sample.meta
    assert out[0].meta["url"] == "http://example.com/0.jpg"  # original json carried over


def test_reshard_output_is_byte_reproducible_and_unsorted_keep_is_accepted(tmp_path, input_shards):
    sources, _ = input_shards
    keep_uids = [uid_of(i) for i in range(0, 40, 3)]
    first = reshard(sources, sort_halves(uids_to_halves(keep_uids)), tmp_path / "a", samples_per_shard=5)
    second = reshard(sources, uids_to_halves(keep_uids[::-1]), tmp_path / "b", samples_per_shard=5)
    assert first["kept"] == second["kept"] == len(keep_uids)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) == [f"{i:08d}.tar" for i in range(3)]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / names[0]) as tar:
        members = tar.getmembers()
    assert {m.mtime for m in members} == {0} and {m.uname for m in members} == {""}
    assert [m.name for m in members[:3]] == [f"{uid_of(0)}.{ext}" for ext in ("jpg", "json", "txt")]


def test_reshard_writes_a_repeated_uid_once(tmp_path, input_shards):
    sources, _ = input_shards
    stats = reshard(sources + sources[:1], uids_to_halves([uid_of(1), uid_of(2)]), tmp_path / "out")
    assert stats["kept"] == 2 and stats["duplicates"] == 2
    assert [s.uid for s in read_output(tmp_path / "out")] == [uid_of(1), uid_of(2)]


# -- writers ---------------------------------------------------------------------------------------


def test_atomic_writes_replace_whole_files_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "stats.json"
    atomic_write_json(target, {"b": 1, "a": tmp_path})
    assert json.loads(target.read_text()) == {"a": str(tmp_path), "b": 1}
    atomic_write(target, "replaced")
    assert target.read_text() == "replaced"
    table = pa.table({"uid": ["a" * 32], "score": [0.5]})
    atomic_write_parquet(table, tmp_path / "scores.parquet")
    assert pq.read_table(tmp_path / "scores.parquet").equals(table)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "scores.parquet", "stats.json"]


def test_a_killed_writer_never_leaves_a_partial_file_under_the_final_name(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        from mlmfilter.io.writers import AtomicFile
        out = AtomicFile({str(tmp_path / "big.bin")!r})
        out.file.write(b"x" * 1_000_000)
        out.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == -signal.SIGKILL
    assert not (tmp_path / "big.bin").exists()
    (leftover,) = list(tmp_path.iterdir())  # the hidden temp file only
    assert leftover.name.startswith(".big.bin.") and leftover.name.endswith(".tmp")


def test_tar_writer_discards_the_shard_in_progress_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with TarShardWriter(tmp_path, samples_per_shard=2, prefix="part-") as writer:
            for i in range(3):
                writer.write(f"k{i}", {"txt": f"caption {i}"})
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000000.tar"]
    with tarfile.open(tmp_path / "part-00000000.tar") as tar:
        assert tar.getnames() == ["k0.txt", "k1.txt"]
    with pytest.raises(ValueError, match="invalid WebDataset key"):
        TarShardWriter(tmp_path).write("a.b", {"txt": "x"})


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])  # the writer's, the demo's
def test_a_tar_member_header_depends_only_on_name_content_and_mtime(tmp_path, tar_format):
    def build(path, mtime):
        with tarfile.open(path, "w", format=tar_format) as tar:
            add_tar_member(tar, "k0.txt", b"a caption", mtime=mtime)
            add_tar_member(tar, "k0.jpg", b"\xff\xd8\xff not really a jpeg")
        return path.read_bytes()

    first = build(tmp_path / "a.tar", 1_700_000_000)
    assert build(tmp_path / "b.tar", 1_700_000_000) == first != build(tmp_path / "c.tar", 0)
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
        assert tar.extractfile("k0.txt").read() == b"a caption"
    assert [(m.name, m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members] == [
        ("k0.txt", 1_700_000_000, 0o644, 0, 0, "", ""),
        ("k0.jpg", 0, 0o644, 0, 0, "", ""),
    ]


def test_resharding_an_image_folder_keeps_each_images_file_name(tmp_path, flickr_pairs):
    """A Hugging Face imagefolder (metadata.jsonl + photos) scored, selected and resharded: each new
    sample's json still says which file it was."""
    from mlmfilter import api

    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for image_path, caption in flickr_pairs[:3]:
        (folder / image_path.name).write_bytes(image_path.read_bytes())
        rows.append({"file_name": image_path.name, "text": caption, "source": "flickr8k"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    api.score([str(folder)], run, ["rules"], decode_workers=0)
    api.select(run, expression="rules_words >= 0")
    stats = api.reshard(run / "selection", tmp_path / "out")
    assert stats["kept"] == 3
    written = [s for source in expand_inputs([str(tmp_path / "out" / "*.tar")]) for s in read_shard(source)]
    assert sorted(s.meta["file_name"] for s in written) == sorted(r["file_name"] for r in rows)
    assert {s.meta["source"] for s in written} == {"flickr8k"}
