"""Judge backends chosen by option (``MLMOptions.backend``): transformers (default), vllm and openai
(an OpenAI-compatible server, :mod:`.openai_backend`).

Each backend validates its own settings (``MLMOptions.backend_options``) with its pydantic model, so a
typo in a vLLM setting is refused by name. :func:`build_backend` is the one place that maps a name to
a backend; the transformers backend stays built by the scorer itself (its behaviour is unchanged).
"""

from __future__ import annotations

from typing import Any

BACKENDS = ("transformers", "vllm", "openai")

#: what each backend's expected readout is (judge.backend.BackendCapabilities.distribution), known
#: before it is built: the scorer's columns depend on it (a top-k backend adds <metric>_unplaced)
DECLARED_DISTRIBUTION = {"transformers": "exact", "vllm": "exact", "openai": "top_k"}


def declared_distribution(name: str) -> str:
    return DECLARED_DISTRIBUTION[name]


def backend_options_model(name: str):
    if name == "vllm":
        from mlmfilter.backends.vllm import VllmOptions

        return VllmOptions
    if name == "openai":
        from mlmfilter.backends.openai import OpenAIOptions

        return OpenAIOptions
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def validate_backend_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Checks ``backend_options`` against the chosen backend's model; the transformers backend takes none."""
    if name == "transformers":
        if options:
            raise ValueError(f"the transformers backend takes no backend_options (got {sorted(options)})")
        return {}
    return backend_options_model(name)(**options).model_dump()


def identity_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``backend_options`` less the operational settings (concurrency, timeouts, cache, memory share):
    a resumed run may change them without changing its fingerprint."""
    if name == "transformers":
        return dict(options)
    operational = getattr(backend_options_model(name), "OPERATIONAL", frozenset())
    return {k: v for k, v in options.items() if k not in operational}


def backend_settings(options: Any):
    """The chosen backend's validated settings model for MLMOptions."""
    return backend_options_model(options.backend)(**options.backend_options)


def build_backend(options: Any):
    """A JudgeBackend for MLMOptions with ``backend="vllm"`` or ``"openai"``."""
    settings = backend_settings(options)
    if options.backend == "openai":
        from mlmfilter.backends.openai import build_openai_backend

        return build_openai_backend(options, settings)
    return _build_vllm(options, settings)


def _build_vllm(options: Any, settings):
    from transformers import AutoProcessor

    from mlmfilter.backends.vllm import VllmEngine, VllmJudgeBackend, requested_token_ids
    from mlmfilter.judge.readout import ScoreTrie
    from mlmfilter.models.common import safe_pretrained_kwargs
    from mlmfilter.models.vlm import inspect_vlm

    spec = inspect_vlm(options.model, False, options.max_image_pixels)
    processor = AutoProcessor.from_pretrained(options.model, **safe_pretrained_kwargs())
    trie = ScoreTrie.from_tokenizer(processor.tokenizer)
    engine = VllmEngine(options.model, settings, requested_token_ids(trie))
    return VllmJudgeBackend(
        options.model,
        processor.tokenizer,
        processor,
        spec.family.image_placeholder,
        options.conversation,
        options.answer_prefix,
        options.trie_threshold,
        engine,
        image_size=spec.image_size,
        options=settings,
    )
