"""Where an API key comes from. The key itself is returned to the caller only, never logged or recorded.

Order: the named environment variable (default ``OPENAI_API_KEY``), then a config file, which is either
the bare key on one line or a YAML/JSON mapping with an ``api_key`` field. A local server needs no key:
then a placeholder is sent (the ``openai`` package refuses an empty one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

NO_KEY = "no-key"  # what a keyless local endpoint (vLLM, transformers serve) receives


@dataclass(frozen=True)
class ApiKey:
    value: str
    source: str  # "env:NAME", "file:PATH" or "none": safe to record, unlike ``value``

    def __repr__(self) -> str:  # a key must not leak through a log line or a traceback
        return f"ApiKey(source={self.source!r})"

    __str__ = __repr__


def resolve_api_key(env_var: str = "OPENAI_API_KEY", key_file: str | os.PathLike | None = None) -> ApiKey:
    value = os.environ.get(env_var, "").strip() if env_var else ""
    if value:
        return ApiKey(value, f"env:{env_var}")
    if key_file is not None:
        path = Path(key_file).expanduser()
        if not path.is_file():
            raise ValueError(f"API key file not found: {path}")
        text = path.read_text(encoding="utf-8").strip()
        loaded = yaml.safe_load(text) if text else None
        value = str(loaded.get("api_key", "")).strip() if isinstance(loaded, dict) else text.splitlines()[0].strip()
        if not value:
            raise ValueError(f"API key file {path} holds no key (a bare key, or a mapping with api_key)")
        return ApiKey(value, f"file:{path}")
    return ApiKey(NO_KEY, "none")


def redact(text: str, key: ApiKey) -> str:
    """``text`` with the key replaced, for error messages a server might echo it into."""
    if key.value and key.value != NO_KEY and key.value in text:
        return text.replace(key.value, "<redacted>")
    return text
