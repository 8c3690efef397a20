"""Ctrl-C during `mlmfilter reshard` (a real SIGINT to a real process): exit 130 and one line saying how
many kept pairs are in complete output shards and that a re-run needs --overwrite; the re-run completes."""

from __future__ import annotations

import tarfile

import pyarrow.parquet as pq
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support.builders import flickr_shards
from tests.support.interrupt import interrupt_when, mlmfilter_command

runner = CliRunner()


def test_ctrl_c_during_reshard_exits_130_and_says_what_was_written(tmp_path, flickr_pairs):
    first, second = flickr_shards(flickr_pairs[:6], tmp_path / "in", n_shards=2, per_shard=3)
    stall = tmp_path / "stall"  # while it exists, reading the second shard takes seconds
    inputs = [f"pipe:cat {first}", f"pipe:test -e {stall} && sleep 4; cat {second}"]
    run, selection, out = tmp_path / "run", tmp_path / "sel", tmp_path / "out"
    scored = runner.invoke(app, ["score", *inputs, "-o", str(run), "--scorer", "rules", "--allow-pipe"])
    assert scored.exit_code == 0, scored.output
    chosen = runner.invoke(app, ["select", str(run), "--where", "rules_chars > 0", "-o", str(selection)])
    assert chosen.exit_code == 0, chosen.output
    kept = pq.read_table(selection / "kept.parquet")
    assert kept.num_rows == 6 and kept["shard"].to_pylist()[-1] == "00000001"  # the stalled shard comes last

    stall.touch()
    code, output = interrupt_when(
        mlmfilter_command("reshard", selection, out, "--samples-per-shard", "1", "--allow-pipe"),
        lambda: len(list(out.glob("*.tar"))) >= 3,  # the first shard's pairs are written
    )
    assert code == 130, output
    text = " ".join(output.split())
    assert (
        f"interrupted: 3 of 6 kept pairs done; 3 complete shards are in {out}: "
        "re-run the same command with --overwrite to write them all again"
    ) in text, output
    assert "Traceback" not in output and "Aborted" not in output
    assert len(list(out.glob("*.tar"))) == 3 and not [p for p in out.iterdir() if not p.name.endswith(".tar")]

    stall.unlink()
    again = runner.invoke(app, ["reshard", str(selection), str(out), "--samples-per-shard", "1", "--allow-pipe"])
    assert again.exit_code == 2 and "--overwrite" in again.output  # never mixes old shards with new ones
    again = runner.invoke(
        app, ["reshard", str(selection), str(out), "--samples-per-shard", "1", "--allow-pipe", "--overwrite"]
    )
    assert again.exit_code == 0, again.output
    keys = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".txt")]
    assert sorted(keys) == sorted(kept["uid"].to_pylist())
