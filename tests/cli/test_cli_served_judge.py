"""`score --backend openai` is honest about its server: nothing listening at --base-url, or no key for
api.openai.com, fails in seconds with one line naming the URL (and the key's variable); a run in which the
server answered no request exits 1, naming what happened."""

from __future__ import annotations

import time

from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support.builders import flickr_shards, write_shard
from tests.support.fault_server import FaultServer
from tests.support.serve import free_port

runner = CliRunner()


def _served(tmp_path, base_url: str, run: str = "run") -> list[str]:
    return [
        "score",
        str(tmp_path / "in" / "*.tar"),
        "-o",
        str(tmp_path / run),
        "--scorer",
        "mlm",
        "--model",
        "served-judge",
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--readout",
        "generate",
        "--metrics",
        "itm",
        "--option",
        "mlm.backend_options={max_retries: 0}",
    ]


def test_a_served_judge_that_cannot_answer_fails_up_front(tmp_path, flickr_pairs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flickr_shards(flickr_pairs, tmp_path / "in", n_shards=1, per_shard=2)
    port = free_port()
    started = time.monotonic()
    result = runner.invoke(app, _served(tmp_path, f"http://127.0.0.1:{port}/v1"))
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert f"cannot reach http://127.0.0.1:{port}/v1/models" in line
    assert not list((tmp_path / "run").glob("score/tables/*.parquet"))  # no shard "done" with error rows

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    hosted = runner.invoke(app, _served(tmp_path, "https://api.openai.com/v1", "hosted"))
    assert hosted.exit_code == 2, hosted.output
    line = " ".join(hosted.output.split())
    assert "https://api.openai.com/v1 needs an API key" in line and "OPENAI_API_KEY" in line
    assert time.monotonic() - started < 60


def test_a_run_whose_judge_answered_nothing_exits_1(tmp_path, flickr_pairs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pairs = flickr_pairs[:2]
    write_shard(
        tmp_path / "in" / "00000.tar",
        [{"key": f"{i}", "jpg": p.read_bytes(), "txt": f"{c} [fault:down]"} for i, (p, c) in enumerate(pairs)],
    )
    with FaultServer() as server:
        result = runner.invoke(app, _served(tmp_path, server.base_url), env={"COLUMNS": "200"})
        assert server.requests == 2
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "the judge's server answered none of 2 requests in shard 00000 (judge_request_failed" in text
    assert "1 with no usable pair" in text
