"""Ctrl-C during `mlmfilter train` (a real SIGINT to a real process) exits 130 and says how far it got and
which checkpoint the same command resumes from."""

from __future__ import annotations

import re

import pytest

from tests.support.interrupt import interrupt_when, mlmfilter_command
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
    command = mlmfilter_command("train", data, "-o", out, "--base", base, "--conversation", "qwen")
    command += ["--max-steps", str(MAX_STEPS), "--save-steps", str(SAVE_STEPS), "--batch-size", "2", "--lr", "1e-3"]
    code, output = interrupt_when(
        command, lambda: last_complete_checkpoint(out / "checkpoints") is not None, env={"HF_HUB_OFFLINE": "1"}
    )
    assert code == 130, output[-3000:]
    text = " ".join(output.split())
    found = re.search(
        rf"interrupted: (\d+) of {MAX_STEPS} steps done; re-run the same command to resume from (checkpoint-\d+)", text
    )
    assert found, output[-3000:]
    checkpoint = last_complete_checkpoint(out / "checkpoints")
    assert found.group(2) == checkpoint.name and int(checkpoint.name.split("-")[1]) <= int(found.group(1))
    assert "Traceback" not in output and "Aborted" not in output
    assert not (out / "mlmfilter_judge.json").exists()  # it did not finish
