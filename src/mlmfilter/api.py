"""The public functions. The CLI is a thin layer over these."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mlmfilter import __version__
from mlmfilter.config import ScoreConfig, ScorerSpec

log = logging.getLogger(__name__)


@dataclass
class ScoreSummary:
    run_dir: Path
    shards_total: int
    shards_completed: list[str]
    shards_skipped: list[str]
    shards_failed: dict[str, str]
    stats: dict[str, Any]  # merged stats of every completed shard in the run folder
    provenance: dict[str, Any]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.shards_failed


def score(
    inputs: str | Sequence[str] | None = None,
    output: str | Path | None = None,
    scorers: Iterable[str | ScorerSpec | Mapping[str, Any]] = ("rules",),
    *,
    config: ScoreConfig | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    **settings: Any,
) -> ScoreSummary:
    """Score image-text pairs into a run folder; re-running the same call resumes it.

    ``inputs``: paths, globs, brace patterns or fsspec URLs of WebDataset tars, parquet files
    or image folders. ``scorers``: registry names (``"rules"``, ``"clip"``, ``"mlm"``) or
    ``{"name": ..., "options": {...}}``. Other ``settings`` are :class:`ScoreConfig` fields.
    """
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.runs.executor import LocalExecutor, build_scorers
    from mlmfilter.runs.folder import RunFolder
    from mlmfilter.runs.pipeline import ShardTask

    if config is None:
        if inputs is None or output is None:
            raise ValueError("score() needs inputs and output, or a config")
        config = ScoreConfig(inputs=inputs, output=str(output), scorers=list(_as_specs(scorers)), **settings)
    folder = RunFolder(config.output).create()
    if overwrite:
        folder.clear()
    folder.check_or_write_config(config.model_dump(), config.fingerprint(), overwrite=overwrite)

    sources = expand_inputs(config.inputs, allow_pipe=config.allow_pipe)
    todo = [s for s in sources if not folder.is_done(s.id)]
    skipped = [s.id for s in sources if folder.is_done(s.id)]
    if skipped:
        log.info("resuming: %d of %d shards already done", len(skipped), len(sources))

    # built here for their provenance (read from config files: no weights load until a batch needs them)
    scorers_built = build_scorers(config.scorers)
    provenance = {
        "mlmfilter": __version__,
        "python": platform.python_version(),
        "fingerprint": config.fingerprint(),
        "scorers": {s.name: s.provenance() for s in scorers_built},
    }
    warnings = [w for p in provenance["scorers"].values() for w in p.get("warnings", [])]
    if warnings:
        provenance["warnings"] = warnings
    folder.write_provenance(provenance)

    tasks = [
        ShardTask(
            source=s,
            run_dir=str(folder.path),
            read_options=config.read,
            decode_workers=config.decode_workers,
            chunk_size=config.chunk_size,
            max_pixels=config.max_pixels,
        )
        for s in todo
    ]
    executor = LocalExecutor(workers=config.workers, show_progress=show_progress)
    if config.workers > 1 and len(tasks) > 1:
        scorers_built = None  # each worker loads its own; don't hold a model copy idle here
    report = executor.run(tasks, config.scorers, scorers=scorers_built)
    stats = folder.merged_stats()
    from mlmfilter.io.writers import atomic_write_json

    atomic_write_json(folder.path / "stats.json", stats)
    return ScoreSummary(
        run_dir=folder.path,
        shards_total=len(sources),
        shards_completed=report.completed,
        shards_skipped=skipped,
        shards_failed=report.failed,
        stats=stats,
        provenance=provenance,
        seconds=report.seconds,
    )


def _as_specs(scorers: Iterable[str | ScorerSpec | Mapping[str, Any]]) -> Iterable[ScorerSpec]:
    for s in [scorers] if isinstance(scorers, str) else scorers:
        if isinstance(s, ScorerSpec):
            yield s
        elif isinstance(s, str):
            yield ScorerSpec(name=s)
        else:
            yield ScorerSpec(**s)


def select(run: str | Path, output: str | Path | None = None, **kwargs: Any):
    """Select pairs of a scored run by an expression and/or a global top fraction.

    See :func:`mlmfilter.selection.select.select_run` for the arguments. Output defaults to
    ``RUN/selection``.
    """
    from mlmfilter.selection.select import select_run

    return select_run(run, output if output is not None else Path(run) / "selection", **kwargs)


def reshard(
    selection: str | Path,
    output: str | Path,
    *,
    samples_per_shard: int = 10_000,
    captions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write new WebDataset shards that hold only the pairs a selection kept.

    ``selection`` is a selection folder (written by :func:`select`); its run's config names
    the input shards. ``captions`` maps uid -> replacement caption (the enhancement stage).
    """
    from mlmfilter.io.reshard import reshard as reshard_shards
    from mlmfilter.io.readers import ReadOptions
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.runs.folder import RunFolder
    from mlmfilter.selection.subset import read_datacomp_subset

    selection = Path(selection)
    run_dir = _selection_run_dir(selection)
    config = ScoreConfig(**{k: v for k, v in RunFolder(run_dir).read_config().items() if k != "fingerprint"})
    sources = expand_inputs(config.inputs, allow_pipe=config.allow_pipe)
    keep = read_datacomp_subset(selection / "uids.npy")
    return reshard_shards(
        sources,
        keep,
        output,
        samples_per_shard=samples_per_shard,
        captions=captions,
        read_options=ReadOptions(**config.read),
    )


def _selection_run_dir(selection: Path) -> Path:
    import json

    info_path = selection / "selection.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{selection} is not a selection folder (no selection.json); run `mlmfilter select` first")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    run_dir = info.get("run_dir") or info.get("arguments", {}).get("run_dir")
    if not run_dir:
        raise ValueError(f"{info_path} does not name the run it selected from")
    return Path(run_dir)
