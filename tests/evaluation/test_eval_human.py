"""`eval human`: loaders against the real Flickr8K judgement files, and the command end to end."""

from __future__ import annotations

import json

import pytest
from scipy import stats
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.evaluation.human import ClipScoreJsonAnnotations, CrowdFlowerAnnotations, ExpertAnnotations
from tests.support.data import shared_path

runner = CliRunner()


@pytest.fixture(scope="module")
def judgements_dir():
    return shared_path("data", "flickr8k_judgements")


@pytest.fixture(scope="module")
def expert(judgements_dir):
    return ExpertAnnotations(judgements_dir / "ExpertAnnotations.txt").load()


def test_expert_loader_flattens_three_scores_and_drops_reference_captions_like_clipscore(judgements_dir, expert):
    # CLIPScore's preprocessing yields 5,664 pairs x 3 experts = 16,992 judgements, 158 rows dropped
    assert len(expert.judgements) == 16992 and expert.dropped == {"candidate_is_a_reference_caption": 158}
    assert expert.headline_tau == "c" and len(expert.images) == 1000
    first = expert.judgements[:3]  # 1056338697_4f7d7ce270.jpg  2549968784_39bfbe44f9.jpg#2  1 1 1
    assert {j.image for j in first} == {"1056338697_4f7d7ce270.jpg"} and [j.rater for j in first] == [
        "expert1",
        "expert2",
        "expert3",
    ]
    assert all(j.caption_id == "2549968784_39bfbe44f9.jpg#2" and j.rating == 1.0 for j in first)
    tokens = dict(line.split("\t") for line in (judgements_dir / "Flickr8k.token.txt").read_text().splitlines())
    assert first[0].caption == " ".join(tokens["2549968784_39bfbe44f9.jpg#2"].split())
    kept = ExpertAnnotations(judgements_dir / "ExpertAnnotations.txt", drop_reference_captions=False).load()
    assert len(kept.judgements) == 17466 and not kept.dropped


def test_crowdflower_loader_rates_by_fraction_of_yes(judgements_dir):
    crowd = CrowdFlowerAnnotations(judgements_dir / "CrowdFlowerAnnotations.txt").load()
    assert len(crowd.judgements) == 47830 and crowd.headline_tau == "b"
    assert crowd.judgements[0].rating == 1.0 and crowd.judgements[1].rating == 0.0
    assert {round(j.rating, 4) for j in crowd.judgements} >= {0.0, 0.3333, 0.6667, 1.0}


def test_malformed_rows_are_named_with_their_line(tmp_path, judgements_dir):
    bad = tmp_path / "ExpertAnnotations.txt"
    bad.write_text("a.jpg\t1000268201_693b08cb0e.jpg#0\t1\t2\t3\na.jpg\t1000268201_693b08cb0e.jpg#1\t1\t9\t3\n")
    with pytest.raises(ValueError, match=r"ExpertAnnotations.txt:2: expert score '9' outside 1-4"):
        ExpertAnnotations(bad, judgements_dir / "Flickr8k.token.txt").load()
    bad.write_text("a.jpg\tnot-a-caption#0\t1\t2\t3\n")
    with pytest.raises(ValueError, match=r":1: caption 'not-a-caption#0' is not in the caption file"):
        ExpertAnnotations(bad, judgements_dir / "Flickr8k.token.txt").load()
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt"):
        ExpertAnnotations(bad).load()  # no caption file beside it


def test_clipscore_json_equals_the_text_format_it_was_made_from(tmp_path, expert):
    """The layout CLIPScore's download.py writes, built from the Expert judgements, loads back the same."""
    layout = {}
    for j in expert.judgements[:60]:
        entry = layout.setdefault(j.image, {"image_path": j.image, "ground_truth": [], "human_judgement": []})
        entry["human_judgement"].append({"image_path": j.image, "caption": j.caption, "rating": j.rating})
    entry["human_judgement"].append({"caption": "a rating of NaN", "rating": float("nan")})
    path = tmp_path / "flickr8k.json"
    path.write_text(json.dumps(layout))
    loaded = ClipScoreJsonAnnotations(path).load()
    assert [(j.image, j.caption, j.rating) for j in loaded.judgements] == [
        (j.image, j.caption, j.rating) for j in expert.judgements[:60]
    ]
    assert loaded.dropped == {"nan_rating": 1}
    flat = tmp_path / "list.json"
    flat.write_text(json.dumps([{"image_path": "x.jpg", "caption": "a dog", "rating": 3}]))
    assert ClipScoreJsonAnnotations(flat).load().judgements[0].rating == 3.0


