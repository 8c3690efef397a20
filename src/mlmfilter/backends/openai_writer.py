"""Caption generation through an OpenAI-compatible server: ``enhance --backend openai --base-url URL``.

The same :class:`~mlmfilter.backends.generation.CaptionGenerator` interface as the local writer, over the
project's one client (:class:`~mlmfilter.clients.ChatClient`: bounded concurrency, retries honouring
``retry-after``, the sqlite request cache, counters) that ``teach label`` asks its teacher through, so a
served VLM (vLLM, SGLang, ``transformers serve``, a hosted model) can write the rewrites. One request is
one chat completion: the decoded image as a base64 data URL, then the mode's prompt; ``n`` candidates
come back as ``n`` choices. The server renders the prompt with its own chat template, so only the
``auto`` conversation format applies. A request that fails (after its retries) is a
:class:`~mlmfilter.judge.backend.RequestFailure` of its pair alone.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import Field

from mlmfilter.backends.generation import Generated, GenerationRequest, SamplingParams, cut_at_stop
from mlmfilter.backends.openai import decoded_image_url
from mlmfilter.clients.chat import ChatClient, ChatRequest, ChatResult, ServerSettings, user_message
from mlmfilter.judge.backend import RequestFailure

#: error reasons of a served writer's request (column values: keep them stable)
WRITER_REQUEST_FAILED = "writer_request_failed"  # HTTP error, timeout or connection failure after all retries
WRITER_BAD_RESPONSE = "writer_bad_response"  # a 200 without a usable text


class ServedWriterOptions(ServerSettings):
    """``backend_options`` of ``enhance --backend openai`` (``--base-url`` sets ``base_url``): how the server
    is reached (:class:`~mlmfilter.clients.chat.ServerSettings`, operational) and how the image is sent.
    ``cache``: ``mlmfilter.enhance`` sets ``RUN/cache/requests.sqlite`` for a local run."""

    #: shorter side images are decoded to before they are sent
    image_size: int = Field(448, ge=16)
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(95, ge=1, le=100)

    def identity(self) -> dict[str, Any]:
        """What changes the texts: the image as sent (the served model's name is the stage's ``model``)."""
        return self.model_dump(mode="json", exclude=set(self.OPERATIONAL))


class OpenAICaptionGenerator:
    """:class:`~mlmfilter.backends.generation.CaptionGenerator` over an OpenAI-compatible chat endpoint."""

    def __init__(self, model: str, settings: ServedWriterOptions, client: ChatClient):
        self.model = model
        self.settings = settings
        self.client = client

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    def body(self, request: GenerationRequest, params: SamplingParams) -> dict[str, Any]:
        """The exact JSON posted (and the request cache's key): image first, then the prompt, as teach label asks."""
        s = self.settings
        url = decoded_image_url(request.image, s.image_format, s.jpeg_quality)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [user_message(request.prompt, url)],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
        }
        if not params.greedy:
            body.update(top_p=params.top_p, seed=params.seed)
            if params.top_k is not None:
                body["top_k"] = params.top_k  # vLLM's and SGLang's extension
        if params.n > 1:
            body["n"] = params.n
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[list[Generated] | RequestFailure]:
        results: list[Any] = [None] * len(requests)
        asked = (ChatRequest(self.body(r, params), tag=i) for i, r in enumerate(requests))
        for result in self.client.complete_many(asked):
            results[result.tag] = self._read(result, params)
        return results

    @staticmethod
    def _read(result: ChatResult, params: SamplingParams) -> list[Generated] | RequestFailure:
        if not result.ok:
            reason = WRITER_BAD_RESPONSE if "bad_response" in (result.error or "") else WRITER_REQUEST_FAILED
            return RequestFailure(reason, result.error_detail or result.error or "")
        choices = (result.response or {}).get("choices") or []
        tokens = int(((result.response or {}).get("usage") or {}).get("completion_tokens") or 0)
        texts = []
        for choice in choices:
            content = (choice.get("message") or {}).get("content")
            if not isinstance(content, str):
                continue
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            texts.append(Generated(cut_at_stop(content, params.stop).strip(), finish, tokens // max(1, len(choices))))
        if not texts:
            return RequestFailure(WRITER_BAD_RESPONSE, f"no text in the answer: {str(result.response)[:200]}")
        return texts

    def describe(self) -> dict[str, Any]:
        return describe_served_writer(self.model, self.settings)

    def close(self) -> None:
        """Close the HTTP client and the request cache."""
        self.client.close()


def describe_served_writer(model: str, settings: ServedWriterOptions) -> dict[str, Any]:
    """Provenance of the served writer from its settings alone (nothing is asked)."""
    return {
        "backend": "openai-chat",
        "model": model,
        "conversation": "the server's chat template",
        "endpoint": settings.base_url,
        **settings.identity(),
    }


def build_served_writer(model: str, backend_options: dict[str, Any]) -> OpenAICaptionGenerator:
    """The writer with its client and cache; the server is checked first (a wrong address or a missing key
    fails here in seconds, one line, not after every request's retries)."""
    from mlmfilter.clients.cache import RequestCache

    settings = ServedWriterOptions(**backend_options)
    client_options = settings.client_options()
    client = ChatClient(client_options, cache=RequestCache(settings.cache) if settings.cache else None)
    try:
        client.check_endpoint(model)
    except BaseException:
        client.close()
        raise
    return OpenAICaptionGenerator(model, settings, client)
