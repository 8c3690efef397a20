"""`mlmfilter enhance` stopped with Ctrl-C (a real SIGINT to the real command) says it was interrupted and
exits 130, as `score` does, instead of "0 pairs tried" and exit 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from tests.support import mlm as mlm_support
from tests.support.builders import flickr_shards


@pytest.mark.slow
def test_enhance_interrupted_exits_130_and_says_so(tmp_path, flickr_pairs, smollm2_cache_dir):
    model = str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))
    shard = flickr_shards(flickr_pairs[:3], tmp_path / "in", n_shards=1, per_shard=3)[0]
    run = tmp_path / "run"
    judge = ["--scorer", "mlm", "--model", model, "--metrics", "itm", "--device", "cpu", "--dtype", "fp32"]
    scored = CliRunner().invoke(
        app, ["score", str(shard), "-o", str(run), *judge, "--decode-workers", "0", "--option", "mlm.min_mass=0"]
    )
    assert scored.exit_code == 0, scored.output

    command = [sys.executable, "-m", "mlmfilter.cli.app", "enhance", str(run), "--where", "itm <= 100"]
    command += ["--model", model, "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "24"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list((run / "logs").glob("enhance-main-*.log")):  # the stage has started its worker
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "enhance did not start within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted" in output and "re-run the same command to resume" in output
    assert "Traceback" not in output
    assert os.path.isdir(run / "enhance")
