"""Hostile inputs: huge declared members, FIFOs and devices, paths leading out of the dataset."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import resource
import signal
import tarfile
import tracemalloc

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlmfilter.core import errors
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import ShardSource, expand_inputs

MiB = 2**20


class Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as read: a big member without holding it in memory."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def add_member(tar: tarfile.TarFile, name: str, data: bytes | None = None, **fields) -> None:
    info = tarfile.TarInfo(name)
    for field, value in fields.items():
        setattr(info, field, value)
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def add_pair(tar: tarfile.TarFile, key: str, image: bytes, caption: str = "a dog on the grass") -> None:
    add_member(tar, f"{key}.jpg", image)
    add_member(tar, f"{key}.txt", caption.encode())


def gnu_sparse_header(name: str, declared: int, stored: int = tarfile.BLOCKSIZE) -> bytes:
    """An old-GNU sparse member header ('S'): ``stored`` real bytes at the end of a ``declared``-byte file.

    tarfile cannot write sparse members; GNU tar writes exactly this for a file made by `truncate`."""
    info = tarfile.TarInfo(name)
    info.size = stored
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[156:157] = tarfile.GNUTYPE_SPARSE
    block[386:398] = tarfile.itn(declared - stored, 12, tarfile.GNU_FORMAT)  # first map entry: offset
    block[398:410] = tarfile.itn(stored, 12, tarfile.GNU_FORMAT)  # ... and its length
    block[483:495] = tarfile.itn(declared, 12, tarfile.GNU_FORMAT)  # real (expanded) size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging forever when a regression blocks on a FIFO or device."""

    def expire(*_):
        raise TimeoutError(f"took more than {seconds}s: something blocked on a FIFO or device")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _child_rows(conn, source, options, address_space):
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    try:
        conn.send([(s.key, s.error, s.error_detail, s.image_bytes) for s in read_shard(source, options)])
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        conn.send(exc)


def isolated_rows(source: ShardSource, options: ReadOptions | None = None, timeout: float = 20) -> dict:
    """{key: (error, detail, image bytes)} of reading ``source`` in a forked child that is killed on a
    hang and cannot take more than 1 GiB: a regression reading /dev/zero or a FIFO fails, not stalls."""
    address_space = psutil.Process().memory_info().vms + 2**30
    parent, child = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_child_rows, args=(child, source, options, address_space))
    proc.start()
    try:
        if not parent.poll(timeout):
            pytest.fail(f"reading {source.url} took more than {timeout}s (blocked on a FIFO or device?)")
        result = parent.recv()
    finally:
        proc.kill()
        proc.join()
    if isinstance(result, BaseException):
        raise result
    return {key: (error, detail, data) for key, error, detail, data in result}


def read_measured(source: ShardSource, options: ReadOptions | None = None):
    """(samples, peak python allocation, peak RSS growth) of reading one shard."""
    process = psutil.Process()
    rss_before = rss_peak = process.memory_info().rss
    tracemalloc.start()
    try:
        samples = []
        for sample in read_shard(source, options):
            samples.append(sample)
            rss_peak = max(rss_peak, process.memory_info().rss)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return samples, peak, rss_peak - rss_before


def by_key(samples):
    return {s.key: s for s in samples}


@pytest.fixture(scope="module")
def jpeg(flickr_pairs) -> bytes:
    return flickr_pairs[0][0].read_bytes()


# -- 1. what one member may cost ---------------------------------------------------------------------


