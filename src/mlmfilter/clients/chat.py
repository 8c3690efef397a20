"""Chat completions against any OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, ``transformers serve``).

The ``openai`` package does the HTTP; this class adds what a labelling run needs around it:

- bounded concurrency (a thread pool of ``concurrency`` workers) independent of how many requests the
  caller hands over: at most ``2 * concurrency`` are in flight, the rest wait in the caller's iterator;
- retries with exponential backoff on 429, 408/409, 5xx, timeouts, connection errors and unreadable
  bodies, waiting what the server's ``retry-after`` / ``retry-after-ms`` says when it says so (the
  package's own retries are off, so every retry is counted here);
- a per-request timeout;
- the request cache (:mod:`.cache`): an answer it has is never asked for again, and an answer received
  is stored before anything else happens to it; once the cache's disk is full nothing more is sent
  (:class:`~mlmfilter.clients.cache.CacheFull` ends the run);
- counters: requests sent, cache hits, retries, prompt/completion tokens, failures by reason.

A request is the exact JSON body (``model``, ``messages``, sampling parameters), the same body a Batch
API file holds, so a cached answer, a batch output and a live answer are interchangeable.
A failure is a :class:`ChatResult` with ``error`` set, never an exception: one bad pair loses nothing else.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from mlmfilter.clients.cache import CacheFull, RequestCache, request_key
from mlmfilter.clients.credentials import ApiKey, redact, resolve_api_key

log = logging.getLogger(__name__)

# error reasons of a teacher request (column values: keep them stable)
REQUEST_FAILED = "teacher_request_failed"  # HTTP error, timeout or connection failure after all retries
BAD_RESPONSE = "teacher_bad_response"  # a 200 whose body is not a chat completion (malformed JSON, no text)
NOT_IN_BATCH_OUTPUT = "teacher_not_answered"  # cache-only mode (collecting a batch output) and no answer

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
#: hosts that answer nothing without a key: asked without one, they are refused before any request
KEYED_HOSTS = ("api.openai.com",)
#: how long the up-front check waits for the server's model list
CHECK_TIMEOUT_S = 10.0


class EndpointUnavailable(ValueError):
    """The OpenAI-compatible server cannot be used: no key for a host that needs one, not reachable, or
    the key refused. One line naming the URL tried and where the key comes from (never the key)."""


MAX_RETRY_AFTER_S = 600.0  # a server asking for longer is treated as a failure of this attempt's budget


class ClientOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    api_key_file: str | None = None
    concurrency: int = Field(8, ge=1, le=1024)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0)  # first wait without retry-after; doubles per attempt
    max_backoff_s: float = Field(60.0, ge=0)
    cache_only: bool = False  # answer from the cache only (collecting a batch output): a miss is an error

    def describe(self) -> dict[str, Any]:
        """Settings worth recording; the key's source is named by the caller, never the key."""
        return self.model_dump(exclude={"api_key_file"})


class ServerSettings(BaseModel):
    """How a model served over HTTP is reached: the ``backend_options`` that the served judge and the served
    writer share (address, the key's origin, limits, the request cache). None of them changes an answer,
    so none is part of a stage's identity (:attr:`OPERATIONAL`); provenance records the address."""

    model_config = ConfigDict(extra="forbid")
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset(
        {"base_url", "max_concurrency", "timeout_s", "max_retries", "backoff_s", "cache", "api_key_env", "api_key_file"}
    )

    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    api_key_file: str | None = None
    max_concurrency: int = Field(8, ge=1, le=1024)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    #: sqlite file of answers: a rerun never asks twice; None: no cache
    cache: str | None = None

    def client_options(self) -> ClientOptions:
        if not self.base_url:
            raise ValueError(
                "--backend openai needs the server's address: --base-url URL (e.g. http://127.0.0.1:8000/v1)"
            )
        return ClientOptions(
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            api_key_file=self.api_key_file,
            concurrency=self.max_concurrency,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
        )


@dataclass
class ChatRequest:
    body: dict[str, Any]  # model, messages, parameters: exactly what is POSTed
    tag: Any = None  # the caller's handle, returned with the result

    @property
    def key(self) -> str:
        return request_key(self.body)


