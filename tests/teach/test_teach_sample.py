"""Sampling at pool scale: embeddings on disk, k-means from a memmap in bounded reads, safe encoder loading."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mlmfilter.core.errors import ModelUnavailableError
from mlmfilter.io.uid import uids_to_halves
from mlmfilter.teach.even import even_allocation
from mlmfilter.teach.sample import CaptionEmbedder, NpyAppender, cluster, first_occurrences, minilm_path, pick_evenly


class CountingRows:
    """An (N, d) array that records how many rows each read takes (what memory must hold at once)."""

    def __init__(self, array: np.ndarray):
        self.array, self.reads = array, []

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        out = self.array[index]
        self.reads.append(len(out))
        return out


def blobs(n_per: int = 500, centres: int = 6, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)) * 10
    truth = np.repeat(np.arange(centres), n_per)
    points = means[truth] + rng.normal(size=(len(truth), dim))
    order = rng.permutation(len(truth))  # a pool is not sorted by topic
    return points[order].astype(np.float32), truth[order]


def test_npy_appender_writes_a_real_npy_read_back_as_a_memmap(tmp_path):
    store = NpyAppender(tmp_path / "e.npy", "float16")
    blocks = [np.random.default_rng(i).normal(size=(n, 8)) for i, n in enumerate([3, 1000, 17])]
    for block in blocks:
        store.append(block)
    path = store.close()
    loaded = np.load(path, mmap_mode="r")
    assert isinstance(loaded, np.memmap) and loaded.shape == (1020, 8) and loaded.dtype == np.float16
    assert np.array_equal(loaded, np.concatenate(blocks).astype(np.float16))
    assert not (tmp_path / "e.npy.partial").exists()
    empty = NpyAppender(tmp_path / "none.npy", "float32").close(row_shape=(384,))
    assert np.load(empty).shape == (0, 384)
    with pytest.raises(ValueError, match="rows of shape"):
        again = NpyAppender(tmp_path / "bad.npy", "float32")
        again.append(np.zeros((2, 8)))
        again.append(np.zeros((2, 9)))


def test_streaming_kmeans_from_disk_finds_the_clusters_in_bounded_reads(tmp_path):
    points, truth = blobs()
    store = NpyAppender(tmp_path / "embeddings.npy", "float16")
    for start in range(0, len(points), 700):
        store.append(points[start : start + 700])
    on_disk = CountingRows(np.load(store.close(), mmap_mode="r"))
    labels, distances = cluster(on_disk, 6, seed=2, batch_size=256, in_memory_rows=500)
    assert max(on_disk.reads) <= 500 and sum(on_disk.reads) >= 500 + 2 * len(points)  # sample, one epoch, labels
    # every true cluster is one k-means cluster, and no two share one
    assert all(len(set(labels[truth == c])) == 1 for c in range(6)) and len(set(labels)) == 6
    assert np.isfinite(distances).all() and distances.max() < 10
    again, _ = cluster(
        np.load(tmp_path / "embeddings.npy", mmap_mode="r"), 6, seed=2, batch_size=256, in_memory_rows=500
    )
    assert np.array_equal(labels, again)
    # the in-memory path (the whole set fits) agrees on the partition
    whole, _ = cluster(points, 6, seed=2)
    assert len(set(zip(whole.tolist(), labels.tolist()))) == 6

    keep = np.ones(len(points), bool)
    keep[::3] = False
    masked, masked_d = cluster(points, 6, seed=2, batch_size=256, keep=keep, in_memory_rows=500)
    assert (masked[~keep] == -1).all() and np.isnan(masked_d[~keep]).all() and (masked[keep] >= 0).all()
    picks = pick_evenly(masked, 60, seed=0)
    assert keep[picks].all() and Counter(masked[picks].tolist()) == {c: 10 for c in range(6)}


def test_pick_evenly_matches_the_per_cluster_rule_on_many_labels():
    labels = np.random.default_rng(1).integers(0, 50, 20_000).astype(np.int32)
    labels[:5] = 49  # uneven sizes
    picks = pick_evenly(labels, 777, seed=4)
    sizes = [int((labels == c).sum()) for c in range(50)]
    assert Counter(labels[picks].tolist()) == dict(enumerate(even_allocation(sizes, 777)))
    assert np.array_equal(picks, pick_evenly(labels, 777, seed=4)) and not np.array_equal(
        picks, pick_evenly(labels, 777, seed=5)
    )
    assert len(set(picks.tolist())) == 777 and np.all(np.diff(picks) > 0)


def test_first_occurrences_keeps_the_first_row_of_each_uid():
    uids = [f"{i:032x}" for i in (5, 7, 5, 9, 7, 7)]
    assert first_occurrences(uids_to_halves(uids)).tolist() == [True, True, False, True, False, False]


def test_caption_encoder_loads_as_data_never_code_or_pickles(tmp_path):
    from tests.support.security import Payload, plant_code

    marker = tmp_path / "ran"
    planted = plant_code(Path(shutil.copytree(minilm_path(), tmp_path / "minilm")), marker)
    embedder = CaptionEmbedder(planted)
    assert embedder.embed(["a dog"]).shape == (1, 384) and not marker.exists()

    pickled = Path(shutil.copytree(minilm_path(), tmp_path / "pickled"))
    (pickled / "model.safetensors").unlink()
    torch.save({"payload": Payload(tmp_path / "unpickled")}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        CaptionEmbedder(pickled)
    assert not (tmp_path / "unpickled").exists()

    with pytest.raises(ModelUnavailableError, match="does not exist"):
        CaptionEmbedder(str(tmp_path / "missing" / "encoder"))
    (tmp_path / "file.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="not a local folder"):
        CaptionEmbedder(str(tmp_path / "file.json"))


def test_cli_refuses_a_bad_embedding_dtype_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from mlmfilter.cli.app import app

    result = CliRunner().invoke(
        app, ["teach", "sample", str(tmp_path / "x.tar"), "-o", str(tmp_path / "t"), "--embedding-dtype", "int8"]
    )
    assert result.exit_code == 2 and "embedding_dtype" in result.output and len(result.output.strip().splitlines()) == 1
