"""What the built-in tasks share: loading from the three sources, few-shot prompts from
`prompts/{name}.yaml`, and the label normalisers of each label kind.

A task subclass says where its data lives (hub id, splits, fields), how a record becomes the
student input, and how an exemplar or a query is rendered in its prompt format.
"""

from __future__ import annotations

import functools
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import yaml

from stepdistill.arith import ExpressionError, evaluate_expression, values_equal
from stepdistill.errors import DataError
from stepdistill.tasks.base import Example, Parsed, Task
from stepdistill.tasks.io import SPLITS, as_list, check_split, hub_records, iter_records, paper_file

# Stable, short reasons for an unparseable completion: reports count them by this text.
NO_ANSWER = "no answer phrase"
EMPTY_ANSWER = "empty answer"
OUT_OF_SPACE = "label out of label space"
NOT_ARITHMETIC = "not an arithmetic expression"
AMBIGUOUS = "more than one choice in the answer"


@functools.cache
def load_prompt(name: str) -> dict[str, Any]:
    """The packaged few-shot prompt `prompts/{name}.yaml`: {"version", "exemplars": [...]}."""
    text = (resources.files("stepdistill") / "prompts" / f"{name}.yaml").read_text(encoding="utf-8")
    prompt = yaml.safe_load(text)
    assert prompt.get("exemplars"), f"prompts/{name}.yaml has no exemplars"
    assert prompt.get("version") is not None, f"prompts/{name}.yaml has no version: add `version: 1`"
    return prompt


def first_shots(exemplars: list[dict[str, Any]], n_shots: int | None) -> list[dict[str, Any]]:
    """The exemplars a prompt shows: all when `n_shots` is None (or more than there are), else
    the first `n_shots`; 0 gives a zero-shot prompt."""
    assert n_shots is None or n_shots >= 0, f"n_shots={n_shots}: give 0 or more (None for all)"
    return exemplars[:n_shots]


# --- prompt pieces shared by several formats -------------------------------------------------


def next_example(marker: str) -> str:
    """Regex for the start of an invented next example, which begins with `marker` on its own line.

    Only horizontal space may precede the marker on its line: with any whitespace allowed, the
    regex scans a run of newlines to its end from each newline in it, quadratic in the run
    (seconds for 20k newlines)."""
    return rf"(?:^|\n)[^\S\n]*{re.escape(marker)}"


def stops_before(marker: str) -> tuple[str, ...]:
    """Stop strings that end teacher generation where a next example would begin."""
    return (f"\n\n{marker}", f"\n{marker}")


# an "Answer:" line (esnli, generic); `[^\S\n]*`, not `\s*`, for the reason given in next_example
ANSWER_LINE = r"(?:^|\n)[^\S\n]*Answer:"
NEXT_QUESTION = next_example("Q:")  # the "Q: ... A: ..." format of svamp and cqa
QUESTION_STOPS = stops_before("Q:")


def choice_letter(i: int) -> str:
    return chr(ord("a") + i)


def choice_lines(choices: list[str]) -> list[str]:
    """`["x", "y"]` -> `["Answer Choices:", "(a) x", "(b) y"]`: the paper's CQA choice block."""
    return ["Answer Choices:", *(f"({choice_letter(i)}) {c}" for i, c in enumerate(choices))]


def example_choices(example: Any, field: str = "choices") -> list[str] | None:
    """The choice list in `example.fields[field]`, or None without an example or choices
    (then a choice answer is kept as written)."""
    fields = getattr(example, "fields", None) or {}
    raw = fields.get(field)
    return as_list(raw, field) if raw else None


def cut_at(text: str, pattern: str) -> str:
    """`text` up to the first match of `pattern`: where a completion runs into a new example."""
    m = re.search(pattern, text)
    return text[: m.start()] if m else text


def split_on_phrase(text: str, phrase: str) -> tuple[str, str] | None:
    """(before, after) the last occurrence of the answer phrase (case-insensitive), or None."""
    matches = list(re.finditer(phrase, text, flags=re.IGNORECASE))
    if not matches:
        return None
    m = matches[-1]
    return text[: m.start()].strip(), text[m.end() :]