@dataclass
class ChatResult:
    tag: Any
    key: str
    text: str | None = None
    response: dict[str, Any] | None = None
    cached: bool = False
    attempts: int = 0
    error: str | None = None
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def usage(self) -> dict[str, int]:
        usage = (self.response or {}).get("usage") or {}
        return {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent, retries included
    answered: int = 0  # requests answered over the network
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def fail(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "answered": self.answered,
                "cache_hits": self.cache_hits,
                "retries": self.retries,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "failures": dict(self.failures),
            }


class _Retryable(Exception):
    def __init__(self, detail: str, wait_s: float | None = None, reason: str = REQUEST_FAILED):
        super().__init__(detail)
        self.detail, self.wait_s, self.reason = detail, wait_s, reason


class _Final(Exception):
    def __init__(self, detail: str, reason: str = REQUEST_FAILED):
        super().__init__(detail)
        self.detail, self.reason = detail, reason


class ChatClient:
    def __init__(
        self, options: ClientOptions | None = None, cache: RequestCache | None = None, api_key: ApiKey | None = None
    ):
        self.options = options or ClientOptions()
        self.cache = cache
        self.api_key = api_key or resolve_api_key(self.options.api_key_env, self.options.api_key_file)
        self.stats = ClientStats()
        self._client = None
        self._client_lock = threading.Lock()

    @property
    def openai(self):
        with self._client_lock:
            if self._client is None:
                from openai import OpenAI

                self._client = OpenAI(
                    base_url=self.options.base_url,
                    api_key=self.api_key.value,
                    timeout=self.options.timeout_s,
                    max_retries=0,  # retries are ours: counted, and honouring retry-after
                )
            return self._client

    # -- public -----------------------------------------------------------------------------------
    def complete(self, request: ChatRequest, stop: threading.Event | None = None) -> ChatResult:
        """One request: the cached answer, or sent with retries (``stop`` set: no further retry)."""
        key = request.key
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.add(cache_hits=1)
                return ChatResult(request.tag, key, text=message_text(hit), response=hit, cached=True)
        if self.cache is not None and self.cache.full:  # an answer now could not be kept: nothing is paid
            raise CacheFull(self.cache.path, "nothing more is asked; free some space and run the same command again")
        if self.options.cache_only:
            self.stats.fail(NOT_IN_BATCH_OUTPUT)
            return ChatResult(
                request.tag,
                key,
                error=NOT_IN_BATCH_OUTPUT,
                error_detail="no answer in the cache or the collected batch output",
            )
        return self._send(request, key, stop)

    def complete_many(self, requests: Iterable[ChatRequest]) -> Iterator[ChatResult]:
        """Results in completion order; cache hits come back at once, the rest through the pool.

        When the caller stops early (Ctrl-C, or it closes the iterator), the requests not sent yet are
        dropped and those in flight are not retried: an interrupt ends the run in seconds, not after
        every queued request has had its retries."""
        window = 2 * self.options.concurrency
        pending: set[Future] = set()
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="chat")
        finished = False
        try:
            for request in requests:
                if self.cache is not None and request.key in self.cache:
                    yield self.complete(request)
                    continue
                pending.add(pool.submit(self.complete, request, stop))
                if len(pending) >= window:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
            finished = True
        finally:
            if not finished:
                stop.set()
            pool.shutdown(wait=finished, cancel_futures=not finished)

    def close(self) -> None:
        """Close the HTTP client and the request cache: the client owns both."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.cache is not None:
            self.cache.close()

    def check_endpoint(self, model: str | None = None, timeout_s: float = CHECK_TIMEOUT_S) -> list[str]:
        """Fail in seconds, not after minutes of retries, when the server cannot answer: no key for a host
        that needs one (``api.openai.com``), nothing listening at the address, or the key refused. One
        ``GET /models`` without retries; returns the model names it lists ([] when it lists none). A
        server without ``/models`` (404) is not refused: the requests themselves will tell.

        Raises :class:`EndpointUnavailable` naming the URL tried and the variable or file the key comes from."""
        import openai

        opts = self.options
        base = opts.base_url.rstrip("/")
        key_from = self._key_origin()
        host = (urlsplit(base).hostname or "").lower()
        if self.api_key.source == "none" and any(host == h or host.endswith("." + h) for h in KEYED_HOSTS):
            raise EndpointUnavailable(
                f"{base} needs an API key and {key_from} holds none: set it, or pass --base-url URL of a "
                "local OpenAI-compatible server (vLLM, SGLang, transformers serve)"
            )
        url = f"{base}/models"
        try:
            page = self.openai.with_options(timeout=timeout_s, max_retries=0).models.list()
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise EndpointUnavailable(
                    f"{url} refused the API key from {key_from} (HTTP {exc.status_code}): check it"
                ) from None
            log.debug("%s answered HTTP %s; going on (the requests will tell)", url, exc.status_code)
            return []
        except openai.APITimeoutError:
            raise EndpointUnavailable(
                f"no answer from {url} within {timeout_s:g} s: is the server running at --base-url {base}?"
            ) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise EndpointUnavailable(
                self._clean(f"cannot reach {url} ({cause}): is the server running at --base-url {base}?")
            ) from None
        names = [str(getattr(m, "id", "")) for m in getattr(page, "data", None) or []]
        if model is not None and names and model not in names:
            log.warning("%s lists %s, not %r: the requests may be refused", url, ", ".join(names[:10]), model)
        return names

    def _key_origin(self) -> str:
        """Where the key comes from, for messages: the variable, or the file (never the key)."""
        source = self.api_key.source
        if source.startswith("env:"):
            return f"the environment variable {source[4:]}"
        if source.startswith("file:"):
            return f"the key file {source[5:]}"
        if self.options.api_key_file:
            return f"the environment variable {self.options.api_key_env} or the key file {self.options.api_key_file}"
        return f"the environment variable {self.options.api_key_env}"

    # -- one request with retries -----------------------------------------------------------------
    def _send(self, request: ChatRequest, key: str, stop: threading.Event | None = None) -> ChatResult:
        opts = self.options
        last = ""
        stop = stop or threading.Event()
        for attempt in range(opts.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
            self.stats.add(requests=1)
            try:
                response = self._post(request.body)
            except _Retryable as exc:
                last, reason = exc.detail, exc.reason
                if attempt == opts.max_retries or stop.is_set():
                    break
                wait_s = exc.wait_s if exc.wait_s is not None else min(opts.max_backoff_s, opts.backoff_s * 2**attempt)
                wait_s += random.uniform(0, 0.1 * wait_s)  # spread a burst of 429s apart
                log.debug("retrying %s in %.2fs: %s", key[:12], wait_s, exc.detail)
                if stop.wait(wait_s):  # the caller stopped: no retry
                    break
                continue
            except _Final as exc:
                self.stats.fail(exc.reason)
                return ChatResult(request.tag, key, attempts=attempt + 1, error=exc.reason, error_detail=exc.detail)
            usage = response.get("usage") or {}
            self.stats.add(
                answered=1,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
            if self.cache is not None:
                self.cache.put(key, str(request.body.get("model", "")), response)
            return ChatResult(request.tag, key, text=message_text(response), response=response, attempts=attempt + 1)
        self.stats.fail(reason)
        detail = f"{last} (after {attempt + 1} attempts)"
        return ChatResult(request.tag, key, attempts=attempt + 1, error=reason, error_detail=detail)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import openai

        params = {k: v for k, v in body.items() if k not in ("model", "messages")}
        try:
            raw = self.openai.chat.completions.with_raw_response.create(
                model=body["model"], messages=body["messages"], extra_body=params or None
            )
            text = raw.text if isinstance(raw.text, str) else raw.http_response.text
        except openai.APIStatusError as exc:
            detail = self._clean(f"HTTP {exc.status_code}: {exc.message}")
            if exc.status_code in RETRY_STATUS:
                raise _Retryable(detail, _retry_after(exc.response.headers)) from None
            raise _Final(detail) from None
        except openai.APITimeoutError:
            raise _Retryable(f"timed out after {self.options.timeout_s:g}s") from None
        except openai.APIConnectionError as exc:
            raise _Retryable(self._clean(f"connection error: {exc}")) from None
        try:
            response = json.loads(text)
        except ValueError:
            raise _Retryable(self._clean(f"malformed JSON body: {text[:200]!r}"), reason=BAD_RESPONSE) from None
        if not isinstance(response, dict) or message_text(response) is None:
            raise _Final(self._clean(f"not a chat completion: {text[:200]!r}"), BAD_RESPONSE)
        return response

    def _clean(self, text: str) -> str:
        return redact(text, self.api_key)[:2000]


#: MIME types of the image formats the readers accept
IMAGE_MIME = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
}


def image_data_url(data: bytes, image_format: str | None = None) -> str:
    """Encoded image bytes as a ``data:`` URL for a chat message's ``image_url`` (format sniffed first)."""
    import base64

    from mlmfilter.io.readers import sniff_image_format

    fmt = (sniff_image_format(data) or image_format or "jpeg").lower()
    return f"data:{IMAGE_MIME.get(fmt, 'image/' + fmt)};base64,{base64.b64encode(data).decode('ascii')}"


def user_message(text: str, image_url: str | None = None) -> dict[str, Any]:
    """A user turn of a chat request: the image first (the reference puts ``<image>`` before the prompt),
    then the text. Text alone is still a list of parts, so a request's cache key never depends on the caller."""
    content: list[dict[str, Any]] = []
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def message_text(response: dict[str, Any]) -> str | None:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked for (``retry-after-ms`` first, then ``retry-after`` in seconds)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue  # an HTTP date: fall back to backoff
        if 0 <= seconds <= MAX_RETRY_AFTER_S:
            return seconds
    return None
