"""`mlmfilter verify RUN`: a sample of a finished run re-scored at batch size 1, in fp32 and on a second
backend, per metric against the readout bound of its provenance; exit 1 when a metric moves beyond it.
On the demo data and on a run scored with a saved tiny LLaVA judge."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support import mlm as mlm_support
from tests.support.builders import flickr_shards

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, flickr_pairs, smollm2_cache_dir):
    """A run scored in batches of 4 (pairs padded together) with a tiny LLaVA, exact expected readout, fp32."""
    root = tmp_path_factory.mktemp("verify")
    flickr_shards(flickr_pairs, root / "in", n_shards=1, per_shard=4)
    model = str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))
    run = root / "run"
    result = cli(
        "score", root / "in" / "*.tar", "-o", run, "--scorer", "mlm", "--model", model, "--metrics", "itm,odf",
        "--conversation", "vicuna_v1", "--dtype", "fp32", "--batch-size", 4, "--device", "cpu",
        "--option", "mlm.trie_threshold=0",  # the exact readout: the bound is float rounding only
        "--option", "mlm.min_mass=0",  # a tiny random judge puts little mass on numbers: no floor
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return run


def test_verify_a_run_within_its_bound(scored_run):
    result = cli("verify", scored_run, "--sample", 3, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["sampled"] == 3 and report["checks"] == ["batch_size_1", "fp32"]
    assert report["readout"] == "expected" and report["readout_bound"].startswith("exact")
    assert [m["metric"] for m in report["metrics"]] == ["itm", "odf"]
    for metric in report["metrics"]:
        # batching and padding move nothing beyond float noise, far inside the readout's bound
        assert metric["differences"]["batch_size_1"] < 1e-4 and metric["bound"] == pytest.approx(1e-3)
        assert metric["exceeded"] == {"batch_size_1": 0, "fp32": 0}


def test_a_run_whose_scores_moved_fails_with_exit_1(scored_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(scored_run, run)
    for table_file in (run / "score" / "tables").glob("*.parquet"):  # as if batching had moved every itm by 5
        table = pq.read_table(table_file)
        itm = pa.compute.add(table["itm"], pa.scalar(5.0, pa.float32()))
        pq.write_table(table.set_column(table.schema.get_field_index("itm"), "itm", itm), table_file)
    result = cli("verify", run, "--sample", 2, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert not report["ok"]
    itm, odf = report["metrics"]
    assert not itm["ok"] and itm["differences"]["batch_size_1"] == pytest.approx(5.0, abs=1e-3) and odf["ok"]


def test_verify_on_a_second_backend(scored_run, monkeypatch):
    """A second backend that scores otherwise (the image's brightness) is caught."""
    from mlmfilter import backends

    monkeypatch.setitem(backends.BACKENDS, "brightness", "tests.backends.brightness_judge:INFO")
    result = cli("verify", scored_run, "--sample", 2, "--backend", "brightness", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["checks"] == ["batch_size_1", "fp32", "backend"]
    assert all(m["differences"]["backend"] > 1 and m["exceeded"]["backend"] for m in report["metrics"])
    assert all(m["exceeded"]["batch_size_1"] == 0 for m in report["metrics"])


@pytest.mark.slow
def test_verify_the_demo_run(tmp_path):
    """The quickstart's run (its judge is the loud random stand-in offline): verify works on it."""
    from mlmfilter.demo.data import make_sample_shards

    make_sample_shards(tmp_path / "shards")
    scored = cli(
        "score", tmp_path / "shards" / "*.tar", "-o", tmp_path / "run", "--scorer", "mlm",
        "--model", "HuggingFaceTB/SmolVLM-256M-Instruct", "--metrics", "itm", "--allow-random-fallback",
        "--option", "mlm.min_mass=0",  # as the demo scores its random stand-in
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    result = cli("verify", tmp_path / "run", "--sample", 3)
    assert result.exit_code == 0, result.output
    assert "verified: every metric within its bound" in result.output and "itm" in result.output
    assert "readout bound (provenance)" in result.output


def test_verify_needs_a_scored_mlm_stage(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    assert cli("score", tmp_path / "in" / "*.tar", "-o", tmp_path / "run").exit_code == 0
    result = cli("verify", tmp_path / "run")
    assert result.exit_code == 2 and "no mlm scorer to verify" in result.output
