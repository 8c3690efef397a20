"""What a run counts as its inputs: every partition's shards, a shard named twice once, two shards
with one file name apart, and a model folder however it is spelled."""

from __future__ import annotations

import os
import shutil

import numpy as np
from typer.testing import CliRunner

from mlmfilter import api
from mlmfilter.cli.app import app
from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.folder import RunFolder
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import partition_sources
from tests.support.builders import flickr_shards, write_shard


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def _score(inputs, run, *more) -> tuple[int, str]:
    return _cli("score", *inputs, "-o", run, "--scorer", "rules", "--decode-workers", "0", *more)


# -- partitions -----------------------------------------------------------------------------------
def test_a_partition_that_never_ran_leaves_the_run_incomplete(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=6, per_shard=2)
    inputs = [str(tmp_path / "in" / "*.tar")]
    shares = [partition_sources(expand_inputs(inputs), f"{i}/3") for i in range(3)]
    absent = next(i for i, share in enumerate(shares) if share)  # the job that never runs
    run = tmp_path / "run"
    for i in range(3):
        if i != absent:
            code, output = _score(inputs, run, "--partition", f"{i}/3")
            assert code == 0, output

    done = 6 - len(shares[absent])
    code, output = _cli("select", run, "--where", "rules_words >= 0")
    assert code == 2 and "is incomplete" in output and f"{done} of 6 shards done" in output, output
    code, output = _cli("select", run, "--where", "rules_words >= 0", "--allow-incomplete")
    assert code == 0 and f"read {2 * done} rows" in output, output

    code, output = _score(inputs, run, "--partition", "0/2")  # another split would score shards twice
    assert code == 2 and "--partition i/3 jobs" in output and "Traceback" not in output, output
    code, output = _score(inputs, run, "--partition", f"{absent}/3")
    assert code == 0, output
    assert RunFolder(run).completeness("score").complete
    code, output = _cli("select", run, "--where", "rules_words >= 0")
    assert code == 0 and "read 12 rows" in output, output
    code, output = _score(inputs, run, "--partition", "1/2")  # a finished stage takes any split
    assert code == 0, output


# -- a shard named twice, two shards with one name ------------------------------------------------
def test_the_same_shard_named_twice_is_scored_once_and_flagged(tmp_path, flickr_pairs):
    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=4)
    os.symlink(shard, tmp_path / "in" / "alias.tar")  # the same file under another name
    run = tmp_path / "run"
    code, output = _score([str(shard), str(tmp_path / "in" / "*.tar"), str(shard)], run)
    assert code == 0, output
    assert "input shard(s) were named more than once and are read once" in output
    assert len(RunFolder(run).sources()) == 1
    selection = api.select(run, top_fraction=0.5, by="rules_words")
    assert selection.read == 4 and selection.kept == 2
    assert len(np.load(run / "selection" / "uids.npy")) == 2


def test_two_shards_with_one_file_name_never_share_uids(tmp_path, flickr_pairs):
    pairs = flickr_pairs[:6]
    for folder, chunk in (("a", pairs[:3]), ("b", pairs[3:])):
        write_shard(
            tmp_path / folder / "00000.tar",
            [{"key": f"{i:04d}", "jpg": p.read_bytes(), "txt": c} for i, (p, c) in enumerate(chunk)],
        )
    run = tmp_path / "run"
    api.score([str(tmp_path / "a" / "00000.tar")], run, ["rules"], decode_workers=0)
    before = RunReader(run).table("00000", "score")["uid"].to_pylist()
    summary = api.score([str(tmp_path / "b" / "00000.tar")], run, ["rules"], decode_workers=0)
    assert summary.ok
    uids = RunReader(run).dataset("score").to_table()["uid"].to_pylist()
    assert len(uids) == len(set(uids)) == 6
    assert RunReader(run).table("00000", "score")["uid"].to_pylist() == before  # the first keeps its uids
    selection = api.select(run, expression="rules_words >= 0")
    assert selection.kept == 6 and len(np.load(run / "selection" / "uids.npy")) == 6
    # the first shard's uids are the file-name recipe's, wherever the shard is read from
    elsewhere = tmp_path / "copy" / "00000.tar"
    elsewhere.parent.mkdir()
    shutil.copy(tmp_path / "a" / "00000.tar", elsewhere)
    api.score([str(elsewhere)], tmp_path / "run2", ["rules"], decode_workers=0)
    assert RunReader(tmp_path / "run2").table("00000", "score")["uid"].to_pylist() == before


# -- one model folder, two spellings --------------------------------------------------------------
def test_one_model_folder_spelled_two_ways_is_one_setting(tmp_path, flickr_pairs, tiny_clip_dir, monkeypatch):
    shards = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=2)
    model = tmp_path / "m"
    shutil.copytree(tiny_clip_dir, model)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code, output = _cli("score", shards[0], "-o", run, "-s", "clip", "--model", "./m", "--decode-workers", "0")
    assert code == 0, output
    code, output = _cli("score", *shards, "-o", run, "-s", "clip", "--model", "m/", "--decode-workers", "0")
    assert code == 0 and "1 resumed" in output, output
    markers = [RunReader(run).marker(shard_id, "score")["fingerprint"] for shard_id in ("00000000", "00000001")]
    assert markers[0] == markers[1]
    other = tmp_path / "m2"
    shutil.copytree(tiny_clip_dir, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace("}", ', "note": 1}', 1))
    code, output = _cli("score", *shards, "-o", run, "-s", "clip", "--model", "m2", "--decode-workers", "0")
    assert code == 2 and "other settings" in output, output  # another model still is another setting
