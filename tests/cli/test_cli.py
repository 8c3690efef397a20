"""The CLI end to end on real shards: score -> select -> reshard, recipe files, bad flags."""

from __future__ import annotations

import tarfile

import numpy as np
import pyarrow.dataset as ds
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support.builders import flickr_shards, scores_dataset, write_shard

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_score_select_reshard(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=6)
    write_shard(
        tmp_path / "in" / "00000002.tar",
        [
            {"key": "lazy", "jpg": flickr_pairs[0][0].read_bytes(), "txt": "IMG_0423.jpg"},
            {"key": "bad", "jpg": b"not a jpeg at all", "txt": "a dog on the beach with a red ball"},
        ],
    )
    run = tmp_path / "run"
    invoke("score", tmp_path / "in" / "{00000000..00000002}.tar", "-o", run, "--scorer", "rules")
    scores = scores_dataset(run).to_table()
    assert scores.num_rows == 14

    invoke("select", run, "--where", "rules_ok and rules_words >= 8", "-o", tmp_path / "sel")
    kept = ds.dataset(tmp_path / "sel" / "kept.parquet").to_table()
    expected = {r["uid"] for r in scores.to_pylist() if r["rules_ok"] and r["rules_words"] >= 8}
    assert set(kept["uid"].to_pylist()) == expected and 0 < len(expected) < 14
    subset = np.load(tmp_path / "sel" / "uids.npy")
    assert subset.dtype.names == ("f0", "f1") and len(subset) == len(expected)

    invoke("reshard", tmp_path / "sel", tmp_path / "out", "--samples-per-shard", "4")
    members = []
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += tar.getnames()
    assert len([m for m in members if m.endswith(".txt")]) == len(expected)
    assert len(list((tmp_path / "out").glob("*.tar"))) == -(-len(expected) // 4)


def test_recipe_and_top_fraction(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=10)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"inputs: ['{tmp_path / 'in' / '*.tar'}']\noutput: {tmp_path / 'run'}\nscorers: [rules]\n")
    invoke("score", "--recipe", recipe)
    invoke("select", tmp_path / "run", "--top-fraction", "0.25", "--by", "rules_chars")
    kept = ds.dataset(tmp_path / "run" / "selection" / "kept.parquet").to_table()
    assert kept.num_rows == 5  # exactly 25% of 20


def test_bad_expression_is_a_clear_error(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    invoke("score", tmp_path / "in" / "*.tar", "-o", tmp_path / "run")
    result = runner.invoke(app, ["select", str(tmp_path / "run"), "--where", "rules_okk"])
    assert result.exit_code != 0
    assert "rules_ok" in str(result.exception) + result.output  # suggests the close match


def test_a_model_path_that_does_not_exist_is_one_clear_line(tmp_path, flickr_pairs):
    from typer.testing import CliRunner

    from mlmfilter.cli.app import app
    from tests.support.builders import flickr_shards

    (shard,) = flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=1)
    for scorer in ("clip", "mlm"):
        result = CliRunner().invoke(
            app,
            [
                "score",
                str(shard),
                "-o",
                str(tmp_path / scorer),
                "--scorer",
                scorer,
                "--model",
                str(tmp_path / "no" / "such-model"),
            ],
        )
        assert result.exit_code == 2, result.output
        assert "does not exist" in result.output and "hf download" not in result.output
    result = CliRunner().invoke(app, ["score", str(shard), "-o", str(tmp_path / "r"), "--scorer", "rulez"])
    assert result.exit_code == 2 and "did you mean 'rules'" in result.output
