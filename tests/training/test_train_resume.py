"""`mlmfilter train` killed with SIGKILL after its first checkpoint continues from the last complete
checkpoint when rerun: the global step goes on, the steps before the kill are not trained again."""

from __future__ import annotations

import json
import os
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
def test_resume_after_sigkill_continues_from_the_last_checkpoint(tmp_path, smollm2_cache_dir, flickr_pairs):
    from mlmfilter.training.train import TrainOptions, last_complete_checkpoint, train

    base = str(tiny_model_dir("llava", smollm2_cache_dir))
    data = write_llava_json(tmp_path / "train.json", judge_records(flickr_pairs[:4], 8))
    out = tmp_path / "judge"
    flags = dict(conversation="qwen", max_steps=MAX_STEPS, save_steps=SAVE_STEPS, batch_size=2, learning_rate=1e-3)
    command = [sys.executable, "-m", "mlmfilter.cli.app", "train", str(data), "-o", str(out), "--base", base]
    command += ["--conversation", "qwen", "--max-steps", str(MAX_STEPS), "--save-steps", str(SAVE_STEPS)]
    command += ["--batch-size", "2", "--lr", "1e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while last_complete_checkpoint(out / "checkpoints") is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "mlmfilter_judge.json").exists()  # it did not finish
    checkpoint = last_complete_checkpoint(out / "checkpoints")
    killed_at = int(checkpoint.name.split("-")[1])
    assert SAVE_STEPS <= killed_at < MAX_STEPS
    before = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]

    result = train(data, out, TrainOptions(base=base, **flags))  # the same command, rerun

    assert result.resumed_from == checkpoint.name and result.global_step == MAX_STEPS
    starts = [json.loads(line) for line in (out / "training" / "starts.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in starts] == [0, killed_at]
    history = json.loads((out / "training" / "log_history.json").read_text())
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] <= MAX_STEPS  # no step logged twice
    assert history[: len(before)] == before  # the killed run's steps are kept as they were
    assert all(h["step"] > killed_at for h in history[len(before) :])  # the rerun trained only what was left
    assert (out / "mlmfilter_judge.json").exists()
