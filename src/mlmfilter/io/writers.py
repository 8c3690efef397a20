"""Atomic file writes and a reproducible WebDataset tar writer.

Every file is written to a hidden temp file in the destination directory and moved into place
with ``os.replace``, which is atomic on a local POSIX filesystem: a process killed mid-write
leaves at most a stray ``.NAME.*.tmp`` file, never a half-written file under the final name.
(Object stores and network filesystems do not give that guarantee; write locally and copy.)
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

_UMASK = os.umask(0)
os.umask(_UMASK)

#: mtime stamped on every tar member, so shard bytes depend only on their contents
FIXED_MTIME = 0


class LinkedPathError(ValueError):
    """A folder mlmfilter owns holds a symbolic link where it would write: it never writes through one."""


def refuse_links_below(root: str | os.PathLike, path: str | os.PathLike, *, final: bool = False) -> None:
    """Raise :class:`LinkedPathError` when a component of ``path`` below ``root`` is a symbolic link.

    A received run folder may hold links (``logs -> /elsewhere``); writing through one would write
    outside the folder. ``root`` itself may be a link (the user named it); ``final`` checks the last
    component too (files opened for appending; an atomic write replaces a link, it never follows it).
    """
    root, path = os.path.abspath(root), os.path.abspath(path)
    relative = os.path.relpath(path, root)
    if relative == "." or relative.startswith(".."):
        return
    parts = relative.split(os.sep)
    current = root
    for index, part in enumerate(parts):
        current = os.path.join(current, part)
        if index == len(parts) - 1 and not final:
            return
        if os.path.islink(current):
            raise LinkedPathError(
                f"{current} is a symbolic link (to {os.readlink(current)}); mlmfilter never writes through a link "
                f"inside {root}: replace it with a real {'file' if index == len(parts) - 1 else 'folder'}"
            )


class AtomicFile:
    """A temp file beside ``path``; :meth:`commit` renames it into place, :meth:`abort` removes it.

    ``path`` may be an fsspec URL (``s3://bucket/x``): the temp file is then a local one, put in
    place whole (one PUT, atomic per object) by :meth:`commit`; ``self.path`` stays that URL.
    A failed write (a full disk) leaves nothing behind: neither the temp file nor a partial target.
    """

    def __init__(self, path: str | os.PathLike):
        self._remote = remote_location(path)
        if self._remote is not None:
            self.path: Path | str = os.fspath(path)
            fd, tmp = tempfile.mkstemp(prefix=".mlmfilter-upload.", suffix=".tmp")
        else:
            self.path = Path(local_location(path))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.tmp_path = Path(tmp)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> Path | str:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            # mkstemp makes 0600 files; give the result the mode a plain open() would have
            os.fchmod(self.file.fileno(), 0o666 & ~_UMASK)
            self.file.close()
            if self._remote is not None:
                fs, remote_path = self._remote
                fs.put_file(str(self.tmp_path), remote_path)
                self.tmp_path.unlink(missing_ok=True)
            else:
                os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()  # flushes what is buffered: fails again on a full disk
        except OSError:
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def remote_location(location: str | os.PathLike) -> tuple[Any, str] | None:
    """(filesystem, path) of a location on a filesystem other than this machine's (``s3://``,
    ``memory://`` ...); None for a local path or a ``file://`` URL."""
    location = os.fspath(location)
    if "://" not in location:
        return None
    import fsspec

    from mlmfilter.core.locations import is_local_filesystem

    fs, path = fsspec.core.url_to_fs(location)
    return None if is_local_filesystem(fs) else (fs, path)


def local_location(location: str | os.PathLike) -> str:
    """A local path or ``file://`` URL as an OS path (``~`` expanded)."""
    location = os.fspath(location)
    if location.startswith("file://"):
        location = location[len("file://") :]
    return os.path.expanduser(location)


def join_location(location: str | os.PathLike, *names: str) -> Path | str:
    """``location/name``: a Path for a local folder, a URL string for any other (never ``s3:/b``)."""
    if remote_location(location) is not None:
        return "/".join([os.fspath(location).rstrip("/"), *names])
    return Path(local_location(location)).joinpath(*names)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path | str:
    """Write ``data`` (str is UTF-8 encoded) to ``path`` (a local path or an fsspec URL) atomically."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    remote = remote_location(path)
    if remote is not None:
        fs, remote_path = remote
        fs.pipe_file(remote_path, data)  # one PUT: atomic per object
        return os.fspath(path)
    with AtomicFile(path) as out:
        out.file.write(data)
    return out.path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path | str:
    """Pretty, key-sorted JSON (non-JSON values such as Paths are written with str())."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def atomic_write_parquet(table: pa.Table, path: str | os.PathLike, **write_options: Any) -> Path | str:
    """``pq.write_table`` to a temp file, then rename (or upload, for a URL). ``write_options`` go to pq.write_table."""
    with AtomicFile(path) as out:
        # by path: pyarrow closes file objects it is given, and commit still needs ours
        pq.write_table(table, str(out.tmp_path), **write_options)
    return out.path


class TarShardWriter:
    """Writes samples to WebDataset shards ``{output_dir}/{prefix}{index:08d}.tar``.

    A new shard starts every ``samples_per_shard`` samples; each shard appears under its final
    name only once complete. Members are ``KEY.ext`` in sorted extension order with a fixed
    mtime, owner and mode, so the same samples in the same order give byte-identical shards.
    If the ``with`` block raises, the shard being written is discarded.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        samples_per_shard: int = 10_000,
        prefix: str = "",
        start_index: int = 0,
    ):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.output_dir = output_dir if remote_location(output_dir) is not None else Path(output_dir)
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.next_index = start_index
        self.shards: list[Path | str] = []  # completed shards, in order
        self.samples_written = 0
        self._file: AtomicFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def shard_path(self, index: int) -> Path | str:
        return join_location(self.output_dir, f"{self.prefix}{index:08d}.tar")

    def write(self, key: str, files: Mapping[str, bytes | str]) -> None:
        """Add one sample: ``files`` maps extension (``jpg``, ``txt``, ``json``) to content."""
        if not key or "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"invalid WebDataset key {key!r} (must be non-empty, no dot in its basename)")
        if self._tar is None:
            self._open_shard()
        for ext in sorted(files):
            data = files[ext]
            self._add_member(f"{key}.{ext}", data.encode("utf-8") if isinstance(data, str) else data)
        self._in_shard += 1
        self.samples_written += 1
        if self._in_shard >= self.samples_per_shard:
            self._close_shard()

    def close(self) -> list[Path | str]:
        """Finish the shard in progress; returns every completed shard."""
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (completed shards stay)."""
        if self._tar is not None:
            tar, file, self._tar, self._file = self._tar, self._file, None, None
            try:
                tar.close()  # writes the end blocks: fails again on a full disk
            except OSError:
                pass
            finally:
                file.abort()

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_shard(self) -> None:
        self._file = AtomicFile(self.shard_path(self.next_index))
        self._tar = tarfile.open(fileobj=self._file.file, mode="w", format=tarfile.PAX_FORMAT)
        self._in_shard = 0

    def _close_shard(self) -> None:
        try:
            self._tar.close()
        except BaseException:
            self.abort()
            raise
        self.shards.append(self._file.commit())
        self._tar = self._file = None
        self.next_index += 1

    def _add_member(self, name: str, data: bytes) -> None:
        add_tar_member(self._tar, name, data)


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int = FIXED_MTIME) -> None:
    """One regular file in a tar, its header fixed (mode 0644, owner 0, no user names, ``mtime``)
    so that the tar's bytes depend only on the members' names and contents."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
