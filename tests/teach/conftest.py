"""Fixtures of the teach tests: one `transformers serve` for every module of the package."""

from __future__ import annotations

import pytest

from tests.support.serve import save_tiny_served_llava, transformers_serve


@pytest.fixture(scope="package")
def transformers_server(tmp_path_factory):
    """`transformers serve` with a tiny random LLaVA (real processor: it takes the image data URL)."""
    model_dir = save_tiny_served_llava(tmp_path_factory.mktemp("tiny-llava") / "model")
    with transformers_serve(model_dir, tmp_path_factory.mktemp("serve-log")) as base_url:
        yield base_url, str(model_dir)
