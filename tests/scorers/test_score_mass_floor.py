"""A judge distribution with almost no probability on the numbers 0..100 is not a score.

A real tiny judge (random LLaVA weights, the real SmolLM2 tokenizer: ~0.02% of its probability on numbers,
like the judge of the report) gives no score, its mass is recorded, a shard of such rows is refused, and
enhance never accepts a rewrite on it. A judge that answers with numbers except for a few pairs (the
``mass`` backend of tests/support) shows how such rows look and that no selection decides on them.
"""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlmfilter import backends
from mlmfilter.cli.app import app
from mlmfilter.core import errors
from mlmfilter.core.sample import Sample
from mlmfilter.core.stats import BlockStats
from mlmfilter.enhance.stage import EnhanceOptions, EnhanceStage
from mlmfilter.images.decode import DecodeSpec, decode_sample
from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.folder import RunFolder
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import run_stage
from mlmfilter.scorers import build_scorer
from mlmfilter.scorers.base import ShardRefused
from mlmfilter.scorers.stage import ScoringOptions, ScoringStage
from tests.support import mass_judge
from tests.support import mlm as mlm_support
from tests.support.builders import flickr_shards
from tests.support.enhance import ScriptedWriter, one_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

JUDGE_FLAGS = ["--metrics", "itm", "--conversation", "vicuna_v1", "--device", "cpu", "--dtype", "fp32"]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def numberless_judge(smollm2_cache_dir) -> str:
    return str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))


@pytest.fixture(scope="module")
def shard(tmp_path_factory, flickr_pairs):
    return flickr_shards(flickr_pairs[:3], tmp_path_factory.mktemp("mass") / "in", n_shards=1, per_shard=3)[0]


@pytest.fixture
def mass_backend(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, *mass_judge.LINE)


def _judge(model: str, **options):
    return build_scorer(
        "mlm",
        {
            "model": model,
            "conversation": "vicuna_v1",
            "device": "cpu",
            "dtype": "fp32",
            "metrics": "itm,odf",
            **options,
        },
    )


def _decoded(pairs, scorer):
    samples = [
        Sample(uid=f"{i:032x}", shard="s", key=f"{i}", caption=caption, image_bytes=path.read_bytes())
        for i, (path, caption) in enumerate(pairs)
    ]
    return [decode_sample(s, DecodeSpec(shorter_side=scorer.image_size)) for s in samples]


def test_a_judge_without_mass_on_numbers_gives_no_score_and_its_shard_is_refused(numberless_judge, flickr_pairs):
    scorer = _judge(numberless_judge)
    samples = _decoded(flickr_pairs[:3], scorer)
    stats = BlockStats()
    rows = scorer.score(samples, stats)
    for sample, row in zip(samples, rows):
        assert sample.error == errors.LOW_SCORE_MASS and "below min_mass 0.5" in sample.error_detail
        assert row["itm"] is None and row["odf"] is None  # no score ...
        assert 0 < row["itm_mass"] < 1e-3 and row["itm_std"] > 0  # ... but the evidence is kept
    assert stats.failed[errors.LOW_SCORE_MASS] == 3 and stats.done == 0
    with pytest.raises(ShardRefused, match=r"for 3 of 3 pairs .* min_mass=0\.5 .*mlm\.min_mass"):
        scorer.check_shard(stats)

    # what used to be taken for scores: the floor off, the same judge gives "means" of noise
    off = _judge(numberless_judge, min_mass=0.0)
    noise = off.score(_decoded(flickr_pairs[:3], off))
    assert all(0 <= row["itm"] <= 100 and row["itm_mass"] < 1e-3 for row in noise)


def test_score_refuses_a_shard_the_judge_cannot_score_and_select_then_refuses_the_run(
    tmp_path, shard, numberless_judge
):
    run = tmp_path / "run"
    result = _invoke("score", shard, "-o", run, "--scorer", "rules,mlm", "--model", numberless_judge, *JUDGE_FLAGS)
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "shard 00000000 failed" in flat and "ShardRefused" in flat and "min_mass=0.5" in flat
    assert RunFolder(run).stage("score").done_shards() == []  # no table, no marker: nothing to decide on
    assert _invoke("select", run, "--where", "itm >= 0", "-o", tmp_path / "sel").exit_code == 2


