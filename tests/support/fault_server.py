"""A small OpenAI-compatible chat server on 127.0.0.1 that injects faults, for the client and teach tests.

A request whose text holds ``[fault:KIND]`` gets that fault; others get ``"<score>\\n<rationale>"`` with a
score derived from the request text (deterministic). Kinds:

- ``429``: the first two answers are HTTP 429 with ``retry-after`` (seconds, ``RETRY_AFTER_S``);
- ``500``: the first answer is HTTP 500;
- ``hang``: the first answer comes after ``HANG_S`` seconds (past the client's timeout);
- ``malformed``: always 200 with a body that is not JSON;
- ``nonnumeric``: always a well-formed completion whose score line is not a number;
- ``slow``: always answered after ``SLOW_S`` seconds (to see how many requests are in flight at once);
- ``down``: always HTTP 503 (a teacher that never answers).

``delay_s`` delays every answer (a slow teacher, to interrupt a run mid-way); with ``required_key`` set,
every request without ``Authorization: Bearer <required_key>`` gets HTTP 401. ``GET /v1/models`` lists
the one model ``fault-teacher``, as vLLM and OpenAI list theirs.

The server counts requests per kind and records when each arrived, so a test can check retries and waits.
Every loopback server also counts the client connections it has open, so a test can see a client closed.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RETRY_AFTER_S = 0.3
HANG_S = 5.0  # well past the tests' 2 s client timeout, so a loaded machine cannot blur the two
SLOW_S = 0.3
FAULT = re.compile(r"\[fault:(\w+)\]")


class LoopbackChatServer:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint on 127.0.0.1 (a free port), in a thread.

    Subclasses implement :meth:`_answer`, which writes the reply through ``handler``. Connections are
    kept alive (HTTP/1.1) until the client closes them: :attr:`open_connections` counts those still open.
    """

    def __init__(self) -> None:
        server = self
        self.open_connections = 0
        self._connections_lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with server._connections_lock:
                    server.open_connections += 1

            def finish(self):  # the client closed the connection (or the server shut down)
                try:
                    super().finish()
                finally:
                    with server._connections_lock:
                        server.open_connections -= 1

            def log_message(self, *args):  # quiet test output
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return _send(self, 404, {"error": {"message": f"no route {self.path}"}})
                server._answer(self, body)

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return _send(self, 404, {"error": {"message": f"no route {self.path}"}})
                server._models(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def wait_until_closed(self, timeout_s: float = 5.0) -> int:
        """The number of client connections still open once all are closed or ``timeout_s`` has passed
        (the handler threads see a closed socket a moment after the client closes it)."""
        deadline = time.monotonic() + timeout_s
        while self.open_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.open_connections

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        raise NotImplementedError

    def _models(self, handler: BaseHTTPRequestHandler) -> None:
        _send(handler, 200, {"object": "list", "data": [{"id": "fault-teacher", "object": "model"}]})


class FaultServer(LoopbackChatServer):
    delay_s = 0.0  # every answer waits this long
    required_key: str | None = None  # set: requests without it get HTTP 401

    def __init__(self) -> None:
        self.requests = 0
        self.by_kind: Counter = Counter()
        self.arrivals: dict[str, list[float]] = defaultdict(list)  # request hash -> arrival times
        self.authorization: list[str] = []
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        super().__init__()

    def _refused(self, handler: BaseHTTPRequestHandler) -> bool:
        if self.required_key is None or handler.headers.get("authorization") == f"Bearer {self.required_key}":
            return False
        _send(handler, 401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
        return True

    def _models(self, handler: BaseHTTPRequestHandler) -> None:
        if not self._refused(handler):
            super()._models(handler)

    def _answer(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        if self._refused(handler):
            return
        text = _request_text(body)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        match = FAULT.search(text)
        kind = match.group(1) if match else "ok"
        with self._lock:
            self.requests += 1
            self.by_kind[kind] += 1
            self.arrivals[digest].append(time.monotonic())
            self.authorization.append(handler.headers.get("authorization", ""))
            self.bodies.append(body)
            seen = len(self.arrivals[digest])
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._reply(handler, body, text, digest, kind, seen)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _reply(self, handler: BaseHTTPRequestHandler, body: dict, text: str, digest: str, kind: str, seen: int) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        if kind == "down":
            return _send(handler, 503, {"error": {"message": "the teacher is down"}})
        if kind == "429" and seen <= 2:
            return _send(handler, 429, {"error": {"message": "rate limited"}}, {"retry-after": str(RETRY_AFTER_S)})
        if kind == "500" and seen <= 1:
            return _send(handler, 500, {"error": {"message": "internal error"}})
        if kind == "hang" and seen <= 1:
            time.sleep(HANG_S)
        if kind == "slow":
            time.sleep(SLOW_S)
        if kind == "malformed":
            return _send_raw(handler, 200, b'{"choices": [{"message": {"content": "85')
        if kind == "nonnumeric":
            return _send(handler, 200, _completion(body, "excellent\nThe caption is fine."))
        score = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 101
        _send(handler, 200, _completion(body, f"{score}\nRationale for the request {digest[:8]}."))


def _request_text(body: dict) -> str:
    parts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p.get("text", "") for p in content or [] if p.get("type") == "text")
    return "\n".join(parts)


def _completion(body: dict, text: str) -> dict:
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "fault"),
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


def _send(handler: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
    _send_raw(handler, status, json.dumps(payload).encode(), headers)


def _send_raw(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict | None = None) -> None:
    try:
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): expected
        pass
