"""What runs a model: one file per runtime.

Judge backends, chosen by the MLM scorer's ``backend`` option; each file exports its
:class:`~mlmfilter.backends.base.BackendInfo` as ``INFO`` (settings, readout, where it runs, image size,
provenance, build):

- :mod:`.transformers`: this package's batched, prefix-sharing backend (CPU or GPU; the default);
- :mod:`.vllm`: offline ``vllm.LLM`` on GPUs;
- :mod:`.openai`: an OpenAI-compatible server, through :mod:`mlmfilter.clients`.

:mod:`.generation` writes captions (the enhancer's writer); :mod:`.openai_writer` writes them through an
OpenAI-compatible server (``enhance --backend openai``). :data:`BACKENDS` is the one place that
maps a name to a backend: a new backend is a new file with its ``INFO`` and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic_core import PydanticCustomError

from mlmfilter.backends.base import BackendInfo

#: name -> "module:attribute" of its BackendInfo, imported when first asked (vllm and openai are extras)
BACKENDS: dict[str, str] = {
    "transformers": "mlmfilter.backends.transformers:INFO",
    "vllm": "mlmfilter.backends.vllm:INFO",
    "openai": "mlmfilter.backends.openai:INFO",
}
DEFAULT_BACKEND = "transformers"


def backend_info(name: str) -> BackendInfo:
    """The description of the backend called ``name``."""
    try:
        module, attribute = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    return getattr(importlib.import_module(module), attribute)


def known_backend(name: Any) -> str:
    """``name`` when it names a backend; else the refusal pydantic gives a choice of literals, listing them."""
    if isinstance(name, str) and name in BACKENDS:
        return name
    quoted = [repr(n) for n in BACKENDS]
    expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "BackendInfo", "backend_info", "known_backend"]