def test_sparse_tar_member_declaring_8_gib_is_an_error_row_read_in_little_memory(tmp_path, jpeg):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add_pair(tar, "000", jpeg)
    body = buf.getvalue().rstrip(b"\0")
    body += b"\0" * (-len(body) % tarfile.BLOCKSIZE)
    huge = gnu_sparse_header("001.jpg", declared=8 * 2**30) + b"\xff" * tarfile.BLOCKSIZE
    tail = io.BytesIO()
    with tarfile.open(fileobj=tail, mode="w") as tar:
        add_member(tar, "001.txt", b"a huge image")
        add_pair(tar, "002", jpeg)
    path = tmp_path / "sparse.tar"
    path.write_bytes(body + huge + tail.getvalue())
    assert tarfile.open(path).getmember("001.jpg").size == 8 * 2**30  # what a naive reader would allocate

    samples, peak, rss_growth = read_measured(ShardSource("sparse", str(path), "tar"))
    rows = by_key(samples)
    assert list(rows) == ["000", "001", "002"]
    assert rows["000"].ok and rows["002"].ok and rows["002"].image_bytes == jpeg
    assert rows["001"].error == errors.MEMBER_TOO_LARGE and "001.jpg" in rows["001"].error_detail
    assert peak < 8 * MiB and rss_growth < 64 * MiB, (peak, rss_growth)


def test_gzipped_tar_with_a_big_zero_member_skips_it_in_bounded_memory(tmp_path, jpeg):
    path = tmp_path / "bomb.tar.gz"
    big = 96 * MiB  # over the 64 MiB default, ~100 kB compressed
    with tarfile.open(path, mode="w:gz", compresslevel=1) as tar:
        add_pair(tar, "000", jpeg)
        info = tarfile.TarInfo("001.jpg")
        info.size = big
        tar.addfile(info, Zeros(big))
        add_member(tar, "001.txt", b"zeros")
        add_pair(tar, "002", jpeg)
    assert path.stat().st_size < 2 * MiB
    (source,) = expand_inputs([str(path)])
    samples, peak, rss_growth = read_measured(source)
    rows = by_key(samples)
    assert [rows[k].ok for k in ("000", "001", "002")] == [True, False, True]
    assert rows["001"].error == errors.MEMBER_TOO_LARGE and str(big) in rows["001"].error_detail
    assert peak < 8 * MiB and rss_growth < 48 * MiB, (peak, rss_growth)


def test_a_pax_header_declaring_more_than_the_cap_ends_the_shard_with_one_row(tmp_path, jpeg):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_pair(tar, "000", jpeg)
        add_pair(tar, "001", jpeg)  # as at any break, the sample read last is not known to be complete
    body = buf.getvalue().rstrip(b"\0")
    body += b"\0" * (-len(body) % tarfile.BLOCKSIZE)
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 4 * MiB  # tarfile would read all of it at once
    path = tmp_path / "pax.tar"
    path.write_bytes(body + pax.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * (4 * MiB) + b"\0" * 1024)
    samples = list(read_shard(ShardSource("pax", str(path), "tar"), ReadOptions(max_member_bytes=MiB)))
    assert samples[0].ok and samples[0].key == "000"
    assert [s.error for s in samples[1:]] == [errors.MEMBER_TOO_LARGE]


def test_oversized_folder_files_and_parquet_values_are_error_rows(tmp_path, jpeg):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg)
    (folder / "a.txt").write_text("fine")
    with open(folder / "b.jpg", "wb") as fh:  # sparse: 4 GiB declared, nothing on disk
        fh.truncate(4 * 2**30)
    (folder / "b.txt").write_text("huge")
    (folder_source,) = expand_inputs([str(folder)])
    samples, peak, _ = read_measured(folder_source)
    rows = by_key(samples)
    assert rows["a"].ok and rows["b"].error == errors.MEMBER_TOO_LARGE and "b.jpg" in rows["b"].error_detail
    assert peak < 8 * MiB

    table = pa.table({"image_path": ["folder/a.jpg", "folder/b.jpg"], "caption": ["fine", "huge"]})
    pq.write_table(table, tmp_path / "paths.parquet")
    (by_path,) = expand_inputs([str(tmp_path / "paths.parquet")])
    assert [s.error for s in read_shard(by_path)] == [None, errors.MEMBER_TOO_LARGE]

    small = len(jpeg) + 10
    pq.write_table(
        pa.table({"jpg": [jpeg, jpeg + b"\0" * 100], "caption": ["fine", "too big"]}), tmp_path / "b.parquet"
    )
    (by_bytes,) = expand_inputs([str(tmp_path / "b.parquet")])
    rows = list(read_shard(by_bytes, ReadOptions(max_member_bytes=small)))
    assert [s.error for s in rows] == [None, errors.MEMBER_TOO_LARGE]
    assert rows[0].image_bytes == jpeg and rows[1].image_bytes is None


