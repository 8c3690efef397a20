"""End to end: real tar shards -> run folder, error rows, resume after a real kill, parallel == serial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mlmfilter import api
from mlmfilter.runs.folder import ConfigMismatch, RunFolder
from tests.support.builders import flickr_shards, scores_dataset, write_shard


def read_run(run_dir: Path):
    return scores_dataset(run_dir).to_table().sort_by("uid")


@pytest.fixture()
def broken_shard(tmp_path, flickr_pairs) -> Path:
    good = flickr_pairs[0][0].read_bytes()
    return write_shard(
        tmp_path / "in" / "broken.tar",
        [
            {"key": "ok", "jpg": good, "txt": "A child in a pink dress is climbing up a set of stairs ."},
            {"key": "cut", "jpg": good[: len(good) // 3], "txt": "a truncated photo of a girl on stairs"},
            {"key": "zero", "jpg": b"", "txt": "an empty file pretending to be a photo"},
            {"key": "empty", "jpg": good, "txt": "   "},
            {"key": "nocap", "jpg": good},
            {"key": "latin1", "jpg": good, "txt": "caf\xe9 au lait on a table".encode("latin-1")},
        ],
    )


def test_rules_run_writes_table_stats_and_error_rows(tmp_path, broken_shard):
    summary = api.score([str(broken_shard)], tmp_path / "run", ["rules"])
    table = read_run(summary.run_dir).to_pylist()
    by_key = {r["key"]: r for r in table}
    assert set(by_key) == {"ok", "cut", "zero", "empty", "nocap", "latin1"}
    assert by_key["ok"]["error"] is None and by_key["ok"]["rules_ok"] is True
    assert by_key["ok"]["rules_min_side"] >= 300  # a real ~500x375 Flickr photo
    assert by_key["cut"]["error"] == "truncated_image"
    assert by_key["zero"]["error"] == "empty_image"
    assert by_key["empty"]["error"] == "empty_caption"
    assert by_key["nocap"]["error"] == "missing_caption"
    assert by_key["latin1"]["error"] == "caption_not_utf8"
    for key in ("cut", "zero", "empty", "nocap"):
        assert by_key[key]["rules_ok"] is None  # errored rows carry no scores
    stats = json.loads((summary.run_dir / "score" / "stats.json").read_text())
    assert stats["read"] == 6 and stats["ok"] == 1 and stats["errored"] == 5
    assert stats["errors"]["truncated_image"] == 1
    assert (summary.run_dir / "score" / "completions" / "broken.json").exists()
    assert (summary.run_dir / "score" / "provenance.json").exists()


def test_truncated_tar_keeps_members_before_the_break(tmp_path, flickr_pairs):
    shard = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=6)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    summary = api.score([str(shard)], tmp_path / "run", ["rules"])
    rows = read_run(summary.run_dir).to_pylist()
    good = [r for r in rows if r["error"] is None]
    assert 2 <= len(good) < 6
    assert sum(r["error"] == "truncated_shard" for r in rows) == 1


def test_parallel_workers_equal_serial(tmp_path, flickr_pairs):
    shards = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=3, per_shard=5)
    inputs = [str(tmp_path / "in" / "{00000000..00000002}.tar")]
    serial = api.score(inputs, tmp_path / "serial", ["rules"], workers=1, decode_workers=0)
    parallel = api.score(inputs, tmp_path / "parallel", ["rules"], workers=2, decode_workers=1)
    assert serial.stats.rows == parallel.stats.rows == 15
    assert read_run(serial.run_dir).equals(read_run(parallel.run_dir))
    assert len(shards) == len(parallel.shards_completed) == 3


def test_resume_skips_done_shards_and_refuses_other_settings(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=3)
    inputs = [str(tmp_path / "in" / "*.tar")]
    first = api.score(inputs, tmp_path / "run", ["rules"])
    again = api.score(inputs, tmp_path / "run", ["rules"])
    assert len(first.shards_completed) == 2 and again.shards_completed == [] and len(again.shards_skipped) == 2
    with pytest.raises(ConfigMismatch):
        api.score(inputs, tmp_path / "run", [{"name": "rules", "options": {"min_words": 5}}])


def test_killed_run_resumes_to_identical_output(tmp_path, flickr_pairs):
    """Kill a real `mlmfilter score` process mid-run; re-running finishes with no lost or duplicated uid."""
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=6, per_shard=40)
    cmd = [
        sys.executable,
        "-m",
        "mlmfilter.cli.app",
        "score",
        str(tmp_path / "in" / "*.tar"),
        "--scorer",
        "rules",
        "--decode-workers",
        "0",
    ]
    reference = subprocess.run(cmd + ["-o", str(tmp_path / "ref")], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "run"
    proc = subprocess.Popen(
        cmd + ["-o", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if RunFolder(run).stage("score").done_shards():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    done_before = len(RunFolder(run).stage("score").done_shards())  # a killed marker write leaves only a .tmp
    assert 1 <= done_before < 6, "the kill must land mid-run for this test to mean anything"
    # a shard may have its table but not its marker yet: it is redone, never counted twice
    assert done_before <= len(list((run / "score" / "tables").glob("*.parquet"))) <= done_before + 1

    resumed = subprocess.run(cmd + ["-o", str(run)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert len(RunFolder(run).stage("score").done_shards()) == 6
    table = read_run(run)
    assert table.num_rows == 240 and len(set(table["uid"].to_pylist())) == 240
    assert table.equals(read_run(tmp_path / "ref"))
    for path in (run / "score" / "tables").glob("*.parquet"):
        pq.read_table(path)  # every file is whole
