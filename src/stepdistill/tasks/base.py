"""The Task interface: everything the pipeline needs to know about one dataset.

A task loads examples (from the hub, the paper's file layout or a user's file), formats the
student input, builds the teacher's few-shot chain-of-thought prompt, parses a teacher
completion into (rationale, label), and normalises and scores labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

LabelKind = Literal["classes", "choice", "free", "arithmetic"]


@dataclass(frozen=True)
class Example:
    """One task input. `fields` keeps the raw record (question, choices, premise, ...)."""

    id: str
    input: str  # the student's input text, already formatted by the task
    label: str | None  # gold label, normalised; None when the split has no gold labels
    fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    index: int = 0  # position in the source file: recorded teacher outputs align on it


@dataclass(frozen=True)
class Parsed:
    """A teacher completion, parsed. Exactly one of (label) or (error) is set."""

    rationale: str | None
    label: str | None
    error: str | None = None  # why it did not parse, e.g. "no answer phrase", "label out of space"
    # the teacher's other rationales for the same label, from its other samples (verify.samples > 1);
    # a method reads them only when asked (method.rationales_per_input)
    others: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None and self.label is not None


class Task:
    """Base class. Subclasses set the class attributes and implement the abstract methods.

    `path` selects where examples come from:
      - None: the Hugging Face hub dataset (needs the internet);
      - a directory: the paper's released layout (e.g. ../shared/data/sbs or its task folder);
      - a .jsonl/.json/.csv file: a user's file with the task's fields.
    """

    name: ClassVar[str]
    label_kind: ClassVar[LabelKind]
    classes: ClassVar[tuple[str, ...]] = ()  # the label space when label_kind == "classes"
    stop: ClassVar[tuple[str, ...]] = ()  # stop strings for teacher generation
    # part of the annotation-store key; built-in tasks read it from their prompts/*.yaml `version`
    template_version: ClassVar[str] = "1"

    def load(self, split: str, path: str | Path | None = None) -> list[Example]:
        raise NotImplementedError

    def iter_load(self, split: str, path: str | Path | None = None) -> Iterator[Example]:
        """The examples of `load`, one at a time; tasks that read files stream them."""
        yield from self.load(split, path)

    def teacher_prompt(self, example: Example, n_shots: int | None = None) -> str:
        """The few-shot chain-of-thought prompt whose completion is the rationale + answer.

        `n_shots` keeps the first n exemplars (None, or more than the task ships: all of them;
        0: a zero-shot prompt)."""
        raise NotImplementedError

    def teacher_messages(self, example: Example, n_shots: int | None = None) -> list[dict[str, str]]:
        """The few-shot prompt as chat turns: the instruction as the system turn, each exemplar a
        user turn (its question) and an assistant turn (its rationale and answer), the input a
        last user turn. Built from teacher_prompt's own blocks ("\n\n" apart): a block whose
        question part is not the next block's prefix stays in the user turn, as one message."""
        system, pairs, last = self._prompt_blocks(example, n_shots)
        messages = [{"role": "system", "content": system}] if system else []
        for question, answer in pairs:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return messages + [{"role": "user", "content": last}]

    def _prompt_blocks(self, example: Example, n_shots: int | None) -> tuple[str, list[tuple[str, str]], str]:
        """(instruction, [(question, answer)], last question) of teacher_prompt, split where each
        exemplar's answer begins (after the task's answer cue, e.g. "A:")."""
        blocks = self.teacher_prompt(example, n_shots).split("\n\n")
        last = blocks[-1]
        cue = last.rstrip().rsplit("\n", 1)[-1].strip()  # e.g. "A:": where an exemplar's answer starts
        system, pairs = [], []
        for block in blocks[:-1]:
            head, sep, tail = block.partition("\n" + cue) if cue else (block, "", "")
            if sep and tail.strip():
                pairs.append((head + sep, tail.strip()))
            else:
                system.append(block)  # not an exemplar: an instruction
        return "\n\n".join(system), pairs, last

    def parse(self, completion: str, example: Example | None = None) -> Parsed:
        """Parse a teacher completion (our prompts' or the paper's recorded PaLM outputs)."""
        raise NotImplementedError

    def normalize(self, label: str, example: Example | None = None) -> str | None:
        """Canonical form of a label, or None when it is outside the label space."""
        raise NotImplementedError

    def is_correct(self, prediction: str | None, example: Example) -> bool:
        raise NotImplementedError

    def label_candidates(self, example: Example) -> list[str] | None:
        """The closed set the label of `example` comes from (the classes, or its choices), so a
        student's answer can be ranked instead of generated; None for open answers."""
        return list(self.classes) if self.label_kind == "classes" and self.classes else None

    def vote_key(self, label: str, example: Example | None = None) -> Any:
        """What self-consistency votes on: labels with equal keys are the same answer
        (arithmetic: the value, so `(3 + 4)` and `(4 + 3)` agree)."""
        return self.normalize(label, example)

    def accuracy(self, predictions: list[str | None], examples: list[Example]) -> float | None:
        """Share of the gold-labelled examples predicted correctly, e.g. 0.75; unlabelled
        examples are skipped. None when no example has a gold label (NaN is not valid JSON)."""
        assert len(predictions) == len(examples), "one prediction per example"
        scored = [(p, e) for p, e in zip(predictions, examples) if e.label is not None]
        if not scored:
            return None
        return sum(self.is_correct(p, e) for p, e in scored) / len(scored)
