"""mlmfilter: score, select and repair image-text pairs for vision-language pretraining."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["score", "select", "reshard", "__version__"]


def __getattr__(name: str):
    # lazy: `import mlmfilter.scorers.rules` must not pay for the whole API (and torch)
    if name in ("score", "select", "reshard"):
        from mlmfilter import api

        return getattr(api, name)
    raise AttributeError(name)
