"""The enhancement task's contrastive samples, end to end against the fault server on 127.0.0.1:
negatives -> teacher rewrites through the client (cache, retries, stats, error rows) -> LLaVA JSON + TRL JSONL."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mlmfilter.clients import ChatClient, RequestCache
from mlmfilter.clients.chat import BAD_RESPONSE, ClientOptions
from mlmfilter.enhance.prompts import REWRITE_PROMPT
from mlmfilter.runs.read import RunReader
from mlmfilter.teach.label import LabelOptions
from mlmfilter.teach.negatives import NegativeGenerator
from mlmfilter.teach.rewrites import POOR, REWRITE_REJECTED, UNRELATED, Rewriter, make_rewrites
from tests.support.fault_server import FaultServer
from tests.support.teach import SECRET, assert_no_secret_under, teach_folder, teach_pairs

CAPTIONS = [
    "A dog runs on the green grass .",
    "Two girls play with a red ball in the park .",
    "A man rides a bike down the street .",
    "A boy jumps into a blue pool .",
]
KINDS = ["shuffle_words", "truncate", "other_caption"]


def _options(server, **kw) -> ClientOptions:
    return ClientOptions(
        base_url=server.base_url, api_key_env="TEACH_KEY", timeout_s=2.0, max_retries=3, backoff_s=0.05, **kw
    )


def _rewrite_bodies(server) -> list[dict]:
    return [b for b in server.bodies if "Rewrite the caption" in json.dumps(b)]


def test_rewrite_samples_are_made_deterministically_from_the_generator(flickr_pairs):
    pairs = teach_pairs(flickr_pairs, CAPTIONS)
    rows = make_rewrites(pairs, NegativeGenerator(seed=3, kinds=KINDS))
    assert rows == make_rewrites(pairs, NegativeGenerator(seed=3, kinds=KINDS))
    assert [r["kind"] for r in rows] == [UNRELATED, POOR] * len(pairs)
    for pair, unrelated, poor in zip(pairs, rows[::2], rows[1::2]):
        assert (
            unrelated["caption"] in CAPTIONS
            and unrelated["caption"] != pair.caption
            and unrelated["target"] == pair.caption
        )
        assert poor["target"] is None and poor["caption"] != pair.caption and poor["original"] == pair.caption
        assert poor["detail"].split(":")[0] in ("shuffle_words", "truncate") and poor["parent_uid"] == pair.uid
    assert len({r["uid"] for r in rows}) == len(rows)


def test_teacher_rewrites_faults_become_error_rows_and_a_rerun_is_free(flickr_pairs):
    pairs = {p.uid: p for p in teach_pairs(flickr_pairs, CAPTIONS[:3])}
    parent = list(pairs.values())
    rows = [
        {
            "uid": f"r{i}",
            "parent_uid": parent[i].uid,
            "shard": "s0",
            "key": f"k{i}",
            "kind": POOR,
            "caption": caption,
            "target": None,
            "original": parent[i].caption,
            "detail": "test",
            "teacher": None,
            "reply": None,
            "description": None,
            "request_key": None,
            "cached": False,
            "error": None,
            "error_detail": None,
        }
        for i, caption in enumerate(
            ["dog grass the runs [fault:500]", "Two girls [fault:malformed]", "A man [fault:nonnumeric]"]
        )
    ]
    rows.append({**rows[0], "uid": "u", "kind": UNRELATED, "caption": "a cat", "target": parent[0].caption})
    rows.append({**rows[0], "uid": "gone", "parent_uid": "f" * 32})
    options = LabelOptions(model="teacher-vlm")
    with FaultServer() as server:
        with tempfile.TemporaryDirectory() as tmp:
            client = ChatClient(_options(server), cache=RequestCache(f"{tmp}/c.sqlite"))
            filled = Rewriter(options, client).fill(rows, pairs)
            assert [r["uid"] for r in filled] == [r["uid"] for r in rows]  # nothing lost, same order
            ok, malformed, rejected, unrelated, gone = filled
            assert (
                ok["error"] is None and ok["target"].startswith(tuple("0123456789")) and ok["teacher"] == "teacher-vlm"
            )
            assert client.stats.retries >= 1 + 3  # the 500 once, the malformed body on every attempt
            assert malformed["error"] == BAD_RESPONSE and malformed["target"] is None
            # "excellent\nThe caption is fine.": talk about the task, not a caption
            assert rejected["error"] == REWRITE_REJECTED and rejected["error_detail"].startswith("leaked_prompt")
            assert rejected["reply"] == "excellent\nThe caption is fine." and rejected["target"] is None
            assert unrelated == rows[3]  # its target is the pair's own caption: nothing to ask
            assert gone["error"] == "missing_image"
            prompt = REWRITE_PROMPT.format(caption=rows[0]["caption"])
            body = next(b for b in _rewrite_bodies(server) if b["messages"][0]["content"][1]["text"] == prompt)
            image, _text = body["messages"][0]["content"]
            assert (
                image["image_url"]["url"]
                == "data:image/jpeg;base64," + base64.b64encode(parent[0].image_bytes).decode()
            )
            assert body["max_tokens"] == 256 and body["model"] == "teacher-vlm"
            before = server.requests
            again = Rewriter(options, client).fill(rows, pairs)
            assert server.requests - before == 4  # only the malformed one is asked again (4 attempts)
            assert again[0]["target"] == ok["target"] and again[0]["cached"]
            client.close()  # and its cache


@pytest.mark.parametrize("mode", ["image", "text"])
def test_negatives_label_export_with_rewrite_samples(tmp_path, flickr_pairs, monkeypatch, mode):
    from mlmfilter.cli.app import app

    monkeypatch.setenv("TEACH_KEY", SECRET)
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS)
    runner = CliRunner()
    result = runner.invoke(app, ["teach", "negatives", str(folder.path), "--kinds", ",".join(KINDS)])
    assert result.exit_code == 0, result.output
    assert "8 rewrite samples" in result.output
    planned = pq.read_table(folder.path / "rewrites.parquet").to_pylist()
    options = LabelOptions(
        model="teacher", metrics=["itm"], mode=mode, describer_model="describer" if mode == "text" else None
    )
    with FaultServer() as server:
        info = folder.label(options, _options(server))
        bodies = _rewrite_bodies(server)
        describes = [b for b in server.bodies if b["model"] == "describer"]
        first_requests = server.requests
        again = folder.label(options, _options(server))
        assert server.requests == first_requests  # labels and rewrites: all from the cache
    assert (
        info["rewrites"]["samples"] == 8 and info["rewrites"]["ok"] == 8 and info["rewrites"]["stats"]["answered"] == 4
    )
    assert info["stats"]["answered"] == info["rows"] + 4 + len(
        describes
    )  # labels + rewrites (+ descriptions) in the totals
    # the rewrites are a stage of the run: its finished shard is skipped, nothing is asked again
    assert again["rewrites"]["shards_skipped"] == ["rewrites"] and again["rewrites"]["stats"]["cache_hits"] == 0
    assert again["stats"]["requests"] == 0 and again["stats"]["cache_hits"] == 0
    counted = RunReader(folder.run_path).stats("teach_rewrite")["counters"]
    assert counted["answered"] == 4 and counted.get("cache_hits", 0) == (4 if mode == "text" else 0)  # descriptions
    targets = pq.read_table(folder.path / "rewrite_targets.parquet").to_pylist()
    assert [t["uid"] for t in targets] == [p["uid"] for p in planned]
    poor = [t for t in targets if t["kind"] == POOR]
    replies = {b["messages"][0]["content"][-1]["text"]: b for b in bodies}
    assert len(bodies) == 4 and all(t["target"] and t["target"] == t["reply"].strip() for t in poor)
    if mode == "text":  # one description per image, shared by its labels and its rewrite; no image shown to the teacher
        assert len(describes) == 4 and all(len(b["messages"][0]["content"]) == 1 for b in bodies)
        assert all(
            t["description"] and any(text.startswith(f"Image Description: {t['description']}\n") for text in replies)
            for t in poor
        )
    else:
        assert all(b["messages"][0]["content"][0]["type"] == "image_url" for b in bodies)

    result = runner.invoke(app, ["teach", "export", str(folder.path), "-o", str(tmp_path / "out"), "--all-labels"])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "out" / "mlm_filter_instruct.json").read_text())
    rewrites = {r["id"]: r for r in records if r["id"].endswith("_rewrite")}
    assert len(rewrites) == 8 and len(records) == 8 + info["ok"]
    sample_pairs = {p.uid: p for p in folder.pairs()}
    for row in targets:
        record = rewrites[f"{row['uid']}_rewrite"]
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": "<image>\n" + REWRITE_PROMPT.format(caption=row["caption"])}
        assert gpt == {"from": "gpt", "value": row["target"]}
        assert (tmp_path / "out" / record["image"]).read_bytes() == sample_pairs[row["parent_uid"]].image_bytes
        if row["kind"] == UNRELATED:
            assert row["target"] == sample_pairs[row["parent_uid"]].caption
    trl = {t["id"]: t for t in map(json.loads, (tmp_path / "out" / "train.jsonl").read_text().splitlines())}
    some = next(iter(rewrites.values()))
    assert trl[some["id"]]["prompt"][0]["content"] == [
        {"type": "image"},
        {
            "type": "text",
            "text": REWRITE_PROMPT.format(
                caption=some["conversations"][0]["value"].split('caption: "', 1)[1].split('"\nRewrite', 1)[0]
            ),
        },
    ]
    assert trl[some["id"]]["completion"][0]["content"][0]["text"] == some["conversations"][1]["value"]
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["label"]["prompt_texts"]["rewrite"] == REWRITE_PROMPT
    assert card["negatives"]["rewrites"]["per_kind"] == {UNRELATED: 4, POOR: 4}
    assert card["export"]["rewrite_records"] == 8 and card["export"]["rewrite_per_kind"] == {UNRELATED: 4, POOR: 4}
    without = runner.invoke(
        app, ["teach", "export", str(folder.path), "-o", str(tmp_path / "plain"), "--all-labels", "--no-rewrites"]
    )
    assert (
        without.exit_code == 0
        and len(json.loads((tmp_path / "plain" / "mlm_filter_instruct.json").read_text())) == info["ok"]
    )
    assert_no_secret_under(tmp_path)

    # new negatives without rewrites: no stale targets survive; with them again, export wants a new `label`
    folder.negatives(KINDS, rewrites=False)
    assert not (folder.path / "rewrites.parquet").exists() and not (folder.path / "rewrite_targets.parquet").exists()
    folder.negatives(KINDS, seed=1)
    stale = runner.invoke(app, ["teach", "export", str(folder.path), "-o", str(tmp_path / "x"), "--all-labels"])
    assert stale.exit_code == 2 and "teach label" in stale.output


def test_batch_file_holds_the_rewrites_and_collect_fills_them(tmp_path, flickr_pairs, monkeypatch):
    monkeypatch.setenv("TEACH_KEY", SECRET)
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS[:2])
    folder.negatives(KINDS)
    options = LabelOptions(model="gpt-4o", metrics=["itm"])
    with FaultServer() as server:
        client = folder.client(_options(server))
        files = folder.write_batch(options, client, tmp_path / "batch" / "req.jsonl", max_requests=3)
        client.close()
        lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
        labels = len(folder.pairs())  # pairs and their negatives, one metric
        assert len(lines) == labels + 2 and len(files) == -(-len(lines) // 3)  # + 2 rewrites; 3 a file
        assert sum("Rewrite the caption" in json.dumps(line["body"]) for line in lines) == 2
        from mlmfilter.clients import ChatClient, ChatRequest

        answerer = ChatClient(_options(server))
        output = tmp_path / "out.jsonl"
        with open(output, "w") as fh:
            for line in lines:
                body = answerer.complete(ChatRequest(line["body"])).response
                fh.write(
                    json.dumps({"custom_id": line["custom_id"], "response": {"status_code": 200, "body": body}}) + "\n"
                )
    assert folder.collect([output])["stored"] == len(lines)
    info = folder.label(options, ClientOptions(base_url="http://127.0.0.1:9/v1", cache_only=True))
    assert info["stats"]["requests"] == 0 and info["rewrites"]["ok"] == 4 and info["ok"] == info["rows"]


def test_batch_files_hold_one_model_each_and_respect_the_provider_limits(tmp_path, flickr_pairs):
    from mlmfilter.clients.batch import BatchFileWriter

    writer = BatchFileWriter(tmp_path / "x.jsonl")
    assert writer.max_requests == 50_000 and writer.max_bytes <= 200 * 10**6  # OpenAI's per-file limits
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS[:2])
    options = LabelOptions(model="gpt-4", mode="text", describer_model="org/gpt-4o", metrics=["itm"])
    with FaultServer() as server:
        client = folder.client(_options(server))
        describes = folder.write_batch(options, client, tmp_path / "b1" / "req.jsonl")
        assert [f.name for f in describes] == ["req-gpt-4o-00000.jsonl"]
        # one image described (as if half the output came back): the next round mixes both models
        pair = folder.pairs()[0]
        from mlmfilter.teach.label import TeacherRequests

        client.complete(TeacherRequests(options).describe(pair))
        files = folder.write_batch(options, client, tmp_path / "b2" / "req.jsonl")
        client.close()
    models = {f.name: {json.loads(line)["body"]["model"] for line in f.read_text().splitlines()} for f in files}
    assert models == {"req-00000.jsonl": {"gpt-4"}, "req-gpt-4o-00000.jsonl": {"org/gpt-4o"}}


@pytest.mark.slow
def test_transformers_serve_writes_the_rewrites(tmp_path, flickr_pairs, transformers_server, monkeypatch):
    """A real OpenAI-compatible server (`transformers serve`, tiny random LLaVA): random text, so each
    poor-caption target is either the reply itself or a rejection that keeps the reply."""
    base_url, model = transformers_server
    monkeypatch.setenv("TEACH_KEY", SECRET)
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS[:2])
    folder.negatives(["truncate", "other_caption"])
    options = LabelOptions(model=model, metrics=["itm"], max_tokens=4, rewrite_max_tokens=8)
    client_options = ClientOptions(
        base_url=base_url, api_key_env="TEACH_KEY", timeout_s=120, max_retries=1, concurrency=2
    )
    info = folder.label(options, client_options)
    assert info["rewrites"]["samples"] == 4 and info["rewrites"]["stats"]["answered"] == 2
    poor = [t for t in pq.read_table(folder.path / "rewrite_targets.parquet").to_pylist() if t["kind"] == POOR]
    for row in poor:
        assert row["reply"] is not None and row["request_key"]
        assert (row["error"] is None and row["target"] == row["reply"].strip()) or row["error"] == REWRITE_REJECTED
    again = folder.label(options, client_options)
    assert again["rewrites"]["stats"]["requests"] == 0 and again["rewrites"]["shards_skipped"] == ["rewrites"]
    assert_no_secret_under(folder.path)


def test_cli_rewrite_prompt_file_is_checked_before_any_request(tmp_path):
    from typer.testing import CliRunner

    from mlmfilter.cli.app import app

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Rewrite it better.", encoding="utf-8")
    result = CliRunner().invoke(
        app,
        [
            "teach",
            "label",
            str(tmp_path),
            "--model",
            "m",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--rewrite-prompt",
            str(prompt),
        ],
    )
    assert result.exit_code == 2 and "must use {caption}" in result.output


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["killed", "interrupted"])
def test_a_stopped_label_run_resumes_its_rewrites_and_pays_nothing_twice(tmp_path, flickr_pairs, stop):
    """`teach label` stopped during the teacher's rewrites: the labels' shards are done, the rewrites' shard is
    not; the same command again skips the labels, takes the answered rewrites from the cache, asks the rest."""
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS)
    folder.negatives(KINDS)
    planned = pq.read_table(folder.path / "rewrites.parquet")
    slow = [r | {"caption": r["caption"] + " [fault:slow]"} if r["kind"] == POOR else r for r in planned.to_pylist()]
    pq.write_table(pa.Table.from_pylist(slow, schema=planned.schema), folder.path / "rewrites.parquet")
    with FaultServer() as server:
        command = [sys.executable, "-m", "mlmfilter.cli.app", "teach", "label", str(folder.path), "--model", "teacher"]
        command += ["--metrics", "itm", "--base-url", server.base_url, "--api-key-env", "TEACH_KEY"]
        command += ["--concurrency", "1"]  # one rewrite at a time, each answered after SLOW_S
        env = {**os.environ, "TEACH_KEY": SECRET}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while server.by_kind["slow"] < 3:  # the third rewrite asked: the first two are answered and cached
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the rewrites were not asked within 120 s"
                time.sleep(0.02)
            proc.send_signal(stop)
            output = proc.communicate(timeout=60)[0].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
        if stop == signal.SIGINT:
            assert proc.returncode == 130 and "re-run the same command to resume" in output
        else:
            assert proc.returncode == -signal.SIGKILL
        reader = RunReader(folder.run_path)
        assert reader.marker("sample", "teach_label") and reader.marker("negatives", "teach_label")
        assert reader.marker("rewrites", "teach_rewrite") is None  # not finished: no marker
        assert not (folder.path / "rewrite_targets.parquet").exists()
        asked = server.by_kind["slow"]

        info = folder.label(LabelOptions(model="teacher", metrics=["itm"]), _options(server, concurrency=1))
        rewrites = info["rewrites"]
        assert sorted(info["shards_skipped"]) == ["negatives", "sample"] and rewrites["shards_skipped"] == []
        assert rewrites["ok"] == rewrites["samples"] == 8
        hits, sent = rewrites["stats"]["cache_hits"], rewrites["stats"]["requests"]
        assert hits >= 2 and sent == 4 - hits and server.by_kind["slow"] - asked == sent  # the rest, once each
        assert info["stats"]["requests"] == sent  # the labels were not asked again

        again = folder.label(LabelOptions(model="teacher", metrics=["itm"]), _options(server, concurrency=1))
        assert again["rewrites"]["shards_skipped"] == ["rewrites"] and again["stats"]["requests"] == 0
    targets = pq.read_table(folder.path / "rewrite_targets.parquet").to_pylist()
    assert [t["uid"] for t in targets] == [r["uid"] for r in slow] and all(t["error"] is None for t in targets)
    assert_no_secret_under(tmp_path)


def test_a_rewrite_that_may_succeed_later_is_asked_again_by_the_next_label(tmp_path, flickr_pairs, monkeypatch):
    monkeypatch.setenv("TEACH_KEY", SECRET)
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS[:2])
    folder.negatives(KINDS)
    planned = pq.read_table(folder.path / "rewrites.parquet")
    rows = planned.to_pylist()
    first_poor = next(i for i, r in enumerate(rows) if r["kind"] == POOR)
    rows[first_poor]["caption"] += " [fault:malformed]"
    pq.write_table(pa.Table.from_pylist(rows, schema=planned.schema), folder.path / "rewrites.parquet")
    options = LabelOptions(model="teacher", metrics=["itm"])
    with FaultServer() as server:
        first = folder.label(options, _options(server))
        assert first["rewrites"]["errors"] == {BAD_RESPONSE: 1} and first["rewrites"]["ok"] == 3
        sent = server.requests
        again = folder.label(options, _options(server))
        assert server.requests - sent == 4  # only the failed rewrite, on each of its 4 attempts
    assert sorted(again["shards_skipped"]) == ["negatives", "sample"]  # the labels are not redone
    counted = again["rewrites"]["stats"]
    assert again["stats"] == counted and (counted["requests"], counted["cache_hits"], counted["answered"]) == (4, 1, 0)
    assert again["rewrites"]["errors"] == {BAD_RESPONSE: 1}  # still malformed: kept as an error row
