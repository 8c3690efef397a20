"""Selection expressions: the grammar on real arrow tables, null handling, and what is refused."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlmfilter.selection.expression import (
    ExpressionError,
    compile_expression,
    expression_names,
    parse_expression,
    passing_rows,
)

NAN = float("nan")
ROWS = [  # clip_score, rules_ok, rules_words, itm, error
    (0.10, True, 3, 90.0, None),
    (0.25, False, 12, 40.0, None),
    (0.50, True, 8, 70.0, None),
    (0.90, True, 20, 95.0, None),
    (None, None, None, None, "undecodable_image"),
    (NAN, True, 5, NAN, "scorer_error"),
    (0.30, None, 7, 66.0, "caption_not_utf8"),
]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pa.Table:
    """A score table as the pipeline writes it, read back from a real parquet file."""
    clip, ok, words, itm, error = zip(*ROWS)
    path = tmp_path_factory.mktemp("expr") / "00000.parquet"
    pq.write_table(
        pa.table(
            {
                "uid": [f"{i:032x}" for i in range(len(ROWS))],
                "clip_score": pa.array(clip, pa.float32()),
                "rules_ok": pa.array(ok, pa.bool_()),
                "rules_words": pa.array(words, pa.int64()),
                "itm": pa.array(itm, pa.float64()),
                "error": pa.array(error, pa.string()),
            }
        ),
        path,
    )
    return pq.read_table(path)


def passing(table: pa.Table, text: str) -> list[int]:
    """Row numbers where the expression passes."""
    indexed = table.append_column("row", pa.array(range(table.num_rows)))
    return indexed.filter(compile_expression(text, table.schema))["row"].to_pylist()


def present(value) -> bool:
    return value is not None and not (isinstance(value, (float, np.floating)) and math.isnan(value))


@pytest.mark.parametrize(
    "text, rule",
    [
        ("0.2 <= clip_score < 0.9", lambda c, o, w, i: 0.2 <= c < 0.9),
        ("clip_score > 0.2 and rules_ok", lambda c, o, w, i: c > 0.2 and o),
        ("clip_score > 0.6 or rules_words >= 10", lambda c, o, w, i: c > 0.6 or w >= 10),
        ("not rules_ok", lambda c, o, w, i: not o),
        ("(itm + rules_words) / 2 >= 40", lambda c, o, w, i: (i + w) / 2 >= 40),
        ("rules_words / 16 > 0.5", lambda c, o, w, i: w / 16 > 0.5),  # true division on ints
        ("-clip_score * 10 < -4.9", lambda c, o, w, i: -c * 10 < -4.9),
        ("rules_ok == False", lambda c, o, w, i: o is False),
        ("rules_ok != True and itm - 1 > 0", lambda c, o, w, i: o is not True and i - 1 > 0),
        ("10 > rules_words > 5 > 1", lambda c, o, w, i: 10 > w > 5),
    ],
)
def test_grammar_matches_python_on_rows_with_values(table, text, rule):
    """Python evaluates the same condition on the stored values; clip_score as numpy float32,
    so that literals compare in float32 precision (numpy's rule, which expressions follow)."""
    names = ("clip_score", "rules_ok", "rules_words", "itm")
    used = parse_expression(text, table.schema).columns
    rows = table.select(list(names)).to_pylist()
    for row in rows:
        row["clip_score"] = np.float32(row["clip_score"]) if row["clip_score"] is not None else None
    expected = [
        index
        for index, row in enumerate(rows)
        if all(present(row[name]) for name in used)
        and rule(*[row[name] if present(row[name]) else 0 for name in names])
    ]
    assert passing(table, text) == expected
    assert expected  # every case keeps something, so an always-empty filter cannot pass


def test_missing_values_never_pass_even_under_not(table):
    # row 4 (null scores, errored) and row 5 (NaN clip_score) must not come back through `not`
    assert passing(table, "not clip_score > 0.2") == [0]
    assert passing(table, "not (clip_score > 0.2 and rules_ok)") == [0, 1]
    # a null in a column the expression reads drops the row even if `or` could decide without it
    assert passing(table, "clip_score > 0.2 or rules_ok") == [0, 1, 2, 3]
    # columns not named do not matter: row 6 has an error but a clip_score and is scored
    assert 6 in passing(table, "clip_score >= 0.3")


def test_numbers_compare_in_the_float32_column_precision():
    """0.39 stored as float32 is 0.38999998; `>= 0.39` must still keep it, as numpy would."""
    table = pa.table({"clip_score": pa.array([0.38, 0.39, 0.4], pa.float32()), "itm": [0.38, 0.39, 0.4]})
    assert passing(table, "clip_score >= 0.39") == [1, 2]
    assert passing(table, "clip_score == 0.39") == [1]
    assert passing(table, "0.39 <= clip_score <= 0.39") == [1]
    assert passing(table, "-clip_score <= -0.39") == [2]  # computed values compare in float64
    assert passing(table, "itm >= 0.39") == [1, 2]  # float64 columns are exact anyway


def test_string_comparison_and_literals(table):
    assert passing(table, "error == 'caption_not_utf8'") == [6]
    assert passing(table, "error != 'scorer_error'") == [4, 6]  # nulls (no error) never pass
    assert passing(table, "True") == list(range(len(ROWS)))
    assert passing(table, "False") == []


def test_parse_reports_columns_in_order_of_use(table):
    text = "itm > 3 and (clip_score < 1 or itm < 2)"
    compiled = parse_expression(text, table.schema)
    assert compiled.columns == ("itm", "clip_score")
    # a schema or a name -> type mapping: the same expression
    from_mapping = parse_expression(text, dict(zip(table.schema.names, table.schema.types)))
    assert from_mapping.columns == compiled.columns and from_mapping.expression.equals(compiled.expression)
    # before any table is at hand (which judge columns an enhancement compares): the same names
    assert expression_names(text) == ["itm", "clip_score"]
    assert expression_names("10 > rules_words > 5 and (itm + clip_score) / 2 >= rules_words") == [
        "rules_words",
        "itm",
        "clip_score",
    ]
    with pytest.raises(ExpressionError, match="invalid syntax in 'itm >'"):
        expression_names("itm >")


def test_passing_rows_of_a_stage_table(table):
    """What the score cascade (by key) and enhance (by uid) pick: the rows the filter keeps."""
    text = "clip_score > 0.2 and rules_ok"
    picked = passing_rows(table, text, ["uid"])
    assert picked.column_names == ["uid"]
    assert picked["uid"].to_pylist() == [f"{i:032x}" for i in passing(table, text)] == [f"{i:032x}" for i in (2, 3)]
    assert passing_rows(table, text).equals(table.filter(compile_expression(text, table.schema)))
    assert passing_rows(table, "False", ["uid"]).num_rows == 0
    with pytest.raises(ExpressionError, match="unknown column 'nope'"):
        passing_rows(table, "nope > 1", ["uid"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os').system('touch pwned')", "function call"),
        ("open('/etc/passwd')", "function call"),
        ("clip_score.real > 0", "attribute access"),
        ("().__class__.__bases__", "attribute access"),
        ("rules_words[0] > 1", "indexing"),
        ("(lambda: True)()", "function call"),
        ("[c for c in clip_score]", "ListComp"),
        ("clip_score if rules_ok else itm", "if-expression"),
        ("(x := 1) > 0", "assignment"),
        ("clip_score ** 2 > 0.1", "operator"),
        ("clip_score > 0.2 & rules_ok", "use 'and'"),
        ("clip_score in clip_score", "'in' takes literal values in brackets"),
        ("rules_ok AND clip_score > 1", "write 'and' in lower case"),
        ("clip_score = 1", "compare with '==', not '='"),
        ("clip_score is None", "use '=='"),
        ("clip_score == None", "None is not allowed"),
        ("clip_score", "not a condition"),
        ("clip_score + 1", "not a condition"),
        ("clip_score > 'high'", "cannot compare"),
        ("rules_ok + 1 > 0", "must be a number"),
        ("not clip_score", "must be a condition"),
        ("rules_ok < True", "only be compared with == or !="),
        ("clip_score >", "invalid syntax"),
        ("", "empty"),
        ("b'x' == error", "literal"),
        ("true", "write True"),
    ],
)
def test_rejections_are_clear(table, text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExpressionError, match=message.replace("(", r"\(").replace("*", r"\*")):
        compile_expression(text, table.schema)
    assert not (tmp_path / "pwned").exists()  # nothing was executed


def test_unknown_column_lists_columns_and_suggests(table):
    with pytest.raises(ExpressionError) as info:
        compile_expression("clip_scor > 0.3 and rules_ok", table.schema)
    message = str(info.value)
    assert "'clip_scor'" in message and "Did you mean 'clip_score'" in message
    assert "Available columns: clip_score, error, itm, rules_ok, rules_words, uid" in message


def test_unusable_column_type_is_refused():
    with pytest.raises(ExpressionError, match="type list"):
        compile_expression("tags > 1", {"tags": pa.list_(pa.string())})


def test_in_and_not_in_take_literal_lists(table):
    assert passing(table, "error in ('undecodable_image', 'caption_not_utf8')") == [4, 6]
    assert passing(table, "rules_words in (3, 20)") == [0, 3]
    # missing values never pass, 'not in' included (row 4 has no rules_words, row 5 a NaN clip_score)
    assert passing(table, "rules_words not in (3, 20)") == [1, 2, 5, 6]
    assert passing(table, "clip_score in (0.25, 0.9)") == [1, 3]  # float32 values found as written
    with pytest.raises(ExpressionError, match="cannot compare error"):
        compile_expression("error in (1, 2)", table.schema)


def test_a_stage_qualified_column_reads_as_written():
    schema = pa.schema([("itm", pa.float32()), ("judge.itm", pa.float32()), ("rules_ok", pa.bool_())])
    data = pa.table({"itm": [1.0, 5.0], "judge.itm": [9.0, 2.0], "rules_ok": [True, True]}, schema=schema)
    assert data.filter(compile_expression("judge.itm > itm and rules_ok", schema))["itm"].to_pylist() == [1.0]
    assert expression_names("judge.itm > 3 and itm < 2") == ["judge.itm", "itm"]
    with pytest.raises(ExpressionError, match="Did you mean 'judge.itm'"):
        compile_expression("judge.itmm > 1", pa.schema([("judge.itm", pa.float32())]))
    with pytest.raises(ExpressionError, match="Did you mean 'judge.itm'"):
        compile_expression("itm > 1", pa.schema([("judge.itm", pa.float32())]))
