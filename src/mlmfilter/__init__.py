"""mlmfilter: score, select and repair image-text pairs for vision-language pretraining.

The public face: every verb of :mod:`mlmfilter.api` is a name of the package (``mlmfilter.score(...)``,
``mlmfilter.select(...)``), loaded on first use so that ``import mlmfilter.scorers.rules`` does not
pay for the whole API.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # score a pool
    "ScoreConfig",
    "ScorerSpec",
    "StageSummary",
    "score",
    "list_scorers",
    # keep the good pairs
    "select",
    "reshard",
    # repair captions
    "enhance",
    # embeddings once: near-duplicates, a judge distilled to CLIP cost
    "embed",
    "dedup",
    "distill",
    # teach a judge
    "teach_sample",
    "teach_negatives",
    "teach_label",
    "teach_collect",
    "teach_write_batch",
    "teach_balance",
    "teach_export",
    "train",
    # look at a run
    "report",
    "inspect",
    "stats",
    "ScoreStats",
    # check the scorers
    "evaluate_human",
    "evaluate_corrupt",
    # know the cost before, trust the numbers after
    "plan",
    "plan_teach_label",
    "verify",
    # foreign formats: released judge checkpoints, MLM-Filter score files
    "convert_checkpoint",
    "export_mlm_filter",
    "import_mlm_filter",
]


def __getattr__(name: str):
    if name in __all__:
        from mlmfilter import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlmfilter' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
