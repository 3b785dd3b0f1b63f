"""Math word problems whose label is an arithmetic expression: SVAMP and ASDiv.

Teacher format (the paper's PaLM outputs have this shape):
    Q: <question>
    A: <reasoning> The answer is (<expression>).
Labels are compared by value: gold `( 84.0 / 2.0 )` equals teacher `(84 / 2)`.
"""

from __future__ import annotations

from typing import Any

from stepdistill.arith import ExpressionError, evaluate_expression, values_equal
from stepdistill.tasks import TASKS
from stepdistill.tasks.base import Example, Parsed
from stepdistill.tasks.common import (
    NEXT_QUESTION, NOT_ARITHMETIC, QUESTION_STOPS, RecordTask, normalize_arithmetic, parse_completion,
)

ANSWER_PHRASE = r"the answer is"


def parse_arithmetic(completion: str) -> Parsed:
    """`"... 84 / 2 = 42. The answer is (84 / 2).\\n\\nQ: ..."` -> Parsed(rationale, "(84 / 2)")."""
    return parse_completion(completion, next_example=NEXT_QUESTION, phrase=ANSWER_PHRASE,
                            to_label=normalize_arithmetic, invalid=NOT_ARITHMETIC)


class ArithmeticTask(RecordTask):
    """Records {"input": question text, "label": expression}; the student sees the question."""

    label_kind = "arithmetic"
    stop = QUESTION_STOPS
    input_fields = ("input",)
    prompt_name = "svamp"

    def format_input(self, record: dict[str, Any]) -> str:
        return str(record["input"]).strip()

    def render(self, fields: dict[str, Any], rationale: str | None = None, answer: str | None = None) -> str:
        q = f"Q: {self.format_input(fields)}\nA:"
        return q if rationale is None else f"{q} {rationale} The answer is {answer}."

    def parse(self, completion: str, example: Example | None = None) -> Parsed:
        return parse_arithmetic(completion)

    def normalize(self, label: str, example: Example | None = None) -> str | None:
        return normalize_arithmetic(label)

    def vote_key(self, label: str, example: Example | None = None) -> Any:
        try:
            return round(float(evaluate_expression(label)), 6)
        except (ExpressionError, TypeError, ValueError, OverflowError):
            return None


def _join(body: Any, question: Any) -> str:
    # the paper's files join body and question with a newline; keep inputs identical across sources
    return f"{str(body or '').strip()}\n{str(question or '').strip()}".strip()


@TASKS.register("svamp")
class SvampTask(ArithmeticTask):
    name = "svamp"
    hub_id = "ChilleD/SVAMP"
    hub_splits = {"train": "train", "test": "test"}

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        text = _join(row.get("Body"), row.get("Question")) or row.get("question_concat", "")
        return {"id": row.get("ID"), "input": text, "label": row.get("Equation")}


@TASKS.register("asdiv")
class AsdivTask(ArithmeticTask):
    """ASDiv; the paper adds it to SVAMP's training data. The hub holds a single split (named
    "validation" there), exposed here as "train" because that is how the paper uses it."""

    name = "asdiv"
    hub_id = "EleutherAI/asdiv"
    hub_splits = {"train": "validation"}

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any] | None:
        # formulas look like "7+2=9" or "(5+3)*2=16"; the label is the left-hand side. Rows whose
        # left side does not evaluate to the right side ("17/5=3 r 2": a remainder) are dropped,
        # keeping their index.
        lhs, _, rhs = str(row.get("formula", "")).partition("=")
        label = normalize_arithmetic(lhs)
        try:
            if label is None or not values_equal(label, float(rhs.split()[0])):
                return None
        except (ValueError, IndexError):  # ExpressionError is a ValueError
            return None
        return {"input": _join(row.get("body"), row.get("question")), "label": label}

