"""``enhance()``: run the enhance stage on a scored run (what ``mlmfilter enhance`` calls)."""

from __future__ import annotations

from typing import Any

from mlmfilter.enhance.stage import EnhanceOptions, EnhanceStage
from mlmfilter.selection.expression import expression_names, parse_expression


def judge_from_run(run: str, where: str, source_stage: str = "score") -> list[dict[str, Any]]:
    """The scorer specs of ``source_stage`` that produce a column ``where`` reads: the same judge,
    model and metrics that scored the originals, so the rewrites are re-scored as they were."""
    from mlmfilter.runs.read import RunReader
    from mlmfilter.scorers import build_scorer

    settings = RunReader(run).settings(source_stage)
    specs = (settings.get("options") or {}).get("scorers") or []
    read = set(expression_names(where))
    judge = [s for s in specs if read & set(build_scorer(s["name"], s.get("options")).columns)]
    if not judge:
        raise ValueError(
            f"no scorer of stage {source_stage!r} produces a column that {where!r} reads "
            f"(scorers: {', '.join(s['name'] for s in specs) or 'none'}); name the judge with --judge-model"
        )
    return judge


def enhance(
    run: str, options: EnhanceOptions, *, name: str = "enhance", overwrite: bool = False, show_progress: bool = False
):
    """Enhance the pairs of ``run`` picked by ``options.where``; resumable like any stage.

    Returns the run layer's ``StageSummary``; the stage's tables are ``RUN/<name>/tables``.
    ``overwrite`` discards this stage's earlier results (never the scores).
    """
    from mlmfilter.runs.read import RunReader
    from mlmfilter.runs.runner import run_stage

    reader = RunReader(run)
    parse_expression(options.where, reader.schema(options.source_stage))  # fail early
    stage = EnhanceStage(options, name=name)
    return run_stage(run, stage, overwrite="stage" if overwrite else False, show_progress=show_progress)
