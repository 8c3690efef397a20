"""`--json`: score, select and reshard print one JSON object on stdout and nothing else there.

Run as real processes, so stdout and stderr are the real, separate streams a pipeline sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import numpy as np

from tests.support.builders import flickr_shards, write_shard


def mlmfilter(*args) -> tuple[dict, str]:
    """Run the CLI; returns the parsed stdout (must be exactly one JSON object) and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "mlmfilter.cli.app", *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.endswith("\n"), done.stdout
    return json.loads(done.stdout), done.stderr


def test_score_select_reshard_print_json_on_stdout(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=4)
    write_shard(tmp_path / "in" / "00000002.tar", [{"key": "bad", "jpg": b"not a jpeg", "txt": "a dog on the beach"}])
    run = tmp_path / "run"

    score, _ = mlmfilter("score", tmp_path / "in" / "*.tar", "-o", run, "--scorer", "rules", "--json")
    assert score["ok"] is True and score["shards_total"] == 3 and len(score["shards_completed"]) == 3
    assert score["stats"]["read"] == 9 and score["stats"]["errors"] == {"undecodable_image": 1}
    assert score["run_dir"] == str(run)
    again, _ = mlmfilter("score", tmp_path / "in" / "*.tar", "-o", run, "--scorer", "rules", "--json")
    assert len(again["shards_skipped"]) == 3 and again["shards_completed"] == []  # resumed: nothing redone

    select, stderr = mlmfilter("select", run, "--where", "rules_words >= 3", "--json")
    assert "kept" not in stderr  # the human summary is not printed as well
    assert select["counts"]["read"] == 9 and select["counts"]["errored"] == 1
    assert select["counts"]["kept"] == len(np.load(run / "selection" / "uids.npy")) > 0
    assert select == json.loads((run / "selection" / "selection.json").read_text())

    reshard, _ = mlmfilter("reshard", run / "selection", tmp_path / "out", "--json")
    assert reshard["kept"] == select["counts"]["kept"] and reshard["kept_uids_not_found"] == 0
    assert len(reshard["shards"]) == reshard["written_shards"] == 1
    with tarfile.open(reshard["shards"][0]) as tar:
        assert len([m for m in tar.getnames() if m.endswith(".txt")]) == reshard["kept"]


def test_errors_stay_off_stdout(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mlmfilter.cli.app", "select", str(tmp_path), "--where", "x", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "is not a run folder" in done.stderr
