"""The shared OpenAI-compatible client against a real fault-injecting server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlmfilter.clients import ChatClient, ChatRequest, ClientOptions, RequestCache, request_key
from mlmfilter.clients.batch import BatchFileWriter, ingest_batch_output
from mlmfilter.clients.chat import BAD_RESPONSE, NOT_IN_BATCH_OUTPUT, REQUEST_FAILED
from mlmfilter.clients.credentials import NO_KEY, resolve_api_key
from tests.support.fault_server import HANG_S, RETRY_AFTER_S, FaultServer

SECRET = "sk-test-NEVER-WRITE-ME-4242"


def _request(text: str, model: str = "teacher") -> ChatRequest:
    return ChatRequest(
        {
            "model": model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
            "max_tokens": 16,
            "temperature": 0,
        },
        tag=text,
    )


def _client(server: FaultServer, cache: RequestCache | None, monkeypatch, **options) -> ChatClient:
    monkeypatch.setenv("TEACH_TEST_KEY", SECRET)
    defaults = dict(
        base_url=server.base_url, api_key_env="TEACH_TEST_KEY", timeout_s=2.0, max_retries=3, backoff_s=0.05
    )
    return ChatClient(ClientOptions(**{**defaults, **options}), cache=cache)


def _files_hold(folder: Path, needle: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_faults_retry_then_succeed_or_end_as_errors(tmp_path, monkeypatch):
    kinds = ["ok", "429", "500", "hang", "malformed", "nonnumeric"]
    with FaultServer() as server:
        cache = RequestCache(tmp_path / "cache" / "requests.sqlite")
        client = _client(server, cache, monkeypatch)
        results = {r.tag: r for r in client.complete_many(_request(f"pair {k} [fault:{k}]") for k in kinds)}
        assert len(results) == len(kinds)  # nothing lost
        by_kind = {k: results[f"pair {k} [fault:{k}]"] for k in kinds}
        assert by_kind["ok"].ok and by_kind["ok"].attempts == 1
        assert by_kind["429"].ok and by_kind["429"].attempts == 3
        assert by_kind["500"].ok and by_kind["500"].attempts == 2
        assert by_kind["hang"].ok and by_kind["hang"].attempts == 2
        assert by_kind["nonnumeric"].ok and by_kind["nonnumeric"].text.startswith("excellent")
        bad = by_kind["malformed"]
        assert not bad.ok and bad.error == BAD_RESPONSE and bad.attempts == 4 and "malformed JSON" in bad.error_detail
        # retry-after was honoured: the 429 retries came at least RETRY_AFTER_S apart
        arrivals = server.arrivals[json_digest(by_kind["429"])]
        assert len(arrivals) == 3 and all(b - a >= RETRY_AFTER_S * 0.95 for a, b in zip(arrivals, arrivals[1:]))
        stats = client.stats.as_dict()
        assert stats["retries"] == 2 + 1 + 1 + 3
        assert stats["requests"] == server.requests == 13
        assert stats["answered"] == 5 and stats["failures"] == {BAD_RESPONSE: 1}
        assert stats["prompt_tokens"] == 5 * 11 and stats["completion_tokens"] == 5 * 7
        assert all(a == f"Bearer {SECRET}" for a in server.authorization)  # the key is sent ...

        # a second run sends only what has no answer yet: the malformed one
        before = server.requests
        again = _client(server, cache, monkeypatch)
        second = {r.tag: r for r in again.complete_many(_request(f"pair {k} [fault:{k}]") for k in kinds)}
        assert server.requests - before == 4
        assert again.stats.cache_hits == 5
        assert all(second[t].cached for t in second if "malformed" not in t)
        assert second["pair 429 [fault:429]"].text == by_kind["429"].text
        cache.close()
    assert _files_hold(tmp_path, SECRET) == []  # ... but never written


def json_digest(result) -> str:
    import hashlib

    return hashlib.sha256(
        json.dumps(
            {
                "model": "teacher",
                "messages": [{"role": "user", "content": [{"type": "text", "text": result.tag}]}],
                "max_tokens": 16,
                "temperature": 0,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()


def test_timeouts_exhausted_become_an_error(monkeypatch):
    with FaultServer() as server:
        client = _client(server, None, monkeypatch, max_retries=0, timeout_s=HANG_S / 5)
        result = client.complete(_request("x [fault:hang]"))
    assert result.error == REQUEST_FAILED and "timed out" in result.error_detail


def test_concurrency_is_bounded_independent_of_batch_size(monkeypatch):
    with FaultServer() as server:
        client = _client(server, None, monkeypatch, concurrency=3)
        results = list(client.complete_many(_request(f"p{i} [fault:slow]") for i in range(12)))
    assert len(results) == 12 and all(r.ok for r in results)
    assert server.max_in_flight == 3


def test_client_error_is_not_retried(monkeypatch):
    with FaultServer() as server:
        client = _client(server, None, monkeypatch, base_url=server.base_url.replace("/v1", "/nowhere"))
        result = client.complete(_request("a"))
    assert result.error == REQUEST_FAILED and result.attempts == 1 and SECRET not in result.error_detail


def test_cache_key_covers_the_whole_request():
    base = _request("caption").body
    assert request_key(base) == request_key(json.loads(json.dumps(base)))
    assert request_key(base) != request_key({**base, "temperature": 0.7})
    assert request_key(base) != request_key({**base, "model": "other"})
    image = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]}
        ],
    }
    other = json.loads(json.dumps(image).replace("AAAA", "AAAB"))
    assert request_key(image) != request_key(other)


def test_batch_files_split_and_outputs_fill_the_cache(tmp_path, monkeypatch):
    requests = [_request(f"pair {i}") for i in range(7)]
    with BatchFileWriter(tmp_path / "batch" / "req.jsonl", max_requests=3) as writer:
        for r in requests + requests[:2]:  # repeats are written once
            writer.add(r)
    assert [len(p.read_text().splitlines()) for p in writer.files] == [3, 3, 1]
    lines = [json.loads(line) for p in writer.files for line in p.read_text().splitlines()]
    assert {tuple(sorted(line)) for line in lines} == {("body", "custom_id", "method", "url")}
    assert all(
        line["url"] == "/v1/chat/completions" and line["custom_id"] == request_key(line["body"]) for line in lines
    )
    one = len((json.dumps(lines[0]) + "\n").encode())
    with BatchFileWriter(tmp_path / "bytes" / "req.jsonl", max_bytes=2 * one + 10) as by_bytes:
        for r in requests:
            by_bytes.add(r)
    assert all(p.stat().st_size <= 2 * one + 10 for p in by_bytes.files) and len(by_bytes.files) >= 4

    # the provider's (or `vllm run-batch`'s) output: one line per request, one of them failed
    output = tmp_path / "out.jsonl"
    with FaultServer() as server, open(output, "w") as fh:
        answerer = _client(server, None, monkeypatch)
        for i, line in enumerate(lines):
            if i == 4:
                fh.write(
                    json.dumps(
                        {
                            "id": "b",
                            "custom_id": line["custom_id"],
                            "response": {"status_code": 500, "body": {}},
                            "error": None,
                        }
                    )
                    + "\n"
                )
                continue
            answer = answerer.complete(ChatRequest(line["body"])).response
            fh.write(
                json.dumps(
                    {
                        "id": f"b{i}",
                        "custom_id": line["custom_id"],
                        "response": {"status_code": 200, "body": answer},
                        "error": None,
                    }
                )
                + "\n"
            )
        sent = server.requests
    cache = RequestCache(tmp_path / "cache.sqlite")
    report = ingest_batch_output([output], cache)
    assert report.as_dict() == {"lines": 7, "stored": 6, "failed": 1}
    offline = ChatClient(ClientOptions(base_url="http://127.0.0.1:9/v1", cache_only=True), cache=cache)
    results = [offline.complete(r) for r in requests]
    assert sum(r.ok for r in results) == 6 and sent == 6
    assert [r.error for r in results if not r.ok] == [NOT_IN_BATCH_OUTPUT]
    assert offline.stats.requests == 0


def test_api_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    assert resolve_api_key("NO_SUCH_KEY_VAR").value == NO_KEY
    monkeypatch.setenv("MY_KEY", SECRET)
    key = resolve_api_key("MY_KEY")
    assert key.value == SECRET and key.source == "env:MY_KEY"
    assert SECRET not in repr(key) and SECRET not in str(key) and SECRET not in f"{key}"
    bare = tmp_path / "key.txt"
    bare.write_text(SECRET + "\n")
    assert resolve_api_key("NO_SUCH_KEY_VAR", bare).value == SECRET
    mapping = tmp_path / "key.yaml"
    mapping.write_text(f"api_key: {SECRET}\n")
    assert resolve_api_key("NO_SUCH_KEY_VAR", mapping).value == SECRET
    with pytest.raises(ValueError, match="not found"):
        resolve_api_key("NO_SUCH_KEY_VAR", tmp_path / "missing")


def test_one_user_turn_builder_and_close_owns_the_cache(tmp_path, monkeypatch):
    import sqlite3

    from mlmfilter.clients import user_message
    from mlmfilter.clients.chat import image_data_url

    assert user_message("Rate it.") == {"role": "user", "content": [{"type": "text", "text": "Rate it."}]}
    url = image_data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 8)
    assert url.startswith("data:image/png;base64,")
    image, text = user_message("Rate it.", url)["content"]  # the image first, as <image> precedes the prompt
    assert image == {"type": "image_url", "image_url": {"url": url}} and text == {"type": "text", "text": "Rate it."}

    with FaultServer() as server:
        client = _client(server, RequestCache(tmp_path / "c.sqlite"), monkeypatch)
        request = ChatRequest({"model": "teacher", "messages": [user_message("A dog .", url)], "max_tokens": 8})
        assert client.complete(request).ok
        client.close()
        client.close()  # twice is harmless
    with pytest.raises(sqlite3.ProgrammingError):  # the client closed its cache with it
        client.cache.get(request.key)
    reopened = RequestCache(tmp_path / "c.sqlite")
    assert request.key in reopened  # the answer was kept
    reopened.close()
