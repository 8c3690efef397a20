"""Looking at a run as a curator does, through the CLI: a cascade's stages in `stats`, `inspect`,
`select` and `report`; which rule failed; "kept at >=" counted where values tie.

The run: real Flickr8k shards (one truncated JPEG, one caption of two words), the `rules` scorer in
stage `score`, then a cascade stage `judge` scored only where `rules_ok` holds, with a tiny CLIP and
a second `rules` scorer (its columns clash with the first stage's: `judge.rules_ok`).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.runs.read import RunReader
from tests.support.builders import write_shard

runner = CliRunner()


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.fixture(scope="module")
def cascade(tmp_path_factory, flickr_pairs, tiny_clip_dir):
    root = tmp_path_factory.mktemp("cascade")
    samples = [{"key": f"{i:04d}", "jpg": p.read_bytes(), "txt": c} for i, (p, c) in enumerate(flickr_pairs[:8])]
    samples[2]["txt"] = "two words"  # fails min_words
    samples[5]["jpg"] = samples[5]["jpg"][:400]  # a truncated JPEG: an error row in both stages
    write_shard(root / "in" / "00000000.tar", samples)
    run = root / "run"
    invoke("score", root / "in" / "00000000.tar", "-o", run, "--scorer", "rules")
    judged = invoke(
        "score",
        root / "in" / "00000000.tar",
        "-o",
        run,
        "--scorer",
        "clip,rules",
        "--model",
        tiny_clip_dir,
        "--option",
        "rules.min_words=1",
        "--stage",
        "judge",
        "--only",
        "rules_ok",
    )
    reader = RunReader(run)
    score = {r["key"]: r for r in reader.dataset("score").to_table().to_pylist()}
    judge = {r["key"]: r for r in reader.dataset("judge").to_table().to_pylist()}
    return {"run": run, "judged": judged.output, "score": score, "judge": judge, "root": root}


def test_the_cascade_summary_counts_the_scored_and_the_skipped_apart(cascade):
    skipped = [k for k, r in cascade["judge"].items() if r["skipped"]]
    scored = [k for k, r in cascade["judge"].items() if not r["skipped"] and r["error"] is None]
    # 8 pairs: the two-word caption fails rules_ok, the truncated JPEG has no rules_ok: neither passes
    assert skipped == ["0002", "0005"] and len(scored) == 6
    text = flat(cascade["judged"])
    assert "pairs read 8" in text and "scored 6" in text and "skipped 2 (did not pass --only" in text


def test_stats_reads_one_stage_or_all_with_qualified_names(cascade):
    run = cascade["run"]
    judge = invoke("stats", run, "--stage", "judge", "-c", "clip_score").output
    assert "clip_score: 6 values, 2 missing" in judge  # the skipped pair and the truncated one
    every = invoke("stats", run).output
    assert "stages score, judge, joined on uid" in every
    for column in ("rules_words:", "clip_score:", "judge.rules_words:"):
        assert re.search(rf"^{re.escape(column)} ", every, re.M), column
    unknown = invoke("stats", run, "--stage", "jugde", code=2)
    assert "has no stage 'jugde' (stages: judge, score)" in flat(unknown.output)


def test_inspect_shows_which_rule_failed_and_reads_text_columns(cascade):
    run = cascade["run"]
    result = invoke("inspect", run, "--where", "not rules_ok")
    text = flat(result.output)
    assert "1 pair(s) match not rules_ok" in text and "rules_failed min_words" in text  # by default
    named = invoke("inspect", run, "-c", "rules_failed", "-c", "rules_words", "--where", "skipped and rules_words < 5")
    assert "rules_failed min_words" in flat(named.output) and "rules_words 2" in flat(named.output)
    # a stage-qualified column in an expression, and the judge's own columns
    both = invoke("inspect", run, "--where", "judge.rules_ok and clip_score >= 0", "--limit", 50)
    assert "6 pair(s) match" in flat(both.output)


def test_select_joins_two_stages_of_one_run_and_the_report_follows(cascade, tmp_path):
    run = cascade["run"]
    judged = {k: r for k, r in cascade["judge"].items() if r["clip_cosine"] is not None}
    cut = float(np.median([r["clip_cosine"] for r in judged.values()]))
    result = invoke("select", run, "--stage", "score,judge", "--where", f"rules_ok and clip_cosine >= {cut}")
    expected = {
        r["uid"]
        for k, r in judged.items()
        if cascade["score"][k]["rules_ok"] and np.float32(r["clip_cosine"]) >= np.float32(cut)
    }
    kept = np.load(run / "selection" / "uids.npy")
    assert len(kept) == len(expected) > 0
    assert "of 2 stages" in flat(result.output) and "8 rows are in every stage" in flat(result.output)
    summary = json.loads((run / "selection" / "selection.json").read_text())
    assert summary["arguments"]["stages"] == ["score", "judge"]

    # a selection on a cascade column only: the report reads that stage first and shows the selection
    again = invoke("select", run, "--stage", "judge", "--top-fraction", "0.25", "--by", "clip_score")
    assert "replaced the earlier selection" in flat(again.output)
    report = invoke("report", run)
    page = run / "report.html"  # in the run folder: another run's report never replaces it
    assert "report written to" in report.output and page.exists() and not (tmp_path / "report.html").exists()
    html = page.read_text(encoding="utf-8")
    assert "stages judge, score" in html and "kept <b>2</b> of 8 pairs" in html
    assert "<b>min_words</b> 1" in html  # which rule failed, counted


def test_select_refuses_a_top_fraction_without_by_in_the_flags_words(cascade):
    result = invoke("select", cascade["run"], "--top-fraction", "0.5", code=2)
    assert "--top-fraction needs --by COLUMN" in flat(result.output)


def test_kept_at_counts_ties_in_stats_and_the_report(tmp_path):
    """25 of 30 values are 0.0 (CLIPScore of pairs with a negative cosine): every quantile up to 75%
    is 0, and all 30 rows are kept at >= 0, not the 1 - q the quantile would suggest."""
    from mlmfilter.runs.runner import write_tables

    values = [0.0] * 25 + [0.05, 0.1, 0.1, 0.2, 0.4]
    table = pa.table(
        {
            "uid": [f"{i:032x}" for i in range(30)],
            "shard": ["s"] * 30,
            "key": [f"{i:04d}" for i in range(30)],
            "clip_score": pa.array(values, pa.float32()),
            "error": pa.nulls(30, pa.string()),
            "error_detail": pa.nulls(30, pa.string()),
        }
    )
    run = tmp_path / "run"
    write_tables(run, "score", {"s": table})
    result = invoke("stats", run, "-c", "clip_score")
    found = re.findall(r"^\s*(\d+)%\s+(\S+)\s+(\S+)%\s+(\d+)", result.output, re.M)
    rows = {q: (value, kept, count) for q, value, kept, count in found}
    assert rows["50"] == ("0", "100.0", "30") and rows["75"] == ("0", "100.0", "30")
    # the 90% quantile is the 27th smallest value (0.1): kept at >= 0.1 are 4 rows, the two tied 0.1s included
    assert rows["90"][0] == "0.1" and rows["90"][1:] == ("13.3", "4")
    assert rows["100"] == ("0.4", "3.3", "1")


def test_the_report_compares_scorers_not_one_scorers_derived_columns(tmp_path):
    """clip_score is 2.5 * max(clip_cosine, 0): where many cosines are negative the two rank apart
    (ties at 0), yet they are one scorer's one judgement; itm is another scorer's."""
    from mlmfilter.report import ReportOptions, gather_report, open_run
    from mlmfilter.runs.runner import write_tables

    rng = np.random.default_rng(0)
    n = 200
    cosine = rng.uniform(-0.3, 0.3, n).astype(np.float32)
    table = pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "shard": ["s"] * n,
            "key": [f"{i:04d}" for i in range(n)],
            "clip_cosine": cosine,
            "clip_score": (2.5 * np.maximum(cosine, 0)).astype(np.float32),
            "itm": rng.uniform(0, 100, n).astype(np.float32),
            "error": pa.nulls(n, pa.string()),
            "error_detail": pa.nulls(n, pa.string()),
        }
    )
    write_tables(tmp_path / "run", "score", {"s": table})
    run = open_run(tmp_path / "run")
    data = gather_report(run, run.url, options=ReportOptions(gallery_size=0))
    compared = {frozenset((p.a, p.b)) for p in data.pairs}
    assert frozenset(("clip_cosine", "clip_score")) not in compared
    assert frozenset(("clip_score", "itm")) in compared


def test_an_error_chart_of_one_reason_has_room_for_its_labels():
    import warnings

    from mlmfilter.report import plots

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib: "axes sizes collapsed to zero" when the figure is too small
        svg = plots.bar_svg({"truncated_image": 1}, "error rows by reason")
    assert "truncated_image" in svg and "error rows by reason" in svg
