"""The HTML report, rendered in headless Chromium: plots and thumbnails must be there and visible."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mlmfilter.core.ids import fingerprint_of
from mlmfilter.core.stats import ShardStats
from mlmfilter.io.sources import expand_inputs
from mlmfilter.report import ReportOptions, gather_report, open_run, write_report
from mlmfilter.runs.folder import RunFolder
from mlmfilter.selection.select import select_run
from tests.support.headless import check_page, screenshot
from tests.support.report import RANDOM_WARNING, build_run, make_shards, scores_of


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, flickr_pairs):
    root = tmp_path_factory.mktemp("report-run")
    shards = make_shards(flickr_pairs, root / "shards")
    return build_run(root / "run", shards)


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory, flickr_pairs):
    """A run with a selection (rules_ok + top 40% by clip_score) and an enhancement stage."""
    root = tmp_path_factory.mktemp("report-selected")
    run = build_run(root / "run", make_shards(flickr_pairs, root / "shards"))
    select_run(run, run / "selection", expression="rules_ok", top_fraction=0.4, by="clip_score")
    _add_enhancement_stage(run)
    return run


def _add_enhancement_stage(run):
    """An `enhance` stage table as the enhancement stage writes it (one accepted, one rejected rewrite)."""
    scores = scores_of(run)
    folder = RunFolder(run)
    stage = folder.stage("enhance")
    stage.create()
    fingerprint = fingerprint_of({"kind": "enhance"})
    stage.check_or_write_settings({"kind": "enhance", "identity": {}, "fingerprint": fingerprint})
    by_shard: dict[str, list[dict]] = {}
    for i, (uid, shard, key) in enumerate(zip(scores["uid"], scores["shard"], scores["key"])):
        if scores["error"][i] is not None or len(by_shard.get(shard, [])) >= 1:
            continue
        accepted = not by_shard
        by_shard.setdefault(shard, []).append(
            {
                "uid": uid,
                "shard": shard,
                "key": key,
                "original_caption": f"original caption {key}",
                "candidates": [f"rewritten caption {key}"],
                "itm_before": 20.0,
                "itm_after": 80.0 if accepted else 10.0,
                "decision": "accepted" if accepted else "rejected",
                "reason": None if accepted else "not_better",
                "caption": f"rewritten caption {key}" if accepted else None,
                "error": None,
                "error_detail": None,
            }
        )
    for shard, rows in by_shard.items():
        stage.finish_shard(shard, pa.Table.from_pylist(rows), ShardStats(), {"fingerprint": fingerprint})


class _Cards(HTMLParser):
    """Collects the report's cards: data-uid, thumbnail src and text, per gallery heading."""

    def __init__(self):
        super().__init__()
        self.heading, self.cards, self.links, self._card, self._in_heading = "", [], [], None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])
        if tag in ("h3", "h4"):
            self._in_heading, self.heading = True, ""
        if tag == "div" and "card" in (attrs.get("class") or "").split():
            self._card = {"uid": attrs["data-uid"], "heading": self.heading.strip(), "text": "", "thumb": None}
            self.cards.append(self._card)
        if tag == "img" and self._card is not None and "thumb" in (attrs.get("class") or ""):
            self._card["thumb"] = attrs["src"]

    def handle_endtag(self, tag):
        if tag in ("h3", "h4"):
            self._in_heading = False

    def handle_data(self, data):
        if self._in_heading:
            self.heading += data
        elif self._card is not None:
            self._card["text"] += data


def _cards(html_text: str) -> _Cards:
    parser = _Cards()
    parser.feed(html_text)
    return parser


def test_report_shows_plots_and_thumbnails_in_chromium(scored_run, tmp_path):
    page = write_report(scored_run, tmp_path / "report.html")
    probe = check_page(page, tmp_path)
    assert probe["images"] > 10 and probe["broken"] == [], probe
    assert probe["decoded"] == probe["images"]
    assert probe["thumbs"] >= 10 and probe["scatter"] >= 1
    # clip_score, itm, rules_words: a histogram and a kept-fraction curve each, plus the error bars
    assert probe["svgs"] >= 7 and probe["svg_bars"] >= 10
    assert probe["warning_text"].strip() == RANDOM_WARNING
    assert probe["warning_color"] == "rgb(176, 0, 32)"  # red, as the page's .warning style says

    # the pixels: the first thumbnail's box holds a photo, not the page background
    shot = np.asarray(Image.open(screenshot(page, tmp_path)).convert("RGB"), dtype=np.float64)
    left, top, width, height = (round(v) for v in probe["first_thumb"])
    region = shot[top + 2 : top + height - 2, left + 2 : left + width - 2]
    assert region.size and region.std() > 20, "the thumbnail area is blank in the screenshot"
    assert (np.abs(region - 255).sum(axis=2) > 30).mean() > 0.5  # mostly not white background


