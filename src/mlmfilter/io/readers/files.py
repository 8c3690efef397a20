"""Opening what a shard or dataset names, without reading what the user did not name.

Local files are opened non-blocking and checked with ``fstat`` before a byte is read, so a FIFO
never hangs a run and a device never streams forever. A file's size is checked against the cap
before it is read and every read is bounded (``cap + 1`` bytes). Paths a dataset names (a
parquet image-path column, a captions table, a symlink in a folder) must stay inside the
dataset's folder unless the user allows otherwise.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import stat
from typing import IO, Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mlmfilter.core import errors
from mlmfilter.io.readers.options import ReadOptions
from mlmfilter.io.readers.samples import SampleProblem

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ALLOW_HINT = "pass allow_absolute_paths=True (CLI: --allow-absolute-paths) to allow it"


def is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISDIR, "directory"),
)


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


@contextlib.contextmanager
def open_regular_file(path: str) -> Iterator[IO[bytes]]:
    """A local regular file opened for reading; SampleProblem(not_a_regular_file) for anything else.

    O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SampleProblem(
                errors.NOT_A_REGULAR_FILE, f"{path!r} is a {file_kind(mode)}, not a regular file: not opened"
            )
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


@contextlib.contextmanager
def open_shard_file(url: str) -> Iterator[IO[bytes]]:
    """A shard's byte stream: local files only when regular, anything else through fsspec."""
    fs, path = fsspec.core.url_to_fs(url)
    if is_local(fs):
        with open_regular_file(path) as fh:
            yield fh
    else:
        with fs.open(path, "rb") as fh:
            yield fh


def too_large(what: str, size: int, cap: int) -> SampleProblem:
    return SampleProblem(errors.MEMBER_TOO_LARGE, f"{what} has {size} bytes, over max_member_bytes={cap}: not read")


def read_capped(fs: Any, path: str, cap: int) -> bytes:
    """The bytes of one regular file of at most ``cap`` bytes; SampleProblem otherwise, OSError if missing."""
    if is_local(fs):
        with open_regular_file(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > cap:
                raise too_large(repr(path), size, cap)
            data = fh.read(size + 1)  # bounded by the checked size; + 1 sees a file that grew
    else:
        info = fs.info(path)
        if info.get("type", "file") != "file":
            raise SampleProblem(errors.NOT_A_REGULAR_FILE, f"{path!r} is a {info.get('type')}, not a file: not opened")
        size = info.get("size")
        if size is not None and size > cap:
            raise too_large(repr(path), size, cap)
        with fs.open(path, "rb") as fh:
            data = fh.read(cap + 1 if size is None else size + 1)
    if len(data) > cap:  # the file grew after its size was checked
        raise too_large(repr(path), len(data), cap)
    return data


def _within(path: str, root: str) -> bool:
    root = root.rstrip("/")
    if not root:
        return not path.startswith("..")
    return path == root or path.startswith(root + "/")


class DatasetFiles:
    """Files named by one dataset (a folder, or the folder of a parquet file), bounded in size.

    Relative names resolve against ``root``. Unless ``allow_absolute_paths`` is set, a name (or a
    local symlink) that leads outside ``root``, and any URL, is refused with ``unsafe_path``."""

    def __init__(self, fs: Any, root: str, options: ReadOptions):
        self.fs = fs
        self.root = root.rstrip("/") or ("/" if root.startswith("/") else "")
        self.cap = options.max_member_bytes
        self.allow_outside = options.allow_absolute_paths
        self._real_root = os.path.realpath(self.root) if is_local(fs) else None

    def locate(self, name: str) -> tuple[Any, str]:
        """(filesystem, path) of ``name``; SampleProblem(unsafe_path) where it is not allowed."""
        if _URL.match(name):
            if not self.allow_outside:
                raise SampleProblem(errors.UNSAFE_PATH, f"image path {name!r} is a URL: not read; {_ALLOW_HINT}")
            return fsspec.core.url_to_fs(name)
        path = self._resolve(name)
        if not self.allow_outside and not self._inside(path):
            raise SampleProblem(
                errors.UNSAFE_PATH,
                f"image path {name!r} leads outside the dataset folder {self.root!r}: not read; {_ALLOW_HINT}",
            )
        return self.fs, path

    def _resolve(self, name: str) -> str:
        return posixpath.normpath(name if name.startswith("/") else posixpath.join(self.root, name))

    def _inside(self, path: str) -> bool:
        if not _within(path, self.root):
            return False
        if self._real_root is not None:  # a symlink inside the folder may point anywhere
            return _within(os.path.realpath(path), self._real_root)
        return True

    def read(self, name: str) -> bytes:
        fs, path = self.locate(name)
        return read_capped(fs, path, self.cap)

    def is_inside(self, name: str) -> bool:
        """Whether ``name`` resolves to a path inside the root (lexically; symlinks are checked on read)."""
        return not _URL.match(name) and _within(self._resolve(name), self.root)

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self.root) if self.root else path