def test_a_few_pairs_without_mass_are_error_rows_no_selection_decides_on(tmp_path, flickr_pairs, mass_backend):
    captions = [caption for _, caption in flickr_pairs[:4]]
    captions[1] = "[dim] " + captions[1]
    pairs = [(path, caption) for (path, _), caption in zip(flickr_pairs[:4], captions)]
    shard = flickr_shards(pairs, tmp_path / "in", n_shards=1, per_shard=4)[0]
    run = tmp_path / "run"
    result = _invoke(
        "score", shard, "-o", run, "--scorer", "rules,mlm", "--backend", "mass", "--model", "m", "--metrics", "itm"
    )
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "low_score_mass: 1" in flat and "1 pairs have no judge score" in flat
    rows = {row["key"]: row for row in pq.read_table(run / "score" / "tables" / "00000000.parquet").to_pylist()}
    dim = rows["000000001"]
    assert dim["error"] == errors.LOW_SCORE_MASS and dim["itm"] is None
    assert math.isclose(dim["itm_mass"], mass_judge.DIM_MASS, rel_tol=1e-3)
    assert all(r["error"] is None and r["itm"] is not None for k, r in rows.items() if k != "000000001")

    for args, kept in ((["--where", "itm >= 0"], 3), (["--top-fraction", "1", "--by", "itm"], 3)):
        out = tmp_path / f"sel{kept}{len(args)}"
        assert _invoke("select", run, *args, "-o", out).exit_code == 0
        selected = pq.read_table(out / "kept.parquet").to_pylist()
        assert len(selected) == kept and "000000001" not in {r["key"] for r in selected}
    cascade = _invoke("score", shard, "-o", run, "--stage", "later", "--only", "itm >= 0", "--scorer", "rules")
    assert cascade.exit_code == 0, cascade.output
    later = {row["key"]: row for row in pq.read_table(run / "later" / "tables" / "00000000.parquet").to_pylist()}
    assert later["000000001"]["skipped"] is True and later["000000000"]["skipped"] is False


def _rewrite(caption: str) -> str:
    return caption.rstrip(" .") + " , seen in bright daylight"


def _enhance(run, judge: dict, original: list[str]):
    """Enhance every pair at margin 0 with fluent rewrites that pass the checks, re-scored by ``judge``."""
    writer = ScriptedWriter(lambda prompt: [_rewrite(next(c for c in original if c in prompt))])
    options = EnhanceOptions(
        where="rules_chars > 0", model="scripted-writer", judge=[judge], decision={"compare": ["itm"], "margin": 0}
    )
    return run_stage(run, EnhanceStage(options, generator=writer))


def test_enhance_accepts_no_rewrite_a_judge_without_mass_scored(tmp_path, shard, flickr_pairs, numberless_judge):
    run = tmp_path / "run"
    inputs = [str(shard)]
    scored = run_stage(
        run, ScoringStage(ScoringOptions(decode_workers=0)), sources=expand_inputs(inputs), inputs=inputs
    )
    assert scored.ok
    judge = {
        "name": "mlm",
        "options": {
            "model": numberless_judge,
            "metrics": "itm",
            "conversation": "vicuna_v1",
            "device": "cpu",
            "dtype": "fp32",
        },
    }
    summary = _enhance(run, judge, [c.strip() for _, c in flickr_pairs[:3]])
    assert not summary.ok and "ShardRefused" in summary.shards_failed["00000000"]
    assert RunReader(run).table("00000000", "enhance") is None  # nothing was decided, nothing to reshard

    assert _invoke("select", run, "--where", "rules_chars > 0").exit_code == 0
    result = _invoke("reshard", run / "selection", tmp_path / "out", "--captions-stage", "enhance", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output[result.output.index("{") :])
    assert stats["kept"] == 3 and stats["captions_replaced"] == 0  # every original caption kept


def test_enhance_rejects_a_pair_whose_scores_have_no_mass(tmp_path, flickr_pairs, mass_backend):
    originals = [c.strip() for _, c in flickr_pairs[:4]]
    originals[2] = "[dim] " + originals[2]
    pairs = [(path, caption) for (path, _), caption in zip(flickr_pairs[:4], originals)]
    shard = flickr_shards(pairs, tmp_path / "in", n_shards=1, per_shard=4)[0]
    run = tmp_path / "run"
    inputs = [str(shard)]
    assert run_stage(
        run, ScoringStage(ScoringOptions(decode_workers=0)), sources=expand_inputs(inputs), inputs=inputs
    ).ok
    summary = _enhance(run, {"name": "mlm", "options": {"model": "m", "metrics": "itm", "backend": "mass"}}, originals)
    assert summary.ok, summary.shards_failed
    rows = {row["key"]: row for row in RunReader(run).table("00000000", "enhance").to_pylist()}
    dim = rows["000000002"]
    assert dim["decision"] == "rejected" and dim["reason"] == errors.LOW_SCORE_MASS and dim["caption"] is None
    assert "low_score_mass" in dim["reason_detail"] and dim["candidate_reasons"] == [errors.LOW_SCORE_MASS]
    assert all(r["reason"] != errors.LOW_SCORE_MASS for k, r in rows.items() if k != "000000002")
    assert summary.stats.counters[f"rejected:{errors.LOW_SCORE_MASS}"] == 1