def answer_line(text: str) -> str:
    """The answer proper: its first non-empty line, without the sentence's final full stop."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip().rstrip(".").strip()
    return ""


def parse_completion(completion: str, *, next_example: str, phrase: str, to_label: Callable[[str], str | None],
                     invalid: str, choice_letters: bool = False, free_text: bool = False) -> Parsed:
    """The one parsing skeleton every task shares: cut where the completion runs into an
    invented next example, split on the last answer phrase, take the answer, normalise it.

    `to_label(raw)` gives the canonical label or None (then the error is `invalid`);
    `choice_letters` rejects answers naming several choices ("either (a) X or (e) Y");
    `free_text` keeps the whole answer, not only its first line.
    """
    text = cut_at(str(completion), next_example)
    parts = split_on_phrase(text, phrase)
    if parts is None:
        return Parsed(text.strip() or None, None, NO_ANSWER)
    rationale, rest = parts
    raw = " ".join(rest.split()).rstrip(".") if free_text else answer_line(rest)
    if not raw:
        return Parsed(rationale or None, None, EMPTY_ANSWER)
    if choice_letters and len(set(_LETTER.findall(raw))) > 1:
        return Parsed(rationale or None, None, AMBIGUOUS)
    label = to_label(raw)
    if label is None:
        return Parsed(rationale or None, None, invalid)
    return Parsed(rationale, label)


_LETTER = re.compile(r"\(([a-z])\)")


# --- normalisers, one per label kind -------------------------------------------------------

_PUNCT = string.punctuation + "“”‘’"


def _key(text: str) -> str:
    """Comparison key: case, surrounding punctuation and repeated spaces do not matter."""
    return " ".join(text.casefold().split()).strip(_PUNCT + " ")


def normalize_class(label: Any, classes: tuple[str, ...]) -> str | None:
    """`"Neutral."` -> `"neutral"`; an int picks classes[int]; anything else -> None."""
    if isinstance(label, int) and not isinstance(label, bool):
        return classes[label] if 0 <= label < len(classes) else None
    text = str(label).strip()
    if text in classes:  # a class named like a number ("1", "-1") is that class, not an index
        return text
    key = _key(text)
    found = next((c for c in classes if _key(c) == key), None)
    # CSV files carry int labels as text. ASCII digits only (int("²") raises), at most 9 (int()
    # refuses 4300+), and unsigned: _key strips the "-" of "-1" (no gold), which is not index 1
    if found is None and key.isascii() and key.isdigit() and len(key) <= 9 and not text.startswith("-"):
        return normalize_class(int(key), classes)
    return found


_LETTER_ONLY = re.compile(r"\(?([a-z])\)?\.?")
_LETTER_TEXT = re.compile(r"\(([a-z])\)\s*(.*)", re.DOTALL)


def normalize_choice(label: Any, choices: list[str] | None) -> str | None:
    """A choice answer -> the choice text. Accepts the text (`math problem`), the letter (`d`,
    `(d)`) or both (`(d) math problem`; the text wins when the two disagree, as in the paper).
    Without `choices` the text is returned as written."""
    s = str(label).strip()
    if choices and not s.startswith("("):  # a bare "x" naming the choice "x" is that choice, not letter (x)
        found = next((c for c in choices if _key(c) == _key(s)), None)
        if found is not None:
            return found
    letter, text = None, s
    if m := _LETTER_TEXT.fullmatch(s):
        letter, text = m.group(1), m.group(2).strip().rstrip(".")
    elif m := _LETTER_ONLY.fullmatch(s.casefold()):
        letter, text = m.group(1), ""
    if not choices:
        return " ".join(text.split()) or None
    if text:
        found = next((c for c in choices if _key(c) == _key(text)), None)
        if found is not None:
            return found
    i = ord(letter.lower()) - ord("a") if letter else -1
    return choices[i] if 0 <= i < len(choices) else None


def normalize_arithmetic(label: Any) -> str | None:
    """`"(84 / 2)."` -> `"(84 / 2)"` when it evaluates; anything else -> None."""
    s = " ".join(str(label).split()).rstrip(".").strip()
    if s.startswith("="):
        s = s[1:].strip()
    try:
        evaluate_expression(s)
    except ExpressionError:
        return None
    return s


def normalize_free(label: Any) -> str | None:
    s = " ".join(str(label).split()).strip()
    return s or None


class RecordTask(Task):
    """A task whose examples are records with named fields, loaded from hub, paper dir or file."""

    hub_id: ClassVar[str]
    hub_config: ClassVar[str | None] = None
    hub_splits: ClassVar[dict[str, str]]  # our split name -> the hub's split name
    input_fields: ClassVar[tuple[str, ...]]  # required in every record of a paper/user file
    label_field: ClassVar[str] = "label"  # optional: unlabelled files are allowed (teacher labels them)
    prompt_name: ClassVar[str]

    @property
    def template_version(self) -> str:
        """The `version` of prompts/{prompt_name}.yaml: bumping it there gives stored teacher
        outputs a new annotation-store key."""
        return str(load_prompt(self.prompt_name)["version"])

    # --- loading ---

    def iter_load(self, split: str, path: str | Path | None = None) -> Iterator[Example]:
        check_split(split)
        if path is None:
            if split not in self.hub_splits:
                raise DataError(
                    f"{self.name}: the hub dataset {self.hub_id} has no {split!r} split "
                    f"(have: {', '.join(self.hub_splits)}): choose one of those, or pass a data path"
                )
            records = (self.from_hub(r) for r in hub_records(self.hub_id, self.hub_config, self.hub_splits[split]))
            where = f"{self.hub_id} {self.hub_splits[split]}"
        else:
            p = Path(path)
            file = paper_file(p, self.name, split) if p.is_dir() else p
            records = _labelled_alike(iter_records(file, self.input_fields), self.label_field, file)
            where = str(file)
        # a hub row may be dropped (None) but keeps its position: index is the source position
        for i, r in enumerate(records):
            if r is not None:
                yield self.example(r, split, i, where)

    def load(self, split: str, path: str | Path | None = None) -> list[Example]:
        return list(self.iter_load(split, path))

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """A hub row in this task's file fields; None drops the row."""
        raise NotImplementedError

    def example(self, record: dict[str, Any], split: str, index: int, where: str = "") -> Example:
        raw = record.get(self.label_field)
        label = None
        if raw not in (None, ""):
            label = self.normalize(raw, _Probe(record))
            if label is None:
                raise DataError(
                    f"{where} record {index + 1}: gold label {raw!r} is outside the label space "
                    f"of {self.name}{self._space_hint()}: fix the label"
                )
        ident = record.get("id") or record.get("uid") or record.get("ID") or f"{split}-{index}"
        return Example(id=str(ident), input=self.format_input(record), label=label, fields=dict(record), index=index)

    def _space_hint(self) -> str:
        return f" ({', '.join(self.classes)})" if self.classes else ""

    def format_input(self, record: dict[str, Any]) -> str:
        raise NotImplementedError

    # --- teacher prompt ---

    def render(self, fields: dict[str, Any], rationale: str | None = None, answer: str | None = None) -> str:
        """One example in the prompt format; without a rationale it ends where the teacher's
        completion begins."""
        raise NotImplementedError

    def teacher_prompt(self, example: Example, n_shots: int | None = None) -> str:
        exemplars = first_shots(load_prompt(self.prompt_name)["exemplars"], n_shots)
        shots = [self.render(e, e["rationale"], e["answer"]) for e in exemplars]
        return "\n\n".join([*shots, self.render(example.fields)])

    # --- labels ---

    def label_candidates(self, example: Example) -> list[str] | None:
        if self.label_kind == "choice":
            return example_choices(example)
        return super().label_candidates(example)

    def is_correct(self, prediction: str | None, example: Example) -> bool:
        if prediction is None or example.label is None:
            return False
        pred = self.normalize(prediction, example)
        if pred is None:
            return False
        if self.label_kind == "arithmetic":
            try:
                return values_equal(pred, example.label)
            except ExpressionError:
                return False
        return pred == example.label


