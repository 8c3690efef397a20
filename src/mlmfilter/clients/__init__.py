"""The project's one OpenAI-compatible client (teachers, describers, HTTP judges).

- :mod:`.chat`: :class:`ChatClient`, bounded concurrency, retries honouring ``retry-after``, timeouts, stats;
- :mod:`.cache`: the sqlite request cache keyed by a hash of the whole request;
- :mod:`.credentials`: API keys from the environment or a config file, never logged or written;
- :mod:`.batch`: OpenAI Batch API JSONL files (also what ``vllm run-batch`` reads) and their output files.
"""

from mlmfilter.clients.cache import RequestCache, request_key
from mlmfilter.clients.chat import ChatClient, ChatRequest, ChatResult, ClientOptions, ClientStats, user_message

__all__ = [
    "ChatClient",
    "ChatRequest",
    "ChatResult",
    "ClientOptions",
    "ClientStats",
    "RequestCache",
    "request_key",
    "user_message",
]
