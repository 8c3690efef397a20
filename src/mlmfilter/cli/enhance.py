"""`mlmfilter enhance`: rewrite the poor captions of a scored run, keep a rewrite only when it scores better."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("enhance")(enhance)


def enhance(
    run: str = typer.Argument(..., help="Run folder scored by `mlmfilter score` (path or fsspec URL)."),
    where: Optional[str] = typer.Option(None, "--where", "-w", help="Pairs to work on, e.g. 'itm < 40'."),
    mode: Optional[str] = typer.Option(None, help="rewrite (default), fuse (CapsFusion) or aitqe."),
    model: Optional[str] = typer.Option(None, help="The VLM that writes candidates (hub id or path)."),
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
    recipe: Optional[Path] = typer.Option(
        None, help="YAML with enhance-stage fields (prompts, checks ...); flags override it."
    ),
    name: str = typer.Option("enhance", help="Stage folder in the run."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Discard this stage's earlier results (the scores stay)."
    ),
) -> None:
    """Rewrite poor captions (AITQE-style), re-score them with the same judge, keep only better ones.

    Writes RUN/<name>/tables/<shard>.parquet: original caption, candidates, scores before/after,
    decision and reason per pair. `mlmfilter reshard ... --captions-stage <name>` uses the accepted ones.
    Re-running the same command resumes.
    """
    from pydantic import ValidationError

    from mlmfilter.cli.app import console, user_errors
    from mlmfilter.config import load_recipe
    from mlmfilter.enhance.api import enhance as run_enhance
    from mlmfilter.enhance.api import judge_from_run
    from mlmfilter.enhance.stage import EnhanceOptions

    with user_errors():
        fields: dict[str, Any] = load_recipe(recipe) if recipe else {}
    flags = dict(
        where=where,
        mode=mode,
        model=model,
        conversation=conversation,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        allow_random_fallback=allow_random_fallback,
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
    sampling = dict(fields.get("sampling") or {})
    if candidates is not None:
        sampling["n"] = candidates
        if candidates > 1 and temperature is None and "temperature" not in sampling:
            sampling["temperature"] = 0.7  # several greedy candidates would all be the same text
    for key, value in (("temperature", temperature), ("max_new_tokens", max_new_tokens)):
        if value is not None:
            sampling[key] = value
    if sampling:
        fields["sampling"] = sampling
    with user_errors():
        if "judge" not in fields:
            fields["judge"] = judge_from_run(run, fields["where"], fields.get("source_stage", "score"))
        if judge_model:
            for spec in fields["judge"]:
                if spec["name"] == "mlm":
                    spec.setdefault("options", {})["model"] = judge_model
        try:
            options = EnhanceOptions(**fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ValueError(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}") from None
        summary = run_enhance(run, options, name=name, overwrite=overwrite, show_progress=True)
    counters = summary.stats.counters
    accepted = int(counters.get("accepted", 0))
    gain = counters.get("gain_sum", 0.0) / accepted if accepted else 0.0
    rejected = {k.split(":", 1)[1]: int(v) for k, v in sorted(counters.items()) if k.startswith("rejected:")}
    console.print(
        f"enhance {summary.run_url}/{name}: {int(counters.get('tried', 0))} pairs tried, {accepted} accepted "
        f"(mean gain {gain:+.2f}), rejected: {', '.join(f'{k} {v}' for k, v in rejected.items()) or 'none'}",
        highlight=False,
    )
    for warning in summary.provenance.get("warnings", []):
        console.print(f"[bold red]{warning}[/]")
    for shard, error in summary.shards_failed.items():
        console.print(f"[red]shard {shard} failed:[/] {error}")
    if not summary.ok:
        raise typer.Exit(1)
