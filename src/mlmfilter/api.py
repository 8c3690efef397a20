"""The public face: every verb a user has, one function each (``mlmfilter/__init__.py`` re-exports them).

The command line (:mod:`mlmfilter.cli`) turns flags into one of these calls and prints what it
returns; the work lives in the rooms below (:mod:`mlmfilter.scorers`, :mod:`mlmfilter.selection`,
:mod:`mlmfilter.enhance`, :mod:`mlmfilter.teach`, :mod:`mlmfilter.training`, :mod:`mlmfilter.report`,
:mod:`mlmfilter.evaluation`). Heavy imports stay inside the functions: importing this module loads
no torch.

- score a pool: :func:`score` (settings: :class:`ScoreConfig`), :func:`list_scorers`
- keep the good pairs: :func:`select`, :func:`reshard`
- repair captions: :func:`enhance`
- teach a judge: :func:`teach_sample`, :func:`teach_negatives`, :func:`teach_label` (:func:`teach_collect`,
  :func:`teach_write_batch`), :func:`teach_balance`, :func:`teach_export`, then :func:`train`
- look at a run: :func:`report`, :func:`inspect`, :func:`stats`
- check the scorers: :func:`evaluate_human`, :func:`evaluate_corrupt`

Every stage run returns a :class:`StageSummary`. ``mlmfilter/__init__.py`` lists the public names.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

from pydantic import Field, field_validator

from mlmfilter.core.errors import LOW_SCORE_MASS
from mlmfilter.io.readers import ReadOptions
from mlmfilter.runs.executors import ExecutorName
from mlmfilter.runs.executors.ray import RayOptions
from mlmfilter.runs.runner import StageSummary
from mlmfilter.scorers.stage import ScorerSpec, ScoringOptions

if TYPE_CHECKING:
    from mlmfilter.clients.chat import ClientOptions
    from mlmfilter.enhance.stage import EnhanceOptions
    from mlmfilter.report import ReportOptions
    from mlmfilter.report.inspect import Matches
    from mlmfilter.report.profile import ColumnProfile
    from mlmfilter.teach.balance import BalanceOptions
    from mlmfilter.teach.export import ExportOptions
    from mlmfilter.teach.label import LabelOptions
    from mlmfilter.teach.sample import SampleOptions
    from mlmfilter.training.train import TrainOptions, TrainResult

log = logging.getLogger(__name__)


@contextmanager
def _library_bars_off() -> Iterator[None]:
    """No transformers / huggingface_hub tqdm bars ("Loading weights", "Writing model shards") on a
    caller's terminal during a verb: this process's and its workers' (they read the variable when they
    import the libraries). A user's own HF_HUB_DISABLE_PROGRESS_BARS wins; the state before is restored."""
    variable = os.environ.get(_BARS_VARIABLE)
    if variable is not None and variable.strip().lower() in ("0", "false", "no", "off", ""):
        yield  # the user asked for the bars
        return
    os.environ[_BARS_VARIABLE] = "1"
    enabled_before = {name: _bars_enabled(name) for name in ("transformers", "huggingface_hub")}
    for name in enabled_before:
        _set_bars(name, False)
    try:
        yield
    finally:
        if variable is None:
            os.environ.pop(_BARS_VARIABLE, None)
        for name, enabled in enabled_before.items():
            _set_bars(name, variable is None if enabled is None else enabled)


_BARS_VARIABLE = "HF_HUB_DISABLE_PROGRESS_BARS"


def _bars_enabled(library: str) -> bool | None:
    """Whether the library shows bars now; None when it is not imported yet (then it will, by default)."""
    import sys

    if library not in sys.modules:
        return None
    if library == "transformers":
        from transformers.utils import logging as transformers_logging

        return transformers_logging.is_progress_bar_enabled()
    from huggingface_hub.utils import are_progress_bars_disabled

    return not are_progress_bars_disabled()


def _set_bars(library: str, enabled: bool) -> None:
    import sys

    if library not in sys.modules:
        return
    if library == "transformers":
        from transformers.utils import logging as transformers_logging

        (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
    else:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if enabled else disable_progress_bars)()


# -- score ------------------------------------------------------------------------------------------


