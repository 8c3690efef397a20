"""The small shared blocks of core: the batcher, class paths, where a file is."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from mlmfilter.core.batching import batched
from mlmfilter.core.classes import class_path, import_class
from mlmfilter.core.locations import as_path, is_local_filesystem, is_url, location_of
from mlmfilter.runs.stage import Stage
from mlmfilter.runs.storage import RunStorage


def test_batches_are_lists_in_order_pulled_one_batch_at_a_time():
    pulled = []

    def items():
        for i in range(7):
            pulled.append(i)
            yield i

    batches = batched(items(), 3)
    assert next(batches) == [0, 1, 2] and pulled == [0, 1, 2]  # nothing of the next batch is read early
    assert list(batches) == [[3, 4, 5], [6]]
    assert list(batched([], 4)) == []
    with pytest.raises(ValueError, match="at least 1"):
        next(batched([1], 0))


def test_a_class_path_names_the_class_and_nothing_else():
    assert class_path(RunStorage) == "mlmfilter.runs.storage:RunStorage"
    assert import_class(class_path(RunStorage)) is RunStorage
    with pytest.raises(ValueError, match="no module 'mlmfilter.nowhere'"):
        import_class("mlmfilter.nowhere:Stage")
    with pytest.raises(ValueError, match="has no 'Missing'"):
        import_class("mlmfilter.runs.stage:Missing")
    with pytest.raises(ValueError, match="is not a Stage"):
        import_class("mlmfilter.runs.storage:RunStorage", Stage)
    with pytest.raises(ValueError, match="not a class path"):
        import_class("mlmfilter.runs.storage.RunStorage")


def test_local_files_are_absolute_paths_and_others_keep_their_protocol(tmp_path, monkeypatch):
    local, path = fsspec.core.url_to_fs(str(tmp_path / "x"))
    memory, key = fsspec.core.url_to_fs("memory://bucket/run")
    assert is_local_filesystem(local) and not is_local_filesystem(memory)
    monkeypatch.chdir(tmp_path)
    assert location_of(local, "rel/a.tar") == str(tmp_path / "rel" / "a.tar")
    assert location_of(memory, key).startswith("memory://") and location_of(memory, key).endswith("/bucket/run")
    assert is_url("s3://b/run") and not is_url(str(tmp_path))
    assert as_path(str(tmp_path)) == tmp_path and isinstance(as_path(str(tmp_path)), Path)
    assert as_path("memory://bucket/run") == "memory://bucket/run"
    remote = RunStorage("memory://bucket/run")
    assert is_url(remote.url) and RunStorage(remote.url).root == remote.root  # its url names the same folder
    assert RunStorage(tmp_path / "run").url == str(tmp_path / "run")
    assert RunStorage("memory://bucket/run").arrow_filesystem is not None
    assert RunStorage(tmp_path / "run").arrow_filesystem is None
