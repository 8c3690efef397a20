"""The lifecycle every scorer shares: whether it wants a GPU (from its options alone) and ``close()``.

The score stage asks its scorers both; a served judge's HTTP client is closed when the stage ends,
seen from the server's side on 127.0.0.1 (its keep-alive connections end).
"""

from __future__ import annotations

import pytest

from mlmfilter.io.sources import expand_inputs
from mlmfilter.runs.read import RunReader
from mlmfilter.runs.runner import run_stage
from mlmfilter.scorers import build_scorer
from mlmfilter.scorers.stage import ScoringOptions, ScoringStage
from tests.support.builders import write_shard
from tests.support.fault_server import FaultServer

SERVED = {"base_url": "http://127.0.0.1:9/v1"}


@pytest.mark.parametrize(
    "name, options, wants",
    [
        ("rules", {}, False),
        ("ocr", {}, False),
        ("clip", {"model": "nobody/clip", "device": "cpu"}, False),
        ("clip", {"model": "nobody/clip", "device": "auto"}, True),
        ("clip", {"model": "nobody/clip", "device": "mps"}, False),
        ("mlm", {"model": "nobody/judge", "device": "cpu"}, False),
        ("mlm", {"model": "nobody/judge", "device": "cuda:1"}, True),
        ("mlm", {"model": "nobody/judge"}, True),  # device auto
        ("mlm", {"model": "nobody/judge", "device": "cpu", "backend": "vllm"}, True),  # vLLM runs on GPUs only
        ("mlm", {"model": "served", "device": "cuda", "backend": "openai", "backend_options": SERVED}, False),
        ("aitqe", {"model": "nobody/aitqe", "device": "cpu"}, False),
        ("aitqe", {"model": "nobody/aitqe", "device": "auto"}, True),
    ],
)
def test_a_scorer_says_from_its_options_whether_it_wants_a_gpu(name, options, wants):
    scorer = build_scorer(name, options)
    assert scorer.wants_gpu() is wants
    stage = ScoringStage(ScoringOptions(scorers=["rules", {"name": name, "options": options}]))
    assert stage.wants_gpu() is wants  # the stage asks its scorers: rules never wants one


def test_a_score_run_closes_its_served_judge(tmp_path, flickr_pairs):
    pairs = flickr_pairs[:3]
    write_shard(
        tmp_path / "in" / "00000.tar",
        [{"key": f"{i}", "jpg": p.read_bytes(), "txt": c} for i, (p, c) in enumerate(pairs)],
    )
    inputs = [str(tmp_path / "in" / "*.tar")]
    with FaultServer() as server:
        judge = {
            "model": "served-judge",
            "metrics": "itm,odf",
            "readout": "generate",
            "backend": "openai",
            "backend_options": {"base_url": server.base_url, "max_concurrency": 2, "timeout_s": 5.0},
        }
        stage = ScoringStage(ScoringOptions(scorers=[{"name": "mlm", "options": judge}], decode_workers=0))
        summary = run_stage(tmp_path / "run", stage, sources=expand_inputs(inputs), inputs=inputs, read_options={})
        assert summary.ok, summary.shards_failed
        assert server.requests == 2 * len(pairs)  # every pair's two prompts went over HTTP
        assert server.wait_until_closed() == 0  # the stage closed the scorer, the scorer its client
        assert stage.scorers[0].backend is None
    rows = RunReader(tmp_path / "run").dataset("score").to_table().to_pylist()
    assert all(r["error"] is None and 0 <= r["itm"] <= 100 and r["odf_raw"] for r in rows)
