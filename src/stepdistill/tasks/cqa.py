"""CommonsenseQA: five answer choices (a)-(e); the label is the text of the right choice.

Teacher format (the paper's PaLM outputs have this shape):
    Q: <question>
    Answer Choices:
    (a) <choice>
    ...
    A: <reasoning> So the answer is (d) <choice text>.
"""

from __future__ import annotations

from typing import Any

from stepdistill.errors import DataError
from stepdistill.tasks import TASKS
from stepdistill.tasks.base import Example, Parsed
from stepdistill.tasks.common import (
    NEXT_QUESTION, OUT_OF_SPACE, QUESTION_STOPS, RecordTask, choice_letter, choice_lines, example_choices,
    normalize_choice, parse_completion,
)
from stepdistill.tasks.io import as_list

ANSWER_PHRASE = r"so the answer is"


def format_choices(question: str, choices: list[str]) -> str:
    """The paper's CQA student input: `question\\nAnswer Choices:\\n(a) c0\\n(b) c1 ...`."""
    return "\n".join([question.strip(), *choice_lines(choices)])


def parse_choice(completion: str, choices: list[str] | None) -> Parsed:
    """`"... So the answer is (d) math problem.\\n\\nQ: ..."` -> Parsed(rationale, "math problem")."""
    return parse_completion(completion, next_example=NEXT_QUESTION, phrase=ANSWER_PHRASE,
                            to_label=lambda raw: normalize_choice(raw, choices), invalid=OUT_OF_SPACE,
                            choice_letters=True)


@TASKS.register("cqa")
class CqaTask(RecordTask):
    name = "cqa"
    label_kind = "choice"
    stop = QUESTION_STOPS
    hub_id = "tau/commonsense_qa"
    hub_splits = {"train": "train", "valid": "validation", "test": "test"}  # hub test: no labels
    input_fields = ("question", "choices")
    label_field = "answer"
    prompt_name = "cqa"

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        letters, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
        key = row.get("answerKey") or ""
        answer = texts[letters.index(key)] if key in letters else None
        return {"id": row.get("id"), "question": row["question"], "choices": texts, "answer": answer}

    def example(self, record: dict[str, Any], split: str, index: int, where: str = "") -> Example:
        choices = as_list(record["choices"], f"{where} record {index + 1}: field 'choices'")
        if not 2 <= len(choices) <= 26:
            raise DataError(f"{where} record {index + 1}: {len(choices)} choices: give between 2 and 26")
        return super().example({**record, "choices": choices}, split, index, where)

    def format_input(self, record: dict[str, Any]) -> str:
        return format_choices(str(record["question"]), as_list(record["choices"], "choices"))

    def render(self, fields: dict[str, Any], rationale: str | None = None, answer: str | None = None) -> str:
        q = f"Q: {self.format_input(fields)}\nA:"
        if rationale is None:
            return q
        choices = as_list(fields["choices"], "choices")
        return f"{q} {rationale} So the answer is ({choice_letter(choices.index(answer))}) {answer}."

    def parse(self, completion: str, example: Example | None = None) -> Parsed:
        return parse_choice(completion, example_choices(example))

    def normalize(self, label: str, example: Example | None = None) -> str | None:
        return normalize_choice(label, example_choices(example))
