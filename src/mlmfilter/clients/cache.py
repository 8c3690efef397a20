"""An on-disk cache of teacher answers, keyed by a hash of the whole request.

The key is the sha256 of the canonical JSON of the request body (model, messages with their image data
URLs, every sampling parameter), so a changed prompt, image, model or temperature is a new request and
an interrupted or repeated run never pays twice for an answer it has. Only successful answers are
stored; failures are retried by the next run. No credential is part of a request body, so none is stored.
One sqlite file, WAL mode, safe to share between threads of one process.

A full disk must not lose an answer that was paid for. Beside the database lies a reserve file
(``<cache>.reserve``, :data:`RESERVE_BYTES`), made when the cache opens: when an answer cannot be
written for want of space, the reserve is given up and the answer written into its room, and the
cache says it is :attr:`~RequestCache.full` so that the client sends nothing more (the answers already
on their way still fit). The run then ends with :class:`CacheFull` (an ``OSError``, ``ENOSPC``), and
the next run, with space again, finds every answer and makes a new reserve. A disk too full to hold
the reserve when the cache opens is refused at once, before anything is asked.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from mlmfilter.core.ids import canonical_sha256


def request_key(body: dict[str, Any]) -> str:
    """The sha256 of the request body as compact, unescaped canonical JSON (the cache's keys since its first version)."""
    return canonical_sha256(body, ensure_ascii=False, compact=True)


#: room kept beside the cache for the answers in flight when the disk fills (each is a few KiB)
RESERVE_BYTES = 4 << 20


class CacheFull(OSError):
    """The request cache's disk is full: nothing more is asked (``errno`` is ``ENOSPC``)."""

    def __init__(self, path: Path, detail: str):
        super().__init__(errno.ENOSPC, f"no space left for the request cache {path}: {detail}", str(path))


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """``exc`` says the disk is full: ENOSPC/EDQUOT, sqlite's "database or disk is full", or sqlite's
    "disk I/O error" while the disk holding ``where`` has no room left."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
        return True
    if where is not None and (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR or "disk I/O" in str(exc)):
        return _free_bytes(where) < RESERVE_BYTES
    return False


def _free_bytes(path: Path) -> int:
    try:
        stats = os.statvfs(path)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


class RequestCache:
    def __init__(self, path: str | Path, reserve_bytes: int = RESERVE_BYTES):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        #: the disk filled and the reserve is spent: the client asks nothing more
        self.full = False
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self._connect()
            self._keep_reserve()
        except (sqlite3.Error, OSError) as exc:
            if self._db is not None:
                self._db.close()
            if is_disk_full(exc, self.path.parent):
                raise CacheFull(self.path, "free some space and run the same command again") from None
            raise

    def _connect(self) -> None:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, response TEXT, created REAL)"
        )
        self._db.commit()

    def _keep_reserve(self) -> None:
        """Make (or complete) the reserve file: room taken now, given up for answers when the disk fills."""
        have = self.reserve_path.stat().st_size if self.reserve_path.exists() else 0
        if have >= self.reserve_bytes:
            return
        with open(self.reserve_path, "ab") as fh:
            try:
                os.posix_fallocate(fh.fileno(), 0, self.reserve_bytes)
            except (AttributeError, OSError) as exc:  # no fallocate here: write the bytes
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                fh.write(b"\0" * (self.reserve_bytes - have))
                fh.flush()
                os.fsync(fh.fileno())

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, response: dict[str, Any]) -> None:
        """Store an answer (committed at once: a killed run keeps everything it was sent). On a full disk
        the reserve makes room for it and the cache turns :attr:`full`; :class:`CacheFull` only when even
        that room is gone (the answer is then lost)."""
        row = (key, model, json.dumps(response, ensure_ascii=False), time.time())
        with self._lock:
            try:
                self._insert(row)
                return
            except (sqlite3.Error, OSError) as exc:
                if not is_disk_full(exc, self.path.parent):
                    raise
                try:
                    self._recover()
                except (sqlite3.Error, OSError):
                    raise CacheFull(self.path, "the cache could not be reopened on the full disk") from None
            self.full = True
            try:
                self._insert(row)
            except (sqlite3.Error, OSError) as exc:
                if not is_disk_full(exc, self.path.parent):
                    raise
                raise CacheFull(self.path, "an answer could not be stored even in the reserve") from None

    def _insert(self, row: tuple) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses (key, model, response, created) VALUES (?, ?, ?, ?)", row)
        self._db.commit()

    def _recover(self) -> None:
        """After a failed write on a full disk: undo it, give up the reserve, and reconnect."""
        try:
            self._db.rollback()
        except sqlite3.Error:
            pass
        self.reserve_path.unlink(missing_ok=True)
        self._db.close()
        self._connect()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()  # closing twice is harmless