def test_report_is_self_contained_and_shows_the_right_pairs(scored_run, tmp_path):
    page = write_report(scored_run, tmp_path / "report.html", options=ReportOptions(gallery_size=3))
    text = page.read_text(encoding="utf-8")
    parsed = _cards(text)
    # nothing to fetch: every src/href is inline data or an anchor on the page
    assert all(link.startswith(("data:", "#")) for link in parsed.links), [
        link[:60] for link in parsed.links if not link.startswith(("data:", "#"))
    ]

    scores = scores_of(scored_run)
    ok = [i for i, e in enumerate(scores["error"]) if e is None]
    best = max(ok, key=lambda i: scores["clip_score"][i])
    worst = min(ok, key=lambda i: scores["clip_score"][i])
    top = [c for c in parsed.cards if c["heading"] == "Top clip_score"]
    bottom = [c for c in parsed.cards if c["heading"] == "Bottom clip_score"]
    assert len(top) == 3 and top[0]["uid"] == scores["uid"][best]
    assert bottom[0]["uid"] == scores["uid"][worst]
    assert all(c["thumb"].startswith("data:image/jpeg;base64,") for c in top)
    # clip_cosine ranks the pairs exactly as clip_score does: no galleries of its own
    assert not [c for c in parsed.cards if "clip_cosine" in c["heading"]]
    assert "orders the pairs as clip_score does" in text

    # the error table by reason, with examples read back from the shard
    errors = {c["heading"]: c for c in parsed.cards if c["heading"].startswith(("truncated_image", "empty_caption"))}
    assert set(errors) == {"truncated_image (1)", "empty_caption (1)"}
    assert errors["truncated_image (1)"]["thumb"] is None  # the broken JPEG has no thumbnail, it says why
    assert "truncated_image" in errors["truncated_image (1)"]["text"]
    # rules_ok false examples: every one really has rules_ok false
    failing = {c["uid"] for c in parsed.cards if c["heading"] == "rules_ok is false"}
    expected = {u for u, flag in zip(scores["uid"], scores["rules_ok"]) if flag is False}
    assert failing and failing <= expected
    # provenance
    assert "tiny-random-clip" in text


def test_report_of_a_selection_and_rewrites(selected_run, tmp_path):
    page = write_report(selected_run, tmp_path / "report.html")
    text = page.read_text(encoding="utf-8")
    parsed = _cards(text)
    selection = json.loads((selected_run / "selection" / "selection.json").read_text())
    kept = selection["counts"]["kept"]
    assert re.search(rf"kept <b>{kept}</b> of 12 pairs", text)
    cut = selection["threshold"]["score"]
    scores = scores_of(selected_run)
    by_uid = dict(zip(scores["uid"], scores["clip_score"]))
    kept_lowest = [c["uid"] for c in parsed.cards if c["heading"] == "Kept, lowest clip_score"]
    dropped_highest = [c["uid"] for c in parsed.cards if c["heading"] == "Dropped below the cut, highest clip_score"]
    assert kept_lowest and by_uid[kept_lowest[0]] == pytest.approx(cut)
    passed = {u for u, flag in zip(scores["uid"], scores["rules_ok"]) if flag}
    assert dropped_highest and all(u in passed and by_uid[u] <= cut for u in dropped_highest)
    by_expression = [c["uid"] for c in parsed.cards if c["heading"] == "Dropped by the expression rules_ok (random)"]
    assert by_expression and not set(by_expression) & passed
    # the clip_score plots mark the selection's cut, not the median
    assert "nearest the selection&#39;s cut" in text or "nearest the selection's cut" in text

    rewrites = [c for c in parsed.cards if c["heading"] in ("Accepted rewrites", "Rejected rewrites")]
    accepted = [c for c in rewrites if c["heading"] == "Accepted rewrites"]
    assert (
        len(accepted) == 1 and "original caption" in accepted[0]["text"] and "rewritten caption" in accepted[0]["text"]
    )
    assert accepted[0]["thumb"].startswith("data:image/jpeg")
    assert "itm_before 20" in accepted[0]["text"] and "itm_after 80" in accepted[0]["text"]
    rejected = [c for c in rewrites if c["heading"] == "Rejected rewrites"]
    assert len(rejected) == 1 and "rewritten caption" in rejected[0]["text"] and "not_better" in rejected[0]["text"]

    probe = check_page(page, tmp_path)
    assert probe["broken"] == [] and probe["decoded"] == probe["images"] > 10


