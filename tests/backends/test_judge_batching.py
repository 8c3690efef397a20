"""How the transformers judge cuts its work: micro-batches by a token budget, the automatic budget on
CUDA from the model's size, and the benchmark of the 1.5B layout running end to end on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mlmfilter.backends.transformers import AUTO_BUDGET_MAX_TOKENS, auto_batch_tokens, micro_batches
from mlmfilter.images.pool import decode_workers_for
from mlmfilter.scorers.mlm import MLMScorer

ROOT = Path(__file__).resolve().parents[2]


def test_micro_batches_fill_a_token_budget_counting_prefix_padding():
    costs = [(100, 50), (100, 50), (120, 40), (300, 100), (90, 10)]
    # no budget: pairs only
    assert micro_batches(costs, None, 2) == [[0, 1], [2, 3], [4]]
    # 2 x 100 + 100 = 300 fits; a third (3 x 120 + 140 = 500) does not
    assert micro_batches(costs, 300, 8) == [[0, 1], [2], [3], [4]]
    # the padded prefix counts: 300 wide x 2 rows + 110 > 700, so the short pair after the long one waits
    assert micro_batches(costs, 700, 8) == [[0, 1, 2], [3], [4]]
    assert micro_batches(costs, 10, 8) == [[0], [1], [2], [3], [4]]  # one pair over the budget runs alone
    assert micro_batches([], 100, 8) == []


def test_the_automatic_budget_follows_the_model_and_the_free_memory():
    qwen_15b = SimpleNamespace(
        num_attention_heads=12, num_key_value_heads=2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28
    )
    llama_8b = SimpleNamespace(
        num_attention_heads=32, num_key_value_heads=8, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32
    )
    free = 70 << 30  # an H100 with the weights loaded
    small, large = auto_batch_tokens(qwen_15b, torch.bfloat16, free), auto_batch_tokens(llama_8b, torch.bfloat16, free)
    assert small == AUTO_BUDGET_MAX_TOKENS and 1024 <= large < small  # more KV per token: fewer tokens
    assert auto_batch_tokens(llama_8b, torch.bfloat16, 1 << 20) == 1024  # the floor


def test_budget_is_speed_only_and_on_by_default_only_on_cuda(smollm2_cache_dir):
    from tests.support import mlm as mlm_support

    model = str(mlm_support.tiny_model_dir("llava", smollm2_cache_dir))
    cpu = MLMScorer(MLMScorer.Options(model=model, device="cpu"))
    budgeted = MLMScorer(MLMScorer.Options(model=model, device="cpu", batch_tokens=4096))
    assert cpu.batch_size == 8 and budgeted.batch_size == 64  # the scorer hands a budgeted backend more pairs
    assert "batch_tokens" not in budgeted.identity()["options"]  # a run resumes under another budget
    assert budgeted.identity() == cpu.identity()


def test_decode_workers_keep_a_gpu_judge_fed():
    assert decode_workers_for(100, 16.0, cpus=16) == 3  # ceil(100 x 16 ms x 1.5)
    assert decode_workers_for(100, 16.0, cpus=3) == 1  # never more than the CPUs less two
    assert decode_workers_for(10, 6.0, cpus=16) == 1


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu(smollm2_cache_dir):
    """The 1.5B layout's benchmark at real widths, one layer each, one pair: both methods run and report."""
    from tests.support import mlm as mlm_support

    mlm_support.tokenizer(smollm2_cache_dir)  # converted once per session
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_judge_gpu.py"),
        *("--device", "cpu", "--pairs", "1", "--metrics", "itm,odf", "--threads", "1"),
        *("--text-layers", "1", "--vision-layers", "1", "--vocab-size", "49216"),
        *("--tokenizer-cache", smollm2_cache_dir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "1.5B layout (SigLIP-so400m 384 px -> 144 tokens" in out and "2 metrics (itm,odf)" in out
    assert "ours (expected readout)" in out and "released script's method" in out
    assert "ratio ours / released method (pairs/s):" in out
