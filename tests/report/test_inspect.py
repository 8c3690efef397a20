"""`mlmfilter inspect` and `mlmfilter stats` on a real run folder."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support.headless import check_page
from tests.support.report import build_run, make_shards, scores_of


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, flickr_pairs):
    root = tmp_path_factory.mktemp("inspect-run")
    return build_run(root / "run", make_shards(flickr_pairs, root / "shards"))


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_inspect_lists_matching_pairs_with_captions_from_the_shards(run_dir, flickr_pairs):
    scores = scores_of(run_dir)
    failing = [i for i, flag in enumerate(scores["rules_ok"]) if flag is False]
    assert failing, "the test run needs pairs failing rules_ok"
    result = _invoke("inspect", run_dir, "--where", "not rules_ok", "--limit", 20)
    assert result.exit_code == 0, result.output
    assert f"{len(failing)} pair(s) match not rules_ok" in result.output
    flat = re.sub(r"[\s│|]+", " ", result.output)
    captions = {f"{s:04d}{i:04d}": flickr_pairs[(s * 6 + i) % len(flickr_pairs)][1] for s in range(2) for i in range(6)}
    for i in failing:
        assert scores["uid"][i] in result.output
        assert " ".join(captions[scores["key"][i]].split()[:3]) in flat  # the caption, read from the tar
    assert not any(scores["uid"][i] in result.output for i, flag in enumerate(scores["rules_ok"]) if flag)


def test_inspect_errors_and_limit(run_dir):
    result = _invoke("inspect", run_dir, "--where", "error == 'truncated_image'")
    assert result.exit_code == 0, result.output
    assert "1 pair(s) match" in result.output and "truncated_image" in result.output
    everything = _invoke("inspect", run_dir, "--limit", 2)
    assert "12 pair(s) match (everything); showing 2" in everything.output


def test_inspect_contact_sheet_in_chromium(run_dir, tmp_path):
    sheet = tmp_path / "sheet.html"
    result = _invoke("inspect", run_dir, "--where", "clip_score > 0", "--limit", 5, "--html", sheet)
    assert result.exit_code == 0, result.output
    probe = check_page(sheet, tmp_path)
    assert probe["thumbs"] == 5 and probe["decoded"] == 5 and probe["broken"] == []
    assert probe["warning_color"] == "rgb(176, 0, 32)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--where", "itm >"], "invalid syntax"),
        (["--where", "itmm > 3"], "unknown column 'itmm'"),
        (["--column", "nope"], "no column 'nope'"),
    ],
)
def test_inspect_refuses_mistakes_in_one_line(run_dir, args, message):
    result = _invoke("inspect", run_dir, *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_stats_prints_quantiles_and_a_histogram(run_dir):
    result = _invoke("stats", run_dir, "--column", "clip_score", "--bins", 8)
    assert result.exit_code == 0, result.output
    values = np.array([v for v in scores_of(run_dir)["clip_score"] if v is not None], dtype=np.float64)
    assert f"clip_score: {len(values)} values, 2 missing" in result.output
    rows = dict(re.findall(r"^\s*(\d+)%\s+([-\d.]+)", result.output, re.M))
    assert float(rows["0"]) == pytest.approx(values.min(), rel=1e-3)
    assert float(rows["100"]) == pytest.approx(values.max(), rel=1e-3)
    bars = [line for line in result.output.splitlines() if "█" in line]
    assert len(bars) >= 1 and sum(
        int(line.split()[2])
        for line in result.output.splitlines()
        if re.match(r"^\s*[-\d.]+\s+[-\d.]+\s+\d+(\s|$)", line)
    ) == len(values)
    assert "RANDOM WEIGHTS" in result.output


def test_stats_refuses_unknown_columns_and_non_runs(run_dir, tmp_path):
    unknown = _invoke("stats", run_dir, "-c", "itmm")
    assert unknown.exit_code == 2 and "no numeric score column 'itmm'" in " ".join(unknown.output.split())
    result = _invoke("stats", tmp_path)
    assert result.exit_code == 2 and "not a run folder" in " ".join(result.output.split())


def test_a_broken_shard_row_is_shown_without_a_lookup(tmp_path, flickr_pairs):
    from mlmfilter.report import write_report

    run = build_run(tmp_path / "run", make_shards(flickr_pairs, tmp_path / "shards", per_shard=3, cut_last=True))
    assert "truncated_shard" in scores_of(run)["error"]
    result = _invoke("inspect", run, "--where", "error == 'truncated_shard'")
    assert result.exit_code == 0 and "(no sample:" in result.output, result.output  # the cell wraps
    assert "not found in their shards" not in result.output
    text = write_report(run, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "truncated_shard (1)" in text and "no sample: truncated_shard" in text
    assert "could not be found in their shards again" not in text
