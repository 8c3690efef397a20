"""The MLM-Filter judge, independent of any model runtime.

- :mod:`mlmfilter.judge.prompts` - the exact reference prompts (package data) and how one is filled
- :mod:`mlmfilter.judge.conversations` - the reference conversation formats (Vicuna v1, Llama-3, Qwen);
  the Jinja chat template of a converted LLaVA-1.5 judge is generated from the same Vicuna v1 source
- :mod:`mlmfilter.judge.readout` - expected score from the exact distribution over 0..100; the one
  score-line parser (a generated answer, a published score dump, a teacher's reply)
- :mod:`mlmfilter.judge.backend` - the narrow ``JudgeBackend`` protocol a model runtime implements
  (one file per runtime in :mod:`mlmfilter.backends`)

Nothing here imports torch at module load.
"""

from __future__ import annotations

from mlmfilter.judge.backend import JudgeBackend, JudgeRequest, RequestFailure
from mlmfilter.judge.prompts import METRICS, resolve_metrics, resolve_template

__all__ = ["JudgeBackend", "JudgeRequest", "RequestFailure", "METRICS", "resolve_metrics", "resolve_template"]
