"""DataComp subset files: the uids of the kept pairs as a sorted, unique ``.npy`` array; external
uid lists (``--intersect`` / ``--union``) and their algebra over the selected rows (:class:`UidLists`).

The format is DataComp's (``--subset_file`` of its resharder and training scripts): a numpy
structured array of dtype ``[("f0", "<u8"), ("f1", "<u8")]`` -- the first and last 16 hex
characters of each uid as unsigned integers -- sorted by (f0, f1), without duplicates, written
with ``np.save``. Uids are gathered as per-batch arrays, never as Python objects, so 100M uids
cost 1.6 GB plus the sort's index, nothing more.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlmfilter.io.uid import HALVES_DTYPE, empty_halves, is_sorted_halves, sort_halves
from mlmfilter.io.writers import AtomicFile


class SubsetAccumulator:
    """Collects uid halves batch by batch; :meth:`write` sorts, de-duplicates and saves them."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.rows = 0

    def add(self, halves: np.ndarray) -> None:
        if len(halves):
            self._parts.append(np.asarray(halves, dtype=HALVES_DTYPE))
            self.rows += len(halves)

    def write(self, path: str | os.PathLike) -> int:
        """Save the subset file; returns the number of unique uids written. The collected
        parts are released first, so the peak is the uids, their sorted copy and the order."""
        parts, self._parts = self._parts, []
        combined = np.concatenate(parts) if parts else empty_halves()
        del parts
        return _save(unique_sorted_halves(combined), path)


def unique_sorted_halves(halves: np.ndarray) -> np.ndarray:
    """Sorted by (f0, f1), duplicates dropped."""
    halves = sort_halves(halves)
    if len(halves) < 2:
        return halves
    repeated = (halves["f0"][1:] == halves["f0"][:-1]) & (halves["f1"][1:] == halves["f1"][:-1])
    return halves[np.concatenate([[True], ~repeated])] if repeated.any() else halves


def write_datacomp_subset(halves: np.ndarray, path: str | os.PathLike) -> int:
    """Sort, de-duplicate and ``np.save`` uid halves to ``path`` atomically; returns the count."""
    return _save(unique_sorted_halves(halves), path)


def _save(subset: np.ndarray, path: str | os.PathLike) -> int:
    with AtomicFile(path) as out:
        np.save(out.file, subset, allow_pickle=False)
    return len(subset)


