"""The quickstart job: build the bundled sample shards, score them, select, and show what happened."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.dataset as ds
from rich import box
from rich.console import Console
from rich.table import Table

from mlmfilter import api
from mlmfilter.runs.read import RunReader
from mlmfilter.demo_data import make_sample_shards
from mlmfilter.hub import hub_reachable, use_offline_hub

#: what the demo scores with: real hub models when they can be had, loud random stand-ins otherwise
DEMO_SCORERS = [
    {"name": "rules"},
    {"name": "clip", "options": {"model": "openai/clip-vit-base-patch32", "allow_random_fallback": True}},
]
# a small VLM that transformers loads as it is, used zero-shot as the judge; the released
# MLM-Filter checkpoints are 8-13B and in the original LLaVA layout (`mlmfilter convert-llava`)
DEMO_MLM = {
    "name": "mlm",
    "options": {
        "model": "HuggingFaceTB/SmolVLM-256M-Instruct",
        "metrics": "itm,odf",
        "allow_random_fallback": True,
    },
}
DEMO_WHERE = "rules_ok"
DEMO_TOP_FRACTION = 0.25


def run_demo(output: str | Path, with_mlm: bool = True, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    output = Path(output)
    if not hub_reachable(timeout=3.0):
        # fail over to the random stand-ins at once instead of after minutes of download retries
        use_offline_hub()
        console.print("[yellow]The Hugging Face hub is not reachable: models load from the local cache only.[/]")
    shards = make_sample_shards(output / "shards")
    console.print(f"[bold]1/3[/] wrote {len(shards)} sample shards to {output / 'shards'}")

    scorers = DEMO_SCORERS + ([DEMO_MLM] if with_mlm else [])
    by = "itm" if with_mlm else "clip_score"
    summary = api.score([str(output / "shards" / "*.tar")], output / "run", scorers, show_progress=True)
    console.print(f"[bold]2/3[/] scored {summary.stats['read']} pairs into {summary.run_dir} "
                  f"({summary.stats['errored']} error rows: {summary.stats['errors']})")
    for warning in summary.provenance.get("warnings", []):
        console.print(f"[bold red]{warning}[/]")

    selection = api.select(summary.run_dir, output / "selection", expression=DEMO_WHERE,
                           top_fraction=DEMO_TOP_FRACTION, by=by)
    console.print(f"[bold]3/3[/] selected with `{DEMO_WHERE}` + top {DEMO_TOP_FRACTION:.0%} by {by}: "
                  f"kept {selection.kept} -> {output / 'selection' / 'uids.npy'}")
    console.print(_results_table(summary.run_dir, output / "selection", shards, by))
    if summary.provenance.get("warnings"):
        console.print("[bold red]Model scores above come from RANDOM stand-in weights (no model hub here): "
                      "they mean nothing. Rule scores and errors are real.[/]")
    report = None
    try:
        from mlmfilter.report import write_report

        report = write_report(summary.run_dir, output / "report.html", selection_dir=output / "selection")
        console.print(f"report: {report} (open it in a browser; it works offline)")
    except ImportError as exc:  # the report needs matplotlib (the `report` extra)
        console.print(f"[yellow]no report written: {exc}[/]")
    run_dir = summary.run_dir
    console.print(
        "[bold]next steps[/]\n"
        f"  mlmfilter stats {run_dir}                          # score distributions, to pick thresholds\n"
        f"  mlmfilter inspect {run_dir} --where 'not rules_ok'  # the pairs the rules dropped\n"
        f"  mlmfilter select {run_dir} --where 'rules_ok and clip_cosine >= 0.2'\n"
        f"  mlmfilter reshard {output / 'selection'} {output / 'kept-shards'}  # new shards with the kept pairs\n"
        f"  files: {run_dir}/run.yaml, {run_dir}/score/ (tables, stats, provenance), {output / 'selection'}/uids.npy",
        highlight=False,
    )
    return {"summary": summary, "selection": selection, "report": report}


def _results_table(run_dir: Path, selection_dir: Path, shards: list[Path], by: str) -> Table:
    labels = _demo_labels(shards)
    kept = set(ds.dataset(selection_dir / "kept.parquet").to_table(columns=["uid"])["uid"].to_pylist())
    rows = RunReader(run_dir).dataset().to_table().to_pylist()
    table = Table(title="sample pairs", box=box.SIMPLE_HEAD, pad_edge=False)
    score_columns = ["clip_score"] + ([by] if by != "clip_score" else [])
    widths = {"label": 14, "caption": 23, "rules": 5, "clip_score": 6, by: 7, "error": 17, "kept": 6}
    for col in ["label", "caption", "rules", *score_columns, "error", "kept"]:
        table.add_column(col.replace("_score", ""), no_wrap=True, overflow="ellipsis", width=widths[col])
    for row in sorted(rows, key=lambda r: (r["shard"], r["key"])):
        label, caption = labels.get(row["uid"], ("?", ""))
        rules = {True: "ok", False: "no"}.get(row.get("rules_ok"), "")
        values = [label, caption or "", rules]
        values += [_fmt(row.get(col)) for col in score_columns]
        values += [row["error"] or "", "yes" if row["uid"] in kept else ""]
        table.add_row(*values)
    return table


def _fmt(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _demo_labels(shards: list[Path]) -> dict[str, tuple[str, str]]:
    """uid -> (demo_label, caption) from the sample shards' json members."""
    labels = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    labels[meta["uid"]] = (meta.get("demo_label", "?"), meta.get("caption", ""))
    return labels

