"""Received run folders that are broken or hostile: links inside, damaged records, markers that are
folders, a read-only disk, a full disk. Each ends with one line naming the file, or is redone where
that is right; nothing is ever written outside the folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlmfilter import api
from mlmfilter.cli.app import app
from tests.support.builders import flickr_shards


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())  # one line whatever the terminal width


@pytest.fixture()
def scored(tmp_path, flickr_pairs) -> tuple[Path, list[str]]:
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=3)
    inputs = [str(tmp_path / "in" / "*.tar")]
    api.score(inputs, tmp_path / "run", ["rules"], decode_workers=0)
    return tmp_path / "run", inputs


def _score_args(run: Path, inputs: list[str], *more: str) -> list[str]:
    return ["score", *inputs, "-o", str(run), "--scorer", "rules", "--decode-workers", "0", *more]


# -- links inside a run folder --------------------------------------------------------------------
@pytest.mark.parametrize("inside", ["logs", "score/tables", "score/completions"])
def test_a_link_inside_a_run_folder_is_never_written_through(scored, tmp_path, flickr_pairs, inside):
    run, inputs = scored
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(run / inside)
    os.symlink(elsewhere, run / inside)
    flickr_shards(flickr_pairs, tmp_path / "more", n_shards=1, per_shard=2)  # new work for the run
    code, output = _cli(*_score_args(run, inputs + [str(tmp_path / "more" / "*.tar")]))
    assert code == 2, output
    assert f"{run / inside} is a symbolic link" in output and "never writes through a link" in output
    assert list(elsewhere.iterdir()) == []


def test_select_never_writes_its_selection_through_a_link_in_the_run(scored, tmp_path):
    run, _ = scored
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, run / "selection")
    code, output = _cli("select", run, "--where", "rules_words >= 0")
    assert code == 2, output
    assert f"{run / 'selection'} is a symbolic link" in output
    assert list(elsewhere.iterdir()) == []


def test_a_planted_lock_link_is_never_truncated(scored, tmp_path):
    run, inputs = scored
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (run / ".lock").unlink(missing_ok=True)
    os.symlink(precious, run / ".lock")
    code, output = _cli(*_score_args(run, inputs))
    assert code == 2 and f"{run / '.lock'} is a symbolic link" in output, output
    assert precious.read_text() == "keep me"


# -- damaged records ------------------------------------------------------------------------------
def test_a_marker_that_is_a_folder_is_named_in_one_line(scored):
    run, inputs = scored
    marker = run / "score" / "completions" / "00000000.json"
    marker.unlink()
    marker.mkdir()
    code, output = _cli(*_score_args(run, inputs))
    assert code == 2, output
    assert f"{marker} is a folder, not a completion marker" in output and "Traceback" not in output


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "it is empty"),
        ("sources: [unclosed", "invalid YAML"),
        ("- a\n- b\n", "a list, not a mapping"),
        ("{}\n", "registers no input shard"),
        ("mlmfilter: 0.1.0\ninputs: []\n", "registers no input shard"),
    ],
)
def test_an_empty_or_invalid_run_yaml_is_named_by_every_command(scored, tmp_path, text, problem):
    run, inputs = scored
    (run / "run.yaml").write_text(text)
    for args in (_score_args(run, inputs), ["select", run, "--where", "rules_ok"], ["inspect", run]):
        code, output = _cli(*args)
        assert code == 2, (args, output)
        assert f"{run / 'run.yaml'} is not a run record" in output and problem in output, (args, output)


def test_a_run_yaml_without_sources_is_not_a_run_of_zero_shards(scored):
    run, _ = scored
    (run / "run.yaml").write_text("mlmfilter: 1\nsources: just a string\n")
    code, output = _cli("select", run, "--where", "rules_ok")
    assert code == 2 and "is not a run record" in output and "0 of 0" not in output, output


def test_an_invalid_stage_yaml_is_named(scored):
    run, inputs = scored
    (run / "score" / "stage.yaml").write_text("kind: score\nfingerprint: [oops\n")
    code, output = _cli(*_score_args(run, inputs))
    assert code == 2 and f"{run / 'score' / 'stage.yaml'} is not a stage's settings" in output, output


def test_garbage_provenance_is_named(scored):
    run, inputs = scored
    (run / "score" / "provenance.json").write_bytes(b"\x00\x01 not json")
    for args in (_score_args(run, inputs), ["stats", run]):
        code, output = _cli(*args)
        assert code == 2, (args, output)
        assert f"{run / 'score' / 'provenance.json'} is not a stage's provenance" in output, (args, output)


def test_a_garbage_stats_file_makes_its_shard_redone(scored):
    run, inputs = scored
    (run / "score" / "stats" / "00000001.json").write_text("{ garbage")
    code, output = _cli(*_score_args(run, inputs, "--json"))
    assert code == 0, output
    summary = json.loads(CliRunner().invoke(app, _score_args(run, inputs, "--json")).stdout)
    assert summary["stats"]["read"] == 6
    assert json.loads((run / "score" / "stats" / "00000001.json").read_text())["read"] == 3


# -- a read-only folder, a full disk --------------------------------------------------------------
def _namespaced(script: str) -> subprocess.CompletedProcess:
    """``script`` in a private mount namespace (root only): mounts there vanish with it."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a read-only or a full filesystem")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode()[:200]}")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)


def _mlmfilter(*args) -> str:
    return " ".join([sys.executable, "-m", "mlmfilter.cli.app", *map(lambda a: f"'{a}'", args)])


def test_a_no_op_resume_of_a_finished_run_works_on_a_read_only_filesystem(scored):
    run, inputs = scored
    done = _namespaced(
        f"mount --bind {run} {run} && mount -o remount,bind,ro {run} && "
        + _mlmfilter(*_score_args(run, inputs, "--json"))
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["ok"] and len(summary["shards_skipped"]) == 2 and summary["stats"]["read"] == 6


def test_a_full_disk_leaves_no_temp_files_in_a_selection_or_reshard_output(scored, tmp_path):
    run, _ = scored
    disk = tmp_path / "disk"
    disk.mkdir()
    # a 64 KiB filesystem, filled but for a few bytes: the outputs start, then the disk is full
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {disk} && mkdir {disk}/sel {disk}/out && "
        f"(head -c 65536 /dev/zero > {disk}/filler 2>/dev/null; true) && "
        f"{_mlmfilter('select', run, '--where', 'rules_words >= 0', '-o', disk / 'sel')}; echo select=$?; "
        f"{_mlmfilter('reshard', run / 'selection', disk / 'out')}; echo reshard=$?; "
        f"ls -A {disk}/sel {disk}/out"
    )
    api.select(run, expression="rules_words >= 0")  # the selection reshard reads, on the real disk
    done = _namespaced(script)
    lines = done.stdout.splitlines()
    assert "select=1" in lines and "reshard=1" in lines, done.stdout + done.stderr[-2000:]
    listed = [line for line in lines if line and "=" not in line and not line.endswith(":")]
    assert not [name for name in listed if name.endswith(".tmp")], done.stdout
    assert "No space left on device" in done.stderr and "Traceback" not in done.stderr
