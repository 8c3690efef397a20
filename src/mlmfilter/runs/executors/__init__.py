"""Executors decide where a stage's shards run; stages know nothing of them.

Every executor runs the same body, :class:`~mlmfilter.runs.executors.worker.Worker`, somewhere:
``local`` in this process or in worker processes on this machine, ``ray`` in Ray actors.

A new executor is one file here, holding a class with ``from_options(options, workers)`` and
``run(tasks, stage, fingerprint, progress) -> ExecutionReport`` (see :class:`Executor`), plus its
line in :data:`EXECUTORS`. Its settings, if it has any, are the recipe section named after it
(``ray:``). Executor modules are imported only when chosen (Ray is an optional extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, Sequence

from mlmfilter.core.classes import import_class

if TYPE_CHECKING:
    from mlmfilter.runs.progress import RunProgress
    from mlmfilter.runs.stage import Stage, StageTask

#: executor name (``--executor``, a recipe's ``executor:``) -> its class path
EXECUTORS: dict[str, str] = {
    "local": "mlmfilter.runs.executors.local:LocalExecutor",
    "ray": "mlmfilter.runs.executors.ray:RayExecutor",
}
#: the names a recipe may give (validated by pydantic where a recipe is read)
ExecutorName = Literal[tuple(EXECUTORS)]  # type: ignore[valid-type]


@dataclass
class ExecutionReport:
    completed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard id -> one-line reason
    interrupted: bool = False
    seconds: float = 0.0


class Executor(Protocol):
    @classmethod
    def from_options(cls, options: Any = None, workers: int = 1) -> "Executor":
        """The executor for a run of ``workers`` parallel shards, with its own settings (or defaults)."""

    def run(
        self, tasks: Sequence["StageTask"], stage: "Stage", fingerprint: str, progress: "RunProgress"
    ) -> ExecutionReport:
        """Run every task; never raises for a failed shard (it is in the report)."""


def build_executor(name: str, workers: int = 1, options: Any = None) -> Executor:
    """The executor called ``name`` for ``workers`` parallel shards; ``options`` are its settings."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
    return import_class(EXECUTORS[name]).from_options(options, workers=workers)


__all__ = ["EXECUTORS", "ExecutionReport", "Executor", "ExecutorName", "build_executor"]
