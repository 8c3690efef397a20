from __future__ import annotations

import io
import re
import tarfile
import uuid

import fsspec
import pytest

from mlmfilter.core import errors
from mlmfilter.io.readers import read_shard
from mlmfilter.io.sources import ShardSource, expand_inputs
from mlmfilter.io.writers import add_tar_member


def small_tar(image: bytes, caption: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("000000000.jpg", image), ("000000000.txt", caption.encode())):
            add_tar_member(tar, name, data)
    return buf.getvalue()


@pytest.fixture
def shard_dir(tmp_path, flickr_pairs):
    image_path, caption = flickr_pairs[0]
    payload = small_tar(image_path.read_bytes(), caption)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(12):
        (shards / f"{i:08d}.tar").write_bytes(payload)
    (shards / "00000000_stats.json").write_text("{}")  # img2dataset leaves these beside shards
    return shards


def test_glob_and_brace_patterns_expand_sorted_and_deduplicated(shard_dir):
    by_glob = expand_inputs([str(shard_dir / "*.tar")])
    assert [s.id for s in by_glob] == [f"{i:08d}" for i in range(12)]
    assert all(s.format == "tar" and s.url == str(shard_dir / f"{s.id}.tar") for s in by_glob)

    by_brace = expand_inputs([str(shard_dir / "{00000000..00000011}.tar")])
    assert by_brace == by_glob
    # overlapping specs: each shard once, sorted
    mixed = expand_inputs([str(shard_dir / "{00000005..00000011}.tar"), str(shard_dir / "0000000[0-6].tar")])
    assert mixed == by_glob
    # a loose glob skips files that are not shards
    assert expand_inputs(str(shard_dir / "*")) == by_glob
    assert expand_inputs([f"file://{shard_dir}/00000003.tar"]) == [by_glob[3]]


def test_missing_inputs_raise_file_not_found_naming_the_spec(shard_dir):
    with pytest.raises(FileNotFoundError, match=re.escape("nothing_here/*.tar")):
        expand_inputs([str(shard_dir / "nothing_here/*.tar")])
    spec = str(shard_dir / "{00000010..00000012}.tar")  # 00000012.tar does not exist
    with pytest.raises(FileNotFoundError, match=re.escape(spec)):
        expand_inputs([spec])
    with pytest.raises(ValueError, match="cannot tell the format"):
        expand_inputs([str(shard_dir / "00000000_stats.json")])


def test_directories_and_parquet_files_get_their_format(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "part-0.parquet").write_bytes(b"")
    (tmp_path / "x.tar.gz").write_bytes(b"")
    sources = expand_inputs([str(tmp_path / "photos"), str(tmp_path / "*.parquet"), str(tmp_path / "x.tar.gz")])
    assert [(s.id, s.format) for s in sources] == [("part-0", "parquet"), ("photos", "folder"), ("x", "tar")]


def test_colliding_stems_get_a_stable_hash_suffix_and_safe_ids(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "00000000.tar").write_bytes(b"")
    (tmp_path / "b" / "shard one (copy).tar").write_bytes(b"")
    sources = expand_inputs([str(tmp_path / "*/*.tar")])
    ids = [s.id for s in sources]
    assert re.fullmatch(r"00000000-[0-9a-f]{8}", ids[0]) and re.fullmatch(r"00000000-[0-9a-f]{8}", ids[1])
    assert ids[0] != ids[1] and ids[2] == "shard_one_copy"
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in ids)
    assert [s.id for s in expand_inputs([str(tmp_path / "*/*.tar")])] == ids  # stable


def test_fsspec_memory_urls_glob_and_read(flickr_pairs):
    image_path, caption = flickr_pairs[1]
    root = f"memory://mlmfilter-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for i in range(3):
        with fs.open(f"{root}/shards/{i:05d}.tar", "wb") as fh:
            fh.write(small_tar(image_path.read_bytes(), caption))
    try:
        sources = expand_inputs([f"{root}/shards/*.tar"])
        assert [s.id for s in sources] == ["00000", "00001", "00002"]
        assert all(s.url.startswith("memory://") for s in sources)
        assert expand_inputs([f"{root}/shards/{{00000..00002}}.tar"]) == sources
        (sample,) = list(read_shard(sources[2]))
        assert sample.ok and sample.caption == caption and sample.image_bytes == image_path.read_bytes()
    finally:
        fs.rm(root.replace("memory://", "/"), recursive=True)


def test_pipe_inputs_are_refused_unless_opted_in(shard_dir):
    spec = f"pipe:cat {shard_dir}/00000004.tar"
    with pytest.raises(ValueError, match="allow_pipe"):
        expand_inputs([spec])
    (source,) = expand_inputs([spec], allow_pipe=True)
    assert source == ShardSource(id="00000004", url=spec, format="tar")
    (sample,) = list(read_shard(source))
    assert sample.ok and sample.key == "000000000"
    (failed,) = list(read_shard(ShardSource("x", f"pipe:cat {shard_dir}/missing.tar", "tar")))
    assert failed.error == errors.UNREADABLE_SHARD


def test_a_spec_naming_an_existing_file_is_taken_literally_not_globbed(tmp_path, flickr_pairs):
    image_path, caption = flickr_pairs[0]
    (tmp_path / "shard[1].tar").write_bytes(small_tar(image_path.read_bytes(), "the literal one"))
    (tmp_path / "shard1.tar").write_bytes(small_tar(image_path.read_bytes(), caption))
    (tmp_path / "{a,b}.tar").write_bytes(small_tar(image_path.read_bytes(), "braces, literally"))
    (literal,) = expand_inputs([str(tmp_path / "shard[1].tar")])
    assert literal.url == str(tmp_path / "shard[1].tar")
    assert [s.caption for s in read_shard(literal)] == ["the literal one"]
    (braces,) = expand_inputs([str(tmp_path / "{a,b}.tar")])
    assert braces.url.endswith("{a,b}.tar")
    # a pattern that names no file still expands
    assert [s.url for s in expand_inputs([str(tmp_path / "shard?.tar")])] == [str(tmp_path / "shard1.tar")]
