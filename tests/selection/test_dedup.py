"""Deduplication: re-encoded and resized copies of real photos, near-identical captions (real MiniLM),
SemDeDup on planted groups at known cosines, and `select --where 'dup_keep and ...'` over the stage."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.io.uid import HALVES_DTYPE
from mlmfilter.runs.read import RunReader
from mlmfilter.selection.dedup import REASONS, DedupOptions, find_duplicates
from tests.support.builders import write_shard

runner = CliRunner()


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def copies_run(tmp_path_factory, flickr_pairs, tiny_clip_dir):
    """Real Flickr8k photos with, among them, a byte-identical copy under another caption, a
    re-encoded copy (JPEG q=40), a copy resized to 60 % and re-encoded, and a lossless PNG of one;
    embedded (tiny CLIP + hashes) and scored with the rules."""
    root = tmp_path_factory.mktemp("copies")
    photos = flickr_pairs[:10]
    samples = [
        {"key": f"orig{i}", "jpg": path.read_bytes(), "txt": caption} for i, (path, caption) in enumerate(photos)
    ]
    image0 = Image.open(photos[0][0]).convert("RGB")
    image1 = Image.open(photos[1][0]).convert("RGB")
    image3 = Image.open(photos[3][0]).convert("RGB")
    small = image1.resize((int(image1.width * 0.6), int(image1.height * 0.6)), Image.Resampling.LANCZOS)
    copies = [
        {"key": "reencoded0", "jpg": _jpeg(image0, 40), "txt": "the same photo, saved again at a lower quality"},
        {"key": "resized1", "jpg": _jpeg(small, 85), "txt": "a smaller copy of the second photo"},
        {"key": "bytes2", "jpg": photos[2][0].read_bytes(), "txt": "the third photo under another caption"},
        {"key": "png3", "png": _png(image3), "txt": "the fourth photo as a PNG"},
    ]
    write_shard(root / "in" / "00000.tar", samples[:6] + copies[:2])
    write_shard(root / "in" / "00001.tar", samples[6:] + copies[2:])
    run = root / "run"
    invoke("embed", run, root / "in" / "*.tar", "--model", tiny_clip_dir, "--decode-workers", "0")
    invoke("score", root / "in" / "*.tar", "-o", run, "--scorer", "rules")
    return run


def _rows(run, stage="dedup"):
    return {r["key"]: r for r in RunReader(run).dataset(stage).to_table().to_pylist()}


def test_dedup_finds_reencoded_resized_and_byte_copies_of_real_photos(copies_run):
    # the tiny CLIP is random: its cosines say nothing, so only the image hashes decide here
    result = invoke("dedup", copies_run, "--no-semantic", "--json")
    summary = json.loads(result.stdout)
    rows = _rows(copies_run)
    expected = [("orig0", "reencoded0"), ("orig1", "resized1"), ("orig2", "bytes2"), ("orig3", "png3")]
    for a, b in expected:
        assert rows[a]["dup_group"] is not None and rows[a]["dup_group"] == rows[b]["dup_group"], (a, b)
        assert rows[a]["dup_size"] == 2 and [rows[a]["dup_keep"], rows[b]["dup_keep"]].count(True) == 1
    assert rows["bytes2"]["dup_reason"] == "same_bytes"
    assert rows["png3"]["dup_reason"] in ("same_pixels", "near_pixels")
    assert rows["resized1"]["dup_reason"] in ("same_pixels", "near_pixels")
    for i in range(4, 10):  # distinct photos have no duplicate
        assert rows[f"orig{i}"]["dup_group"] is None and rows[f"orig{i}"]["dup_keep"] is True
    assert summary["groups"] == 4 and summary["removed"] == 4 and summary["kept"] == 10
    # without a column to keep by, the first by uid is kept
    for a, b in expected:
        kept = a if rows[a]["dup_keep"] else b
        assert rows[kept]["uid"] == min(rows[a]["uid"], rows[b]["uid"])


def test_select_reads_the_dedup_stage_beside_the_scores(copies_run, tmp_path):
    invoke("dedup", copies_run, "--no-semantic", "--keep-best", "rules_words", "--overwrite")
    rows = _rows(copies_run)
    scores = _rows(copies_run, "score")
    # the kept pair of each group is the one with the most caption words
    for a, b in [("orig0", "reencoded0"), ("orig1", "resized1"), ("orig2", "bytes2"), ("orig3", "png3")]:
        best = max((a, b), key=lambda k: (scores[k]["rules_words"], -int(rows[k]["uid"], 16)))
        assert rows[best]["dup_keep"] and not rows[({a, b} - {best}).pop()]["dup_keep"]
    result = invoke("select", copies_run, "--where", "dup_keep and rules_words >= 1", "-o", tmp_path / "sel")
    assert "joined stage 'dedup'" in result.output
    kept = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert kept["counts"]["kept"] == 10 and kept["arguments"]["stages"] == ["score", "dedup"]


def test_other_dedup_settings_need_overwrite(copies_run):
    invoke("dedup", copies_run, "--no-semantic", "--phash-bits", "2", "--stage", "dedup_strict")
    result = invoke("dedup", copies_run, "--no-semantic", "--phash-bits", "6", "--stage", "dedup_strict", code=2)
    assert "other dedup settings" in result.output and "--overwrite" in result.output
    invoke("dedup", copies_run, "--no-semantic", "--phash-bits", "6", "--stage", "dedup_strict", "--overwrite")


def test_the_spill_margin_is_a_setting_of_the_stage(copies_run):
    result = invoke("dedup", copies_run, "--spill-margin", "0.05", "--stage", "dedup_wide", "--json")
    assert json.loads(result.stdout)["settings"]["options"]["spill_margin"] == 0.05
    refused = invoke("dedup", copies_run, "--spill-margin", "0.02", "--stage", "dedup_wide", code=2)
    assert "other dedup settings" in refused.output


def test_dedup_of_a_run_without_embeddings_says_how_to_make_them(tmp_path, flickr_pairs):
    write_shard(tmp_path / "in" / "0.tar", [{"key": "a", "jpg": flickr_pairs[0][0].read_bytes(), "txt": "a dog"}])
    invoke("score", tmp_path / "in" / "0.tar", "-o", tmp_path / "run", "--scorer", "rules")
    result = invoke("dedup", tmp_path / "run", code=2)
    assert "keeps no embeddings" in result.output and "mlmfilter embed" in result.output


def test_near_identical_captions_of_one_image_by_real_minilm(tmp_path, flickr_pairs):
    photo = flickr_pairs[5][0].read_bytes()
    near = [
        "A brown dog is running through the grass .",
        "A brown dog is running through the grass",
        "a brown dog running through the grass",
    ]
    others = ["A black dog is running through the grass .", *[c for _, c in flickr_pairs[10:16]]]
    samples = [{"key": f"near{i}", "jpg": photo, "txt": c} for i, c in enumerate(near)]
    samples += [{"key": f"other{i}", "jpg": p.read_bytes(), "txt": c} for i, (p, c) in enumerate(flickr_pairs[10:16])]
    samples.append({"key": "black", "jpg": flickr_pairs[20][0].read_bytes(), "txt": others[0]})
    write_shard(tmp_path / "in" / "0.tar", samples)
    run = tmp_path / "run"
    invoke("embed", run, tmp_path / "in" / "0.tar", "--text-only", "--decode-workers", "0")
    invoke("dedup", run, "--threshold", "0.95")  # only caption embeddings: duplicates are captions
    rows = _rows(run)
    groups = {rows[f"near{i}"]["dup_group"] for i in range(3)}
    assert len(groups) == 1 and None not in groups and rows["near0"]["dup_size"] == 3
    assert all(rows[f"near{i}"]["dup_reason"] == "semantic" for i in range(3))
    assert rows["black"]["dup_group"] is None and 0.6 < rows["black"]["dup_nearest_cosine"] < 0.95
    assert all(rows[f"other{i}"]["dup_group"] is None for i in range(6))


def test_random_stand_in_embeddings_get_exact_dedup_only_and_say_so(tmp_path, flickr_pairs):
    data = flickr_pairs[0][0].read_bytes()
    write_shard(
        tmp_path / "in" / "0.tar",
        [{"key": "a", "jpg": data, "txt": "a dog"}, {"key": "b", "jpg": data, "txt": "the same picture"}]
        + [{"key": f"o{i}", "jpg": p.read_bytes(), "txt": c} for i, (p, c) in enumerate(flickr_pairs[1:5])],
    )
    run = tmp_path / "run"
    missing = tmp_path / "no-such-clip"
    invoke(
        "embed", run, tmp_path / "in" / "0.tar", "--model", missing, "--allow-random-fallback", "--decode-workers", "0"
    )
    result = invoke("dedup", run)
    assert "semantic dedup skipped" in " ".join(result.output.split())
    assert "random weights" in result.output
    rows = _rows(run)
    assert rows["a"]["dup_group"] == rows["b"]["dup_group"] is not None
    assert all(rows[f"o{i}"]["dup_group"] is None for i in range(4))


# -- SemDeDup on planted groups -----------------------------------------------------------------------


def planted(n_single: int, groups: int, dim: int, threshold: float, seed: int):
    """Unit vectors: singles around a few topics, and groups whose copies sit at known cosines
    (above ``threshold``) to their original. Returns (vectors, true group of each row)."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((8, dim))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)

    def unit(m):
        u = rng.standard_normal((m, dim))
        return u / np.linalg.norm(u, axis=1, keepdims=True)

    base = 0.5 * topics[rng.integers(0, 8, n_single + groups)] + np.sqrt(0.75) * unit(n_single + groups)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    originals = np.arange(n_single, n_single + groups)
    copies_of = np.repeat(originals, 2)
    cosine = rng.uniform(threshold + 0.01, 0.999, size=(len(copies_of), 1))
    o = base[copies_of]
    u = unit(len(copies_of))
    u -= (u * o).sum(1, keepdims=True) * o
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    vectors = np.concatenate([base, cosine * o + np.sqrt(1 - cosine**2) * u])
    truth = np.concatenate([np.arange(len(base)), copies_of])
    order = rng.permutation(len(vectors))
    return vectors[order].astype(np.float16), truth[order]


