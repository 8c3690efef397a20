"""`teach label` says what it did: Ctrl-C (a real SIGINT to a real process) exits 130 with how many labels
are done; an unlabelled folder is not balanced or exported unless told; a teacher that cannot answer
(no key for api.openai.com, nothing at the address, a refused key) fails in seconds with one line; a run
whose every request failed exits 1; and no `HTTP Request` log lines reach the terminal."""

from __future__ import annotations

import re
import subprocess
import time

from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support.fault_server import FaultServer
from tests.support.interrupt import interrupt_when, mlmfilter_command
from tests.support.serve import free_port
from tests.support.teach import teach_folder

runner = CliRunner()
CAPTIONS = ["A dog runs on the grass .", "Two girls read a book .", "Boats float at sea ."]


def _label_args(folder, base_url: str, *extra: str) -> list[str]:
    return ["teach", "label", str(folder), "--model", "fault-teacher", "--metrics", "itm,odf"] + [
        "--base-url",
        base_url,
        "--api-key-env",
        "TEACH_HONEST_KEY",
        *extra,
    ]


def test_ctrl_c_exits_130_says_how_many_labels_are_done_and_balance_refuses_the_gaps(tmp_path, flickr_pairs):
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS)
    kinds = ["--kinds", "shuffle_words,truncate", "--no-rewrites"]
    made = runner.invoke(app, ["teach", "negatives", str(folder.path), *kinds])
    assert made.exit_code == 0, made.output
    negatives = made.output.split()[0]
    total = 2 * (len(CAPTIONS) + int(negatives))  # two metrics per pair and negative
    with FaultServer() as server:
        server.delay_s = 0.4  # a slow teacher, answering one request at a time
        command = mlmfilter_command(
            *_label_args(folder.path, server.base_url, "--concurrency", "1", "--max-retries", "0")
        )
        markers = folder.path / "run" / "teach_label" / "completions"
        asked: list[int] = []

        def one_table_labelled_and_the_other_begun() -> bool:
            if not asked and markers.is_dir() and any(markers.glob("*.json")):
                asked.append(server.requests)
            return bool(asked) and server.requests >= asked[0] + 2

        code, output = interrupt_when(command, one_table_labelled_and_the_other_begun)
        assert code == 130, output
        text = " ".join(output.split())
        found = re.search(r"interrupted: (\d+) of (\d+) labels done; re-run the same command to resume", text)
        assert found, output
        done = int(found.group(1))
        assert int(found.group(2)) == total and done in (2 * len(CAPTIONS), 2 * int(negatives))  # one table
        cached = re.search(r"\((\d+) more answers received are cached", text)
        cached = int(cached.group(1)) if cached else 0
        assert 1 <= cached < total - done  # the table in progress: answered requests kept in the cache
        assert "HTTP Request" not in output  # library logs stay in RUN/logs
        assert "Traceback" not in output and "Aborted" not in output

        refused = runner.invoke(app, ["teach", "balance", str(folder.path), "--target", "2", "--bins", "2"])
        assert refused.exit_code == 2, refused.output
        line = " ".join(refused.output.split())
        unlabelled = "sample.parquet" if done == 2 * int(negatives) else "negatives.parquet"
        assert "labelled incompletely" in line and f"{unlabelled}: " in line and "--allow-incomplete" in line
        assert f"{total - done} of {total} labels are missing" in line
        export = runner.invoke(app, ["teach", "export", str(folder.path), "-o", str(tmp_path / "x"), "--all-labels"])
        assert export.exit_code == 2 and "--allow-incomplete" in export.output
        told = runner.invoke(
            app, ["teach", "balance", str(folder.path), "--target", "2", "--bins", "2", "--allow-incomplete"]
        )
        assert told.exit_code == 0 and "incomplete:" in told.output, told.output

        asked_before = server.requests
        server.delay_s = 0.0
        again = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        # nothing answered is asked again (the one in flight at the interrupt may have been answered since)
        assert total - done - cached - 1 <= server.requests - asked_before <= total - done - cached
    assert f"{total} labels ({total} ok" in " ".join(again.stderr.split())
    complete = runner.invoke(app, ["teach", "balance", str(folder.path), "--target", "2", "--bins", "2"])
    assert complete.exit_code == 0 and "incomplete" not in complete.output, complete.output


def test_a_teacher_that_cannot_answer_fails_in_seconds_with_one_line(tmp_path, flickr_pairs, monkeypatch):
    folder = teach_folder(tmp_path, flickr_pairs, CAPTIONS[:2])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    started = time.monotonic()
    no_key = runner.invoke(app, ["teach", "label", str(folder.path), "--model", "gpt-4o"])  # the README's line
    assert no_key.exit_code == 2, no_key.output
    line = " ".join(no_key.output.split())
    assert "https://api.openai.com/v1 needs an API key" in line and "OPENAI_API_KEY" in line and "--base-url" in line

    port = free_port()  # nothing listens there
    nobody = runner.invoke(
        app, ["teach", "label", str(folder.path), "--model", "m", "--base-url", f"http://127.0.0.1:{port}/v1"]
    )
    assert nobody.exit_code == 2, nobody.output
    assert f"cannot reach http://127.0.0.1:{port}/v1/models" in " ".join(nobody.output.split())

    monkeypatch.setenv("TEACH_HONEST_KEY", "sk-wrong")
    with FaultServer() as server:
        server.required_key = "sk-right"
        refused = runner.invoke(app, _label_args(folder.path, server.base_url))
        assert server.requests == 0  # refused at the model list, before any label was asked for
    assert refused.exit_code == 2, refused.output
    line = " ".join(refused.output.split())
    assert f"{server.base_url}/models refused the API key from the environment variable TEACH_HONEST_KEY" in line
    assert "sk-wrong" not in refused.output
    assert time.monotonic() - started < 60  # seconds each, not minutes of retries
    assert not (folder.path / "labels.parquet").exists()


def test_a_run_whose_every_request_failed_exits_1(tmp_path, flickr_pairs):
    folder = teach_folder(tmp_path, flickr_pairs, [f"{c} [fault:down]" for c in CAPTIONS[:2]])
    with FaultServer() as server:
        result = runner.invoke(app, _label_args(folder.path, server.base_url, "--max-retries", "0"))
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert f"no answer from the teacher at {server.base_url} for 4 of 4 labels (teacher_request_failed: 4)" in line
    assert "re-run the same command" in line