class ScoreConfig(ScoringOptions):
    """Everything :func:`score` needs: the score stage's own options (scorers, decoding, cascade) plus
    where to read and write and how to run. Filled from CLI flags or a YAML recipe with the same flat
    fields. Every field is validated when the model is built (read options included), so a typo in
    a recipe is refused before anything is written or any shard is read.
    """

    inputs: list[str]
    output: str
    read: ReadOptions = Field(default_factory=ReadOptions)
    stage: str = "score"  # the stage's folder in the run: a second scoring with other scorers takes another name
    workers: int = 1  # shards scored in parallel, one process each
    executor: ExecutorName = "local"  # ray: shards over a Ray cluster's actors (optional extra)
    ray: RayOptions = Field(default_factory=RayOptions)  # used by executor="ray"

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_input(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def read_options(self) -> dict[str, Any]:
        """The read options that differ from the defaults (what run.yaml records)."""
        return self.read.model_dump(mode="json", exclude_defaults=True)

    def scoring_options(self, **changes: Any) -> ScoringOptions:
        """The score stage's options (what its stage.yaml records), with ``changes``."""
        return ScoringOptions(**{**{name: getattr(self, name) for name in ScoringOptions.model_fields}, **changes})


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
    base_url: str | None = None,
    offline_if_unreachable: bool = True,
    **settings: Any,
) -> StageSummary:
    """Score image-text pairs into a run folder; re-running the same call resumes it.

    ``inputs``: paths, globs, brace patterns or fsspec URLs of WebDataset tars, parquet files
    or image folders. ``scorers``: registry names (``"rules"``, ``"clip"``, ``"mlm"``) or
    ``{"name": ..., "options": {...}}``. Other ``settings`` are :class:`ScoreConfig` fields.
    Scoring more inputs into an existing run extends it. ``overwrite`` discards the earlier run.
    ``allow_pipe`` lets ``pipe:CMD`` inputs run shell commands (never read from a recipe).
    ``partition="i/N"`` scores only job i's share of the inputs, so N jobs (a Slurm array) can
    score into one run folder side by side; ``select`` then sees one run.
    ``base_url``: the OpenAI-compatible server of the MLM judge (``backend="openai"``), set as its
    ``backend_options.base_url``. ``offline_if_unreachable``: when a scorer loads a model by hub
    name and the hub does not answer, models load from the local cache only (this process and its
    workers), instead of minutes of download retries before a missing model is reported.
    The summary's ``notes`` name, for a shard none of whose pairs could be read, the flag to pass.
    """
    from mlmfilter.core.processes import unguarded_main_call
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.runs.runner import parse_partition, run_stage
    from mlmfilter.scorers.stage import ScoringStage

    if config is None:
        if inputs is None or output is None:
            raise ValueError("score() needs inputs and output, or a config")
        config = ScoreConfig(inputs=inputs, output=str(output), scorers=list(_as_specs(scorers)), **settings)
    if base_url is not None:
        config = config.model_copy(update={"scorers": _with_base_url(config.scorers, base_url)})
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
    _refuse_foreign_output(config.output)
    sources = expand_inputs(config.inputs, allow_pipe=allow_pipe, notes=notes)
    if partition is not None:
        parse_partition(partition)  # every partition job registers all sources, then scores its share
    _refuse_broken_captions_tables(sources, config.read)
    if config.only is not None:
        _check_cascade(config)
    if offline_if_unreachable and _names_a_hub_model(config.scorers):
        from mlmfilter.models.hub import go_offline_if_unreachable

        if go_offline_if_unreachable():
            log.info("the Hugging Face hub is not reachable: models load from the local cache only")
    stage = ScoringStage(config.scoring_options(decode_workers=decode_workers), name=config.stage)
    with _library_bars_off():  # transformers' "Loading weights" bars: here and in the workers
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
    from mlmfilter.io.readers.layout import MAX_HINTS

    # a shard none of whose pairs could be read is done but unusable (exit 1); its hint names the flag to pass
    summary.shards_unusable = _layout_hints(summary, config.read)
    hints = list(dict.fromkeys(summary.shards_unusable.values()))
    unanswered = _unanswered_shards(summary)  # a served judge that answered nothing: not a success either
    summary.shards_unusable.update(unanswered)
    notes.extend(list(dict.fromkeys(unanswered.values()))[:1])
    for hint in hints[:MAX_HINTS]:
        log.debug(hint)  # the summary's notes carry it (the CLI prints them): not twice on the terminal
        notes.append(hint)
    if len(hints) > MAX_HINTS:
        notes.append(f"(only the first {MAX_HINTS} such shards are named; {len(hints)} in all)")
    if hints:
        notes.append(
            "run the same command again with these flags into the same folder: a run that read no pair "
            "takes corrected read options without --overwrite"
        )
    if summary.stats.errors.get(LOW_SCORE_MASS):  # scores that are not scores: said once, in words
        from mlmfilter.scorers.mlm import low_mass_note

        notes.append(low_mass_note(summary.stats))
    summary.notes.extend(notes)
    return summary


def _refuse_foreign_output(output: str) -> None:
    """A run goes into a new folder, an empty one or a run folder; never into a selection folder,
    a folder of shards or any other non-empty folder, whose files it would mix with its own."""
    if "://" in output:
        return
    path = Path(output).expanduser()
    # a run starting (or stopped before it wrote run.yaml) leaves only its locks and logs
    if not path.is_dir() or (path / "run.yaml").exists() or not [n for n in _entries(path) if not _run_own(n)]:
        return
    from mlmfilter.selection.folder import SUMMARY_FILE

    what = "a selection folder" if (path / SUMMARY_FILE).exists() else "not a run folder (no run.yaml)"
    raise ValueError(
        f"-o {output} is not empty and is {what}: a run needs a new or empty folder, or an earlier run's; "
        f"e.g. -o {path.parent / (path.name + '-run') if path.name else 'runs/NAME'}"
    )


def _entries(path: Path) -> set[str]:
    return {entry.name for entry in path.iterdir()}


def _run_own(name: str) -> bool:
    """A file a run folder holds before its run.yaml: locks (``.lock``, ``lock-0-of-3.json``) and logs."""
    return name.startswith(".lock") or (name.startswith("lock") and name.endswith(".json")) or name == "logs"


def _refuse_broken_captions_tables(sources, read: ReadOptions) -> None:
    """An image folder whose captions table an unbalanced quote would garble is refused before the run,
    naming the file and line (the reader alone could only make it an ``unreadable_shard`` row)."""
    from mlmfilter.io.readers.folder import check_captions_table

    for source in sources:
        if source.format == "folder":
            check_captions_table(source, read)


def _with_base_url(specs: Sequence[ScorerSpec], base_url: str) -> list[ScorerSpec]:
    """The MLM judge's specs with ``backend_options.base_url`` set (its openai backend's server)."""
    if not any(spec.name == "mlm" for spec in specs):
        raise ValueError("--base-url is for the MLM judge's openai backend: add --scorer mlm --backend openai")
    out = []
    for spec in specs:
        if spec.name == "mlm":
            backend_options = {**(spec.options.get("backend_options") or {}), "base_url": base_url}
            spec = ScorerSpec(name=spec.name, options={**spec.options, "backend_options": backend_options})
        out.append(spec)
    return out