def test_eval_human_on_the_real_expert_files_counts_missing_images(tmp_path, judgements_dir, expert, flickr_dir):
    out = tmp_path / "expert.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "human",
            "--benchmark",
            "flickr8k-expert",
            "--images",
            str(flickr_dir / "images"),
            "--annotations",
            str(judgements_dir / "ExpertAnnotations.txt"),
            "--scorer",
            "rules",
            "--column",
            "rules_words",
            "--column",
            "rules_ok",
            "--bootstrap",
            "30",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    # 6 of the 1,000 test images are present: 37 Expert rows x 3 experts = 111 judgements
    assert report["images_total"] == 1000 and report["images_missing"] == 994
    assert report["judgements_scored"] == 111 and report["judgements_missing_image"] == 16992 - 111
    assert len(report["missing_images"]) == 200 and "1258913059_07c613f7ff.jpg" in report["missing_images"]
    assert "994 images missing" in result.output and "rules_words" in result.output
    # the rules scorer counts words: the reported tau-c equals scipy's on the same judgements
    present = {p.name for p in (flickr_dir / "images").iterdir()}
    scored = [j for j in expert.judgements if j.image in present]
    words = [len(j.caption.split()) for j in scored]
    tau_c = stats.kendalltau(words, [j.rating for j in scored], variant="c").statistic
    column = report["columns"]["rules_words"]
    assert column["n"] == 111 and column["kendall_tau_c"]["value"] == pytest.approx(tau_c)
    assert column["kendall_tau_c"]["low"] <= tau_c <= column["kendall_tau_c"]["high"]
    assert set(report["columns"]) == {"rules_words", "rules_ok"}


def test_broken_and_missing_images_are_counted_not_dropped(tmp_path, flickr_pairs):
    images = tmp_path / "images"
    images.mkdir()
    (good_path, caption), (other_path, _) = flickr_pairs[0], flickr_pairs[1]
    (images / "good.jpg").write_bytes(good_path.read_bytes())
    (images / "cut.jpg").write_bytes(other_path.read_bytes()[:2000])
    rows = [
        ("good.jpg", caption, 4),
        ("good.jpg", "a cat on a sofa in a room", 1),
        ("good.jpg", "two men talk", 2),
        ("cut.jpg", caption, 3),
        ("gone.jpg", caption, 2),
        ("../escape.jpg", caption, 1),
    ]
    annotations = tmp_path / "ratings.json"
    annotations.write_text(json.dumps([{"image_path": i, "caption": c, "rating": r} for i, c, r in rows]))
    out = tmp_path / "out.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "human",
            "--benchmark",
            "composite",
            "--images",
            str(images),
            "--annotations",
            str(annotations),
            "-s",
            "rules",
            "--bootstrap",
            "0",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["images_missing"] == 2 and report["missing_images"] == ["../escape.jpg", "gone.jpg"]
    assert report["pair_errors"] == {"truncated_image": 1} and report["judgements_scored"] == 3
    assert report["columns"]["rules_words"]["n"] == 3


def test_user_mistakes_end_with_one_line_and_exit_2(tmp_path, judgements_dir):
    base = ["eval", "human", "--annotations", str(judgements_dir / "ExpertAnnotations.txt"), "-s", "rules"]
    result = runner.invoke(app, [*base, "--benchmark", "flickr8k-expert", "--images", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "images folder" in result.output
    result = runner.invoke(app, [*base, "--benchmark", "pascal50s", "--images", str(tmp_path)])
    assert result.exit_code == 2 and "unknown benchmark" in result.output
