"""A safe evaluator for the arithmetic answers of math word problems (SVAMP, ASDiv, quickstart).

Gold labels look like `( 84.0 / 2.0 )` and teachers write `(84 / 2)`: the two are compared by
value. Model output is untrusted text, so it is parsed with `ast` and only numbers, + - * /,
unary +/- and parentheses are allowed; `eval()` is never used. Size is bounded so that no input
can make evaluation slow.

>>> evaluate_expression("(84 / 2)")
42.0
>>> values_equal("( 84.0 / 2.0 )", "(84 / 2)")
True
"""

from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 200  # the longest SVAMP gold equation is under 60 characters
MAX_NODES = 100
MAX_DEPTH = 32

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ExpressionError(ValueError):
    """Text that is not a plain arithmetic expression, or one that cannot be evaluated."""


def evaluate_expression(text: str) -> float:
    """The value of an arithmetic expression such as `((7 + 5) * 2) / 3`.

    Raises ExpressionError for anything else: names, calls, `**`, tuples like `(175, 5)`,
    text over MAX_CHARS characters, division by zero, or a result that is not finite.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"expression is {len(text)} characters long; the limit is {MAX_CHARS}")
    if not text.strip():
        raise ExpressionError("empty expression")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise ExpressionError(f"not an arithmetic expression: {text!r}") from e
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > MAX_NODES:
        raise ExpressionError(f"expression has {nodes} syntax nodes; the limit is {MAX_NODES}")
    try:
        value = _eval(tree.body, 0)
    except ZeroDivisionError as e:
        raise ExpressionError(f"division by zero in {text!r}") from e
    except OverflowError as e:
        raise ExpressionError(f"result of {text!r} is too large") from e
    if not math.isfinite(value):
        raise ExpressionError(f"result of {text!r} is not finite")
    return value


def _eval(node: ast.AST, depth: int) -> float:
    if depth > MAX_DEPTH:
        raise ExpressionError(f"expression is nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant):
        # bool is an int subclass; True + 1 is not arithmetic a teacher should write
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)  # float at once, so no huge-int arithmetic can happen
        raise ExpressionError(f"only numbers are allowed, not {node.value!r}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, depth + 1), _eval(node.right, depth + 1))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, depth + 1))
    what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
    raise ExpressionError(f"{what} is not allowed: only numbers, + - * /, and parentheses")


def values_equal(a: float | str, b: float | str, rel_tol: float = 1e-9) -> bool:
    """Whether two numbers or expressions have the same value (relative tolerance `rel_tol`).

    Strings are evaluated with evaluate_expression, which raises ExpressionError when one is
    not an arithmetic expression. The tolerance only absorbs float rounding (`(1 / 3) * 6` vs
    `2`): a looser one (1e-4) would count `(610769 + 590796 + 22)` equal to `(610769 + 590796)`,
    a real SVAMP teacher error.
    """
    x = evaluate_expression(a) if isinstance(a, str) else float(a)
    y = evaluate_expression(b) if isinstance(b, str) else float(b)
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)
