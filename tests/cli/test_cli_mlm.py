"""The judge through the CLI, end to end: score real shards with a saved tiny LLaVA, select on its columns, resume."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.runs.folder import RunFolder
from tests.support import mlm as mlm_support
from tests.support.builders import flickr_shards, scores_dataset, write_shard

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def llava_dir(smollm2_cache_dir) -> str:
    return str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))


@pytest.fixture()
def shards(tmp_path, flickr_pairs):
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=2, per_shard=3)
    write_shard(
        tmp_path / "in" / "00000002.tar",
        [
            {"key": "broken", "jpg": flickr_pairs[0][0].read_bytes()[:5000], "txt": "a girl on wooden stairs"},
            {"key": "nocaption", "jpg": flickr_pairs[1][0].read_bytes(), "txt": ""},
        ],
    )
    return tmp_path / "in" / "*.tar"


def test_score_with_mlm_then_select_on_its_columns(tmp_path, shards, llava_dir):
    run = tmp_path / "run"
    score_args = [
        "score",
        shards,
        "-o",
        run,
        "--scorer",
        "mlm",
        "--model",
        llava_dir,
        "--metrics",
        "itm,odf",
        "--conversation",
        "vicuna_v1",
        "--dtype",
        "fp32",
        "--option",
        "mlm.min_mass=0",  # a tiny random judge puts ~0.02% on numbers: the floor is tested on its own
    ]
    invoke(*score_args)
    table = scores_dataset(run).to_table()
    rows = {r["key"]: r for r in table.to_pylist()}
    assert len(rows) == 8
    assert {"itm", "odf", "itm_mass", "odf_std"} <= set(table.column_names)
    assert "ctq" not in table.column_names and "su" not in table.column_names
    assert rows["broken"]["error"] == "truncated_image" and rows["broken"]["itm"] is None
    assert rows["nocaption"]["error"] == "empty_caption"
    good = [r for r in rows.values() if r["error"] is None]
    assert len(good) == 6 and all(0.0 <= r["itm"] <= 100.0 and 0.0 <= r["odf"] <= 100.0 for r in good)

    # a threshold between the observed scores, so the selection is neither empty nor everything
    itm_cut = sorted(r["itm"] for r in good)[3]
    invoke("select", run, "--where", f"itm >= {itm_cut} and odf >= 0", "-o", tmp_path / "sel")
    kept = set(ds.dataset(tmp_path / "sel" / "kept.parquet").to_table()["uid"].to_pylist())
    import numpy as np

    expected = {r["uid"] for r in good if np.float32(r["itm"]) >= np.float32(itm_cut)}
    assert kept == expected and 0 < len(kept) < 6

    # resume: forget one shard; the rerun redoes exactly that one and reproduces its scores
    folder = RunFolder(run).stage("score")
    before = scores_dataset(run).to_table().sort_by("uid")
    (run / "score" / "completions" / "00000001.json").unlink()
    result = invoke(*score_args)
    assert "2 resumed" in result.output  # the two untouched shards were skipped
    assert folder.done_shards() == ["00000000", "00000001", "00000002"]
    after = scores_dataset(run).to_table().sort_by("uid")
    assert after.column("uid").equals(before.column("uid"))
    for col in ("itm", "odf"):
        a, b = after[col].to_numpy(zero_copy_only=False), before[col].to_numpy(zero_copy_only=False)
        assert np.allclose(a, b, atol=1e-4, equal_nan=True)
