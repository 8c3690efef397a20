"""The enhance stage end to end with tiny random models: real generation, real judge, gibberish rejected."""

from __future__ import annotations

import pytest

from mlmfilter.enhance.checks import CHECK_REASONS
from mlmfilter.enhance.stage import EnhanceOptions, EnhanceStage
from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import run_stage
from mlmfilter.scorers.stage import ScoringOptions, ScoringStage
from tests.support import mlm as mlm_support
from tests.support.builders import flickr_shards
from tests.support.enhance import one_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rewrite", "fuse"])
def test_tiny_models_write_gibberish_and_the_checks_reject_it(tmp_path, flickr_pairs, smollm2_cache_dir, mode):
    model = str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))
    # min_mass 0: a tiny random judge puts ~0.02% on numbers; the floor is tested on its own
    judge_options = {"model": model, "metrics": "itm", "device": "cpu", "dtype": "fp32", "min_mass": 0.0}
    judge = {"name": "mlm", "options": judge_options}
    inputs = [str(p) for p in flickr_shards(flickr_pairs[:3], tmp_path / "in", n_shards=1, per_shard=3)]
    summary = run_stage(
        tmp_path / "run",
        ScoringStage(ScoringOptions(scorers=[judge], decode_workers=0)),
        sources=expand_inputs(inputs),
        inputs=inputs,
        read_options={},
    )
    assert summary.ok, summary.shards_failed
    options = EnhanceOptions(
        where="itm <= 100",
        mode=mode,
        model=model,
        device="cpu",
        dtype="fp32",
        judge=[judge],
        sampling={"max_new_tokens": 24, "temperature": 1.0, "n": 2, "seed": 3},
    )
    summary = run_stage(tmp_path / "run", EnhanceStage(options))
    assert summary.ok, summary.shards_failed
    rows = RunReader(tmp_path / "run").dataset("enhance").to_table().to_pylist()
    assert len(rows) == 3
    for row in rows:
        assert row["decision"] == "rejected" and row["caption"] is None and row["error"] is None
        assert row["reason"] in CHECK_REASONS, row
        assert len(row["candidates"]) == 2 and all(row["candidates"])
        assert all(reason in CHECK_REASONS for reason in row["candidate_reasons"])
        assert (row["intermediate"] is not None) == (mode == "fuse")
    counters = RunReader(tmp_path / "run").stats("enhance")["counters"]
    assert counters["tried"] == 3 and counters.get("accepted", 0) == 0
    provenance = RunReader(tmp_path / "run").provenance("enhance")
    assert provenance["generator"]["family"] == "llava" and provenance["mode"] == mode
