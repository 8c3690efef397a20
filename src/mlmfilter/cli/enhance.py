"""`mlmfilter enhance`: rewrite the poor captions of a scored run, keep a rewrite only when it scores better."""

from __future__ import annotations

from typing import Any, Optional

import typer

from mlmfilter.cli.common import console, exit_if_interrupted, load_recipe, options_or_exit, user_errors

#: the flags that set nested EnhanceOptions fields, named in a refusal of their value
ENHANCE_FLAGS = {
    "decision.margin": "--margin",
    "decision.compare": "--compare",
    "sampling.n": "--candidates",
    "sampling.temperature": "--temperature",
    "sampling.max_new_tokens": "--max-new-tokens",
}


def enhance(
    run: str = typer.Argument(..., help="Run folder scored by `mlmfilter score` (path or fsspec URL)."),
    where: Optional[str] = typer.Option(None, "--where", "-w", help="Pairs to work on, e.g. 'itm < 40'."),
    mode: Optional[str] = typer.Option(None, help="rewrite (default), fuse (CapsFusion) or aitqe."),
    model: Optional[str] = typer.Option(
        None, help="The VLM that writes candidates: hub id or path; with --backend openai, the server's model name."
    ),
    backend: Optional[str] = typer.Option(
        None,
        help="Who runs the writer: transformers (here; the default) or openai (a server: vLLM, SGLang, "
        "transformers serve, a hosted model), asked as `teach label` asks, answers cached in RUN/cache.",
    ),
    base_url: Optional[str] = typer.Option(
        None,
        "--base-url",
        help="The writer's OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (implies openai).",
    ),
    judge_model: Optional[str] = typer.Option(
        None, help="Re-score with this MLM judge (default: the run's own judge, model and metrics)."
    ),
    compare: Optional[str] = typer.Option(
        None, help="Judge columns compared, e.g. itm,odf (default: those --where reads)."
    ),
    margin: Optional[float] = typer.Option(None, help="A rewrite must beat the original by this much (default 5)."),
    candidates: Optional[int] = typer.Option(None, help="Candidates per pair (sampled; default 1, greedy)."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (default 0.7 with --candidates > 1)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Token limit of one candidate."),
    conversation: Optional[str] = typer.Option(None, help="Writer's conversation format (default auto; aitqe: aitqe)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ..."),
    dtype: Optional[str] = typer.Option(None, help="auto, fp32, bf16, fp16."),
    batch_size: Optional[int] = typer.Option(None, help="Requests per generation batch."),
    allow_random_fallback: Optional[bool] = typer.Option(
        None,
        "--allow-random-fallback",
        help="If a model cannot be found, use a tiny random one (output is meaningless).",
    ),
    recipe: Optional[str] = typer.Option(
        None, help="YAML with enhance-stage fields (prompts, checks ...); flags override it."
    ),
    source_stage: Optional[str] = typer.Option(
        None, "--source-stage", help="The scoring stage --where reads (default score; a cascade's judge: judge)."
    ),
    stage: str = typer.Option("enhance", "--stage", help="Stage folder in the run."),
    name: Optional[str] = typer.Option(None, "--name", hidden=True, help="The old name of --stage."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Discard this stage's earlier results (the scores stay)."
    ),
) -> None:
    """Rewrite poor captions (AITQE-style), re-score them with the same judge, keep only better ones.

    Writes RUN/<stage>/tables/<shard>.parquet: original caption, candidates, scores before/after,
    decision and reason per pair. `mlmfilter reshard ... --captions-stage <stage>` uses the accepted ones.
    Re-running the same command resumes.
    """
    from mlmfilter import api
    from mlmfilter.enhance.stage import EnhanceOptions

    stage = name or stage
    with user_errors():
        fields: dict[str, Any] = load_recipe(recipe) if recipe else {}
    flags = dict(
        where=where,
        mode=mode,
        model=model,
        backend=backend or ("openai" if base_url else None),
        conversation=conversation,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        allow_random_fallback=allow_random_fallback,
        source_stage=source_stage,
    )
    fields.update({k: v for k, v in flags.items() if v is not None})
    if "where" not in fields or "model" not in fields:
        raise typer.BadParameter("give --where and --model (or a --recipe that has them)")
    decision = dict(fields.get("decision") or {})
    if compare:
        decision["compare"] = [c.strip() for c in compare.split(",") if c.strip()]
    if margin is not None:
        decision["margin"] = margin
    fields["decision"] = decision
    if base_url is not None:  # the server's address, beside the recipe's other backend_options
        fields["backend_options"] = {**(fields.get("backend_options") or {}), "base_url": base_url}
    # several candidates are sampled at 0.7 unless a temperature is given (EnhanceOptions' rule)
    sampling = dict(fields.get("sampling") or {})
    given = (("n", candidates), ("temperature", temperature), ("max_new_tokens", max_new_tokens))
    sampling.update({key: value for key, value in given if value is not None})
    if sampling:
        fields["sampling"] = sampling
    options = options_or_exit(EnhanceOptions, flag_names=ENHANCE_FLAGS, **fields)
    with user_errors():
        summary = api.enhance(
            run, options, stage=stage, judge_model=judge_model, overwrite=overwrite, show_progress=True
        )
    counters = summary.stats.counters
    accepted = int(counters.get("accepted", 0))
    gain = counters.get("gain_sum", 0.0) / accepted if accepted else 0.0
    rejected = {k.split(":", 1)[1]: int(v) for k, v in sorted(counters.items()) if k.startswith("rejected:")}
    console.print(
        f"enhance {summary.run_url}/{stage}: {int(counters.get('tried', 0))} pairs tried, {accepted} accepted "
        f"(mean gain {gain:+.2f}), rejected: {', '.join(f'{k} {v}' for k, v in rejected.items()) or 'none'}",
        highlight=False,
    )
    for warning in summary.provenance.get("warnings", []):
        console.print(f"[bold red]{warning}[/]")
    for shard, error in summary.shards_failed.items():
        console.print(f"[red]shard {shard} failed:[/] {error}")
    exit_if_interrupted(summary)
    if not summary.ok:
        raise typer.Exit(1)
