"""DataComp's basic filter on real photos: each rule trips on its own."""

from __future__ import annotations

import io

from PIL import Image

from mlmfilter import api
from tests.support.builders import scores_dataset, write_shard


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_each_rule_trips_on_its_own(tmp_path, flickr_pairs):
    photo_path, caption = flickr_pairs[0]
    photo = Image.open(photo_path).convert("RGB")  # ~500 x 375
    small = photo.resize((180, 135))
    wide = photo.crop((0, 0, photo.width, photo.width // 4)).resize((900, 225))
    write_shard(
        tmp_path / "in" / "rules.tar",
        [
            {"key": "good", "jpg": jpeg(photo), "txt": caption},
            {"key": "two_words", "jpg": jpeg(photo), "txt": "pink dress"},
            {
                "key": "german",
                "jpg": jpeg(photo),
                "txt": "Ein kleines Mädchen in einem rosa Kleid klettert die Treppe hinauf",
            },
            {"key": "small", "jpg": jpeg(small), "txt": caption},
            {"key": "wide", "jpg": jpeg(wide), "txt": caption},
        ],
    )
    run = api.score([str(tmp_path / "in" / "rules.tar")], tmp_path / "run", ["rules"])
    rows = {r["key"]: r for r in scores_dataset(run.run_dir).to_table().to_pylist()}

    assert rows["good"]["rules_ok"] is True
    assert rows["good"]["rules_lang"] == "en" and rows["good"]["rules_lang_prob"] > 0.9
    assert (rows["good"]["rules_min_side"], rows["good"]["rules_words"]) == (min(photo.size), len(caption.split()))

    assert rows["two_words"]["rules_words"] == 2 and rows["two_words"]["rules_ok"] is False
    assert rows["german"]["rules_lang"] == "de" and rows["german"]["rules_ok"] is False
    assert rows["small"]["rules_min_side"] == 135 and rows["small"]["rules_ok"] is False
    assert abs(rows["wide"]["rules_aspect_ratio"] - 4.0) < 1e-6 and rows["wide"]["rules_ok"] is False
    # the original size is reported, not the reduced size the decoder produced for speed
    assert rows["wide"]["rules_min_side"] == 225


def test_thresholds_are_options(tmp_path, flickr_pairs):
    photo_path, _ = flickr_pairs[0]
    write_shard(tmp_path / "in" / "t.tar", [{"key": "k", "jpg": photo_path.read_bytes(), "txt": "pink dress"}])
    strict = api.score([str(tmp_path / "in" / "t.tar")], tmp_path / "a", ["rules"])
    lenient = api.score(
        [str(tmp_path / "in" / "t.tar")],
        tmp_path / "b",
        [{"name": "rules", "options": {"min_words": 2, "min_language_prob": 0.0}}],
    )
    get = lambda r: scores_dataset(r.run_dir).to_table()["rules_ok"][0].as_py()  # noqa: E731
    assert get(strict) is False and get(lenient) is True


def test_rules_failed_names_every_failed_rule():
    from mlmfilter.core.sample import Sample
    from mlmfilter.scorers import build_scorer

    scorer = build_scorer("rules")
    lazy, good = scorer.score(
        [
            Sample(uid="0" * 32, shard="s", key="a", caption="img", width=100, height=600),
            Sample(
                uid="1" * 32,
                shard="s",
                key="b",
                caption="A dog runs across a grassy field with a red ball .",
                width=500,
                height=375,
            ),
        ]
    )
    assert lazy["rules_ok"] is False
    assert set(lazy["rules_failed"].split(",")) == {
        "min_words",
        "min_chars",
        "min_side",
        "max_aspect_ratio",
        "language",
    }
    assert good["rules_ok"] is True and good["rules_failed"] == ""