# -- 2. FIFOs and devices ----------------------------------------------------------------------------


def test_fifo_and_device_inputs_are_refused_naming_the_path(tmp_path):
    os.mkfifo(tmp_path / "a.tar")
    os.symlink("/dev/zero", tmp_path / "x.tar")
    with deadline(10):
        for spec, named in (
            (tmp_path / "a.tar", "a.tar"),
            (tmp_path / "x.tar", "/dev/zero"),
            ("/dev/zero", "/dev/zero"),
        ):
            with pytest.raises(ValueError, match="not a regular file") as caught:
                expand_inputs([str(spec)])
            assert named in str(caught.value)
        with pytest.raises(ValueError, match="FIFO"):
            expand_inputs([str(tmp_path / "*.tar")])  # a glob catching one is refused too


def test_a_fifo_or_device_shard_source_is_one_unreadable_row_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "a.tar")
    os.symlink("/dev/zero", tmp_path / "x.tar")
    os.mkfifo(tmp_path / "p.parquet")
    for name, fmt in (("a.tar", "tar"), ("x.tar", "tar"), ("p.parquet", "parquet")):
        ((error, detail, _),) = isolated_rows(ShardSource(name, str(tmp_path / name), fmt)).values()
        assert error == errors.UNREADABLE_SHARD and "not a regular file" in detail


def test_fifos_and_devices_inside_folders_are_error_rows(tmp_path, jpeg):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg)
    (folder / "a.txt").write_text("fine")
    os.mkfifo(folder / "b.jpg")
    (folder / "b.txt").write_text("a fifo")
    os.mkfifo(folder / "c.txt")  # the caption part
    (folder / "c.jpg").write_bytes(jpeg)
    (folder_source,) = expand_inputs([str(folder)])
    rows = isolated_rows(folder_source)
    assert rows["a"][:2] == (None, None)
    assert rows["b"][0] == rows["c"][0] == errors.NOT_A_REGULAR_FILE
    assert "FIFO" in rows["b"][1]

    (folder / "captions.jsonl").write_text(
        "\n".join(json.dumps({"image": n, "caption": "x"}) for n in ("a.jpg", "b.jpg")) + "\n"
    )
    rows = isolated_rows(folder_source)
    assert rows["a"][0] is None and rows["b"][0] == errors.NOT_A_REGULAR_FILE


# -- 3. nothing outside what the user named ----------------------------------------------------------


