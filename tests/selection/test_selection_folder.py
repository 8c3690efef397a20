"""SelectionFolder: the one owner of a selection folder's layout, written by select_run and read back
(the run it came from, kept rows shard by shard, the uids) from a local path or an fsspec URL."""

from __future__ import annotations

import json
import shutil

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlmfilter.io.uid import halves_to_uids
from mlmfilter.runs.runner import write_tables
from mlmfilter.selection import SelectionFolder, select_run
from mlmfilter.selection.subset import read_datacomp_subset

SCHEMA = pa.schema([("uid", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("clip_score", pa.float32())])


def uid(shard: int, i: int) -> str:
    return f"{shard:016x}{i * 7919 % 1000:016x}"


@pytest.fixture()
def run(tmp_path):
    """Three shards of 40 rows; a score that decreases with the row number."""
    tables = {}
    for shard in range(3):
        rows = [
            {"uid": uid(shard, i), "shard": f"{shard:08d}", "key": f"k{shard}-{i:03d}", "clip_score": 1.0 - i / 40}
            for i in range(40)
        ]
        tables[f"{shard:08d}"] = pa.Table.from_pylist(rows, schema=SCHEMA)
    write_tables(tmp_path / "run", "score", tables)
    return tmp_path / "run"


def test_the_folder_reads_back_what_select_wrote(run):
    folder = SelectionFolder.in_run(run)
    assert not folder.exists()
    result = select_run(run, folder.path, expression="clip_score > 0.5")
    assert folder.exists() and sorted(p.name for p in folder.path.iterdir()) == [
        "kept.parquet",
        "selection.json",
        "uids.npy",
    ]
    assert result.paths == folder.paths()
    assert folder.summary() == json.loads(json.dumps(result.to_json(), default=str))
    assert folder.summary()["run_dir_relative"] == ".."

    kept = pq.read_table(folder.kept_path).to_pylist()
    assert len(kept) == 3 * 20 and {r["key"].split("-")[1] < "020" for r in kept} == {True}
    groups = list(folder.kept_groups())
    assert [shard for shard, _ in groups] == ["00000000", "00000001", "00000002"]
    assert {key: u for _, keys in groups for key, u in keys.items()} == {r["key"]: r["uid"] for r in kept}

    np.testing.assert_array_equal(folder.uids(), read_datacomp_subset(folder.subset_path))
    assert sorted(halves_to_uids(folder.uids())) == sorted(r["uid"] for r in kept)


def test_the_run_is_found_beside_the_selection_or_where_it_was(run, tmp_path):
    select_run(run, run / "selection", expression="clip_score > 0.9")
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(run), moved)  # together: the relative path still leads to the run
    assert SelectionFolder(moved / "selection").run_dir() == str(moved.resolve())

    select_run(moved, tmp_path / "apart", expression="clip_score > 0.9")
    shutil.move(str(tmp_path / "apart"), tmp_path / "elsewhere" / "apart")  # apart: the recorded path
    assert SelectionFolder(tmp_path / "elsewhere" / "apart").run_dir() == str(moved)


def test_missing_and_foreign_files_are_named(run, tmp_path):
    empty = SelectionFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty is not a selection folder \(no selection.json\); run"):
        empty.run_dir()
    with pytest.raises(FileNotFoundError, match=r"needs selection.json and uids.npy"):
        empty.require()

    folder = SelectionFolder(tmp_path / "sel")
    select_run(run, folder.path, expression="clip_score > 0.5")
    folder.kept_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"sel/kept.parquet is missing; re-run `mlmfilter select`"):
        next(folder.kept_groups())

    rows = [{"uid": uid(s, 0), "shard": f"{s:08d}", "key": "k"} for s in (0, 1, 0)]
    pq.write_table(pa.Table.from_pylist(rows), folder.kept_path)
    with pytest.raises(ValueError, match="not in shard order .shard '00000000' appears twice"):
        list(folder.kept_groups())

    info = folder.summary()
    del info["run_dir"], info["arguments"]["run_dir"], info["run_dir_relative"]
    folder.write_summary(info)
    with pytest.raises(ValueError, match="selection.json does not name the run it selected from"):
        folder.run_dir()


def test_a_selection_is_read_from_an_fsspec_url(run, tmp_path):
    local = SelectionFolder(tmp_path / "sel")
    select_run(run, local.path, top_fraction=0.25, by="clip_score")
    memory, root = fsspec.filesystem("memory"), f"memory://{tmp_path.name}"
    for name in ("selection.json", "uids.npy", "kept.parquet"):
        memory.pipe_file(f"{root}/sel/{name}", (local.path / name).read_bytes())

    remote = SelectionFolder(f"{root}/sel")
    assert remote.exists() and not SelectionFolder(f"{root}/none").exists()
    assert remote.summary() == local.summary()
    np.testing.assert_array_equal(remote.uids(), local.uids())
    assert list(remote.kept_groups()) == list(local.kept_groups())
    assert remote.run_dir() == str(run)  # the relative path is only followed on a local disk
    assert SelectionFolder.in_run(root).url == f"{root}/selection"