def _names_a_hub_model(specs: Sequence[ScorerSpec]) -> bool:
    """True when a scorer loads a model by a hub name: its default one, or a name that is not a local path."""
    from mlmfilter.models.hub import names_a_local_path
    from mlmfilter.scorers import scorer_class

    for spec in specs:
        option = scorer_class(spec.name).model_option
        if option is None:
            continue
        model = spec.options.get(option)
        local = bool(model) and (names_a_local_path(str(model)) or Path(str(model)).expanduser().exists())
        if not local:
            return True
    return False


def _layout_hints(summary, read_options) -> dict[str, str]:
    """For each shard of this invocation (scored now, or done before: re-running the same command is no
    success either) whose every row lacked its image or caption (or that could not be read): what it
    holds and the flags that fix it (``--caption-column TEXT_EN``), by shard id (each such shard's schema
    or first members are peeked at, never the whole shard)."""
    import json

    from mlmfilter.io.readers.layout import LAYOUT_ERRORS, shard_hint
    from mlmfilter.runs.folder import RunFolder

    if not any(summary.stats.errors.get(code) for code in LAYOUT_ERRORS):
        return {}  # no shard can have failed for its layout: no per-shard stats to read
    folder = RunFolder(summary.run_url)
    stage, sources = folder.stage(summary.stage), folder.sources()
    hints: dict[str, str] = {}
    for shard_id in [*summary.shards_completed, *summary.shards_skipped]:
        rel = stage.stats_rel(shard_id)
        if shard_id not in sources or not stage.storage.exists(rel):
            continue
        shard = json.loads(stage.storage.read_text(rel))
        hint = shard_hint(sources[shard_id], read_options, int(shard.get("read", 0)), shard.get("errors") or {})
        if hint:
            hints[shard_id] = hint
    return hints


def _unanswered_shards(summary) -> dict[str, str]:
    """Shards of this invocation in which the served judge answered no request (every pair that reached it
    is a ``judge_request_failed`` row, no pair scored): by shard id, what happened and what to do."""
    from mlmfilter.backends.openai import JUDGE_REQUEST_FAILED
    from mlmfilter.runs.folder import RunFolder

    if not summary.stats.errors.get(JUDGE_REQUEST_FAILED):
        return {}
    stage = RunFolder(summary.run_url).stage(summary.stage)
    out: dict[str, str] = {}
    for shard_id in [*summary.shards_completed, *summary.shards_skipped]:
        stats = stage.read_stats(shard_id)
        failed = stats.errors.get(JUDGE_REQUEST_FAILED, 0) if stats is not None else 0
        if failed and not stats.ok:
            out[shard_id] = (
                f"the judge's server answered none of {failed} requests in shard {shard_id} ({JUDGE_REQUEST_FAILED}; "
                "error_detail says why): fix the server, then score again with --overwrite or another --stage"
            )
    return out


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


def list_scorers() -> list[dict[str, Any]]:
    """Every scorer of the registry: ``name``, ``options`` (name -> default), ``columns`` (None when
    they depend on the options) and ``unavailable`` (why it cannot load here: a missing extra)."""
    from mlmfilter.scorers import REGISTRY, scorer_class

    out: list[dict[str, Any]] = []
    for name in sorted(REGISTRY):
        try:
            cls = scorer_class(name)
        except ImportError as exc:  # an optional extra is missing
            out.append({"name": name, "options": {}, "columns": None, "unavailable": str(exc)})
            continue
        columns = getattr(cls, "columns", None)
        out.append(
            {
                "name": name,
                "options": {
                    key: field.get_default(call_default_factory=True)  # a default_factory's value, not Undefined
                    for key, field in cls.Options.model_fields.items()
                },
                "columns": list(columns) if isinstance(columns, dict) and columns else None,
                "unavailable": None,
            }
        )
    return out


# -- enhance ----------------------------------------------------------------------------------------


def enhance(
    run: str | Path,
    options: EnhanceOptions | None = None,
    *,
    stage: str = "enhance",
    judge_model: str | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    base_url: str | None = None,
    **fields: Any,
) -> StageSummary:
    """Rewrite the poor captions of a scored run; keep a rewrite only where the judge scores it better.

    ``options`` is an :class:`~mlmfilter.enhance.stage.EnhanceOptions`, or give its fields as keywords
    (``where="itm < 40"``, ``model=...``, ``mode``, ``sampling`` ...). Without a ``judge``, the run's own:
    the scorers of ``source_stage`` that produce a column ``where`` reads, so the rewrites are re-scored
    as the originals were; ``judge_model`` replaces the MLM judge's model. The stage's tables are
    ``RUN/<stage>/tables``; resumable like any stage. ``overwrite`` discards this stage's earlier
    results (never the scores). ``base_url``: the writer is a served VLM (``backend="openai"``, ``model``
    the name the server knows), asked through the client ``teach_label`` uses, its answers cached in
    ``RUN/cache/requests.sqlite`` (a local run; ``backend_options.cache`` names another file).
    """
    from mlmfilter.enhance.stage import EnhanceOptions, EnhanceStage, run_judge
    from mlmfilter.runs.read import RunReader
    from mlmfilter.runs.runner import run_stage
    from mlmfilter.selection.expression import parse_expression

    if options is None:
        options = EnhanceOptions(**fields)
    elif fields:
        raise TypeError(f"enhance() takes EnhanceOptions or its fields, not both ({', '.join(fields)})")
    run = str(run)
    if base_url is not None:
        backend_options = {**options.backend_options, "base_url": base_url}
        options = EnhanceOptions(**{**options.model_dump(), "backend": "openai", "backend_options": backend_options})
    if options.backend == "openai" and "cache" not in options.backend_options and "://" not in run:
        # never ask twice: the served writer's answers are kept beside the run (no setting of the identity)
        backend_options = {
            **options.backend_options,
            "cache": os.path.join(os.path.abspath(run), "cache", "requests.sqlite"),
        }
        options = options.model_copy(update={"backend_options": backend_options})
    judge = [spec.model_dump() for spec in options.judge] or run_judge(run, options.where, options.source_stage)
    if judge_model:
        for spec in judge:
            if spec["name"] == "mlm":
                spec.setdefault("options", {})["model"] = judge_model
    options = options.model_copy(update={"judge": [ScorerSpec(**spec) for spec in judge]})
    reader = RunReader(run)
    parse_expression(options.where, {f.name: f.type for f in reader.schema(options.source_stage)})  # fail early
    with _library_bars_off():
        return run_stage(
            run,
            EnhanceStage(options, name=stage),
            overwrite="stage" if overwrite else False,
            show_progress=show_progress,
        )


