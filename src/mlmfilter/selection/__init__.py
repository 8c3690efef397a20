"""Selection: expressions over score columns, exact top fractions in bounded memory, and
DataComp subset files. :func:`select_run` ties them together over a run folder and writes a
selection folder (:class:`SelectionFolder`, the one owner of its layout)."""

from __future__ import annotations

from mlmfilter.selection.expression import CompiledExpression, ExpressionError, compile_expression, parse_expression
from mlmfilter.selection.folder import SelectionFolder
from mlmfilter.selection.select import SelectionResult, select_run
from mlmfilter.selection.subset import read_datacomp_subset, write_datacomp_subset
from mlmfilter.selection.tables import SelectionError
from mlmfilter.selection.topk import ScoreBatch, ScoreKeys, TopKThreshold, find_top_k, top_k_mask

__all__ = [
    "CompiledExpression",
    "ExpressionError",
    "ScoreBatch",
    "ScoreKeys",
    "SelectionError",
    "SelectionFolder",
    "SelectionResult",
    "TopKThreshold",
    "compile_expression",
    "find_top_k",
    "parse_expression",
    "read_datacomp_subset",
    "select_run",
    "top_k_mask",
    "write_datacomp_subset",
]
