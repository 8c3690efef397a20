"""Teacher labelling against real servers on 127.0.0.1: the fault server and `transformers serve`."""

from __future__ import annotations

import base64
import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlmfilter.clients.chat import BAD_RESPONSE, ClientOptions
from mlmfilter.core import errors
from mlmfilter.judge.prompts import resolve_template
from mlmfilter.teach.label import LabelOptions, ReplyParseError, parse_reply
from tests.support.fault_server import FaultServer
from tests.support.teach import SECRET, assert_no_secret_under, teach_folder


def _client_options(server, **kw) -> ClientOptions:
    return ClientOptions(
        base_url=server.base_url, api_key_env="TEACH_KEY", timeout_s=2.0, max_retries=3, backoff_s=0.05, **kw
    )


def test_parse_reply():
    assert parse_reply("85\nThe caption matches.") == (85, "The caption matches.")
    assert parse_reply("  Score: 7 \n\nwhy") == (7, "why")
    assert parse_reply("**100**\nok") == (100, "ok")
    assert parse_reply("64/100\nfine") == (64, "fine")
    for bad in ["", "excellent\n90", "101\nx", "about 80\nx", "8 5\nx"]:
        with pytest.raises(ReplyParseError):
            parse_reply(bad)


def test_label_faults_end_as_errors_and_a_rerun_sends_nothing_new(tmp_path, flickr_pairs, monkeypatch):
    monkeypatch.setenv("TEACH_KEY", SECRET)
    captions = [
        "A dog runs on grass .",
        "Two girls [fault:429] play .",
        "A man [fault:500] cycles .",
        "A boy [fault:hang] jumps .",
        "A cat [fault:malformed] sleeps .",
        "A car [fault:nonnumeric] parks .",
    ]
    folder = teach_folder(tmp_path, flickr_pairs, captions)
    options = LabelOptions(model="teacher-vlm", metrics=["itm", "ctq"])
    with FaultServer() as server:
        info = folder.label(options, _client_options(server))
        rows = pq.read_table(folder.path / "labels.parquet").to_pylist()
        assert len(rows) == len(captions) * 2  # every pair and metric: nothing lost
        assert [(r["key"], r["metric"]) for r in rows] == [(f"k{i}", m) for i in range(6) for m in ("itm", "ctq")]
        by_key = {(r["key"], r["metric"]): r for r in rows}
        for i in (0, 1, 2, 3):
            for m in ("itm", "ctq"):
                row = by_key[(f"k{i}", m)]
                assert row["error"] is None and 0 <= row["score"] <= 100 and row["rationale"].startswith("Rationale")
        assert {by_key[("k4", m)]["error"] for m in ("itm", "ctq")} == {BAD_RESPONSE}
        nonnumeric = by_key[("k5", "itm")]
        assert nonnumeric["error"] == errors.UNPARSEABLE_SCORE and nonnumeric["score"] is None
        assert nonnumeric["reply"].startswith("excellent")  # the raw text is kept
        assert info["stats"]["retries"] == 2 * (2 + 1 + 1 + 3) and info["errors"] == {
            BAD_RESPONSE: 2,
            errors.UNPARSEABLE_SCORE: 2,
        }

        # the request is the judge's: image first as a data URL of the original bytes, then the metric prompt
        body = next(b for b in server.bodies if "A dog runs" in json.dumps(b))
        image_part, text_part = body["messages"][0]["content"]
        assert (
            image_part["image_url"]["url"]
            == "data:image/jpeg;base64," + base64.b64encode(flickr_pairs[0][0].read_bytes()).decode()
        )
        assert text_part["text"] in {
            resolve_template("v2").render(m, captions[0]) for m in ("image_text_matching", "caption_text_quality")
        }

        before = server.requests
        again = folder.label(options, _client_options(server))
        assert server.requests - before == 2 * 4  # only the malformed pair's two requests, 4 attempts each
        assert again["stats"]["cache_hits"] == 10
        rerun = pq.read_table(folder.path / "labels.parquet").to_pylist()
        strip = lambda rs: [{k: v for k, v in r.items() if k != "cached"} for r in rs]  # noqa: E731
        assert strip(rerun) == strip(rows)
    assert_no_secret_under(folder.path)
    assert "api_key_source" in folder.manifest()["label"] and SECRET not in json.dumps(folder.manifest())


