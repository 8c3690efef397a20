"""The run layer: run folders, stages, executors. Stages (scoring, labelling, enhancement, ...)
implement only their per-shard work; resume, locking, markers, stats and logs live here."""

from mlmfilter.runs.folder import ConfigMismatch, RunError, RunFolder, RunLocked, SourceChanged
from mlmfilter.runs.stage import Stage, StageOptions, StageSpec, StageTask

__all__ = [
    "ConfigMismatch",
    "RunError",
    "RunFolder",
    "RunLocked",
    "SourceChanged",
    "Stage",
    "StageOptions",
    "StageSpec",
    "StageTask",
    "run_stage",
    "RunReader",
]


def __getattr__(name: str):
    # imported on use: the runner pulls in executors, the reader pyarrow.dataset
    if name == "run_stage":
        from mlmfilter.runs.runner import run_stage

        return run_stage
    if name == "RunReader":
        from mlmfilter.runs.read import RunReader

        return RunReader
    raise AttributeError(name)
