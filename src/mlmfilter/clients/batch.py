"""OpenAI Batch API files: requests out as JSONL, answers back in, into the request cache.

Input line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``; a file
holds at most 50,000 requests and 200 MB (the provider limits), so the writer starts a new part when
either would be exceeded. ``custom_id`` is the request's cache key, so an output line lands in the
cache under the key the next live or cache-only run looks up; nothing else has to be matched.
The same files run offline with ``vllm run-batch -i part.jsonl -o out.jsonl --model M``.

Output line: ``{"id", "custom_id", "response": {"status_code", "body": {...}}, "error"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mlmfilter.clients.cache import RequestCache
from mlmfilter.clients.chat import ChatRequest, message_text

MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1000 * 1000  # "200 MB": the decimal reading, which is within either reading
CHAT_URL = "/v1/chat/completions"


class BatchFileWriter:
    """Writes ``<stem>-00000.jsonl``, ``<stem>-00001.jsonl``, ... next to ``path``; skips repeated requests."""

    def __init__(
        self, path: str | Path, max_requests: int = MAX_REQUESTS_PER_FILE, max_bytes: int = MAX_BYTES_PER_FILE
    ):
        self.path = Path(path)
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.files: list[Path] = []
        self.written = 0
        self._seen: set[str] = set()
        self._fh = None
        self._count = self._bytes = 0

    def add(self, request: ChatRequest) -> bool:
        key = request.key
        if key in self._seen:
            return False
        line = (
            json.dumps({"custom_id": key, "method": "POST", "url": CHAT_URL, "body": request.body}, ensure_ascii=False)
            + "\n"
        ).encode("utf-8")
        if len(line) > self.max_bytes:
            raise ValueError(f"one request is {len(line)} bytes, over the {self.max_bytes}-byte batch file limit")
        if self._fh is None or self._count >= self.max_requests or self._bytes + len(line) > self.max_bytes:
            self._next_file()
        self._fh.write(line)
        self._seen.add(key)
        self._count += 1
        self._bytes += len(line)
        self.written += 1
        return True

    def _next_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        suffix = self.path.suffix or ".jsonl"
        part = self.path.with_name(f"{self.path.stem}-{len(self.files):05d}{suffix}")
        self._fh = open(part, "wb")
        self.files.append(part)
        self._count = self._bytes = 0

    def close(self) -> list[Path]:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return self.files

    def __enter__(self) -> "BatchFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class IngestReport:
    lines: int = 0
    stored: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # custom_id -> why its line holds no answer

    def as_dict(self) -> dict:
        return {"lines": self.lines, "stored": self.stored, "failed": len(self.failed)}


def ingest_batch_output(paths: Iterable[str | Path], cache: RequestCache) -> IngestReport:
    """Store every successful answer of the output file(s) in ``cache`` under its ``custom_id``."""
    report = IngestReport()
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                report.lines += 1
                try:
                    record = json.loads(line)
                except ValueError:
                    report.failed[f"{path}:{number}"] = "line is not JSON"
                    continue
                custom_id = str(record.get("custom_id", f"{path}:{number}"))
                response = record.get("response") or {}
                body = response.get("body")
                if record.get("error") or response.get("status_code") != 200 or not isinstance(body, dict):
                    report.failed[custom_id] = json.dumps(
                        record.get("error") or {"status_code": response.get("status_code")}
                    )[:500]
                    continue
                if message_text(body) is None:
                    report.failed[custom_id] = "answer is not a chat completion"
                    continue
                cache.put(custom_id, str(body.get("model", "")), body)
                report.stored += 1
    return report