# -- teach a judge ----------------------------------------------------------------------------------


def teach_sample(
    pool: str | Sequence[str],
    output: str | Path,
    options: SampleOptions | None = None,
    *,
    read: ReadOptions | None = None,
) -> dict[str, Any]:
    """Pick diverse pairs of a pool into the teach folder ``output``: embed, k-means, sample evenly
    across clusters. ``read``: the pool's input columns. Returns the step's record (``report``: counts).

    ``pool`` may be a run folder: its shards, read as the run records, and, when the run keeps
    embeddings (``embed``; image ones for ``encoder="clip"``, caption ones for ``minilm``), those
    instead of an encoder pass (``report.embeddings.from_run`` says which)."""
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.teach.folder import TeachFolder
    from mlmfilter.teach.sample import SampleOptions

    options = options or SampleOptions()
    pool = [pool] if isinstance(pool, (str, Path)) else list(pool)
    run_embeddings = None
    if len(pool) == 1 and _is_run(pool[0]):
        from mlmfilter.runs.embeddings import NoEmbeddings, RunEmbeddings
        from mlmfilter.runs.read import RunReader

        reader = RunReader(pool[0])
        sources = list(reader.sources().values())
        read = read if read is not None and read != ReadOptions() else ReadOptions(**reader.read_options())
        try:
            run_embeddings = RunEmbeddings(reader, modality="image" if options.encoder == "clip" else "text")
        except NoEmbeddings as exc:
            log.info("%s; embedding the pool with the encoder instead", exc)
    else:
        sources = expand_inputs([str(p) for p in pool])
    if not sources:
        raise ValueError(f"no shards match {pool}")
    return TeachFolder(output).sample(sources, options, read or ReadOptions(), run_embeddings=run_embeddings)


def _is_run(path: str | Path) -> bool:
    """A run folder (``run.yaml`` inside), local or on object storage."""
    if "://" in str(path):
        from mlmfilter.runs.folder import RunFolder

        try:
            return RunFolder(str(path)).is_run
        except (OSError, ValueError):  # an unreachable store, a file: not a run
            return False
    return (Path(path) / "run.yaml").is_file()


def teach_negatives(
    folder: str | Path, kinds: Sequence[str] | None = None, seed: int = 0, *, rewrites: bool = True
) -> dict[str, Any]:
    """Tagged low-quality variants of the sampled pairs (labelled by the teacher like any pair) and,
    with ``rewrites``, the enhancement task's samples (their targets are asked for by :func:`teach_label`)."""
    from mlmfilter.teach.folder import TeachFolder

    return TeachFolder(folder).negatives(kinds, seed, rewrites=rewrites)


def teach_label(
    folder: str | Path, options: LabelOptions, client: ClientOptions, *, relabel: bool = False
) -> dict[str, Any]:
    """Ask the teacher for a score line and a rationale per pair and metric (cached: never asked twice);
    resumable. Returns rows, ok, errors and the client's stats (requests, cache hits, tokens ...).
    Other settings or re-made pairs than the folder's earlier labels are refused unless ``relabel``."""
    from mlmfilter.teach.folder import TeachFolder

    return TeachFolder(folder).label(options, client, relabel=relabel)


def teach_collect(folder: str | Path, outputs: Sequence[str | Path]) -> dict[str, Any]:
    """Ingest OpenAI Batch API output files into the folder's request cache (then label from them)."""
    from mlmfilter.teach.folder import TeachFolder

    return TeachFolder(folder).collect(outputs)


def teach_write_batch(
    folder: str | Path, options: LabelOptions, client: ClientOptions, path: str | Path | None = None
) -> list[Path]:
    """Batch API request files (JSONL) for every teacher request not answered yet, instead of sending."""
    from mlmfilter.teach.folder import TeachFolder

    teach = TeachFolder(folder)
    chat = teach.client(client)  # for its cache: answered requests are not written again
    try:
        return teach.write_batch(options, chat, path)
    finally:
        chat.close()


def teach_balance(
    folder: str | Path, options: BalanceOptions | None = None, *, allow_incomplete: bool = False
) -> dict[str, Any]:
    """Keep labels evenly across score bins per metric; returns histograms before and after.
    A folder whose pairs are not all labelled (an interrupted ``teach_label``, failed requests) is
    refused unless ``allow_incomplete`` (then the report's ``incomplete_labels`` counts the gaps)."""
    from mlmfilter.teach.balance import BalanceOptions
    from mlmfilter.teach.folder import TeachFolder

    return TeachFolder(folder).balance(options or BalanceOptions(), allow_incomplete=allow_incomplete)


