"""A run folder's files through fsspec: local disks and object stores behave alike.

Local paths keep the strongest guarantee: a temp file beside the target, fsync, ``os.replace``
(see :class:`mlmfilter.io.writers.AtomicFile`). Object stores have no rename, but a PUT is atomic
per object, so each file is written whole in one call; a completion marker is always the last
object a shard writes, so a half-finished shard never looks done on either kind of storage.
"""

from __future__ import annotations

import io
import os
import posixpath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mlmfilter.core.locations import is_local_filesystem, location_of
from mlmfilter.io.writers import atomic_write, atomic_write_parquet, refuse_links_below


class RunStorage:
    """Files under one root (a local directory or an fsspec URL), addressed by relative posix paths."""

    def __init__(self, root: str | os.PathLike):
        root = os.fspath(root)
        self.fs, path = fsspec.core.url_to_fs(root)
        self.is_local = is_local_filesystem(self.fs)
        # local roots are made absolute once, so a run folder works from any working directory
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.url = location_of(self.fs, self.root)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def local_path(self, rel: str = "") -> str | None:
        """The OS path of ``rel`` on a local run folder; None on object storage."""
        return self.path(rel) if self.is_local else None

    def writable_path(self, rel: str, *, final: bool = False) -> str:
        """The OS path of ``rel`` to write to, refused (LinkedPathError) when a folder on the way below
        the root is a symbolic link: a received run folder never makes us write outside it. ``final``
        checks ``rel`` itself too (files opened in place, not replaced)."""
        path = self.path(rel)
        if self.is_local:
            refuse_links_below(self.root, path, final=final)
        return path

    # -- reading ----------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def is_dir(self, rel: str) -> bool:
        return self.fs.isdir(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def list_names(self, rel: str, suffix: str = "") -> list[str]:
        """Sorted file names directly under ``rel`` (hidden names, i.e. temp files, and folders left out)."""
        try:
            entries = self.fs.ls(self.path(rel), detail=True)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "directory")
        return sorted(n for n in names if n and not n.startswith(".") and n.endswith(suffix))

    def list_dirs(self, rel: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self.path(rel), detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")

    def info(self, rel: str) -> dict[str, Any]:
        return self.fs.info(self.path(rel))

    def parquet_rows(self, rel: str) -> int:
        """Row count from the footer only (no data read)."""
        with self.fs.open(self.path(rel), "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows

    @property
    def arrow_filesystem(self) -> Any:
        """The filesystem pyarrow reads this folder's paths through: None (its own) for local ones."""
        return None if self.is_local else self.fs

    # -- writing ----------------------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self.writable_path(rel, final=True), exist_ok=True)
        # object stores have no directories: a prefix exists once an object is under it

    def write_bytes(self, rel: str, data: bytes | str) -> None:
        data = data.encode("utf-8") if isinstance(data, str) else data
        if self.is_local:
            atomic_write(self.writable_path(rel), data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        if self.is_local:
            atomic_write_parquet(table, self.writable_path(rel))
            return
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.fs.pipe_file(self.path(rel), buffer.getvalue())

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.writable_path(rel))
        except FileNotFoundError:
            pass

    def remove_tree(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.writable_path(rel, final=True), recursive=True)
