"""`teach label --dry-run`: requests, tokens and API cost with and without the Batch API, counted from the
teach folder's real pairs (captions, image sizes); nothing is sent (no server, no key)."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.teach.label import LabelOptions
from mlmfilter.teach.plan import image_tokens, price_of
from tests.support.teach import teach_folder

CAPTIONS = ["a dog runs on the beach", "two children play in a fountain", "a man climbs a rock wall"]


def test_image_tokens_follow_openais_tile_rule():
    assert image_tokens(2048, 4096, "gpt-4o") == 1105  # OpenAI's worked example: 6 tiles
    assert image_tokens(1024, 1024, "gpt-4o") == 765  # 768 x 768: 4 tiles
    assert image_tokens(500, 375, "gpt-4o") == 255  # never scaled up: one tile
    assert image_tokens(1024, 1024, "gpt-4o-mini") == 2833 + 4 * 5667
    assert price_of("gpt-4o-2024-08-06") == price_of("gpt-4o") == (2.50, 10.00)
    assert price_of("my-local-teacher") is None


def test_label_plan_counts_requests_tokens_and_cost(tmp_path, flickr_pairs, monkeypatch):
    from mlmfilter import api

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS)
    plan = api.plan_teach_label(folder.path, LabelOptions(model="gpt-4o", metrics=["itm", "odf"]))
    [labels] = plan.kinds
    assert labels.requests == plan.requests == 3 * 2
    sizes = [Image.open(flickr_pairs[i][0]).size for i in range(3)]
    images = 2 * sum(image_tokens(w, h, "gpt-4o") for w, h in sizes)
    assert images < labels.input_tokens < images + 6 * 400  # plus the prompts' text
    assert labels.output_tokens == 6 * 150 and labels.output_tokens_max == 6 * 512
    cost = (plan.input_tokens * 2.50 + plan.output_tokens * 10.00) / 1e6
    assert plan.cost() == pytest.approx(cost) and plan.cost(batch=True) == pytest.approx(cost / 2)
    assert plan.cost(worst=True) > plan.cost()


def test_teach_label_dry_run_prints_the_cost_and_sends_nothing(tmp_path, flickr_pairs):
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS)
    result = CliRunner().invoke(
        app,
        ["teach", "label", str(folder.path), "--model", "gpt-4o", "--base-url", "http://127.0.0.1:9/v1", "--dry-run"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "label" in text and "12" in text  # 3 pairs x 4 metrics
    assert "with the Batch API" in text and "API cost: $" in text
    assert not (folder.path / "run").exists() and not (folder.path / "labels.parquet").exists()


def test_an_unpriced_teacher_takes_prices_from_the_command_line(tmp_path, flickr_pairs):
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS)
    runner = CliRunner()
    args = ["teach", "label", str(folder.path), "--model", "local-vlm", "--dry-run"]
    unpriced = runner.invoke(app, args, catch_exceptions=False)
    assert unpriced.exit_code == 0 and "no recorded price" in " ".join(unpriced.output.split())
    priced = runner.invoke(app, [*args, "--price", "1,2"], catch_exceptions=False)
    assert priced.exit_code == 0 and "API cost: $" in priced.output
    bad = runner.invoke(app, [*args, "--price", "1"])
    assert bad.exit_code == 2 and "IN,OUT" in bad.output