def test_unsafe_tar_members_are_error_rows_naming_them_never_followed(tmp_path, jpeg):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_pair(tar, "000", jpeg)
        add_member(tar, "/abs/001.jpg", jpeg)
        add_member(tar, "../../002.jpg", jpeg)
        add_member(tar, "003.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(tar, "003.txt", b"a symlink")
        add_member(tar, "004.jpg", type=tarfile.LNKTYPE, linkname="000.jpg")
        add_member(tar, "004.txt", b"a hardlink")
        add_member(tar, "005.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        add_member(tar, "005.txt", b"/dev/zero as a member")
        add_member(tar, "006.jpg", type=tarfile.FIFOTYPE)
        add_member(tar, "006.txt", b"a fifo")
        add_member(tar, "link", type=tarfile.SYMTYPE, linkname="/")  # no key: a row of its own
        add_pair(tar, "007", jpeg)
    path = tmp_path / "unsafe.tar"
    path.write_bytes(buf.getvalue())
    samples = list(read_shard(ShardSource("unsafe", str(path), "tar")))  # no member is opened: nothing to hang on
    assert len(samples) == 9  # 000, 003-007 and one row for each of the three members with no usable key
    rows = by_key(samples)
    assert rows["000"].ok and rows["007"].ok
    for key, named in (("003", "/etc/passwd"), ("004", "hardlink"), ("005", "character device"), ("006", "FIFO")):
        assert rows[key].error == errors.UNSAFE_MEMBER and named in rows[key].error_detail, key
    alone = [s for s in samples if s.key.startswith("__unsafe__@")]
    assert [s.error for s in alone] == [errors.UNSAFE_MEMBER] * 3
    assert ["/abs/001.jpg" in alone[0].error_detail, "../../002.jpg" in alone[1].error_detail] == [True, True]
    assert "'link'" in alone[2].error_detail
    assert len({s.uid for s in samples}) == len(samples)


def test_folder_symlinks_leading_outside_the_folder_are_unsafe_rows(tmp_path, jpeg):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(jpeg)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg)
    (folder / "a.txt").write_text("fine")
    os.symlink(outside, folder / "b.jpg")
    (folder / "b.txt").write_text("leads out")
    os.symlink(folder / "a.jpg", folder / "c.jpg")  # stays inside: fine
    (folder / "c.txt").write_text("leads in")
    os.symlink("/dev/zero", folder / "d.jpg")
    (folder / "d.txt").write_text("a device")
    os.symlink(tmp_path, folder / "loop")  # a symlinked directory is not descended into
    (folder_source,) = expand_inputs([str(folder)])
    rows = isolated_rows(folder_source)
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert rows["a"][0] is rows["c"][0] is None and rows["c"][2] == jpeg
    assert rows["b"][0] == rows["d"][0] == errors.UNSAFE_PATH
    allowed = isolated_rows(folder_source, ReadOptions(allow_absolute_paths=True))
    assert allowed["b"][0] is None and allowed["d"][0] == errors.NOT_A_REGULAR_FILE


def test_image_paths_outside_the_dataset_root_need_allow_absolute_paths(tmp_path, jpeg):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg)
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.jpg").write_bytes(jpeg)
    names = [
        "img/a.jpg",
        str(data / "img" / "a.jpg"),
        "img/../img/a.jpg",
        "../outside.jpg",
        str(outside),
        "../../../../../etc/passwd",
        "s3://bucket/a.jpg",
        "memory://a.jpg",
    ]
    pq.write_table(pa.table({"image_path": names, "caption": ["c"] * len(names)}), data / "paths.parquet")
    (source,) = expand_inputs([str(data / "paths.parquet")])
    rows = list(read_shard(source))
    assert [s.error for s in rows[:3]] == [None] * 3
    assert [s.error for s in rows[3:]] == [errors.UNSAFE_PATH] * 5
    assert "allow_absolute_paths" in rows[3].error_detail and "s3://bucket/a.jpg" in rows[6].error_detail

    allowed = list(read_shard(source, ReadOptions(allow_absolute_paths=True)))
    assert allowed[3].ok and allowed[4].ok and allowed[4].image_bytes == jpeg
    assert allowed[5].error != errors.UNSAFE_PATH  # read as named (bytes for the decoder to judge)
    assert allowed[6].error == errors.MISSING_IMAGE  # no s3 filesystem here: a missing image, not a refusal

    (data / "captions.jsonl").write_text(
        "\n".join(json.dumps({"image": n, "caption": "c"}) for n in ("img/a.jpg", "../outside.jpg", "/etc/passwd"))
        + "\n"
    )
    (folder,) = expand_inputs([str(data)])
    rows = list(read_shard(folder))
    assert len(rows) == 3
    assert sorted(s.error or "ok" for s in rows) == ["ok", errors.UNSAFE_PATH, errors.UNSAFE_PATH]
    allowed = list(read_shard(folder, ReadOptions(allow_absolute_paths=True)))
    assert [s.error for s in allowed] == [None] * 3
    assert {s.image_bytes == jpeg for s in allowed} == {True, False}  # outside.jpg, and /etc/passwd as named