def teach_export(
    folder: str | Path,
    output: str | Path,
    options: ExportOptions | None = None,
    *,
    balanced: bool = True,
    allow_incomplete: bool = False,
) -> dict[str, Any]:
    """Write the instruction set (MLM-Filter's LLaVA JSON + images, TRL prompt-completion JSONL) and its
    card; ``balanced=False`` exports every parsed label instead of the balanced set. An incompletely
    labelled folder is refused unless ``allow_incomplete`` (the card then records the gaps)."""
    from mlmfilter.teach.export import ExportOptions
    from mlmfilter.teach.folder import TeachFolder

    return TeachFolder(folder).export(
        output, options or ExportOptions(), balanced=balanced, allow_incomplete=allow_incomplete
    )


def train(data: str | Path | Sequence[str | Path], output: str | Path, options: TrainOptions) -> TrainResult:
    """Fine-tune ``options.base`` on instruction data (LLaVA JSON, TRL JSONL) into a judge that
    ``score(..., scorers=[{"name": "mlm", "options": {"model": output}}])`` loads; rerun to resume."""
    from mlmfilter.core.locations import local_path
    from mlmfilter.training.train import train as run_training

    paths = [data] if isinstance(data, (str, Path)) else list(data)
    paths = [local_path(p, "instruction data", "training reads its images beside it") for p in paths]
    output = local_path(output, "the training output folder", "checkpoints are written and resumed there")
    return run_training([str(p) for p in paths], output, options)


# -- look at a run ----------------------------------------------------------------------------------


def report(
    run: str | Path,
    output: str | Path | None = None,
    selection: str | Path | None = None,
    options: ReportOptions | None = None,
    *,
    stage: str | Sequence[str] | None = None,
) -> Path | str:
    """One self-contained HTML page (works offline): distributions, thresholds, disagreements,
    galleries, errors, provenance. ``output`` defaults to ``RUN/report.html`` (a run on object
    storage: ``<run name>-report.html`` here), so the report of one run never replaces another's.
    ``selection`` defaults to ``RUN/selection`` when present. ``stage``: one stage, several joined on
    uid (``"score,judge"``), or None / ``"all"``: every scoring stage, the selection's first."""
    from mlmfilter.report import ReportOptions, default_report_path, write_report

    if stage is not None:
        options = (options or ReportOptions()).model_copy(update={"stage": _stage_text(stage)})
    return write_report(run, output if output is not None else default_report_path(run), selection, options)


def _stage_text(stage: str | Sequence[str]) -> str:
    return stage if isinstance(stage, str) else ",".join(stage)


def inspect(
    run: str | Path,
    where: str | None = None,
    limit: int = 20,
    *,
    columns: Sequence[str] | None = None,
    html: str | Path | None = None,
    stage: str | Sequence[str] | None = None,
) -> Matches:
    """The first ``limit`` pairs matching ``where`` (every pair without it), read back from the shards:
    uid, caption, scores (text columns too; by default which rule failed), error. ``html``: also
    write a contact sheet with thumbnails there. ``stage``: one stage, several joined on uid
    (``"score,judge"``: a column two stages hold is ``judge.column`` in the later one), or None /
    ``"all"``: every scoring stage."""
    from mlmfilter.io.writers import atomic_write
    from mlmfilter.report import open_run
    from mlmfilter.report.inspect import find_pairs
    from mlmfilter.report.render import ContactSheet, render_contact_sheet

    reader = open_run(run)
    matches = find_pairs(
        reader, where, limit, columns=list(columns) if columns else None, thumbnails=html is not None, stage=stage
    )
    if html is not None:
        page = render_contact_sheet(
            ContactSheet(matches.rows, matches.shown),
            run=reader.url,
            title=f"pairs where {where or 'everything'}",
            matched=matches.matched,
            columns=matches.columns,
            warnings=reader.warnings(),
        )
        atomic_write(html, page)  # a local path (its folder made) or an fsspec URL
    return matches


@dataclass
class ScoreStats:
    """What :func:`stats` returns: each column's profile (quantiles, histogram) and the run's warnings."""

    profiles: dict[str, ColumnProfile]
    warnings: list[str]
    stages: list[str] | None = None  # the stages read, joined on uid when several


def stats(
    run: str | Path, columns: Sequence[str] | None = None, *, stage: str | Sequence[str] | None = None
) -> ScoreStats:
    """Quantiles (values of the column), the share kept at >= each (counted, ties included) and a
    histogram per numeric score column (default: every one), to pick a threshold. ``stage``: one
    stage, several joined on uid (``"score,judge"``), or None / ``"all"``: every scoring stage."""
    from mlmfilter.report import open_run
    from mlmfilter.report.profile import profile_columns
    from mlmfilter.report.scan import numeric_columns
    from mlmfilter.selection.stages import resolve_stages, stages_dataset

    reader = open_run(run)
    stages = resolve_stages(reader, stage)
    dataset = stages_dataset(reader, stages)
    available = numeric_columns(dataset.schema)
    names = list(columns or available)
    unknown = [c for c in names if c not in available]
    if unknown:
        raise ValueError(f"no numeric score column {', '.join(map(repr, unknown))} (columns: {', '.join(available)})")
    return ScoreStats(profiles=profile_columns(dataset, names), warnings=reader.warnings(), stages=stages)


# -- check the scorers ------------------------------------------------------------------------------


