"""`enhance --backend openai --base-url URL`: the rewrites written by a served VLM through the client and
request cache `teach label` uses (a real server on 127.0.0.1), asked once; a server that is not there fails
in seconds; Ctrl-C (a real SIGINT to a real process) exits 130 saying which shards are done."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.runs.read import RunReader
from tests.support.builders import flickr_shards
from tests.support.fault_server import FaultServer
from tests.support.interrupt import interrupt_when, mlmfilter_command
from tests.support.serve import free_port

runner = CliRunner()
WHERE = "rules_lang_prob <= 1"  # every pair; the rules scorer re-scores: cheap, real


@pytest.fixture(scope="module")
def rules_run(tmp_path_factory, flickr_pairs):
    tmp = tmp_path_factory.mktemp("enhance-served")
    flickr_shards(flickr_pairs[:6], tmp / "in", n_shards=3, per_shard=2)
    result = runner.invoke(app, ["score", str(tmp / "in" / "*.tar"), "-o", str(tmp / "run"), "--scorer", "rules"])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def _enhance(run, base_url: str, *extra: str) -> list[str]:
    return ["enhance", str(run), "--where", WHERE, "--model", "fault-teacher", "--base-url", base_url, *extra]


def _table(run) -> pa.Table:
    reader = RunReader(run)
    return pa.concat_tables([reader.table(shard, "enhance") for shard in sorted(reader.sources())])


def test_a_served_writer_writes_the_rewrites_and_is_asked_once(rules_run):
    with FaultServer() as server:
        result = runner.invoke(app, _enhance(rules_run, server.base_url))
        assert result.exit_code == 0, result.output
        asked = server.requests
        bodies = list(server.bodies)
        again = runner.invoke(app, _enhance(rules_run, server.base_url, "--overwrite"))
        assert again.exit_code == 0, again.output
        assert server.requests == asked == 6  # one request per pair; the redo came from the request cache
    table = _table(rules_run)
    assert table.num_rows == 6 and table["error"].to_pylist() == [None] * 6
    for candidates in table["candidates"].to_pylist():
        assert len(candidates) == 1 and "Rationale for the request" in candidates[0]  # the server's own text
    originals = set(table["original_caption"].to_pylist())
    for body in bodies:
        image, text = body["messages"][0]["content"]
        assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert body["model"] == "fault-teacher" and body["temperature"] == 0.0
        assert any(caption in text["text"] for caption in originals)  # the enhancer's rewrite prompt
    assert (rules_run / "cache" / "requests.sqlite").exists()
    provenance = RunReader(rules_run).provenance("enhance")
    assert provenance["generator"]["backend"] == "openai-chat"


def test_a_served_writer_that_is_not_there_fails_in_seconds(rules_run):
    port = free_port()
    started = time.monotonic()
    result = runner.invoke(app, _enhance(rules_run, f"http://127.0.0.1:{port}/v1", "--stage", "nobody"))
    assert result.exit_code == 2, result.output
    assert f"cannot reach http://127.0.0.1:{port}/v1/models" in " ".join(result.output.split())
    assert time.monotonic() - started < 60
    refused = runner.invoke(
        app, _enhance(rules_run, "http://127.0.0.1:9/v1", "--stage", "x", "--conversation", "vicuna_v1")
    )
    assert refused.exit_code == 2 and "chat template" in refused.output


@pytest.mark.slow
def test_ctrl_c_exits_130_and_says_which_shards_are_done(rules_run):
    with FaultServer() as server:
        server.delay_s = 1.0  # a slow writer: one shard at a time, seconds each
        markers = rules_run / "slow" / "completions"
        code, output = interrupt_when(
            mlmfilter_command(*_enhance(rules_run, server.base_url, "--stage", "slow")),
            lambda: markers.is_dir() and any(markers.glob("*.json")),  # one shard enhanced
        )
    assert code == 130, output
    done = len(list(markers.glob("*.json")))
    # the shards' requests overlap: the last ones may finish while the interrupt lands; the line counts them
    assert 1 <= done <= 3
    text = " ".join(output.split())
    assert f"interrupted: {done} of 3 shards done; re-run the same command to resume" in text, output
    assert "Traceback" not in output and "Aborted" not in output
