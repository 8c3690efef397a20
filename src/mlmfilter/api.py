"""The public functions. The CLI is a thin layer over these."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mlmfilter.config import ScoreConfig, ScorerSpec

log = logging.getLogger(__name__)


@dataclass
class ScoreSummary:
    run_dir: Path | str  # a local path, or the fsspec URL of a run folder on object storage
    stage: str
    shards_total: int
    shards_completed: list[str]
    shards_skipped: list[str]
    shards_failed: dict[str, str]
    stats: dict[str, Any]  # merged stats of every completed shard of the stage
    provenance: dict[str, Any]
    seconds: float
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.shards_failed and not self.interrupted


def score(
    inputs: str | Sequence[str] | None = None,
    output: str | Path | None = None,
    scorers: Iterable[str | ScorerSpec | Mapping[str, Any]] = ("rules",),
    *,
    config: ScoreConfig | None = None,
    overwrite: bool = False,
    allow_pipe: bool = False,
    show_progress: bool = False,
    partition: str | None = None,
    **settings: Any,
) -> ScoreSummary:
    """Score image-text pairs into a run folder; re-running the same call resumes it.

    ``inputs``: paths, globs, brace patterns or fsspec URLs of WebDataset tars, parquet files
    or image folders. ``scorers``: registry names (``"rules"``, ``"clip"``, ``"mlm"``) or
    ``{"name": ..., "options": {...}}``. Other ``settings`` are :class:`ScoreConfig` fields.
    Scoring more inputs into an existing run extends it. ``overwrite`` discards the earlier run.
    ``allow_pipe`` lets ``pipe:CMD`` inputs run shell commands (never read from a recipe).
    ``partition="i/N"`` scores only job i's share of the inputs, so N jobs (a Slurm array) can
    score into one run folder side by side; ``select`` then sees one run.
    """
    from mlmfilter.core.locations import as_path
    from mlmfilter.core.processes import unguarded_main_call
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.runs.runner import partition_sources, run_stage
    from mlmfilter.scorers.stage import ScoringOptions, ScoringStage

    if config is None:
        if inputs is None or output is None:
            raise ValueError("score() needs inputs and output, or a config")
        config = ScoreConfig(inputs=inputs, output=str(output), scorers=list(_as_specs(scorers)), **settings)
    notes: list[str] = []
    workers, decode_workers = config.workers, config.decode_workers
    script = unguarded_main_call()
    if script and (workers > 1 or decode_workers > 0):
        # worker processes would re-run the script's top level and die while starting
        notes.append(
            f'{script} calls mlmfilter at its top level without `if __name__ == "__main__":`; '
            "running without worker processes (add the guard to decode and score in parallel)"
        )
        log.warning(notes[-1])
        workers, decode_workers = 1, 0
    # everything is validated before the run folder is touched: sources, scorers, options
    sources = expand_inputs(config.inputs, allow_pipe=allow_pipe)
    if partition is not None:
        sources = partition_sources(sources, partition)
    if config.only is not None:
        _check_cascade(config)
    options = ScoringOptions(
        scorers=config.scorers,
        decode_workers=decode_workers,
        chunk_size=config.chunk_size,
        max_pixels=config.max_pixels,
        only=config.only,
        only_stage=config.only_stage,
    )
    stage = ScoringStage(options, name=config.stage)
    summary = run_stage(
        config.output,
        stage,
        sources=sources,
        inputs=[_absolute_spec(spec) for spec in config.inputs],
        read_options=config.read_options(),
        executor=_executor(config, workers),
        overwrite="run" if overwrite else False,
        show_progress=show_progress,
        partition=partition,
    )
    for hint in _layout_hints(summary, config.read):  # once per shard none of whose pairs could be read
        log.debug(hint)  # the summary's notes carry it (the CLI prints them): not twice on the terminal
        notes.append(hint)
    stats = {"shards_done": summary.stats.shards, **summary.stats.to_json()}
    return ScoreSummary(
        run_dir=as_path(summary.run_url),
        stage=summary.stage,
        shards_total=summary.shards_total,
        shards_completed=summary.shards_completed,
        shards_skipped=summary.shards_skipped,
        shards_failed=summary.shards_failed,
        stats=stats,
        provenance=summary.provenance,
        seconds=summary.seconds,
        interrupted=summary.interrupted,
        notes=notes,
    )


def _layout_hints(summary, read_options) -> list[str]:
    """For each shard scored now whose every row lacked its image or caption (or that could not be
    read): what it holds and the flag that fixes it (``--caption-column TEXT_EN``)."""
    import json

    from mlmfilter.io.readers.layout import LAYOUT_ERRORS, MAX_HINTS, shard_hint
    from mlmfilter.runs.folder import RunFolder

    if not any(summary.stats.errors.get(code) for code in LAYOUT_ERRORS):
        return []  # no shard can have failed for its layout: no per-shard stats to read
    folder = RunFolder(summary.run_url)
    stage, sources = folder.stage(summary.stage), folder.sources()
    hints: list[str] = []
    for shard_id in summary.shards_completed:
        if len(hints) == MAX_HINTS:
            hints.append(f"(only the first {MAX_HINTS} such shards are named)")
            break
        rel = stage.stats_rel(shard_id)
        if shard_id not in sources or not stage.storage.exists(rel):
            continue
        shard = json.loads(stage.storage.read_text(rel))
        hint = shard_hint(sources[shard_id], read_options, int(shard.get("read", 0)), shard.get("errors") or {})
        if hint:
            hints.append(hint)
    return hints


def _executor(config: ScoreConfig, workers: int):
    """The executor the recipe names, with the recipe's section of the same name as its settings
    (``ray:``; ``ray.num_actors`` defaults to ``workers``)."""
    from mlmfilter.runs.executors import build_executor

    return build_executor(config.executor, workers=workers, options=getattr(config, config.executor, None))


def _check_cascade(config: ScoreConfig) -> None:
    """A cascade reads an earlier stage of the same run: it must exist and know the columns."""
    from mlmfilter.runs.read import RunReader
    from mlmfilter.selection.expression import parse_expression

    if config.only_stage == config.stage:
        raise ValueError(f"--only reads stage {config.only_stage!r}: give this scoring another --stage name")
    parse_expression(config.only, RunReader(config.output).schema(config.only_stage))


def _absolute_spec(spec: str) -> str:
    """Local specs are recorded absolute, so the run reads the same inputs from any directory."""
    if "://" in spec or spec.startswith("pipe:"):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def _as_specs(scorers: Iterable[str | ScorerSpec | Mapping[str, Any]]) -> Iterable[ScorerSpec]:
    for s in [scorers] if isinstance(scorers, str) else scorers:
        if isinstance(s, ScorerSpec):
            yield s
        elif isinstance(s, str):
            yield ScorerSpec(name=s)
        else:
            yield ScorerSpec(**s)


def select(
    run: str | Path | Sequence[str | Path | tuple[str | None, str | Path]],
    output: str | Path | None = None,
    **kwargs: Any,
):
    """Select pairs of a scored run by an expression and/or a global top fraction.

    ``run`` is one run folder or several (a list), joined on uid; an item ``(name, path)``
    exposes that run's columns as ``name_column``. See
    :func:`mlmfilter.selection.select.select_run` for the arguments (``stage``,
    ``allow_incomplete``, ``intersect``, ``union`` among them). Output defaults to
    ``RUN/selection`` for one run; several runs need ``output`` (no run owns the selection).
    """
    from mlmfilter.selection.folder import SelectionFolder
    from mlmfilter.selection.select import select_run

    runs = [run] if isinstance(run, (str, Path)) else list(run)
    if len(runs) == 1 and not isinstance(runs[0], tuple):
        run = runs[0]
    if output is None:
        if len(runs) != 1 or isinstance(runs[0], tuple):
            what = f"{len(runs)} runs" if len(runs) > 1 else "a named run"
            raise ValueError(
                f"selecting from {what} needs an output folder (-o/--output): no one run owns the selection"
            )
        if "://" in str(run):
            raise ValueError("a run folder on object storage needs an explicit selection output folder")
        output = SelectionFolder.in_run(run).path
    return select_run(run, output, **kwargs)


def reshard(
    selection: str | Path,
    output: str | Path,
    *,
    samples_per_shard: int = 10_000,
    captions: Mapping[str, str] | None = None,
    captions_stage: str | None = None,
    overwrite: bool = False,
    allow_pipe: bool = False,
) -> dict[str, Any]:
    """Write new WebDataset shards that hold exactly the rows a selection kept.

    ``selection`` is a selection folder (written by :func:`select`); the run it names holds the
    input shards (for a selection over several runs, the first run: kept rows carry its shard
    and key). New captions come from ``captions`` (uid -> caption) or from an enhancement
    stage of the run (``captions_stage``: its tables' ``caption`` column, read shard by shard;
    null keeps the original). ``allow_pipe`` is this call's permission for ``pipe:`` inputs
    (a run folder can never grant it). Stats include ``kept_uids_not_found``: non-zero means
    the selection names pairs the shards no longer hold.
    """
    from mlmfilter.io.readers import ReadOptions
    from mlmfilter.io.reshard import ReshardError, reshard_selected
    from mlmfilter.runs.read import RunReader
    from mlmfilter.selection.folder import SelectionFolder

    folder = SelectionFolder(Path(selection))
    run = RunReader(folder.run_dir())
    sources = run.sources()
    piped = [s.url for s in sources.values() if s.is_pipe]
    if piped and not allow_pipe:
        raise ReshardError(
            f"the run reads 'pipe:' inputs, which run shell commands ({piped[0]!r}); "
            "pass --allow-pipe on this command line to run them"
        )
    if captions_stage is not None:
        run.settings(captions_stage)  # refuse an unknown stage before writing anything

    def captions_for(shard_id: str, uid_of_key: Mapping[str, str]) -> Mapping[str, str]:
        out: dict[str, str] = {}
        if captions:
            out.update({key: captions[uid] for key, uid in uid_of_key.items() if uid in captions})
        if captions_stage is not None:
            table = run.table(shard_id, captions_stage, columns=["key", "caption"])
            if table is not None:
                out.update({k: c for k, c in zip(table["key"].to_pylist(), table["caption"].to_pylist()) if c})
        return out

    stats = reshard_selected(
        sources,
        folder.kept_groups(),
        output,
        samples_per_shard=samples_per_shard,
        captions_for=captions_for if (captions or captions_stage) else None,
        read_options=ReadOptions(**run.read_options()),
        overwrite=overwrite,
    )
    stats["selection"] = str(folder.path.resolve())
    return stats


# -- foreign formats (mlmfilter.convert) -------------------------------------------------------------
# `convert_checkpoint`, not `convert`: `mlmfilter.convert` is the package that does it


def convert_checkpoint(
    src: str | Path, dst: str | Path, dtype: str = "auto", vision_tower: str | None = None
) -> tuple[str, Path]:
    """Convert a released judge from its original layout (LLaVA-1.5, LLaVA-Unified or AITQE, detected from
    its config.json) into a folder transformers loads; ``src`` is a folder or a hub id. Returns (layout, folder)."""
    from mlmfilter.convert.detect import convert_checkpoint as convert

    return convert(src, dst, dtype=dtype, vision_tower=vision_tower)


def export_mlm_filter(run_dir: str | Path, out_dir: str | Path, stage: str = "score") -> list[Path]:
    """Write a run's MLM scores as the released MLM-Filter scripts do: ``{shard}_{metric}.parquet``."""
    from mlmfilter.convert.dumps import export_mlm_filter as export

    return export(run_dir, out_dir, stage=stage)


def import_mlm_filter(
    dumps: str | Path, run_dir: str | Path, shards: Sequence[str] | None = None, stage: str = "score"
) -> dict[str, int]:
    """Turn published MLM-Filter score files into a run that ``select`` and ``reshard`` read; returns counts."""
    from mlmfilter.convert.dumps import import_mlm_filter as import_dumps

    return import_dumps(dumps, run_dir, shards=list(shards) if shards else None, stage=stage)