class _Probe:
    """Lets normalize() see a record's fields (the choices) before its Example exists."""

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields


def _labelled_alike(records: Iterable[tuple[int, dict[str, Any]]], label_field: str, file: Path
                    ) -> Iterator[dict[str, Any]]:
    """All records labelled, or none (an unlabelled pool for the teacher); never a mix. The
    first record decides; the first that differs is named."""
    first = None
    for i, (_, r) in enumerate(records, start=1):
        has = r.get(label_field) not in (None, "")
        if first is None:
            first = has
        elif has != first:
            what = f"no field {label_field!r}" if first else f"a field {label_field!r}"
            raise DataError(
                f"{file} record {i}: {what} while other records {'have one' if first else 'have none'}: "
                f"label every record, or none (the teacher then labels them)"
            )
        yield r


__all__ = [
    "SPLITS", "RecordTask", "load_prompt", "first_shots", "cut_at", "split_on_phrase", "answer_line", "parse_completion",
    "normalize_class", "normalize_choice", "normalize_arithmetic", "normalize_free",
    "next_example", "stops_before", "ANSWER_LINE", "NEXT_QUESTION", "QUESTION_STOPS",
    "choice_letter", "choice_lines", "example_choices",
    "NO_ANSWER", "EMPTY_ANSWER", "OUT_OF_SPACE", "NOT_ARITHMETIC", "AMBIGUOUS",
]
