"""An on-disk cache of teacher answers, keyed by a hash of the whole request.

The key is the sha256 of the canonical JSON of the request body (model, messages with their image data
URLs, every sampling parameter), so a changed prompt, image, model or temperature is a new request and
an interrupted or repeated run never pays twice for an answer it has. Only successful answers are
stored; failures are retried by the next run. No credential is part of a request body, so none is stored.
One sqlite file, WAL mode, safe to share between threads of one process.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from mlmfilter.core.ids import canonical_sha256


def request_key(body: dict[str, Any]) -> str:
    """The sha256 of the request body as compact, unescaped canonical JSON (the cache's keys since its first version)."""
    return canonical_sha256(body, ensure_ascii=False, compact=True)


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, response TEXT, created REAL)"
        )
        self._db.commit()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, response: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, model, response, created) VALUES (?, ?, ?, ?)",
                (key, model, json.dumps(response, ensure_ascii=False), time.time()),
            )
            self._db.commit()  # per answer: a killed run keeps everything it was sent

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()  # closing twice is harmless
