"""What a judge backend says about itself before, and without, being built: :class:`BackendInfo`.

The MLM scorer asks this description, never a backend's name: which settings it takes
(``backend_options``, checked by its ``Options`` model), what readout it gives (its columns depend on
it), whether its model runs in this process (then its files are read here and it wants a GPU), what
image size it wants and how it describes itself in provenance while nothing is loaded yet. ``build``
makes the :class:`~mlmfilter.judge.backend.JudgeBackend` itself, once per worker.

Each backend file (``backends/<name>.py``) exports one instance as ``INFO``;
``backends/__init__.py`` lists them, one line each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import BaseModel

from mlmfilter.judge.backend import EXACT_EXPECTED_DEFINITION, Distribution, JudgeBackend, adaptive_trie_bound


class BackendInfo(ABC):
    """One judge runtime, described. ``options`` below are the MLM scorer's options (``MLMOptions``)."""

    #: the value of ``MLMOptions.backend`` that picks it
    name: ClassVar[str]
    #: the model ``backend_options`` are checked by (pydantic, ``extra="forbid"``); None: it takes none.
    #: Its ``OPERATIONAL`` class variable names the settings that change speed or cost, not scores
    Options: ClassVar[type[BaseModel] | None] = None
    #: the expected readout it gives: "exact", "top_k" (the scorer adds ``<metric>_unplaced``) or
    #: "none" (generate only)
    distribution: ClassVar[Distribution]
    #: the model runs in this process: its files are read here, and it wants a GPU unless its device is cpu/mps
    runs_in_process: ClassVar[bool]

    # -- settings -----------------------------------------------------------------------------------

    def validate_options(self, backend_options: dict[str, Any]) -> dict[str, Any]:
        """``backend_options`` checked by :attr:`Options` (a misspelt setting is refused by name), defaults filled in."""
        if self.Options is None:
            if backend_options:
                raise ValueError(f"the {self.name} backend takes no backend_options (got {sorted(backend_options)})")
            return {}
        return self.Options(**backend_options).model_dump()

    def settings(self, options: Any) -> BaseModel | None:
        """The validated ``backend_options`` of ``options`` as its model (None when it takes none)."""
        return None if self.Options is None else self.Options(**options.backend_options)

    def identity_options(self, backend_options: dict[str, Any]) -> dict[str, Any]:
        """``backend_options`` less the operational settings: a resumed run may change them."""
        operational = getattr(self.Options, "OPERATIONAL", frozenset())
        return {k: v for k, v in backend_options.items() if k not in operational}

    def check(self, options: Any) -> None:
        """Refuse, with the reason, scorer options this backend cannot serve (run when they are validated)."""

    def wants_gpu(self, options: Any) -> bool:
        """Its model runs in this process on a GPU (``device`` auto or cuda)."""
        if not self.runs_in_process:
            return False
        from mlmfilter.models.common import may_use_gpu  # torch: only for a model in this process

        return may_use_gpu(options.device)

    # -- before it is built -------------------------------------------------------------------------

    @abstractmethod
    def image_size(self, options: Any) -> int | None:
        """Shorter side images are decoded to for it, from settings or config files (no weights)."""

    @abstractmethod
    def describe_settings(self, options: Any) -> dict[str, Any]:
        """Its provenance from settings and config files alone (what :meth:`JudgeBackend.describe` says once built)."""

    @abstractmethod
    def readout_provenance(self, options: Any) -> dict[str, str]:
        """``readout_definition`` and ``readout_bound`` of the expected readout it will compute."""

    @abstractmethod
    def build(self, options: Any, released: Any = None) -> JudgeBackend:
        """The backend itself (loads the model, starts the engine or opens the client).

        ``released``: the :class:`~mlmfilter.judge.registry.ResolvedSettings` of a released judge, when
        the model is one (how its images were preprocessed in training), else None.
        """


def exact_readout_provenance(trie_threshold: float) -> dict[str, str]:
    """The expected readout of a backend with exact log-probabilities walking the adaptive score trie."""
    return {
        "readout_definition": EXACT_EXPECTED_DEFINITION,
        "readout_bound": adaptive_trie_bound(trie_threshold),
    }
