"""`eval human` on broken or hostile annotation files: the right file is named, a byte-order mark is not part
of the first image's name, `rating: true` is no rating, a negative --bootstrap is refused, and a deeply
nested JSON file is one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app


@pytest.fixture
def images(tmp_path, flickr_pairs):
    folder = tmp_path / "images"
    folder.mkdir()
    for path, _ in flickr_pairs[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _eval(benchmark: str, images, annotations, *extra):
    args = ["eval", "human", "--benchmark", benchmark, "--images", str(images), "--annotations", str(annotations)]
    return CliRunner().invoke(app, [*args, "-s", "rules", *map(str, extra)], catch_exceptions=False)


def _one_error_line(result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.output
    return lines[0]


def test_a_missing_annotations_file_is_named_not_the_caption_file(tmp_path, images):
    for benchmark in ("flickr8k-expert", "flickr8k-crowdflower"):
        line = _one_error_line(_eval(benchmark, images, tmp_path / "ExpertAnnotations.txt"), "annotation file")
        assert "ExpertAnnotations.txt" in line and "caption file" not in line


def test_a_byte_order_mark_is_not_part_of_the_first_image(tmp_path, images, flickr_pairs):
    names = [path.name for path, _ in flickr_pairs[:3]]
    tokens = tmp_path / "Flickr8k.token.txt"
    tokens.write_text("".join(f"{name}#0\t{caption}\n" for name, (_, caption) in zip(names, flickr_pairs)), "utf-8-sig")
    expert = tmp_path / "ExpertAnnotations.txt"
    expert.write_text(
        "".join(f"{name}\t{names[(i + 1) % 3]}#0\t{i + 1}\t2\t3\n" for i, name in enumerate(names)), "utf-8-sig"
    )
    out = tmp_path / "expert.json"
    result = _eval("flickr8k-expert", images, expert, "--bootstrap", "0", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["images_missing"] == 0 and report["judgements_scored"] == 9

    composite = tmp_path / "composite.json"
    entries = [
        {"image_path": name, "caption": caption, "rating": i}
        for i, (name, (_, caption)) in enumerate(zip(names, flickr_pairs))
    ]
    composite.write_text(json.dumps(entries), "utf-8-sig")
    result = _eval("composite", images, composite, "--bootstrap", "0", "-o", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["judgements_scored"] == 3


def test_a_boolean_rating_is_refused_not_counted_as_one(tmp_path, images, flickr_pairs):
    path, caption = flickr_pairs[0]
    ratings = tmp_path / "ratings.json"
    ratings.write_text(json.dumps([{"image_path": path.name, "caption": caption, "rating": True}] * 3))
    line = _one_error_line(_eval("composite", images, ratings), "numeric rating")
    assert "True" in line and "ratings.json" in line


def test_a_negative_bootstrap_is_refused(tmp_path, images, flickr_pairs):
    ratings = tmp_path / "ratings.json"
    entries = [{"image_path": p.name, "caption": c, "rating": i} for i, (p, c) in enumerate(flickr_pairs[:3])]
    ratings.write_text(json.dumps(entries))
    _one_error_line(_eval("composite", images, ratings, "--bootstrap", "-1"), "--bootstrap")


def test_a_deeply_nested_json_file_is_one_line(tmp_path, images):
    nested = tmp_path / "nested.json"
    nested.write_text('{"a": ' * 50_000 + "1" + "}" * 50_000)
    _one_error_line(_eval("composite", images, nested), "nested.json")
