"""Selection expressions: a small, safe condition language over score columns.

    clip_score > 0.28 and rules_ok
    0.2 <= clip_score < 0.9 or (itm + odf) / 2 >= 85
    not rules_ok and error == "caption_not_utf8"
    itm >= 60 and judge.rules_ok          (several stages of a run: a later stage's column of a name an
                                           earlier stage has too is written stage.column)

The text is parsed with Python's ``ast`` and only a whitelist is translated into a
``pyarrow.compute.Expression``: column names (``stage.column`` too), numbers, strings, True/False, comparisons
(chains included), ``and``/``or``/``not``, ``+ - * /`` and unary minus. Nothing is ever evaluated
by Python, so calls, attributes, subscripts and the like are rejected, not executed.

Missing values never pass: a row passes only when every column the expression names holds a
value (not null, not NaN) *and* the condition is true. So ``not clip_score > 0.3`` does not keep
rows whose clip_score is missing (errored rows), and the result is never null.

A number compared directly with a float32 column is taken in float32, as numpy does, so that
``clip_score >= 0.39`` keeps a stored 0.39; arithmetic results compare in their own precision.
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

BOOL, NUMBER, STRING = "bool", "number", "string"

_COMPARISONS = {
    ast.Eq: pc.equal,
    ast.NotEq: pc.not_equal,
    ast.Lt: pc.less,
    ast.LtE: pc.less_equal,
    ast.Gt: pc.greater,
    ast.GtE: pc.greater_equal,
}
_ARITHMETIC = {ast.Add: pc.add, ast.Sub: pc.subtract, ast.Mult: pc.multiply, ast.Div: pc.divide}
_SYMBOLS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
# Operators people reach for by habit (pandas, SQL), with what to write instead.
_HINTS = {
    ast.BitAnd: "use 'and' instead of '&'",
    ast.BitOr: "use 'or' instead of '|'",
    ast.Invert: "use 'not' instead of '~'",
    ast.Is: "use '==' instead of 'is'",
    ast.IsNot: "use '!=' instead of 'is not'",
}
_GRAMMAR = (
    "allowed: column names, numbers, 'strings', True/False, comparisons (== != < <= > >=), "
    "in / not in ('a', 'b'), and/or/not, + - * /"
)
#: SQL habits in a text Python cannot parse, with what to write instead
_SQL_HINTS = (
    (re.compile(r"\b(AND|OR|NOT)\b"), lambda m: f"write {m.group(1).lower()!r} in lower case"),
    (re.compile(r"(?<![=<>!])=(?!=)"), lambda m: "compare with '==', not '='"),
    (re.compile(r"<>"), lambda m: "write '!=' instead of '<>'"),
    (
        re.compile(r"\bIS\s+(NOT\s+)?NULL\b", re.I),
        lambda m: "rows with missing values never pass: drop the IS NULL test",
    ),
)


class ExpressionError(ValueError):
    """The expression text is not valid: syntax, an unknown column, a disallowed construct or types."""


@dataclass(frozen=True)
class CompiledExpression:
    text: str
    expression: pc.Expression  # boolean, never null: true only where the row passes
    columns: tuple[str, ...]  # the columns it reads, in order of first use


#: what an expression is checked against: a table's schema, or column name -> arrow type
Columns = Union[pa.Schema, Mapping[str, pa.DataType]]


def compile_expression(text: str, columns: Columns) -> pc.Expression:
    """The arrow expression for ``text`` over a table with these columns (its schema)."""
    return parse_expression(text, columns).expression


def parse_expression(text: str, columns: Columns) -> CompiledExpression:
    """Like :func:`compile_expression`, also telling which columns the expression reads."""
    tree = _parse(text)
    translator = _Translator(columns)
    condition, kind = translator.visit(tree.body)
    if kind != BOOL:
        raise ExpressionError(
            f"{text!r} is a {kind}, not a condition; compare it, e.g. '{ast.unparse(tree.body)} > 0.3'"
        )
    expression = condition
    for name in reversed(translator.used):
        # Kleene 'and' with a false validity yields false, so the result is never null.
        present = pc.invert(pc.is_null(pc.field(name), nan_is_null=True))
        expression = pc.and_kleene(present, expression)
    return CompiledExpression(text=text, expression=expression, columns=tuple(translator.used))


def expression_names(text: str) -> list[str]:
    """The names ``text`` reads, in order of first use, before any table is at hand to check them
    against (e.g. which of a judge's columns an enhancement's ``--where`` compares)."""
    tree = _parse(text)
    names, inner = [], set()
    for node in ast.walk(tree):  # outermost first: judge.itm is one name, not judge
        name = _column_name(node)
        if name is not None and id(node) not in inner:
            names.append((node.lineno, node.col_offset, name))
            inner.update(id(n) for n in ast.walk(node) if n is not node)
    return list(dict.fromkeys(name for _, _, name in sorted(names)))


def _column_name(node: ast.AST) -> str | None:
    """The column a name node reads: ``itm``, or a stage-qualified ``judge.itm``; None otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _column_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def passing_rows(table: pa.Table, text: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of a stage's table where ``text`` passes (only ``columns`` of them, when given):
    the cascade of ``score --only`` picks its keys with it, ``enhance --where`` its uids."""
    return ds.dataset(table).to_table(columns=columns, filter=compile_expression(text, table.schema))


#: how deeply an expression may nest (parentheses, not, operators); a real condition needs a handful
MAX_DEPTH = 100


def _parse(text: str) -> ast.Expression:
    if not text or not text.strip():
        raise ExpressionError("the expression is empty")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        hints = [hint(m) for pattern, hint in _SQL_HINTS for m in [pattern.search(text)] if m]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ExpressionError(f"invalid syntax in {_shown(text)}{where}: {exc.msg}{hint}") from None
    except (RecursionError, MemoryError):  # Python's parser gives up on thousands of nested levels
        raise ExpressionError(f"{_shown(text)} nests too deeply (at most {MAX_DEPTH} levels)") from None
    depth = _depth(tree.body)
    if depth > MAX_DEPTH:
        raise ExpressionError(f"{_shown(text)} nests {depth} levels deep; at most {MAX_DEPTH} are allowed")
    return tree


def _depth(node: ast.AST) -> int:
    """How deeply ``node`` nests, counted without recursion (a hostile text may nest thousands deep)."""
    deepest, todo = 0, [(node, 1)]
    while todo:
        current, depth = todo.pop()
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in ast.iter_child_nodes(current))
    return deepest


def _shown(text: str, limit: int = 80) -> str:
    """The expression as an error message quotes it: cut, so a hostile one does not flood the terminal."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def column_kind(name: str, dtype: pa.DataType) -> str:
    """bool, number or string: what an expression may do with a column of this arrow type."""
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_boolean(dtype):
        return BOOL
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return NUMBER
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return STRING
    raise ExpressionError(f"column {name!r} has type {dtype}, which expressions cannot use")


class _Translator:
    """ast node -> (arrow expression, kind). Every node type not handled here is rejected."""

    def __init__(self, columns: Columns):
        self.columns = dict(zip(columns.names, columns.types)) if isinstance(columns, pa.Schema) else dict(columns)
        self.used: list[str] = []

    def visit(self, node: ast.AST) -> tuple[pc.Expression, str]:
        handler = getattr(self, f"visit_{type(node).__name__}", None)
        if handler is None:
            raise ExpressionError(f"{_describe(node)} is not allowed in selection expressions ({_GRAMMAR})")
        return handler(node)

    def visit_Attribute(self, node: ast.Attribute) -> tuple[pc.Expression, str]:
        name = _column_name(node)  # a stage-qualified column: judge.itm
        if name is None or (name not in self.columns and _column_name(node.value) in self.columns):
            raise ExpressionError(f"{_describe(node)} is not allowed in selection expressions ({_GRAMMAR})")
        return self._column(name)

    def visit_Name(self, node: ast.Name) -> tuple[pc.Expression, str]:
        return self._column(node.id)

    def _column(self, name: str) -> tuple[pc.Expression, str]:
        if name not in self.columns:
            raise ExpressionError(_unknown_column_message(name, self.columns))
        kind = column_kind(name, self.columns[name])
        if name not in self.used:
            self.used.append(name)
        return pc.field(name), kind

    def visit_Constant(self, node: ast.Constant) -> tuple[pc.Expression, str]:
        value = node.value
        if isinstance(value, bool):
            return pc.scalar(value), BOOL
        if isinstance(value, (int, float)):
            return pc.scalar(value), NUMBER
        if isinstance(value, str):
            return pc.scalar(value), STRING
        if value is None:
            raise ExpressionError("None is not allowed: rows with missing values never pass anyway")
        raise ExpressionError(f"the literal {value!r} is not allowed ({_GRAMMAR})")

    def visit_BoolOp(self, node: ast.BoolOp) -> tuple[pc.Expression, str]:
        word = "and" if isinstance(node.op, ast.And) else "or"
        combine = pc.and_kleene if word == "and" else pc.or_kleene
        result = None
        for operand in node.values:
            expression = self._expect(operand, BOOL, f"operands of '{word}'")
            result = expression if result is None else combine(result, expression)
        return result, BOOL

    def visit_UnaryOp(self, node: ast.UnaryOp) -> tuple[pc.Expression, str]:
        if isinstance(node.op, ast.Not):
            return pc.invert(self._expect(node.operand, BOOL, "the operand of 'not'")), BOOL
        if isinstance(node.op, ast.USub):
            return pc.negate(self._expect(node.operand, NUMBER, "the operand of unary '-'")), NUMBER
        if isinstance(node.op, ast.UAdd):
            return self._expect(node.operand, NUMBER, "the operand of unary '+'"), NUMBER
        raise ExpressionError(_HINTS.get(type(node.op), f"{_describe(node)} is not allowed ({_GRAMMAR})"))

    def visit_BinOp(self, node: ast.BinOp) -> tuple[pc.Expression, str]:
        operation = _ARITHMETIC.get(type(node.op))
        if operation is None:
            hint = _HINTS.get(type(node.op), f"the operator in {ast.unparse(node)!r} is not allowed ({_GRAMMAR})")
            raise ExpressionError(hint)
        what = f"operands of '{_SYMBOLS[type(node.op)]}'"
        left = self._expect(node.left, NUMBER, what)
        right = self._expect(node.right, NUMBER, what)
        if isinstance(node.op, ast.Div):
            # true division, as in Python: integer columns divide as floats, x / 0 gives inf/nan
            left, right = left.cast(pa.float64()), right.cast(pa.float64())
        return operation(left, right), NUMBER

    def visit_Compare(self, node: ast.Compare) -> tuple[pc.Expression, str]:
        # a < b <= c means (a < b) and (b <= c), as in Python
        result = None
        left_node = node.left
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                term = self._membership(left_node, right_node, isinstance(op, ast.NotIn))
                result = term if result is None else pc.and_kleene(result, term)
                left_node = right_node
                continue
            compare = _COMPARISONS.get(type(op))
            if compare is None:
                raise ExpressionError(_HINTS.get(type(op), f"the comparison in {_describe(node)} is not allowed"))
            left, left_kind = self._operand(left_node, right_node)
            right, right_kind = self._operand(right_node, left_node)
            if left_kind != right_kind:
                raise ExpressionError(
                    f"cannot compare {ast.unparse(left_node)} ({left_kind}) with {ast.unparse(right_node)} ({right_kind})"
                )
            if left_kind == BOOL and type(op) not in (ast.Eq, ast.NotEq):
                raise ExpressionError(f"True/False values can only be compared with == or != in {ast.unparse(node)!r}")
            term = compare(left, right)
            result = term if result is None else pc.and_kleene(result, term)
            left_node = right_node
        return result, BOOL

    def _membership(self, left: ast.AST, right: ast.AST, negate: bool) -> pc.Expression:
        """``error in ('empty_caption', 'truncated_image')``: a column against literal values."""
        word = "not in" if negate else "in"
        if not isinstance(right, (ast.Tuple, ast.List, ast.Set)):
            raise ExpressionError(f"'{word}' takes literal values in brackets, e.g. error {word} ('a', 'b')")
        expression, kind = self.visit(left)
        values = []
        for element in right.elts:
            number = _number_literal(element)
            if number is not None:
                values.append((number, NUMBER))
            elif isinstance(element, ast.Constant) and isinstance(element.value, (str, bool)):
                values.append((element.value, BOOL if isinstance(element.value, bool) else STRING))
            else:
                raise ExpressionError(f"'{word}' takes literal values only, not {ast.unparse(element)!r}")
        if not values:
            raise ExpressionError(f"'{word}' needs at least one value")
        wrong = [v for v, k in values if k != kind]
        if wrong:
            raise ExpressionError(f"cannot compare {ast.unparse(left)} ({kind}) with {wrong[0]!r} in '{word}'")
        member = pc.is_in(expression, value_set=pa.array([v for v, _ in values]))
        return pc.invert(member) if negate else member

    def _operand(self, node: ast.AST, other: ast.AST) -> tuple[pc.Expression, str]:
        """A number compared with a float32 column is read as float32, as numpy does: otherwise
        ``clip_score >= 0.39`` would miss the stored 0.39 (0.38999998 once widened to float64)."""
        value = _number_literal(node)
        column = _column_name(other)
        if value is not None and column in self.columns:
            dtype = self.columns[column]
            if pa.types.is_floating(dtype) and dtype.bit_width < 64:
                return pc.scalar(pa.scalar(value, pa.float32())), NUMBER
        return self.visit(node)

    def _expect(self, node: ast.AST, kind: str, what: str) -> pc.Expression:
        expression, actual = self.visit(node)
        if actual != kind:
            raise ExpressionError(f"{what} must be {_ARTICLE[kind]}, but {ast.unparse(node)!r} is {_ARTICLE[actual]}")
        return expression


def _number_literal(node: ast.AST) -> float | None:
    """The value of a literal number, signed or not; None for anything else."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return sign * float(node.value)
    return None


_ARTICLE = {BOOL: "a condition", NUMBER: "a number", STRING: "a string"}


def _describe(node: ast.AST) -> str:
    kinds = {
        ast.Call: "a function call",
        ast.Attribute: "attribute access",
        ast.Subscript: "indexing",
        ast.Lambda: "a lambda",
        ast.IfExp: "an if-expression",
        ast.NamedExpr: "an assignment",
        ast.List: "a list",
        ast.Tuple: "a tuple",
        ast.Dict: "a dict",
        ast.Set: "a set",
        ast.JoinedStr: "an f-string",
    }
    kind = kinds.get(type(node), type(node).__name__)
    return f"{kind} ({ast.unparse(node)!r})"


def _unknown_column_message(name: str, columns: Mapping[str, pa.DataType]) -> str:
    if name in ("true", "false"):
        return f"unknown name {name!r}: write {name.capitalize()}"
    available = sorted(columns)
    qualified = [c for c in available if c.endswith("." + name)]  # in a later stage of the run
    close = qualified or difflib.get_close_matches(name, available, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown column {name!r}.{hint} Available columns: {', '.join(available)}"