def evaluate_human(
    benchmark: str,
    images: str | Path,
    annotations: str | Path,
    captions: str | Path | None = None,
    scorers: Iterable[str | ScorerSpec | Mapping[str, Any]] = ("rules",),
    *,
    keep_reference_captions: bool = False,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    columns: Sequence[str] | None = None,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Kendall tau-b/c, Spearman and Pearson (bootstrap CIs) of each score column against human ratings
    (``benchmark``: flickr8k-expert, flickr8k-crowdflower, clipscore-json or composite). ``output``: also
    write the result there as JSON."""
    from mlmfilter.core.locations import local_path
    from mlmfilter.evaluation.agreement import HumanAgreement
    from mlmfilter.evaluation.human import load_benchmark
    from mlmfilter.evaluation.scoring import PairScorer

    if not 0 < confidence < 1:
        raise ValueError("--confidence must be between 0 and 1")
    if bootstrap < 0:
        raise ValueError(f"--bootstrap must be 0 (no intervals) or a number of resamples, not {bootstrap}")
    images = local_path(images, "the images folder")
    annotations = local_path(annotations, "the annotations file")
    captions = local_path(captions, "the captions file") if captions is not None else None
    judgements = load_benchmark(benchmark, annotations, captions, drop_reference_captions=not keep_reference_captions)
    agreement = HumanAgreement(
        PairScorer([spec.model_dump() for spec in _as_specs(scorers)]),
        n_resamples=bootstrap,
        confidence=confidence,
        seed=seed,
        columns=list(columns) if columns else None,
    )
    result = agreement.evaluate(judgements, images)
    _write_result(result, output)
    return result


def evaluate_corrupt(
    inputs: str | Sequence[str],
    scorers: Iterable[str | ScorerSpec | Mapping[str, Any]] = ("rules",),
    *,
    limit: int = 500,
    kinds: Sequence[str] | None = None,
    seed: int = 0,
    columns: Sequence[str] | None = None,
    allow_pipe: bool = False,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Per score column and corruption kind of the first ``limit`` usable pairs: how often the true
    caption outscores the corrupted one, and the AUC. ``output``: also write the result there as JSON."""
    from mlmfilter.evaluation.corrupt import CorruptionCheck, read_pairs
    from mlmfilter.evaluation.scoring import PairScorer
    from mlmfilter.teach.negatives import NegativeGenerator

    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    generator = NegativeGenerator(seed=seed, kinds=list(kinds) if kinds else None)
    pair_scorer = PairScorer([spec.model_dump() for spec in _as_specs(scorers)])
    check = CorruptionCheck(pair_scorer, generator, columns=list(columns) if columns else None)
    pairs, read_errors = read_pairs(inputs, limit, allow_pipe=allow_pipe)
    if not pairs:
        raise ValueError(f"no usable pair in {', '.join(inputs)} (reader errors: {read_errors or 'none'})")
    result = check.evaluate(pairs, read_errors=read_errors)
    result["inputs"] = inputs
    _write_result(result, output)
    return result


def _write_result(result: dict[str, Any], output: str | Path | None) -> None:
    if output is None:
        return
    import json

    from mlmfilter.io.writers import atomic_write

    atomic_write(output, (json.dumps(result, indent=2, default=str) + "\n").encode("utf-8"))


# -- select, reshard --------------------------------------------------------------------------------


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
        output = SelectionFolder.in_run(run).url  # RUN/selection, on object storage too
    return select_run(run, output, **kwargs)


def reshard(
    selection: str | Path,
    output: str | Path,
    *,
    samples_per_shard: int = 10_000,
    captions: Mapping[str, str] | str | Path | None = None,
    captions_stage: str | None = None,
    overwrite: bool = False,
    allow_pipe: bool = False,
    caption_column: str = "caption",
) -> dict[str, Any]:
    """Write new WebDataset shards that hold exactly the rows a selection kept.

    ``selection`` is a selection folder (written by :func:`select`); the run it names holds the
    input shards (for a selection over several runs, the first run: kept rows carry its shard
    and key). New captions come from ``captions`` (uid -> caption, or a parquet file with ``uid`` and
    a text ``caption_column``) or from an enhancement
    stage of the run (``captions_stage``: its tables' ``caption`` column, read shard by shard;
    null keeps the original). ``allow_pipe`` is this call's permission for ``pipe:`` inputs
    (a run folder can never grant it). Stats include ``kept_uids_not_found``: non-zero means
    the selection names pairs the shards no longer hold.
    """
    from mlmfilter.io.readers import ReadOptions
    from mlmfilter.io.reshard import (
        ReshardError,
        check_caption_replacements,
        read_caption_replacements,
        reshard_selected,
    )
    from mlmfilter.runs.read import RunReader
    from mlmfilter.selection.folder import SelectionFolder

    if isinstance(captions, (str, Path)):
        captions = read_caption_replacements(captions, caption_column)
    elif captions is not None:
        check_caption_replacements(captions)
    folder = SelectionFolder(selection)  # a local path or an fsspec URL
    run = RunReader(folder.run_dir())
    sources = run.sources()
    imported = [s.url for s in sources.values() if s.url.startswith("imported:")]
    if imported and len(imported) == len(sources):
        raise ReshardError(
            f"{folder.run_dir()} was imported from score files without its shards (`mlmfilter import` without "
            "--shards): it has no images or captions to write. Import again with --shards 'SHARDS/*.tar' "
            "(the tars the scores describe), then select and reshard"
        )
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
        expected=(folder.summary().get("counts") or {}).get("kept"),
    )
    stats["selection"] = str(Path(folder.path).resolve()) if folder.is_local else folder.url
    return stats


# -- embeddings once: embed, dedup, distill --------------------------------------------------------------


