"""Natural language inference: e-SNLI and ANLI rounds 1-3.

Labels are entailment / neutral / contradiction (ints 0 / 1 / 2 in the data). The two
families keep the two output shapes of the paper's recorded PaLM outputs:
    anli:  Premise: ...\\nHypothesis: ...\\nA: <reasoning> So the answer is <label>.
    esnli: Premise: ...\\nHypothesis: ...\\nReasonings: <reasoning>\\nAnswer: <label>
"""

from __future__ import annotations

from typing import Any, ClassVar

from stepdistill.tasks import TASKS
from stepdistill.tasks.base import Example, Parsed
from stepdistill.tasks.common import (
    ANSWER_LINE, OUT_OF_SPACE, RecordTask, next_example, normalize_class, parse_completion, stops_before,
)

CLASSES = ("entailment", "neutral", "contradiction")
NEXT_PREMISE = next_example("Premise:")
# "So the answer is" as the paper's prompt taught; PaLM also writes ", so the answer is" and "The
# answer is": all are the answer phrase. The comma and spaces are only matched before "so": an
# optional `,?\s*` in front made every run of spaces quadratic (10 s for 20k spaces).
SO_THE_ANSWER_IS = r"(?:,\s*\bso\s+|\bso\s+)?the answer is"


def parse_class(completion: str, phrase: str, classes: tuple[str, ...], next_example: str) -> Parsed:
    """Cut at the next example, split on the last answer phrase, normalise the label."""
    # the answer's first line: a label cut short after it ("entailment\n\nPre") still counts
    return parse_completion(completion, next_example=next_example, phrase=phrase,
                            to_label=lambda raw: normalize_class(raw, classes), invalid=OUT_OF_SPACE)


class NliTask(RecordTask):
    label_kind = "classes"
    classes = CLASSES
    stop = stops_before("Premise:")
    input_fields = ("premise", "hypothesis")

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        label = row.get("label")
        return {
            **row,
            "label": label if isinstance(label, int) and 0 <= label < len(CLASSES) else None,  # -1: no gold
        }

    def format_input(self, record: dict[str, Any]) -> str:
        # The paper's T5 input was `premise </s> hypothesis`; for causal students named lines read better.
        return f"Premise: {str(record['premise']).strip()}\nHypothesis: {str(record['hypothesis']).strip()}"

    def normalize(self, label: str, example: Example | None = None) -> str | None:
        return normalize_class(label, self.classes)


@TASKS.register("esnli")
class EsnliTask(NliTask):
    name = "esnli"
    hub_id = "esnli"
    hub_splits = {"train": "train", "valid": "validation", "test": "test"}
    prompt_name = "esnli"

    def render(self, fields: dict[str, Any], rationale: str | None = None, answer: str | None = None) -> str:
        q = f"{self.format_input(fields)}\nReasonings:"
        return q if rationale is None else f"{q} {rationale}\nAnswer: {answer}"

    def parse(self, completion: str, example: Example | None = None) -> Parsed:
        return parse_class(completion, ANSWER_LINE, self.classes, NEXT_PREMISE)


class AnliTask(NliTask):
    hub_id = "facebook/anli"
    prompt_name = "anli"
    round: ClassVar[int]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        r = cls.round
        cls.hub_splits = {"train": f"train_r{r}", "valid": f"dev_r{r}", "test": f"test_r{r}"}

    def render(self, fields: dict[str, Any], rationale: str | None = None, answer: str | None = None) -> str:
        q = f"{self.format_input(fields)}\nA:"
        return q if rationale is None else f"{q} {rationale} So the answer is {answer}."

    def parse(self, completion: str, example: Example | None = None) -> Parsed:
        return parse_class(completion, SO_THE_ANSWER_IS, self.classes, NEXT_PREMISE)


@TASKS.register("anli1")
class Anli1Task(AnliTask):
    name, round = "anli1", 1


@TASKS.register("anli2")
class Anli2Task(AnliTask):
    name, round = "anli2", 2


@TASKS.register("anli3")
class Anli3Task(AnliTask):
    name, round = "anli3", 3
