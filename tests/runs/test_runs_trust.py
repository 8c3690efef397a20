"""Runs you can trust: identity-checked resume, growing inputs, infrastructure failures, locks,
markers that are verified, safe reshard. Each test is a defect a user met with the old run layer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlmfilter import api
from mlmfilter.io.reshard import ReshardError
from mlmfilter.runs.folder import ConfigMismatch, RunFolder, RunLock, RunLocked, SourceChanged
from mlmfilter.runs.read import RunReader
from mlmfilter.selection.select import SelectionError
from tests.support.builders import build_tiny_clip, flickr_shards, scores_dataset, write_shard

REPO = Path(__file__).resolve().parents[2]


def uids_of(run_dir) -> list[str]:
    return sorted(scores_dataset(run_dir).to_table(columns=["uid"])["uid"].to_pylist())


@pytest.fixture()
def two_folders(tmp_path, flickr_pairs):
    """a/0001.tar and b/0001.tar: same file name, different pairs."""
    a = write_shard(
        tmp_path / "a" / "0001.tar",
        [{"key": f"a{i}", "jpg": flickr_pairs[i][0].read_bytes(), "txt": flickr_pairs[i][1]} for i in range(3)],
    )
    b = write_shard(
        tmp_path / "b" / "0001.tar",
        [{"key": f"b{i}", "jpg": flickr_pairs[i + 3][0].read_bytes(), "txt": flickr_pairs[i + 3][1]} for i in range(4)],
    )
    return a, b


def test_a_shard_with_a_taken_name_is_scored_not_skipped(tmp_path, two_folders):
    a, b = two_folders
    run = tmp_path / "run"
    api.score([str(a)], run, ["rules"], decode_workers=0)
    second = api.score([str(b)], run, ["rules"], decode_workers=0)
    assert second.shards_skipped == [] and len(second.shards_completed) == 1
    assert len(uids_of(run)) == 7 == len(set(uids_of(run)))
    ids = sorted(RunFolder(run).sources())
    assert ids[0] == "0001" and ids[1].startswith("0001-")
    # both together again: nothing renamed, nothing redone, select reads every pair once
    again = api.score([str(a), str(b)], run, ["rules"], decode_workers=0)
    assert sorted(again.shards_skipped) == ids and again.shards_completed == []
    result = api.select(run, expression="rules_ok or not rules_ok")
    assert result.read == 7 and not result.notes


def test_scoring_in_parts_extends_the_run_and_reshard_keeps_every_part(tmp_path, two_folders):
    a, b = two_folders
    run = tmp_path / "run"
    api.score([str(a)], run, ["rules"], decode_workers=0)
    api.score([str(b)], run, ["rules"], decode_workers=0)
    record = RunFolder(run).read_record()
    assert {s["url"] for s in record["sources"].values()} == {str(a), str(b)}
    assert record["inputs"] == [str(a), str(b)]
    api.select(run, expression="rules_words >= 0")
    stats = api.reshard(run / "selection", tmp_path / "out")
    assert stats["kept"] == 7 and stats["kept_uids_not_found"] == 0


def test_a_dead_decode_pool_fails_the_shard_instead_of_writing_error_rows(tmp_path, flickr_pairs, monkeypatch):
    import mlmfilter.images.pool as decode_pool
    from tests.support.builders import dying_initializer

    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=4)
    monkeypatch.setattr(decode_pool, "worker_initializer", dying_initializer)
    broken = api.score([str(shard)], tmp_path / "run", ["rules"], decode_workers=1)
    assert not broken.ok and list(broken.shards_failed) == ["00000000"]
    assert "DecodePoolError" in broken.shards_failed["00000000"]
    stage = RunFolder(tmp_path / "run").stage("score")
    assert stage.done_shards() == [] and not (tmp_path / "run" / "score" / "tables" / "00000000.parquet").exists()
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "logs").glob("*.log"))
    assert "DecodePoolError" in logs and "Traceback" in logs  # the failure's traceback is in the log
    monkeypatch.undo()
    fixed = api.score([str(shard)], tmp_path / "run", ["rules"], decode_workers=1)
    assert fixed.ok and fixed.shards_completed == ["00000000"]
    table = scores_dataset(tmp_path / "run").to_table()
    assert table.num_rows == 4 and table["error"].null_count == 4


def test_the_python_api_works_from_a_script_without_a_main_guard(tmp_path, flickr_pairs):
    shards = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=3)
    script = tmp_path / "plain.py"
    script.write_text(
        textwrap.dedent(f"""
        import mlmfilter
        run = mlmfilter.score([{str(tmp_path / "in" / "*.tar")!r}], {str(tmp_path / "run")!r}, ["rules"], workers=2)
        print("OK", run.ok, run.stats.ok, run.notes)
    """)
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK True 6" in result.stdout and "if __name__" in result.stdout
    assert len(shards) == 2


def test_resuming_a_random_fallback_run_with_the_real_model_is_refused(tmp_path, flickr_pairs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    model = tmp_path / "clip-model"
    options = {"model": str(model), "allow_random_fallback": True, "dtype": "fp32"}
    first = api.score([str(shard)], tmp_path / "run", [{"name": "clip", "options": options}], decode_workers=0)
    assert any("random" in w.lower() for w in first.provenance["warnings"])
    build_tiny_clip(model)  # the real model appears where the name pointed
    with pytest.raises(ConfigMismatch, match="other settings"):
        api.score([str(shard)], tmp_path / "run", [{"name": "clip", "options": options}], decode_workers=0)
    provenance = json.loads((tmp_path / "run" / "score" / "provenance.json").read_text())
    assert any("random" in w.lower() for w in provenance["warnings"])  # never rewritten away


def test_a_run_folder_works_from_any_directory(tmp_path, flickr_pairs, monkeypatch):
    flickr_shards(flickr_pairs, tmp_path / "data", n_shards=2, per_shard=3)
    monkeypatch.chdir(tmp_path)
    api.score(["data/*.tar"], "run", ["rules"], decode_workers=0)
    api.select("run", expression="rules_words >= 0")
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    elsewhere = tmp_path / "cwd2"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shutil.move(str(tmp_path / "run"), moved)  # the run moves with its selection inside it
    stats = api.reshard(moved / "selection", "out")
    assert stats["kept"] == 6
    again = api.score([str(tmp_path / "data" / "*.tar")], moved, ["rules"], decode_workers=0)
    assert len(again.shards_skipped) == 2


def test_select_refuses_an_incomplete_run_unless_allowed(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=3, per_shard=3)
    run = tmp_path / "run"
    api.score([str(tmp_path / "in" / "*.tar")], run, ["rules"], decode_workers=0)
    (run / "score" / "completions" / "00000001.json").unlink()  # as if that shard had failed
    with pytest.raises(SelectionError, match="incomplete: 2 of 3"):
        api.select(run, top_fraction=0.5, by="rules_words")
    result = api.select(run, top_fraction=0.5, by="rules_words", allow_incomplete=True)
    assert result.read == 6
    info = json.loads((run / "selection" / "selection.json").read_text())
    assert info["completeness"]["complete"] is False and info["completeness"]["missing"] == ["00000001"]


def test_reshard_refuses_non_empty_and_input_folders_and_overwrite_replaces(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=3)
    run = tmp_path / "run"
    api.score([str(tmp_path / "in" / "*.tar")], run, ["rules"], decode_workers=0)
    api.select(run, expression="rules_words >= 0")
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000007.tar").write_bytes(b"an old shard")
    with pytest.raises(ReshardError, match="not empty"):
        api.reshard(run / "selection", out)
    with pytest.raises(ReshardError, match="destroy the inputs"):
        api.reshard(run / "selection", tmp_path / "in", overwrite=True)
    assert len(list((tmp_path / "in").glob("*.tar"))) == 2
    stats = api.reshard(run / "selection", out, overwrite=True, samples_per_shard=4)
    assert sorted(os.listdir(out)) == ["00000000.tar", "00000001.tar"] and stats["removed_old_files"] == [
        "00000007.tar"
    ]


def test_reshard_writes_the_selected_row_of_a_repeated_uid_and_updates_the_json_caption(tmp_path, flickr_pairs):
    from mlmfilter.io.readers import read_shard
    from mlmfilter.io.sources import expand_inputs

    photo = flickr_pairs[0][0].read_bytes()
    uid = "ab" * 16
    write_shard(
        tmp_path / "in" / "x.tar",
        [
            {"key": "first", "jpg": photo, "txt": "a", "json": {"uid": uid, "caption": "a"}},
            {
                "key": "second",
                "jpg": photo,
                "txt": "two dogs run on the wet sand by the sea",
                "json": {"uid": uid, "caption": "two dogs run on the wet sand by the sea"},
            },
        ],
    )
    run = tmp_path / "run"
    api.score([str(tmp_path / "in" / "x.tar")], run, ["rules"], decode_workers=0)
    api.select(run, expression="rules_words >= 5")  # only the second row passes
    stats = api.reshard(run / "selection", tmp_path / "out", captions={uid: "Two brown dogs running on a beach."})
    (written,) = [s for src in expand_inputs([str(tmp_path / "out" / "*.tar")]) for s in read_shard(src)]
    assert stats["kept"] == 1 and written.caption == "Two brown dogs running on a beach."
    assert written.meta["caption"] == "Two brown dogs running on a beach."
    assert written.meta["original_caption"] == "two dogs run on the wet sand by the sea"


def test_cli_reshard_exits_non_zero_when_kept_pairs_are_missing(tmp_path, flickr_pairs):
    from typer.testing import CliRunner

    from mlmfilter.cli.app import app

    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=3)
    run = tmp_path / "run"
    api.score([str(shard)], run, ["rules"], decode_workers=0)
    api.select(run, expression="rules_words >= 0")
    flickr_shards(flickr_pairs[5:], tmp_path / "other", n_shards=1, per_shard=2)
    shutil.copy(tmp_path / "other" / "00000000.tar", shard)  # the shard now holds other pairs
    os.utime(shard, (1, 1))
    result = CliRunner().invoke(app, ["reshard", str(run / "selection"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "not found" in result.output


def test_pipe_inputs_are_allowed_only_by_this_command_line(tmp_path, flickr_pairs):
    from mlmfilter.api import ScoreConfig

    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    with pytest.raises(ValueError, match="allow_pipe"):
        ScoreConfig(inputs=[str(shard)], output=str(tmp_path / "run"), allow_pipe=True)  # a recipe cannot
    run = tmp_path / "run"
    api.score([f"pipe:cat {shard}"], run, ["rules"], allow_pipe=True, decode_workers=0)
    api.select(run, expression="rules_words >= 0")
    with pytest.raises(ReshardError, match="allow-pipe"):
        api.reshard(run / "selection", tmp_path / "out")
    assert api.reshard(run / "selection", tmp_path / "out", allow_pipe=True)["kept"] == 2


def test_a_typo_in_a_recipe_is_refused_before_anything_is_written(tmp_path, flickr_pairs):
    from typer.testing import CliRunner

    from mlmfilter.cli.app import app

    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"inputs: [{shard}]\noutput: {tmp_path / 'run'}\nread: {{caption_kye: txt}}\n")
    result = CliRunner().invoke(app, ["score", "--recipe", str(recipe)])
    assert result.exit_code == 2 and "caption_kye" in result.output
    assert not (tmp_path / "run").exists()
    recipe.write_text(
        f"inputs: [{shard}]\noutput: {tmp_path / 'run'}\nscorers: [{{name: rules, options: {{min_wrds: 3}}}}]\n"
    )
    result = CliRunner().invoke(app, ["score", "--recipe", str(recipe)])
    assert result.exit_code == 2 and "min_wrds" in result.output and not (tmp_path / "run").exists()


def test_a_default_run_writes_its_log(tmp_path, flickr_pairs):
    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    api.score([str(shard)], tmp_path / "run", ["rules"], decode_workers=0)
    (log,) = (tmp_path / "run" / "logs").glob("*.log")
    assert log.name.startswith("score-main-") and "shard 00000000 done, 2 rows" in log.read_text()


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path, flickr_pairs):
    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time
        from mlmfilter.runs.folder import RunFolder, RunLock
        with RunLock(RunFolder({str(tmp_path / "run")!r})):
            print("locked", flush=True)
            time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match="in use by another mlmfilter process"):
            api.score([str(shard)], tmp_path / "run", ["rules"], decode_workers=0)
    finally:
        holder.kill()
        holder.wait()
    assert api.score([str(shard)], tmp_path / "run", ["rules"], decode_workers=0).ok  # a dead holder frees it
    with RunLock(RunFolder(tmp_path / "run")):
        with pytest.raises(RunLocked):
            RunLock(RunFolder(tmp_path / "run")).acquire()


def test_a_table_deleted_or_truncated_behind_its_marker_is_redone(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=3, per_shard=3)
    inputs = [str(tmp_path / "in" / "*.tar")]
    run = tmp_path / "run"
    api.score(inputs, run, ["rules"], decode_workers=0)
    reference = scores_dataset(run).to_table().sort_by("uid")
    (run / "score" / "tables" / "00000000.parquet").unlink()
    table_1 = run / "score" / "tables" / "00000001.parquet"
    table_1.write_bytes(table_1.read_bytes()[:100])
    again = api.score(inputs, run, ["rules"], decode_workers=0)
    assert sorted(again.shards_completed) == ["00000000", "00000001"] and again.shards_skipped == ["00000002"]
    assert scores_dataset(run).to_table().sort_by("uid").equals(reference)


def test_a_source_changed_after_scoring_is_refused(tmp_path, flickr_pairs):
    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=3)
    api.score([str(shard)], tmp_path / "run", ["rules"], decode_workers=0)
    flickr_shards(flickr_pairs[4:], tmp_path / "in", n_shards=1, per_shard=2)  # rewritten in place
    with pytest.raises(SourceChanged, match="changed"):
        api.score([str(shard)], tmp_path / "run", ["rules"], decode_workers=0)


def test_workers_die_with_a_killed_main_process(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=8, per_shard=12)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlmfilter.cli.app",
            "score",
            str(tmp_path / "in" / "*.tar"),
            "-o",
            str(run),
            "--scorer",
            "rules",
            "--workers",
            "2",
            "--decode-workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = (
            [int(p.stem.rsplit("-", 1)[1]) for p in (run / "logs").glob("score-worker-*.log")]
            if (run / "logs").exists()
            else []
        )
        time.sleep(0.05)
    assert len(workers) == 2, "the workers must have started for this test to mean anything"
    os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_full_disk_fails_the_shard_and_marks_nothing(tmp_path, flickr_pairs, monkeypatch):
    import errno

    from mlmfilter.runs.storage import RunStorage

    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=2)

    def no_space(self, rel, table):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunStorage, "write_parquet", no_space)
    summary = api.score([str(tmp_path / "in" / "*.tar")], tmp_path / "run", ["rules"], decode_workers=0)
    assert len(summary.shards_failed) == 2 and "No space left" in summary.shards_failed["00000000"]
    assert RunFolder(tmp_path / "run").stage("score").done_shards() == []


def test_a_run_folder_on_object_storage_works_like_a_local_one(tmp_path, flickr_pairs):
    import fsspec

    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=3)
    inputs = [str(tmp_path / "in" / "*.tar")]
    local = api.score(inputs, tmp_path / "local", ["rules"], decode_workers=0)
    remote = api.score(inputs, "memory://runs/r1", ["rules"], decode_workers=0)
    assert remote.ok and remote.stats.rows == local.stats.rows == 6
    reader = RunReader("memory://runs/r1")
    assert (
        reader.dataset("score")
        .to_table()
        .sort_by("uid")
        .equals(scores_dataset(tmp_path / "local").to_table().sort_by("uid"))
    )
    assert fsspec.filesystem("memory").exists("runs/r1/score/completions/00000000.json")
    again = api.score(inputs, "memory://runs/r1", ["rules"], decode_workers=0)
    assert sorted(again.shards_skipped) == ["00000000", "00000001"]
    result = api.select("memory://runs/r1", tmp_path / "sel", top_fraction=0.5, by="rules_words")
    assert result.kept == 3 and np.load(tmp_path / "sel" / "uids.npy").shape == (3,)
    assert pq.read_table(tmp_path / "sel" / "kept.parquet").num_rows == 3


def test_partition_jobs_score_disjoint_shares_into_one_run_side_by_side(tmp_path, flickr_pairs):
    from mlmfilter.io.sources import expand_inputs
    from mlmfilter.runs.runner import partition_sources

    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=6, per_shard=2)
    inputs = [str(tmp_path / "in" / "*.tar")]
    shares = [partition_sources(expand_inputs(inputs), f"{i}/3") for i in range(3)]
    assert sorted(s.url for share in shares for s in share) == sorted(s.url for s in expand_inputs(inputs))
    run = tmp_path / "run"
    with RunLock(RunFolder(run), partition="1/3"):  # job 1 is still running ...
        api.score(inputs, run, ["rules"], decode_workers=0, partition="0/3")  # ... job 0 runs beside it
        with pytest.raises(RunLocked):
            api.score(inputs, run, ["rules"], decode_workers=0, partition="1/3")
        with pytest.raises(RunLocked):
            api.score(inputs, run, ["rules"], decode_workers=0)  # a whole-run job waits for the partitions
    for i in (1, 2):
        api.score(inputs, run, ["rules"], decode_workers=0, partition=f"{i}/3")
    assert RunFolder(run).completeness("score").complete and len(uids_of(run)) == 12


def test_a_cascade_scores_only_the_survivors_and_marks_the_rest_skipped(tmp_path, flickr_pairs):
    photo = flickr_pairs[0][0].read_bytes()
    write_shard(
        tmp_path / "in" / "c.tar",
        [
            {"key": "good", "jpg": photo, "txt": flickr_pairs[0][1]},
            {"key": "lazy", "jpg": photo, "txt": "img"},
            {"key": "good2", "jpg": flickr_pairs[1][0].read_bytes(), "txt": flickr_pairs[1][1]},
        ],
    )
    inputs = [str(tmp_path / "in" / "c.tar")]
    run = tmp_path / "run"
    api.score(inputs, run, ["rules"], decode_workers=0)
    with pytest.raises(ValueError, match="rules_okk"):
        api.score(inputs, run, ["rules"], decode_workers=0, stage="judge", only="rules_okk")
    judged = api.score(
        inputs, run, [{"name": "rules", "options": {"min_words": 1}}], decode_workers=0, stage="judge", only="rules_ok"
    )
    assert judged.stats.counters["skipped_by_cascade"] == 1
    rows = {r["key"]: r for r in scores_dataset(run, "judge").to_table().to_pylist()}
    assert rows["lazy"]["skipped"] is True and rows["lazy"]["error"] is None and rows["lazy"]["rules_words"] is None
    assert rows["good"]["skipped"] is False and rows["good"]["rules_words"] > 3
    kept = api.select(run, tmp_path / "sel", expression="rules_words >= 0", stage="judge")
    assert kept.kept == 2  # a skipped pair never passes


def test_an_image_path_ending_in_json_never_overwrites_the_metadata(tmp_path, flickr_pairs):
    import pyarrow as pa

    from mlmfilter.io.readers import read_shard
    from mlmfilter.io.sources import expand_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "photo.json").write_bytes(flickr_pairs[0][0].read_bytes())  # a JPEG behind a misleading name
    pq.write_table(
        pa.table(
            {"image_path": ["photo.json"], "caption": [flickr_pairs[0][1]], "uid": ["cd" * 16], "source": ["crawl-7"]}
        ),
        folder / "part.parquet",
    )
    run = tmp_path / "run"
    api.score([str(folder / "part.parquet")], run, ["rules"], decode_workers=0)
    api.select(run, expression="rules_words >= 0")
    api.reshard(run / "selection", tmp_path / "out")
    (written,) = [s for src in expand_inputs([str(tmp_path / "out" / "*.tar")]) for s in read_shard(src)]
    assert written.image_format == "jpg" and written.meta["source"] == "crawl-7" and written.meta["uid"] == "cd" * 16


def test_overwrite_discards_the_earlier_run_and_keeps_its_logs(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=2)
    inputs = [str(tmp_path / "in" / "*.tar")]
    run = tmp_path / "run"
    api.score(inputs, run, ["rules"], decode_workers=0)
    again = api.score(inputs, run, [{"name": "rules", "options": {"min_words": 5}}], decode_workers=0, overwrite=True)
    assert sorted(again.shards_completed) == ["00000000", "00000001"] and again.shards_skipped == []
    (log,) = (run / "logs").glob("*.log")  # one process here: both runs append to its log, which stays
    assert log.read_text().count("shard 00000000 done") == 2
