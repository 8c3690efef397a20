"""Ctrl-C during `mlmfilter train` (a real SIGINT to a real process) exits 130 and says how far it got and
which checkpoint the same command resumes from."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support.mlm import tiny_model_dir
from tests.support.train import judge_records, write_llava_json

MAX_STEPS = 16
SAVE_STEPS = 2


@pytest.mark.slow
def test_ctrl_c_says_the_steps_done_and_the_checkpoint_it_resumes_from(tmp_path, smollm2_cache_dir, flickr_pairs):
    from mlmfilter.training.train import last_complete_checkpoint

    base = str(tiny_model_dir("llava", smollm2_cache_dir))
    data = write_llava_json(tmp_path / "train.json", judge_records(flickr_pairs[:4], 8))
    out = tmp_path / "judge"
    command = [sys.executable, "-m", "mlmfilter.cli.app", "train", str(data), "-o", str(out), "--base", base]
    command += ["--conversation", "qwen", "--max-steps", str(MAX_STEPS), "--save-steps", str(SAVE_STEPS)]
    command += ["--batch-size", "2", "--lr", "1e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while last_complete_checkpoint(out / "checkpoints") is None:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-3000:]
    text = " ".join(output.split())
    found = re.search(
        rf"interrupted: (\d+) of {MAX_STEPS} steps done; re-run the same command to resume from (checkpoint-\d+)", text
    )
    assert found, output[-3000:]
    checkpoint = last_complete_checkpoint(out / "checkpoints")
    assert found.group(2) == checkpoint.name and int(checkpoint.name.split("-")[1]) <= int(found.group(1))
    assert "Traceback" not in output and "Aborted" not in output
    assert not (out / "mlmfilter_judge.json").exists()  # it did not finish
