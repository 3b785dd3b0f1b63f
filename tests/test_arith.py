"""The safe arithmetic evaluator: values, what it refuses, and value comparison."""

import pytest

from stepdistill.arith import MAX_CHARS, ExpressionError, evaluate_expression, values_equal


@pytest.mark.parametrize(
    "text, value",
    [
        ("(84 / 2)", 42.0),
        ("( 84.0 / 2.0 )", 42.0),
        ("( ( 17.0 + 15.0 ) + 2.0 )", 34.0),
        ("(16 * 17) * 4", 1088.0),
        ("-3 + +5", 2.0),
        ("10 - 2 - 3", 5.0),  # left-associative
        ("2 + 3 * 4", 14.0),  # precedence
        ("7", 7.0),
        ("1.5e3 / 3", 500.0),
    ],
)
def test_values(text, value):
    assert evaluate_expression(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "__import__('os').system('echo hi')",
        "x",
        "2 * x",
        "abs(-3)",
        "(1).__class__",
        "2 ** 10",
        "9 ** 9 ** 9",
        "7 // 2",
        "7 % 2",
        "(175, 5)",  # SVAMP: PaLM answered with a tuple
        "(29 / 2) and (30 / 2)",  # eval() would answer 15.0
        "[1, 2]",
        "'12'",
        "True + 1",
        "1 if 1 else 2",
        "lambda: 1",
        "1 < 2",
        "7x = 14",
        "((491 - 21",  # truncated
        "",
        "   ",
        "1j * 2",
    ],
)
def test_rejects_everything_but_arithmetic(text):
    with pytest.raises(ExpressionError):
        evaluate_expression(text)


def test_expression_error_is_a_value_error_with_a_message():
    with pytest.raises(ValueError, match="not allowed"):
        evaluate_expression("abs(1)")


def test_division_by_zero():
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate_expression("(5 / (3 - 3))")


@pytest.mark.parametrize(
    "text",
    [
        "1 + " * 100 + "1",  # over the length limit
        "(" * 150 + "1" + ")" * 150,
        "1" + " + 1" * 49,  # under the length limit, over the node limit
        "-" * 150 + "1",  # deep unary chain
        "1e308 * 10",  # overflows to inf
        "9" * 100 + " * " + "9" * 90 + " * 1e200",  # big literals overflow to inf
    ],
)
def test_rejects_huge_inputs(text):
    with pytest.raises(ExpressionError):
        evaluate_expression(text)


def test_length_limit_message():
    with pytest.raises(ExpressionError, match=f"limit is {MAX_CHARS}"):
        evaluate_expression("1+" * 150 + "1")


def test_rejects_non_strings():
    with pytest.raises(ExpressionError):
        evaluate_expression(42)  # type: ignore[arg-type]


def test_values_equal():
    assert values_equal("( 84.0 / 2.0 )", "(84 / 2)")
    assert values_equal("(1 / 3) * 6", 2)
    assert values_equal(42, "(84 / 2)")
    assert not values_equal("(84 / 2)", "(84 * 2)")
    # a real SVAMP teacher error that a loose tolerance (1e-4) would count as right
    assert not values_equal("(610769 + 590796 + 22)", "( 610769.0 + 590796.0 )")
    with pytest.raises(ExpressionError):
        values_equal("(175, 5)", 175)
