"""The quickstart job: build the bundled sample shards, score them, select, and show what happened."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from mlmfilter import api
from mlmfilter.demo.data import make_sample_shards
from mlmfilter.io.uid import halves_to_uids
from mlmfilter.models.hub import hub_reachable, use_offline_hub
from mlmfilter.runs.folder import ConfigMismatch, SourceChanged
from mlmfilter.runs.read import RunReader
from mlmfilter.scorers.stage import SCORE_STAGE
from mlmfilter.selection.folder import SelectionFolder

#: what the demo scores with: real hub models when they can be had, loud random stand-ins otherwise
DEMO_SCORERS = [
    {"name": "rules"},
    {"name": "clip", "options": {"model": "openai/clip-vit-base-patch32", "allow_random_fallback": True}},
]
# a small VLM that transformers loads as it is, used zero-shot as the judge; the released
# MLM-Filter checkpoints are 8-13B and in the original LLaVA layout (`mlmfilter convert`)
DEMO_MLM = {
    "name": "mlm",
    "options": {
        "model": "HuggingFaceTB/SmolVLM-256M-Instruct",
        "metrics": "itm,odf",
        "allow_random_fallback": True,
        # a zero-shot stand-in (or its random fallback) is no trained judge: it rarely answers with a number,
        # so its probability mass is recorded (itm_mass) but not held to the floor a real judge must meet
        "min_mass": 0.0,
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
    # the hub's reachability was decided above, with its own message
    inputs = [str(output / "shards" / "*.tar")]
    try:
        summary = api.score(inputs, output / "run", scorers, show_progress=True, offline_if_unreachable=False)
    except (ConfigMismatch, SourceChanged):  # an earlier demo here, with or without --mlm: the demo owns its run
        console.print("[yellow]the demo run in this folder was made with other settings: scoring it again[/]")
        summary = api.score(
            inputs, output / "run", scorers, show_progress=True, offline_if_unreachable=False, overwrite=True
        )
    stats = summary.stats.to_json()
    console.print(
        f"[bold]2/3[/] scored {stats['read']} pairs into {summary.run_dir} "
        f"({stats['errored']} error rows: {stats['errors']})"
    )
    for warning in summary.provenance.get("warnings", []):
        console.print(f"[bold red]{warning}[/]")

    selection = api.select(
        summary.run_dir, output / "selection", expression=DEMO_WHERE, top_fraction=DEMO_TOP_FRACTION, by=by
    )
    console.print(
        f"[bold]3/3[/] selected with `{DEMO_WHERE}` + top {DEMO_TOP_FRACTION:.0%} by {by}: "
        f"kept {selection.kept} -> {selection.paths['subset']}"
    )
    console.print(_results_table(_table_rows(summary.run_dir, output / "selection", shards), by, console.width))
    console.print(legend(by, with_mlm), highlight=False)
    if summary.provenance.get("warnings"):
        console.print(
            "[bold red]Model scores above come from RANDOM stand-in weights (no model hub here): "
            "they mean nothing. Rule scores and errors are real.[/]"
        )
    report = None
    try:
        from mlmfilter.report import write_report

        report = write_report(summary.run_dir, output / "report.html", selection_dir=output / "selection")
        console.print(f"report: {report} (open it in a browser; it works offline)")
    except ImportError as exc:  # the report needs matplotlib (the `report` extra)
        console.print(f"[yellow]no report written: {exc}[/]")
    console.print(next_steps(output, summary.run_dir, report), highlight=False, soft_wrap=True)
    return {"summary": summary, "selection": selection, "report": report}


#: the table's columns: header, width (None: the caption takes what is left), what it shows
_COLUMN_WIDTHS = {"label": 12, "caption": None, "rules": 5, "clip": 4, "itm": 5, "error": 15, "kept": 4}
_GAP = 1  # SIMPLE_HEAD puts one space between columns


def _table_rows(run_dir: Path, selection_dir: Path, shards: list[Path]) -> list[dict]:
    """Every scored pair in shard order, with its demo label, caption and whether it was kept."""
    labels = _demo_labels(shards)
    kept = set(halves_to_uids(SelectionFolder(selection_dir).uids()))
    rows = RunReader(run_dir).dataset(SCORE_STAGE).to_table().to_pylist()
    out = []
    for row in sorted(rows, key=lambda r: (r["shard"], r["key"])):
        label, caption = labels.get(row["uid"], ("?", ""))
        out.append({**row, "label": label, "caption": caption or "", "kept": row["uid"] in kept})
    return out


def _results_table(rows: list[dict], by: str, width: int = 80) -> Table:
    """One line per pair. Every column but the caption has the width its longest value needs,
    so that nothing but the caption is ever cut, down to an 80-column terminal."""
    columns = ["label", "caption", "rules", "clip"] + (["itm"] if by == "itm" else []) + ["error", "kept"]
    fixed = sum(_COLUMN_WIDTHS[c] for c in columns if c != "caption") + _GAP * (len(columns) - 1)
    table = Table(title="sample pairs", box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    for col in columns:
        longest = max([len(r["caption"]) for r in rows] + [len("caption")])
        table.add_column(
            col, no_wrap=True, overflow="ellipsis", width=_COLUMN_WIDTHS[col] or max(10, min(width - fixed, longest))
        )
    for row in rows:
        values = {
            "label": row["label"],
            "caption": row["caption"],
            "rules": {True: "ok", False: "no"}.get(row.get("rules_ok"), ""),
            "clip": _fmt(row.get("clip_score"), 2),
            "itm": _fmt(row.get("itm"), 1),
            "error": row.get("error") or "",
            "kept": "yes" if row["kept"] else "",
        }
        table.add_row(*(values[c] for c in columns))
    return table


def legend(by: str, with_mlm: bool) -> str:
    """What each column of the table means (lines under 80 characters)."""
    lines = [
        "label   what the demo made the caption: good, wrong (another photo's), lazy,",
        "        empty, non_english; broken_image is a JPEG cut in half",
        "rules   DataComp-style basic filter (rules_ok); rules_failed says which rule",
        "clip    CLIPScore, 2.5 * max(cosine, 0), 0-2.5 (clip_cosine is the cosine)",
    ]
    if with_mlm:
        lines.append("itm     MLM judge: image-text matching, 0-100 (odf: object detail)")
    lines += [
        "error   why a pair has no scores (a stable code, counted in the stats)",
        f"kept    selected: `{DEMO_WHERE}`, then the top {DEMO_TOP_FRACTION:.0%} of all pairs by {by}",
    ]
    return "\n".join(lines)


def next_steps(output: Path, run_dir: Path, report: Path | None) -> str:
    """Where the files are and the commands to try next, with this demo's paths."""
    selection, run = output / "selection", Path(run_dir)
    if run.is_absolute() and not output.is_absolute():  # the run folder comes back resolved: show it as given
        try:
            run = run.relative_to(Path.cwd())
        except ValueError:
            pass
    lines = [
        "[bold]files[/]",
        f"  {output / 'shards'}/*.tar        the sample WebDataset shards",
        f"  {run}/score/tables/  one parquet per shard: every score column",
        f"  {run}/score/provenance.json  models, settings, warnings",
        f"  {selection}/uids.npy  the kept uids (DataComp subset format)",
        f"  {selection}/kept.parquet, selection.json  kept rows, counts",
    ]
    if report is not None:
        lines.append(f"  {report}  the report (distributions, galleries)")
    lines += [
        "[bold]next steps[/]",
        f"  mlmfilter stats {run}",
        f"  mlmfilter inspect {run} --where 'not rules_ok'",
        f"  mlmfilter select {run} --where 'rules_ok and clip_cosine >= 0.2' -o {output / 'sel2'} --json",
        f"  mlmfilter reshard {selection} {output / 'kept-shards'}",
        "  mlmfilter select RUN1 RUN2 --where 'itm >= 60 and rules_ok' -o SEL   # join runs on uid",
        "  mlmfilter scorers   # every scorer, its options and columns",
    ]
    return "\n".join(lines)


def _fmt(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


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