def embed(
    run: str | Path | None = None,
    inputs: str | Sequence[str] | None = None,
    *,
    output: str | Path | None = None,
    model: str = "openai/clip-vit-base-patch32",
    text_model: str | None = None,
    text_only: bool = False,
    hashes: bool = True,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 64,
    allow_random_fallback: bool = False,
    stage: str = "embed",
    workers: int = 1,
    decode_workers: int = 1,
    read: ReadOptions | None = None,
    allow_pipe: bool = False,
    overwrite: bool = False,
    show_progress: bool = False,
    offline_if_unreachable: bool = True,
) -> StageSummary:
    """Keep each pair's image and text embeddings (float16, L2-normalised) and image hashes in the run.

    ``inputs`` are shards to embed into ``run`` (registered as ``score`` registers them); without
    them, the run's own shards. ``model``: CLIP / SigLIP (hub id or folder) or ``open_clip:ARCH/TAG``;
    ``text_model``: ``clip`` (the model's text tower, the default), ``minilm`` or a sentence-encoder
    folder; ``text_only``: MiniLM caption embeddings and no image model. The stage (``RUN/embed``)
    is what ``dedup``, ``distill``, ``teach_sample`` and the report read; resumable like every stage.
    ``overwrite`` discards this stage only. ``output`` names the run as ``score`` does: then a
    positional first argument is the inputs (``embed("shards/*.tar", output="runs/x")``).
    """
    from mlmfilter.core.processes import unguarded_main_call
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.runs.runner import run_stage
    from mlmfilter.scorers.stage import ScoringStage

    if output is not None:
        if inputs is None and run is not None:
            run, inputs = None, run  # embed(INPUTS, output=RUN), as score is called
        if run is not None:
            raise ValueError("embed() takes the run as `run` or as `output`, not both")
        run = output
    if run is None:
        raise ValueError("embed() needs the run folder (run= or output=)")
    if text_only:
        model, text_model = "none", text_model or "minilm"
    spec = ScorerSpec(
        name="embed",
        options={
            "model": model,
            "text_model": text_model or "clip",
            "hashes": hashes,
            "device": device,
            "dtype": dtype,
            "batch_size": batch_size,
            "allow_random_fallback": allow_random_fallback,
        },
    )
    if unguarded_main_call():
        workers, decode_workers = 1, 0  # worker processes would re-run the script's top level
    sources = None
    if inputs is not None:
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        sources = expand_inputs(inputs, allow_pipe=allow_pipe)
    elif not _is_run(run):
        raise ValueError(
            f"{run} is not a run folder yet: give the shards to embed (mlmfilter embed {run} 'shards/*.tar')"
        )
    if offline_if_unreachable and _names_a_hub_model([spec]) and model != "none":
        from mlmfilter.models.hub import go_offline_if_unreachable

        go_offline_if_unreachable()
    stage_options = ScoringOptions(scorers=[spec], decode_workers=decode_workers)
    return run_stage(
        str(run),
        ScoringStage(stage_options, name=stage),
        sources=sources,
        inputs=[_absolute_spec(spec) for spec in inputs or []],
        read_options=(read or ReadOptions()).model_dump(mode="json", exclude_defaults=True),
        executor=_build_local_executor(workers),
        overwrite="stage" if overwrite else False,
        show_progress=show_progress,
    )


def _build_local_executor(workers: int):
    from mlmfilter.runs.executors import build_executor

    return build_executor("local", workers=workers)


def dedup(
    run: str | Path,
    *,
    threshold: float = 0.95,
    on: str | None = None,
    keep_best: str | None = None,
    exact: bool = True,
    semantic: bool | None = None,
    phash_bits: int = 4,
    clusters: int | None = None,
    seed: int = 0,
    embeddings_stage: str | None = None,
    stage: str = "dedup",
    allow_incomplete: bool = False,
    overwrite: bool = False,
    work_dir: str | Path | None = None,
    **options: Any,
):
    """Duplicate groups of a run: the same image bytes, the same pixels (perceptual hash) and, after
    SemDeDup, embeddings of one k-means cluster at cosine >= ``threshold``; one pair kept per group
    (the highest ``keep_best`` column, else the first by uid). Writes the stage ``RUN/dedup``
    (``dup_group``, ``dup_size``, ``dup_keep``, ``dup_reason``, ``dup_nearest_uid``,
    ``dup_nearest_cosine``), which ``select`` joins: ``select(run, expression="dup_keep and itm >= 60")``.
    ``semantic`` (None): SemDeDup unless the embeddings are random stand-ins. Returns a
    :class:`~mlmfilter.selection.duplicates.DedupSummary`. Other ``options`` are
    :class:`~mlmfilter.selection.dedup.DedupOptions` fields."""
    from mlmfilter.selection.dedup import DedupOptions
    from mlmfilter.selection.duplicates import dedup_run

    settings = DedupOptions(
        threshold=threshold,
        exact=exact,
        phash_bits=phash_bits,
        clusters=clusters,
        seed=seed,
        **options,
    )
    return dedup_run(
        run,
        settings,
        semantic=semantic,
        on=on,
        embeddings_stage=embeddings_stage,
        keep_best=keep_best,
        stage=stage,
        allow_incomplete=allow_incomplete,
        overwrite=overwrite,
        work_dir=work_dir,
    )


def distill(
    run: str | Path,
    options: Any = None,
    *,
    output: str | Path | None = None,
    stage: str = "distill",
    overwrite: bool = False,
    show_progress: bool = False,
    **fields: Any,
):
    """Fit a head from the run's kept embeddings to the judge's scores on the pairs it judged, report its
    held-out agreement (Spearman, top-fraction overlap) and the cascade's uncertain band (the judge
    calls needed for ``agreement`` with an all-judge selection), save it to ``output`` (default
    ``RUN/heads/<stage>``; reload it as ``--scorer distilled --model HEAD``) and predict the whole pool
    into the stage ``RUN/<stage>`` (``distilled_<metric>``). ``options`` is a
    :class:`~mlmfilter.training.distill.DistillOptions`, or give its fields as keywords.
    Returns a :class:`~mlmfilter.training.distill.DistillResult`."""
    from mlmfilter.training.distill import DistillOptions, distill_run

    if options is None:
        options = DistillOptions(**fields)
    elif fields:
        raise TypeError(f"distill() takes DistillOptions or its fields, not both ({', '.join(fields)})")
    return distill_run(run, options, head_dir=output, stage=stage, overwrite=overwrite, show_progress=show_progress)