def read_datacomp_subset(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Load a subset file, checking that it is one: the (f0, f1) uint64 dtype, sorted, unique."""
    path = Path(path)
    subset = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if subset.dtype != HALVES_DTYPE:
        raise ValueError(f"{path} is not a DataComp subset file: dtype {subset.dtype}, expected {HALVES_DTYPE}")
    if subset.ndim != 1:
        raise ValueError(f"{path} is not a DataComp subset file: shape {subset.shape}, expected one dimension")
    if not mmap and not is_sorted_halves(subset):
        raise ValueError(f"{path} is not sorted by (f0, f1), as DataComp subset files must be")
    return subset


def read_uid_list(path: str | os.PathLike) -> np.ndarray:
    """An external uid list (``--intersect`` / ``--union``) as sorted, unique uid halves.

    Accepted ``.npy`` layouts: DataComp's subset files (a structured array of two unsigned 64-bit
    fields, whatever their names -- ``np.dtype("u8,u8")`` gives ``f0, f1``, other tools write
    ``uid_0, uid_1``; either byte order), an ``(N, 2)`` uint64 array of the same halves, and a 1-D
    array of 32-hex-character uid strings (``<U32`` or ``S32``). Anything else is refused with
    one line naming the file: object arrays (pickles) are never loaded.
    """
    import io

    import fsspec

    fs, where = fsspec.core.url_to_fs(os.fspath(path))  # a local path or any fsspec URL, taken as given
    path = os.fspath(path)
    if not fs.isfile(where):
        raise FileNotFoundError(f"uid list {path} does not exist")
    data = fs.cat_file(where)
    magic = data[:6]
    if magic[:2] == b"PK":
        raise ValueError(f"uid list {path} is an .npz archive, not one array; {_UID_LIST_FORMATS}")
    if magic != b"\x93NUMPY":  # np.load would try to unpickle it
        raise ValueError(f"uid list {path} is not a .npy file; {_UID_LIST_FORMATS}")
    try:
        values = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:  # object arrays, a damaged header
        reason = "it holds Python objects (a pickle)" if "allow_pickle" in str(exc) else str(exc)
        raise ValueError(f"uid list {path} cannot be read: {reason}; {_UID_LIST_FORMATS}") from None
    except (OSError, EOFError) as exc:  # truncated
        raise ValueError(f"uid list {path} cannot be read ({exc}); {_UID_LIST_FORMATS}") from None
    return unique_sorted_halves(_as_halves(values, path))


_UID_LIST_FORMATS = "expected a DataComp subset (.npy of dtype u8,u8) or an array of 32-hex-character uid strings"


def _as_halves(values: np.ndarray, path: str | Path) -> np.ndarray:
    dtype = values.dtype
    fields = dtype.names or ()
    if len(fields) == 2 and all(dtype[f].kind == "u" and dtype[f].itemsize == 8 for f in fields) and values.ndim == 1:
        out = np.empty(len(values), dtype=HALVES_DTYPE)
        out["f0"], out["f1"] = values[fields[0]], values[fields[1]]
        return out
    if dtype.kind == "u" and dtype.itemsize == 8 and values.ndim == 2 and values.shape[1] == 2:
        out = np.empty(len(values), dtype=HALVES_DTYPE)
        out["f0"], out["f1"] = values[:, 0], values[:, 1]
        return out
    if dtype.kind in "US" and values.ndim == 1:
        from mlmfilter.io.uid import uids_to_halves

        try:
            return uids_to_halves(values)
        except ValueError as exc:
            raise ValueError(f"uid list {path}: {exc}") from None
    raise ValueError(f"uid list {path} has dtype {dtype} and shape {values.shape}; {_UID_LIST_FORMATS}")


class UidIndex:
    """Sorted unique uid halves with a fast lookup: a binary search over ``f0`` alone (plain
    uint64, ~50x faster than numpy's search over the structured pair), then ``f1`` compared; the
    rare keys sharing an ``f0`` fall back to the exact two-field search."""

    def __init__(self, sorted_unique: np.ndarray):
        self._init(np.ascontiguousarray(sorted_unique["f0"]), np.ascontiguousarray(sorted_unique["f1"]))

    @classmethod
    def from_halves(cls, f0: np.ndarray, f1: np.ndarray) -> "UidIndex":
        """From the two halves' arrays (sorted by (f0, f1), unique), without a structured copy."""
        index = cls.__new__(cls)
        index._init(np.ascontiguousarray(f0, dtype=np.uint64), np.ascontiguousarray(f1, dtype=np.uint64))
        return index

    def _init(self, f0: np.ndarray, f1: np.ndarray) -> None:
        self.f0, self.f1 = f0, f1
        self.shared_f0 = bool(len(f0) > 1 and (f0[1:] == f0[:-1]).any())
        self._keys: np.ndarray | None = None

    @property
    def keys(self) -> np.ndarray:
        """The structured (f0, f1) array, built on first use (only the rare shared-f0 lookups need it)."""
        if self._keys is None:
            self._keys = np.empty(len(self.f0), dtype=HALVES_DTYPE)
            self._keys["f0"], self._keys["f1"] = self.f0, self.f1
        return self._keys

    def __len__(self) -> int:
        return len(self.f0)

    def locate(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, position in ``keys``) for each query uid."""
        from mlmfilter.io.uid import locate_sorted

        if not len(self) or not len(query):
            return np.zeros(len(query), dtype=bool), np.zeros(len(query), dtype=np.intp)
        q0 = np.ascontiguousarray(query["f0"])
        # searching in ascending order walks the keys forward (cache-friendly): ~6x faster
        order = np.argsort(q0)
        position = np.empty(len(q0), dtype=np.intp)
        position[order] = np.searchsorted(self.f0, q0[order])
        np.minimum(position, len(self.f0) - 1, out=position)
        same_f0 = self.f0[position] == q0
        found = same_f0 & (self.f1[position] == query["f1"])
        if self.shared_f0:
            retry = np.flatnonzero(same_f0 & ~found)
            if len(retry):
                found[retry], position[retry] = locate_sorted(self.keys, query[retry])
        return found, position


class UidLists:
    """``--intersect`` / ``--union`` uid lists: loaded (sorted, unique) before the scan, applied
    to each batch's chosen rows, with how many rows each matched, removed or added.

    A file that is not a uid list raises ValueError (naming it) before anything is read."""

    def __init__(self, intersect: Sequence[str | os.PathLike], union: Sequence[str | os.PathLike]):
        self.entries: list[dict[str, Any]] = []
        for mode, paths in (("intersect", intersect), ("union", union)):
            for path in paths:
                uids = read_uid_list(path)
                self.entries.append(
                    {
                        "mode": mode,
                        "path": str(path),
                        "uids": UidIndex(uids),
                        "found": np.zeros(len(uids), dtype=bool),
                        "matched": 0,
                        "changed": 0,
                    }
                )

    def __bool__(self) -> bool:
        return bool(self.entries)

    def apply(self, halves_and_valid: tuple[np.ndarray, np.ndarray], mask: np.ndarray) -> np.ndarray:
        """The rows kept once the lists apply: ``(selected ∩ intersect...) ∪ union...``, of the
        rows of one batch (uid halves, and which rows have a uid at all)."""
        halves, valid = halves_and_valid
        members = []
        for entry in self.entries:
            found, position = entry["uids"].locate(halves)
            found &= valid
            entry["found"][position[found]] = True
            entry["matched"] += int(found.sum())
            members.append(found)
        kept = mask.copy()
        for entry, found in zip(self.entries, members):
            if entry["mode"] == "intersect":
                entry["changed"] += int((kept & ~found).sum())
                kept &= found
        for entry, found in zip(self.entries, members):
            if entry["mode"] == "union":
                entry["changed"] += int((found & ~kept).sum())
                kept |= found
        return kept

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for entry in self.entries:
            item = {
                "mode": entry["mode"],
                "path": entry["path"],
                "uids": len(entry["uids"]),
                "matched": entry["matched"],
                "outside_pool": int((~entry["found"]).sum()),
            }
            item["removed" if entry["mode"] == "intersect" else "added"] = entry["changed"]
            out.append(item)
        return out
