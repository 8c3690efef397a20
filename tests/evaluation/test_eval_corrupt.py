"""`eval corrupt`: true vs corrupted captions through the real reader, decoder and rules scorer."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.evaluation.corrupt import CorruptionCheck, read_pairs
from mlmfilter.evaluation.scoring import PairScorer
from mlmfilter.teach.negatives import CORRUPTION_KINDS, NegativeGenerator
from tests.support.builders import write_shard

runner = CliRunner()


@pytest.fixture(scope="module")
def shard(tmp_path_factory, flickr_pairs):
    folder = tmp_path_factory.mktemp("corrupt")
    samples = [
        {"key": f"{i:04d}", "jpg": path.read_bytes(), "txt": caption}
        for i, (path, caption) in enumerate(flickr_pairs[:12])
    ]
    samples.append({"key": "cut", "jpg": flickr_pairs[12][0].read_bytes()[:3000], "txt": flickr_pairs[12][1]})
    samples.append({"key": "nocap", "jpg": flickr_pairs[13][0].read_bytes()})
    return write_shard(folder / "00000000.tar", samples)


def test_eval_corrupt_reports_what_the_rules_scorer_catches(tmp_path, shard):
    out = tmp_path / "corrupt.json"
    result = runner.invoke(app, ["eval", "corrupt", str(shard), "--scorer", "rules", "--seed", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (
        report["pairs"] == 13 and report["pairs_scored"] == 12
    )  # the cut JPEG is an error row, the caption-less pair a read error
    assert report["score_errors"] == {"truncated_image": 1}
    assert sum(report["read_errors"].values()) == 1
    words = report["columns"]["rules_words"]
    assert words["truncate"]["n"] == 12 and words["truncate"]["win_rate"] == 1.0 and words["truncate"]["auc"] > 0.9
    assert words["shuffle_words"]["tie_rate"] == 1.0  # the same words in another order
    assert words["typos"]["tie_rate"] == 1.0
    # the image is shared by a pair's variants: a caption-blind column ties everywhere
    assert report["columns"]["rules_min_side"]["all"]["tie_rate"] == 1.0
    assert "All ties, not shown: rules_min_side" in " ".join(result.output.split())
    assert set(report["kinds"]) == set(CORRUPTION_KINDS) and report["kinds"]["truncate"]["made"] == 12
    assert all(e["corrupted"] != e["original"] for examples in report["examples"].values() for e in examples)
    again = tmp_path / "again.json"
    assert (
        runner.invoke(app, ["eval", "corrupt", str(shard), "-s", "rules", "--seed", "3", "-o", str(again)]).exit_code
        == 0
    )
    assert json.loads(again.read_text())["columns"] == report["columns"]  # deterministic for a seed


def test_other_caption_never_takes_a_caption_of_the_same_photo(shard, flickr_pairs):
    pairs, _ = read_pairs([str(shard)], limit=3)
    twin = PairScorer.share_image(pairs[0], "f" * 32, "twin", "A second human caption of the first photo .")
    twin.image_bytes = pairs[0].image_bytes
    samples = [pairs[0], twin, pairs[1]]
    captions = {s.key: s.caption for s in samples}
    check = CorruptionCheck(PairScorer([{"name": "rules"}]), NegativeGenerator(kinds=["other_caption"]))
    report = check.evaluate(samples)
    chosen = {e["original"]: e["corrupted"] for e in report["examples"]["other_caption"]}
    assert chosen[captions[pairs[0].key]] == captions[pairs[1].key]
    assert chosen[captions["twin"]] == captions[pairs[1].key]


def test_bad_flags_end_with_one_line(shard):
    result = runner.invoke(app, ["eval", "corrupt", str(shard), "-s", "rules", "--kinds", "swap_verb"])
    assert result.exit_code == 2 and "unknown corruption kinds" in result.output
    result = runner.invoke(app, ["eval", "corrupt", str(shard), "-s", "rules", "--column", "itm"])
    assert result.exit_code == 2 and "unknown score columns" in result.output


def test_a_pixel_scorer_sees_each_image_with_every_caption(tmp_path, shard, tiny_clip_dir):
    """A tiny random CLIP (scores are noise): the plumbing, not the quality, is under test."""
    out = tmp_path / "clip.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "corrupt",
            str(shard),
            "-s",
            "clip",
            "--model",
            str(tiny_clip_dir),
            "--dtype",
            "fp32",
            "--limit",
            "4",
            "--kinds",
            "other_caption,truncate",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["columns"]) == {"clip_cosine", "clip_score"} and report["pairs_scored"] == 4
    cosine = report["columns"]["clip_cosine"]
    assert cosine["other_caption"]["n"] == 4 and cosine["truncate"]["n"] == 4
    assert cosine["all"]["tie_rate"] < 1.0  # another caption, another text embedding


def test_a_judges_readout_diagnostics_are_not_taken_for_detectors(tmp_path, shard, smollm2_cache_dir):
    from tests.support.mlm import tiny_model_dir

    judge = str(tiny_model_dir("llava", smollm2_cache_dir))
    out = tmp_path / "corrupt.json"
    args = ["eval", "corrupt", str(shard), "--scorer", "mlm", "--model", judge, "--metrics", "itm", "--limit", "3"]
    result = runner.invoke(app, [*args, "--kinds", "truncate", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["columns"]) == ["itm"]  # itm_mass and itm_std say how sure the readout was, not the pair
    assert "itm_mass" not in result.output and "itm_std" not in result.output
    named = runner.invoke(app, [*args, "--kinds", "truncate", "--column", "itm_mass", "-o", str(out)])
    assert named.exit_code == 0, named.output
    assert list(json.loads(out.read_text())["columns"]) == ["itm_mass"]  # asked for by name: evaluated