def test_gather_streams_in_small_batches_with_the_same_result(scored_run, monkeypatch):
    """Pair picks do not depend on how the tables are cut into batches."""
    import mlmfilter.report.scan as scan_module

    run = open_run(scored_run)
    whole = gather_report(run, run.url, options=ReportOptions(gallery_size=4))
    monkeypatch.setattr(scan_module, "BATCH_ROWS", 3)
    batches = []
    real_batch = scan_module.Batch

    def counting_batch(*args, **kwargs):
        batches.append(args[0].num_rows)
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(scan_module, "Batch", counting_batch)
    small = gather_report(run, run.url, options=ReportOptions(gallery_size=4))
    for a, b in zip(whole.columns, small.columns):
        assert [r.uid for r in a.top] == [r.uid for r in b.top]
        assert [r.uid for r in a.borderline] == [r.uid for r in b.borderline]
    assert max(batches) <= 3
    assert whole.errors[0][:2] == small.errors[0][:2]
    assert [p.a_over_b[0].uid for p in whole.pairs if p.a_over_b] == [
        p.a_over_b[0].uid for p in small.pairs if p.a_over_b
    ]


def test_report_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="not a run folder"):
        write_report(tmp_path, tmp_path / "report.html")


def test_report_of_a_run_scored_by_the_pipeline(tmp_path, flickr_pairs):
    """End to end on what `mlmfilter score` + `select` write: the rules scorer on real shards."""
    from mlmfilter import api

    shards = make_shards(flickr_pairs, tmp_path / "shards", n_shards=2, per_shard=4)
    summary = api.score([str(tmp_path / "shards" / "*.tar")], tmp_path / "run", ["rules"], workers=1)
    api.select(summary.run_dir, expression="rules_ok")
    page = write_report(summary.run_dir, tmp_path / "report.html")
    text = page.read_text(encoding="utf-8")
    parsed = _cards(text)
    assert "8 pairs" in text and "shards 2/2 complete" in text
    errors = {c["heading"] for c in parsed.cards}
    assert {"truncated_image (1)", "empty_caption (1)"} <= errors
    kept = int(re.search(r"kept <b>(\d+)</b> of 8 pairs", text).group(1))
    assert kept == sum(1 for v in scores_of(summary.run_dir)["rules_ok"] if v)
    assert all(c["thumb"] for c in parsed.cards if c["heading"] == "Kept (random)")
    assert len(shards) == 2


def test_an_incomplete_run_says_so_and_a_named_selection_must_be_one(tmp_path, flickr_pairs):
    """Completeness, warnings and the selection come from the run layer's readers (RunReader,
    SelectionFolder): the page states what is missing, and a folder that holds no selection is refused."""
    from mlmfilter.report.render import render_report

    shards = make_shards(flickr_pairs, tmp_path / "shards", n_shards=3, per_shard=4)
    run_dir = build_run(tmp_path / "run", shards[:2])
    RunFolder(run_dir).open([str(p) for p in shards], expand_inputs([str(p) for p in shards]), {})  # a third, unscored
    run = open_run(run_dir)
    data = gather_report(run, run.url)
    assert data.completeness == run.completeness("score") and not data.completeness.complete
    assert data.warnings == run.warnings() == [RANDOM_WARNING] and data.selection is None
    text = render_report(data)
    assert "shards 2/3 complete" in text
    assert "The run is incomplete: 1 shard(s) not scored yet (00000002)" in text

    with pytest.raises(
        FileNotFoundError, match=r"nowhere is not a selection folder \(needs selection.json and uids.npy\)"
    ):
        gather_report(run, run.url, str(tmp_path / "nowhere"))