def _halves(n: int) -> np.ndarray:
    halves = np.zeros(n, dtype=HALVES_DTYPE)
    halves["f0"] = np.arange(n)[::-1]  # the last row has the smallest uid
    return halves


def test_semdedup_recovers_planted_groups_across_cluster_borders(tmp_path):
    vectors, truth = planted(2000, 150, 64, 0.9, seed=3)
    n = len(vectors)
    options = DedupOptions(threshold=0.9, clusters=16, spill_margin=0.02)
    result = find_duplicates(vectors, np.ones(n, bool), uid_halves=_halves(n), options=options)
    assert result.clusters == 16 and result.stats["spilled"] > 0  # pairs near a border are compared twice
    no_spill = find_duplicates(
        vectors, np.ones(n, bool), uid_halves=_halves(n), options=options.model_copy(update={"spill_margin": 0})
    )
    assert result.groups() >= no_spill.groups()
    same_true = truth[:, None] == truth[None, :]
    same_found = result.group[:, None] == result.group[None, :]
    off_diagonal = ~np.eye(n, dtype=bool)
    found, planted_pairs = same_found & off_diagonal, same_true & off_diagonal
    recall = (found & planted_pairs).sum() / planted_pairs.sum()
    precision = (found & planted_pairs).sum() / max(1, found.sum())
    assert recall >= 0.98 and precision == 1.0
    assert result.groups() >= 145 and set(REASONS[r] for r in result.reason[result.reason >= 0]) == {"semantic"}
    # each group keeps one pair: the first by uid (the largest row index here)
    for group in np.unique(result.group[result.size > 1]):
        members = np.flatnonzero(result.group == group)
        assert result.keep[members].sum() == 1 and result.keep[members.max()]
    # read from a .npy file in blocks: the same answer
    np.save(tmp_path / "v.npy", vectors)
    again = find_duplicates(tmp_path / "v.npy", np.ones(n, bool), uid_halves=_halves(n), options=options)
    assert np.array_equal(again.group, result.group) and np.array_equal(again.keep, result.keep)


def test_keep_best_and_rows_without_vectors():
    vectors, truth = planted(50, 10, 32, 0.95, seed=1)
    n = len(vectors)
    valid = np.ones(n, bool)
    valid[0] = False
    scores = np.random.default_rng(0).random(n)
    result = find_duplicates(vectors, valid, uid_halves=_halves(n), scores=scores, options=DedupOptions(threshold=0.95))
    assert result.group[0] == -1 and not result.keep[0] and result.size[0] == 0
    for group in np.unique(result.group[(result.size > 1) & valid]):
        members = np.flatnonzero(result.group == group)
        assert result.keep[members].sum() == 1 and result.keep[members[np.argmax(scores[members])]]
    # every pair's nearest neighbour is another pair, with its cosine
    has = result.nearest >= 0
    assert has[valid].all() and (result.nearest[has] != np.flatnonzero(has)).all()
    v = vectors.astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    i = np.flatnonzero(has)[:5]
    assert np.allclose((v[i] * v[result.nearest[i]]).sum(1), result.nearest_cosine[i], atol=1e-3)
