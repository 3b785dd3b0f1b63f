"""Your own task, described by a YAML spec instead of code.

    # sentiment.yaml -- stepdistill annotate --task generic --spec sentiment.yaml --data my.jsonl ...
    name: sentiment               # names the task in runs and in data file names
    inputs: [text]                # the record field(s) the student reads
    label: label                  # the record field holding the gold label (optional in the data)
    label_kind: classes           # classes | choice | free | arithmetic
    classes: [positive, negative] # the label space (label_kind classes); int labels index it
    # choices: options            # label_kind choice: the field holding each record's choice list
    instruction: Decide whether the review is positive or negative.
    exemplars:                    # optional few-shot examples for the teacher
      - text: The food was cold and the waiter rude.
        rationale: Cold food and a rude waiter are complaints.
        label: negative
    data:                         # optional: file per split, relative to this spec
      train: sentiment_train.jsonl
      test: sentiment_test.csv

Teacher format:
    <instruction>

    Text: <text>
    Reasoning: <reasoning>
    Answer: <label>
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stepdistill.errors import ConfigError, DataError
from stepdistill.tasks import TASKS
from stepdistill.tasks.base import Example, Parsed
from stepdistill.tasks.common import (
    ANSWER_LINE, NOT_ARITHMETIC, OUT_OF_SPACE, RecordTask, choice_lines, example_choices, first_shots, next_example,
    normalize_arithmetic, normalize_choice, normalize_class, normalize_free, parse_completion, stops_before,
)
from stepdistill.tasks.io import SUFFIXES, as_list, check_split


class GenericSpec(BaseModel):
    """The YAML spec of a generic task; every mistake in it is reported at once."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("generic", description="the task's name, used in run names and data file names")
    inputs: list[str] = Field(description="record field(s) the student reads, e.g. [question]")
    label: str = Field("label", description="record field holding the gold label")
    label_kind: Literal["classes", "choice", "free", "arithmetic"] = Field(description="how labels are compared")
    classes: list[str] = Field(default_factory=list, description="label space, for label_kind classes")
    choices: str | None = Field(None, description="field holding each record's choice list, for label_kind choice")
    instruction: str = Field("", description="the first paragraph of the teacher prompt")
    exemplars: list[dict[str, Any]] = Field(default_factory=list, description="few-shot examples for the teacher")
    data: dict[Literal["train", "valid", "test"], str] = Field(default_factory=dict, description="file per split")

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("classes", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: Any) -> Any:
        # YAML 1.1 reads `classes: [yes, no]` as booleans; a label space of yes/no is what was meant
        if isinstance(v, list):
            return [("yes" if c else "no") if isinstance(c, bool) else c for c in v]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "GenericSpec":
        problems = []
        if not self.inputs:
            problems.append("inputs: name at least one input field")
        if self.label_kind == "classes" and len(self.classes) < 2:
            problems.append("classes: label_kind 'classes' needs a list of at least two classes")
        if self.label_kind != "classes" and self.classes:
            problems.append(f"classes: only used with label_kind 'classes', not {self.label_kind!r}")
        if (self.label_kind == "choice") != (self.choices is not None):
            problems.append("choices: name the field holding the choice list if and only if label_kind is 'choice'")
        need = [*self.inputs, *([self.choices] if self.choices else []), "rationale", self.label]
        for i, ex in enumerate(self.exemplars, start=1):
            missing = [f for f in need if ex.get(f) in (None, "")]
            if missing:
                problems.append(f"exemplars[{i}]: no {', '.join(missing)} (each exemplar needs {', '.join(need)})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class GenericTask(RecordTask):
    """A task configured by a GenericSpec; data from the spec's files or a path."""

    def __init__(self, spec: GenericSpec, base_dir: str | Path = ".", source: str = ""):
        self.spec = spec
        self.base_dir = Path(base_dir)
        self.name = spec.name
        self.label_kind = spec.label_kind
        self.classes = tuple(spec.classes)
        self.input_fields = tuple(spec.inputs) + ((spec.choices,) if spec.choices else ())
        self.label_field = spec.label
        self.hub_splits = {}
        self._marker = self._field_title(spec.inputs[0]) + ":"
        self.stop = stops_before(self._marker)
        # stored teacher outputs are keyed on the template version: a changed spec is a new template
        digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
        self._template_version = f"generic-1-{digest}"
        self.source = source

    @property
    def template_version(self) -> str:
        """Derived from the whole spec (there is no prompt file to carry a version)."""
        return self._template_version

    @classmethod
    def from_yaml(cls, path: str | Path) -> "GenericTask":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such task spec: point task.spec at a YAML file")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read ({e}): a task spec is a UTF-8 text file") from e
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: `2001-13-45`, ints over 4300 digits
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{path}: not valid YAML ({first}): fix the spec") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a task spec is a mapping of fields (inputs, label, label_kind, ...)")
        try:
            spec = GenericSpec.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in err['loc']) or 'spec'}: {err['msg'].removeprefix('Value error, ')}"
                for err in e.errors()
            )
            raise ConfigError(f"{path}: invalid task spec: {problems}") from e
        return cls(spec, base_dir=path.parent, source=str(path))

    # --- loading ---

    def iter_load(self, split: str, path: str | Path | None = None) -> Iterator[Example]:
        check_split(split)
        if path is None:
            if split not in self.spec.data:
                have = ", ".join(self.spec.data) or "none"
                raise DataError(
                    f"task {self.name}: no data file for split {split!r} (spec data has: {have}): "
                    f"add data.{split} to {self.source or 'the spec'} or pass a data path"
                )
            path = self.base_dir / self.spec.data[split]
        path = Path(path)
        if path.is_dir():
            path = self._split_file(path, split)
        return super().iter_load(split, path)

    def _split_file(self, folder: Path, split: str) -> Path:
        names = [f"{stem}{suffix}" for stem in (split, f"{self.name}_{split}") for suffix in SUFFIXES]
        for n in names:
            if (folder / n).is_file():
                return folder / n
        raise DataError(f"{folder}: no data for split {split!r}: expected one of {', '.join(names)}")

    def example(self, record: dict[str, Any], split: str, index: int, where: str = "") -> Example:
        if self.spec.choices:
            record = {**record, self.spec.choices: as_list(record[self.spec.choices], f"{where} record {index + 1}")}
        return super().example(record, split, index, where)

    def _space_hint(self) -> str:
        return f" ({', '.join(self.classes)})" if self.classes else f" ({self.label_kind})"

    # --- formats ---

    @staticmethod
    def _field_title(name: str) -> str:
        return name.replace("_", " ").strip().capitalize()

    def _choice_lines(self, fields: dict[str, Any]) -> list[str]:
        return choice_lines(as_list(fields[self.spec.choices], "choices")) if self.spec.choices else []

    def format_input(self, record: dict[str, Any]) -> str:
        if len(self.spec.inputs) == 1:
            lines = [str(record[self.spec.inputs[0]]).strip()]
        else:
            lines = [f"{self._field_title(f)}: {str(record[f]).strip()}" for f in self.spec.inputs]
        return "\n".join([*lines, *self._choice_lines(record)])

    def render(self, fields: dict[str, Any], rationale: str | None = None, answer: str | None = None) -> str:
        lines = [f"{self._field_title(f)}: {str(fields[f]).strip()}" for f in self.spec.inputs]
        q = "\n".join([*lines, *self._choice_lines(fields), "Reasoning:"])
        return q if rationale is None else f"{q} {rationale}\nAnswer: {answer}"

    def teacher_prompt(self, example: Example, n_shots: int | None = None) -> str:
        # the instruction stays in a zero-shot prompt: it is part of the task, not an exemplar
        instruction = self.spec.instruction.strip() or "Explain your reasoning step by step, then give the answer."
        if self.classes:
            instruction += f" The answer is one of: {', '.join(self.classes)}."
        shots = [self.render(e, e["rationale"], e[self.spec.label]) for e in first_shots(self.spec.exemplars, n_shots)]
        return "\n\n".join([instruction, *shots, self.render(example.fields)])

    # --- parsing and labels ---

    def parse(self, completion: str, example: Example | None = None) -> Parsed:
        return parse_completion(
            completion, next_example=next_example(self._marker), phrase=ANSWER_LINE,
            to_label=lambda raw: self.normalize(raw, example),
            invalid=NOT_ARITHMETIC if self.label_kind == "arithmetic" else OUT_OF_SPACE,
            choice_letters=self.label_kind == "choice", free_text=self.label_kind == "free")

    def normalize(self, label: str, example: Example | None = None) -> str | None:
        if self.label_kind == "classes":
            return normalize_class(label, self.classes)
        if self.label_kind == "arithmetic":
            return normalize_arithmetic(label)
        if self.label_kind == "choice":
            return normalize_choice(label, example_choices(example, self.spec.choices))
        return normalize_free(label)

    def label_candidates(self, example: Example) -> list[str] | None:
        if self.spec.choices:
            return example_choices(example, self.spec.choices)
        return super().label_candidates(example)

    def is_correct(self, prediction: str | None, example: Example) -> bool:
        if self.label_kind == "free":
            pred = normalize_free(prediction) if prediction is not None else None
            return pred is not None and example.label is not None and pred.casefold() == example.label.casefold()
        return super().is_correct(prediction, example)


@TASKS.register("generic")
def generic_task(spec: str | Path | None = None) -> GenericTask:
    """The generic task configured by the YAML file `spec`."""
    if spec is None:
        raise ConfigError("task 'generic' needs a spec: set task.spec to a YAML file (see tasks/generic.py)")
    return GenericTask.from_yaml(spec)