def test_text_only_mode_describes_first(tmp_path, flickr_pairs, monkeypatch):
    folder = teach_folder(tmp_path, flickr_pairs, ["A dog runs on grass .", "A girl reads ."])
    options = LabelOptions(model="text-teacher", describer_model="describer-vlm", mode="text", metrics=["itm"])
    with FaultServer() as server:
        folder.label(options, _client_options(server))
        describe = [b for b in server.bodies if b["model"] == "describer-vlm"]
        teacher = [b for b in server.bodies if b["model"] == "text-teacher"]
    assert len(describe) == 2 and describe[0]["messages"][0]["content"][0]["type"] == "image_url"
    assert len(teacher) == 2 and all(part["type"] == "text" for b in teacher for part in b["messages"][0]["content"])
    rows = pq.read_table(folder.path / "labels.parquet").to_pylist()
    assert all(
        r["error"] is None and r["mode"] == "text" and r["description"].startswith(tuple("0123456789")) for r in rows
    )
    assert all(json.dumps(b).count("Image Description: ") == 1 for b in teacher)


def test_cli_batch_file_then_collect(tmp_path, flickr_pairs, monkeypatch):
    from mlmfilter.cli.app import app

    monkeypatch.setenv("TEACH_KEY", SECRET)
    folder = teach_folder(tmp_path, flickr_pairs, ["A dog runs on grass .", "A girl reads .", "Boats at sea ."])
    runner = CliRunner()
    batch = tmp_path / "batch" / "requests.jsonl"
    result = runner.invoke(
        app,
        [
            "teach",
            "label",
            str(folder.path),
            "--model",
            "gpt-4o",
            "--metrics",
            "itm,odf",
            "--api-key-env",
            "TEACH_KEY",
            "--batch-file",
            str(batch),
        ],
    )
    assert result.exit_code == 0, result.output
    parts = sorted(batch.parent.glob("requests-*.jsonl"))
    lines = [json.loads(line) for p in parts for line in p.read_text().splitlines()]
    assert len(lines) == 6 and all(line["body"]["model"] == "gpt-4o" for line in lines)

    # what the provider / `vllm run-batch` returns, answered here by the fault server
    output = tmp_path / "batch_output.jsonl"
    with FaultServer() as server, open(output, "w") as fh:
        from mlmfilter.clients import ChatClient, ChatRequest

        answerer = ChatClient(_client_options(server))
        for line in lines:
            body = answerer.complete(ChatRequest(line["body"])).response
            fh.write(
                json.dumps(
                    {
                        "id": "x",
                        "custom_id": line["custom_id"],
                        "response": {"status_code": 200, "body": body},
                        "error": None,
                    }
                )
                + "\n"
            )
    result = runner.invoke(
        app,
        [
            "teach",
            "label",
            str(folder.path),
            "--model",
            "gpt-4o",
            "--metrics",
            "itm,odf",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--collect",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "requests 0" in result.output
    rows = pq.read_table(folder.path / "labels.parquet").to_pylist()
    assert len(rows) == 6 and all(r["error"] is None and r["cached"] for r in rows)
    assert_no_secret_under(tmp_path)

    bad = runner.invoke(app, ["teach", "label", str(folder.path), "--model", "m", "--metrics", "nope"])
    assert bad.exit_code == 2 and "unknown metric" in bad.output
    empty = runner.invoke(app, ["teach", "label", str(tmp_path / "nothing"), "--model", "m"])
    assert empty.exit_code == 2 and "teach sample" in empty.output
    unbalanced = runner.invoke(app, ["teach", "export", str(folder.path), "-o", str(tmp_path / "x")])
    assert unbalanced.exit_code == 2 and "teach balance" in unbalanced.output


@pytest.mark.slow
def test_transformers_serve_happy_path(tmp_path, flickr_pairs, transformers_server, monkeypatch):
    base_url, model = transformers_server
    monkeypatch.setenv("TEACH_KEY", SECRET)
    folder = teach_folder(tmp_path, flickr_pairs, ["A dog runs on grass .", "Two girls play ."])
    options = LabelOptions(model=model, metrics=["itm", "odf"], max_tokens=6)
    client_options = ClientOptions(
        base_url=base_url, api_key_env="TEACH_KEY", timeout_s=120, max_retries=1, concurrency=2
    )
    first = folder.label(options, client_options)
    rows = pq.read_table(folder.path / "labels.parquet").to_pylist()
    assert len(rows) == 4 and first["stats"]["answered"] == 4 and first["stats"]["completion_tokens"] > 0
    # random weights write random text: each row either parsed or is an unparseable error keeping its reply
    for row in rows:
        assert row["reply"] is not None
        assert (row["error"] is None and row["score"] is not None) or row["error"] == errors.UNPARSEABLE_SCORE
    second = folder.label(options, client_options)
    # the run layer resumes: the finished shard is skipped (marker + fingerprint), nothing is asked again
    assert second["stats"]["requests"] == 0 and len(second["shards_skipped"]) == 1
    assert (folder.path / "run" / "teach_label" / "stage.yaml").exists() and len(
        list((folder.path / "run" / "teach_label" / "completions").iterdir())
    ) == 1
    # other settings redo the stage when asked to; the answers already cached are free, the new metric is asked
    other = LabelOptions(model=model, metrics=["itm", "odf", "ctq"], max_tokens=6)
    with pytest.raises(ValueError, match="--relabel"):
        folder.label(other, client_options)
    third = folder.label(other, client_options, relabel=True)
    assert third["stats"]["cache_hits"] == 4 and third["stats"]["answered"] == 2 and third["rows"] == 6
    assert_no_secret_under(folder.path)


def test_other_settings_or_new_pairs_are_refused_unless_relabel(tmp_path, flickr_pairs, monkeypatch):
    from mlmfilter.cli.app import app
    from mlmfilter.runs.folder import ConfigMismatch, SourceChanged
    from mlmfilter.teach.pairs import write_pair_table
    from tests.support.teach import teach_pairs

    monkeypatch.setenv("TEACH_KEY", SECRET)
    captions = ["A dog runs on grass .", "A girl reads ."]
    folder = teach_folder(tmp_path, flickr_pairs, captions)
    with FaultServer() as server:
        folder.label(LabelOptions(model="teacher-vlm", metrics=["itm"]), _client_options(server))
        labelled = pq.read_table(folder.path / "labels.parquet").to_pylist()
        sent = server.requests
        with pytest.raises(ConfigMismatch, match=r"changed: metrics.*--relabel"):
            folder.label(LabelOptions(model="teacher-vlm", metrics=["itm", "odf"]), _client_options(server))
        assert server.requests == sent  # refused before any request
        assert pq.read_table(folder.path / "labels.parquet").to_pylist() == labelled  # nothing overwritten

        flags = ["teach", "label", str(folder.path), "--model", "teacher-vlm", "--metrics", "itm,odf"]
        flags += ["--base-url", server.base_url, "--api-key-env", "TEACH_KEY", "--max-retries", "1"]
        refused = CliRunner().invoke(app, flags)
        assert refused.exit_code == 2 and server.requests == sent
        line = refused.output.strip()
        assert "\n" not in line and "changed: metrics" in line and "--relabel" in line
        relabelled = CliRunner().invoke(app, [*flags, "--relabel"])
        assert relabelled.exit_code == 0, relabelled.output
        assert "4 labels (4 ok" in relabelled.output and "requests 2, cache hits 2" in relabelled.output
        assert server.requests == sent + 2  # only the new metric is paid for

        # re-made pairs (another `teach sample`): the labels of the old ones are not mixed in silently
        write_pair_table(folder.path / "sample.parquet", teach_pairs(flickr_pairs, ["A cat sleeps .", *captions[1:]]))
        options = LabelOptions(model="teacher-vlm", metrics=["itm", "odf"])
        with pytest.raises(SourceChanged, match=r"sample\.parquet changed.*--relabel"):
            folder.label(options, _client_options(server))
        info = folder.label(options, _client_options(server), relabel=True)
    assert info["stats"]["requests"] == 2 and info["stats"]["cache_hits"] == 2  # the new first pair's two labels
    rows = pq.read_table(folder.path / "labels.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["k0", "k0", "k1", "k1"] and all(r["error"] is None for r in rows)
    assert_no_secret_under(folder.path)


def test_a_rerun_that_sends_nothing_keeps_the_recorded_counts(tmp_path, flickr_pairs, monkeypatch):
    from mlmfilter.cli.app import app

    monkeypatch.setenv("TEACH_KEY", SECRET)
    folder = teach_folder(tmp_path, flickr_pairs, ["A dog runs on grass .", "Two girls play ."])
    runner = CliRunner()
    with FaultServer() as server:
        args = ["teach", "label", str(folder.path), "--model", "teacher-vlm", "--metrics", "itm,odf"]
        args += ["--base-url", server.base_url, "--api-key-env", "TEACH_KEY"]
        first = runner.invoke(app, args)
        assert first.exit_code == 0, first.output
        sent = server.requests
        assert sent == 4 and "requests 4," in first.output and "all runs" not in first.output
        again = runner.invoke(app, args)  # everything is done and cached: nothing is sent
        assert again.exit_code == 0, again.output
        assert server.requests == sent
    flat = " ".join(again.output.split())
    assert "requests 0," in flat and "all runs: requests 4," in flat
    label = folder.manifest()["label"]
    assert label["stats"]["requests"] == 0  # this run's, shown apart
    assert label["total"]["requests"] == 4 and label["total"]["answered"] == 4  # not overwritten with zeros
