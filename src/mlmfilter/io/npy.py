"""Arrays too big for memory, on disk as real ``.npy`` files: appended block by block, read back as memmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class NpyAppender:
    """Rows appended to a real ``.npy`` file as they are made, so a pool's embeddings live on disk, not in memory.

    The header is written for 0 rows first and rewritten with the real count on :meth:`close`; numpy pads
    every header so the first axis can grow to 21 digits, so the rewrite never moves the data. Readers
    open the result with ``np.load(path, mmap_mode="r")``."""

    def __init__(self, path: str | Path, dtype: str | np.dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self.row_shape: tuple[int, ...] | None = None
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._fh = None
        self._header_len = 0

    def _header(self) -> None:
        d = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows, *self.row_shape),
        }
        np.lib.format.write_array_header_1_0(self._fh, d)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if self._fh is None:
            self.row_shape = tuple(block.shape[1:])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._tmp, "wb")
            self._header()
            self._header_len = self._fh.tell()
        if tuple(block.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {block.shape[1:]} appended to {self.path} of rows {self.row_shape}")
        self._fh.write(block.tobytes())
        self.rows += len(block)

    def close(self, row_shape: tuple[int, ...] = (0,)) -> Path:
        """Finish the file (an empty one has ``row_shape``) and move it into place."""
        if self._fh is None:
            self.row_shape = tuple(row_shape)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._tmp, "wb")
            self._header()
        else:
            self._fh.seek(0)
            self._header()
            if self._fh.tell() != self._header_len:  # cannot happen with numpy's growth padding; never corrupt data
                raise RuntimeError(f"the .npy header of {self.path} changed length")
        self._fh.close()
        self._fh = None
        self._tmp.replace(self.path)
        return self.path