# -- foreign formats (mlmfilter.convert) -------------------------------------------------------------
# `convert_checkpoint`, not `convert`: `mlmfilter.convert` is the package that does it


def convert_checkpoint(
    src: str | Path, dst: str | Path, dtype: str = "auto", vision_tower: str | None = None
) -> tuple[str, Path]:
    """Convert a released judge from its original layout (LLaVA-1.5, LLaVA-Unified or AITQE, detected from
    its config.json) into a folder transformers loads; ``src`` is a folder or a hub id. Returns (layout, folder)."""
    from mlmfilter.convert.detect import convert_checkpoint as convert
    from mlmfilter.core.locations import is_url, local_path

    if is_url(str(src)):
        local_path(src, "the checkpoint to convert", "a local folder or a hub id")
    dst = local_path(dst, "the converted model folder", "transformers loads a model from a local folder")
    with _library_bars_off():
        return convert(src, dst, dtype=dtype, vision_tower=vision_tower)


def export_mlm_filter(run_dir: str | Path, out_dir: str | Path, stage: str = "score") -> list[Path | str]:
    """Write a run's MLM scores as the released MLM-Filter scripts do: ``{shard}_{metric}.parquet``."""
    from mlmfilter.convert.dumps import export_mlm_filter as export

    return export(run_dir, out_dir, stage=stage)


def import_mlm_filter(
    dumps: str | Path, run_dir: str | Path, shards: Sequence[str] | None = None, stage: str = "score"
) -> dict[str, int]:
    """Turn published MLM-Filter score files into a run that ``select`` and ``reshard`` read; returns counts."""
    from mlmfilter.convert.dumps import import_mlm_filter as import_dumps

    return import_dumps(dumps, run_dir, shards=list(shards) if shards else None, stage=stage)


# -- know the cost before, trust the numbers after ---------------------------------------------------


def plan(
    inputs: str | Sequence[str] | None = None,
    scorers: Iterable[str | ScorerSpec | Mapping[str, Any]] = ("rules",),
    *,
    config: ScoreConfig | None = None,
    gpus: str | Sequence[str] | None = None,
    sample: int = 64,
    allow_pipe: bool = False,
    offline_if_unreachable: bool = True,
    **settings: Any,
):
    """What :func:`score` would cost for these inputs and scorers, without scoring: pairs (counted from
    headers, footers, ``_stats.json``), the MLM judge's tokens per pair (its real prompts through its own
    tokenizer, over the first ``sample`` pairs), vision passes, LLM tokens, model FLOPs and hours on the
    named ``gpus`` (measured figures where recorded, else estimated from FLOPs). Downloads no weights and
    converts nothing. Returns a :class:`~mlmfilter.scorers.plan.ScorePlan` (``to_json()``)."""
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.judge.throughput import resolve_gpus
    from mlmfilter.scorers.plan import plan_scoring

    if config is None:
        if inputs is None:
            raise ValueError("plan() needs inputs, or a config")
        settings.setdefault("output", "")
        config = ScoreConfig(inputs=inputs, scorers=list(_as_specs(scorers)), **settings)
    if sample < 1:
        raise ValueError("sample must be at least 1")
    chosen = resolve_gpus(gpus)
    sources = expand_inputs(config.inputs, allow_pipe=allow_pipe)
    if not sources:
        raise ValueError(f"no input matches {', '.join(config.inputs)}")
    if offline_if_unreachable and _names_a_hub_model(config.scorers):
        from mlmfilter.models.hub import go_offline_if_unreachable

        go_offline_if_unreachable()
    return plan_scoring(sources, config.scorers, config.read, chosen, sample=sample, inputs=config.inputs)


def plan_teach_label(folder: str | Path, options: LabelOptions, *, price: tuple[float, float] | None = None):
    """What :func:`teach_label` would ask and cost: requests per kind, input and output tokens, and USD with
    and without the Batch API (``price``: USD per 1M input and output tokens, for a model without a
    recorded price). Nothing is sent. Returns a :class:`~mlmfilter.teach.plan.LabelPlan`."""
    from mlmfilter.teach.folder import TeachFolder
    from mlmfilter.teach.plan import plan_label

    return plan_label(TeachFolder(folder), options, price=price)


def verify(
    run: str | Path,
    *,
    stage: str = "score",
    sample: int = 16,
    seed: int = 0,
    backend: str | None = None,
    backend_options: Mapping[str, Any] | None = None,
    base_url: str | None = None,
    device: str | None = None,
):
    """Re-score a seeded sample of a finished run's MLM judge scores at batch size 1, in fp32 and, with
    ``backend``, on a second backend; per metric, the largest difference against the readout bound
    recorded in provenance. Returns a :class:`~mlmfilter.evaluation.verify.VerifyReport` (``ok``)."""
    from mlmfilter.evaluation.verify import verify_run
    from mlmfilter.models.hub import go_offline_if_unreachable

    if sample < 1:
        raise ValueError("sample must be at least 1")
    go_offline_if_unreachable()  # the run's models from the local cache at once when the hub does not answer
    options = dict(backend_options or {})
    if base_url is not None:
        if backend not in (None, "openai"):
            raise ValueError("--base-url is for the openai backend")
        backend = "openai"
        options["base_url"] = base_url
    return verify_run(
        str(run), stage=stage, sample=sample, seed=seed, backend=backend, backend_options=options, device=device
    )
