"""The selection folder: what ``mlmfilter select`` writes and ``reshard``, ``report`` and the demo read.

    FOLDER/uids.npy        DataComp subset file (sorted unique uid halves)
    FOLDER/kept.parquet    uid, shard, key, the `by` column and the columns the expression reads,
                           in shard order
    FOLDER/selection.json  arguments and counts (:meth:`SelectionResult.to_json
                           <mlmfilter.selection.select.SelectionResult.to_json>`) and the run it was
                           made from: ``run_dir`` as given, ``run_dir_relative`` from this folder

A selection of one run goes to ``RUN/selection`` unless told otherwise. :class:`SelectionFolder`
is the one place that knows these names: the selection writes through it (locally, each file
atomically), the readers read through it (a local path or any fsspec URL).
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq

from mlmfilter.io.uid import sort_halves
from mlmfilter.io.writers import atomic_write_json, join_location, refuse_links_below, remote_location
from mlmfilter.runs.folder import RUN_FILE

SUBSET_FILE, KEPT_FILE, SUMMARY_FILE = "uids.npy", "kept.parquet", "selection.json"
#: the selection folder inside a run folder, where a selection of that one run goes by default
DEFAULT_NAME = "selection"
KEPT_BATCH_ROWS = 65_536


class SelectionFolder:
    """One selection folder, named by a local path or an fsspec URL."""

    def __init__(self, path: str | os.PathLike):
        self.url = os.fspath(path)
        self.fs, self._root = fsspec.core.url_to_fs(self.url)

    @classmethod
    def in_run(cls, run: str | os.PathLike) -> "SelectionFolder":
        """``RUN/selection``: the selection of this one run, unless one was written elsewhere."""
        return cls(posixpath.join(os.fspath(run), DEFAULT_NAME))

    def __repr__(self) -> str:
        return f"SelectionFolder({self.url!r})"

    # -- writing (each file atomically; on object storage one whole PUT each) ---------------------
    @property
    def is_local(self) -> bool:
        return remote_location(self.url) is None

    @property
    def path(self) -> Path | str:
        """The folder: a Path when local, its URL on object storage."""
        return join_location(self.url)

    @property
    def subset_path(self) -> Path | str:
        return join_location(self.url, SUBSET_FILE)

    @property
    def kept_path(self) -> Path | str:
        return join_location(self.url, KEPT_FILE)

    @property
    def summary_path(self) -> Path | str:
        return join_location(self.url, SUMMARY_FILE)

    def paths(self) -> dict[str, Path | str]:
        """What a selection writes, by role (selection.json lists them)."""
        return {"subset": self.subset_path, "kept": self.kept_path, "summary": self.summary_path}

    def run_dir_relative(self, run_dir: Path | str) -> str | None:
        """The run's path from this folder (None when either is on object storage): a selection inside
        its run folder finds the run again wherever the two are moved together."""
        if "://" in str(run_dir) or not self.is_local:
            return None
        return os.path.relpath(os.path.abspath(run_dir), os.path.abspath(self.path))

    def check_writable(self) -> None:
        """A selection folder inside a run folder (``RUN/selection``) is never written through a
        link: a received run folder must not make ``select`` write elsewhere (LinkedPathError)."""
        if "://" in self.url:
            return
        parent = os.path.dirname(os.path.abspath(self.url))
        if os.path.exists(os.path.join(parent, RUN_FILE)):
            refuse_links_below(parent, self.url, final=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """selection.json, written last: a folder whose summary is there holds a whole selection."""
        atomic_write_json(self.summary_path, summary)

    # -- reading ----------------------------------------------------------------------------------
    def _file(self, name: str) -> str:
        return posixpath.join(self._root, name)

    def _shown(self, name: str) -> str:
        return posixpath.join(self.url, name)

    def exists(self) -> bool:
        """Whether this folder holds a selection a reader can use (its summary and its subset file)."""
        return self.fs.exists(self._file(SUMMARY_FILE)) and self.fs.exists(self._file(SUBSET_FILE))

    def require(self) -> "SelectionFolder":
        if not self.exists():
            raise FileNotFoundError(f"{self.url} is not a selection folder (needs {SUMMARY_FILE} and {SUBSET_FILE})")
        return self

    def summary(self) -> dict[str, Any]:
        """selection.json: the arguments, counts, threshold and run of the selection."""
        if not self.fs.exists(self._file(SUMMARY_FILE)):
            raise FileNotFoundError(
                f"{self.url} is not a selection folder (no {SUMMARY_FILE}); run `mlmfilter select` first"
            )
        return json.loads(self.fs.cat_file(self._file(SUMMARY_FILE)))

    def run_dir(self) -> str:
        """The run the selection was made from: beside it if the two moved together, else where it was."""
        info = self.summary()
        relative = info.get("run_dir_relative")
        if relative and self.is_local and (Path(self.path) / relative / RUN_FILE).exists():
            return str((Path(self.path) / relative).resolve())
        run_dir = info.get("run_dir") or info.get("arguments", {}).get("run_dir")
        if not run_dir:
            raise ValueError(f"{self._shown(SUMMARY_FILE)} does not name the run it selected from")
        return run_dir

    def uids(self) -> np.ndarray:
        """The kept uids as sorted uid halves (uids.npy)."""
        with self.fs.open(self._file(SUBSET_FILE), "rb") as fh:
            return sort_halves(np.load(fh))

    def kept_groups(self) -> Iterator[tuple[str, dict[str, str]]]:
        """(shard id, {key: uid}) for each run of kept rows of one shard (kept.parquet is in shard
        order), read in batches; a shard seen twice means the file is not a selection's."""
        path = self._file(KEPT_FILE)
        if not self.fs.exists(path):
            raise FileNotFoundError(f"{self._shown(KEPT_FILE)} is missing; re-run `mlmfilter select`")
        current: str | None = None
        keys: dict[str, str] = {}
        seen: set[str] = set()
        with self.fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=["uid", "shard", "key"], batch_size=KEPT_BATCH_ROWS):
                for uid, shard, key in zip(*(batch.column(c).to_pylist() for c in ("uid", "shard", "key"))):
                    if shard != current:
                        if current is not None:
                            yield current, keys
                        if shard in seen:
                            raise ValueError(
                                f"{self._shown(KEPT_FILE)} is not in shard order (shard {shard!r} appears twice)"
                            )
                        seen.add(shard)
                        current, keys = shard, {}
                    keys[key] = uid
        if current is not None:
            yield current, keys
