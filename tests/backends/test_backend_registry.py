"""A new judge backend is one file plus one line in ``mlmfilter.backends.BACKENDS``.

The file here is tests/backends/brightness_judge.py; each test adds its line to the registry for its own
length and then uses the backend through the MLM scorer and a real score run over real Flickr JPEG
shards: options, columns, image size, provenance, identity, building and closing all come from the
backend's own description, with no other change to the package.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from mlmfilter import backends
from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.images.decode import DecodeSpec, decode_sample
from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import run_stage
from mlmfilter.scorers import build_scorer
from mlmfilter.scorers.mlm import MLMOptions
from mlmfilter.scorers.stage import ScoringOptions, ScoringStage
from tests.backends import brightness_judge
from tests.support.builders import write_shard

#: the one line a new backend adds to mlmfilter/backends/__init__.py
LINE = ("brightness", "tests.backends.brightness_judge:INFO")


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, *LINE)
    brightness_judge.BUILT.clear()
    return brightness_judge


def _options(**backend_options) -> dict:
    return {"model": "brightness-v1", "metrics": "itm,odf", "backend": "brightness", "backend_options": backend_options}


def test_the_name_is_checked_against_the_registry(monkeypatch):
    pinned = "Input should be 'transformers', 'vllm' or 'openai'"
    with pytest.raises(ValidationError, match=f"backend\n  {pinned} \\[type=literal_error"):
        MLMOptions(backend="brightness")
    with pytest.raises(ValueError, match=f"^scorer 'mlm': backend: {pinned}$"):
        build_scorer("mlm", {"backend": 3})
    with pytest.raises(ValueError, match="unknown backend 'brightness'; choose one of transformers, vllm, openai"):
        backends.backend_info("brightness")

    monkeypatch.setitem(backends.BACKENDS, *LINE)
    assert MLMOptions(backend="brightness").backend_options == {"image_size": 32, "label": ""}
    assert backends.backend_info("brightness") is brightness_judge.INFO
    with pytest.raises(ValueError, match="Input should be 'transformers', 'vllm', 'openai' or 'brightness'"):
        build_scorer("mlm", {"backend": "brightnes"})


def test_the_scorer_asks_the_description_before_anything_is_built(registered):
    with pytest.raises(ValueError, match="image_sise"):  # its settings are checked by its own model, by name
        build_scorer("mlm", _options(image_sise=64))
    scorer = build_scorer("mlm", _options(image_size=48, label="first"))
    assert scorer.image_size == 48 and not scorer.wants_gpu()
    assert list(scorer.columns) == ["itm", "itm_mass", "itm_std", "odf", "odf_mass", "odf_std"]  # exact: no _unplaced
    prov = scorer.provenance()
    assert prov["model"] == {"backend": "brightness", "model": "brightness-v1", "image_size": 48}
    assert prov["readout_definition"] == brightness_judge.DEFINITION and prov["readout_bound"] == "exact"
    assert registered.BUILT == []  # described from its settings: nothing built yet

    identity = scorer.identity()
    assert identity["options"]["backend_options"] == {"image_size": 48}  # the label is operational
    assert build_scorer("mlm", _options(image_size=48, label="second")).identity() == identity
    assert build_scorer("mlm", _options(image_size=64)).identity() != identity


def test_a_score_run_uses_builds_and_closes_the_registered_backend(tmp_path, flickr_pairs, registered):
    pairs = flickr_pairs[:5]
    captions = [caption for _, caption in pairs[:4]] + ["a dog [refuse] on the grass"]
    samples = [
        {"key": f"{i:02d}", "jpg": path.read_bytes(), "txt": c} for i, ((path, _), c) in enumerate(zip(pairs, captions))
    ]
    write_shard(tmp_path / "in" / "00000.tar", samples)
    inputs = [str(tmp_path / "in" / "*.tar")]
    stage = ScoringStage(
        ScoringOptions(scorers=[{"name": "mlm", "options": _options(image_size=40)}], decode_workers=0)
    )
    summary = run_stage(tmp_path / "run", stage, sources=expand_inputs(inputs), inputs=inputs, read_options={})
    assert summary.ok, summary.shards_failed

    (judge,) = registered.BUILT  # built once, in setup, and closed with the stage
    assert judge.closed and stage.scorers[0].backend is None
    rows = {r["key"]: r for r in RunReader(tmp_path / "run").dataset("score").to_table().to_pylist()}
    for i, (path, caption) in enumerate(pairs[:4]):
        decoded = decode_sample(
            Sample(uid="0" * 32, shard="s", key="k", caption=caption, image_bytes=path.read_bytes()),
            DecodeSpec(shorter_side=40),  # the size the backend's description asked for
        )
        assert min(decoded.image.size) == 40
        grey = np.asarray(decoded.image.convert("L"), dtype=np.float64).mean()
        row = rows[f"{i:02d}"]
        assert row["error"] is None
        assert row["itm"] == row["odf"] == round(grey / 255 * 100)
        assert math.isclose(row["itm_mass"], 1.0) and row["itm_std"] == 0.0
    refused = rows["04"]
    assert refused["error"] == errors.SCORER_ERROR and "refused" in refused["error_detail"] and refused["itm"] is None
