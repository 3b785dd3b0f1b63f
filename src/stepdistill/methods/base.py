"""The Method interface: what a student is trained on (records) and with which tasks.

A method turns task examples + teacher annotations into `TrainRecord`s. The training loop
(training.py) then trains the label task on every record and, for multi-task methods, the
rationale task on every record that has a rationale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from stepdistill.config import MethodConfig
from stepdistill.errors import StepDistillError
from stepdistill.registry import Registry
from stepdistill.tasks.base import Example, Parsed


@dataclass(frozen=True)
class TrainRecord:
    """One training row. `rationale` is None for single-task methods (and for step-by-step rows
    whose teacher output gave no usable rationale: those train the label task only)."""

    id: str
    input: str
    label: str
    rationale: str | None = None


@dataclass
class RecordSet:
    """The records a method built, and what it left out and why (shown to the user)."""

    records: list[TrainRecord]
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"examples": 100, "dropped_unparsed": 3}

    def summary(self) -> str:
        """`"95 of 100 examples kept (3 unparsed teacher outputs dropped, ...)"`."""
        n = self.counts.get("examples", len(self.records))
        notes = [f"{v} {k.replace('_', ' ')}" for k, v in self.counts.items() if k != "examples" and v]
        return f"{len(self.records)} of {n} examples kept" + (f" ({', '.join(notes)})" if notes else "")


class Method:
    """Base class. `needs_annotations`: a teacher must have annotated the split first.
    `multitask`: the rationale task is trained beside the label task."""

    name: ClassVar[str]
    needs_annotations: ClassVar[bool] = True
    multitask: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    def records(self, examples: list[Example], annotations: Mapping[str, Parsed] | None) -> RecordSet:
        raise NotImplementedError

    def _require_annotations(self, annotations: Mapping[str, Parsed] | None) -> Mapping[str, Parsed]:
        if annotations is None:
            raise StepDistillError(
                f"method {self.name!r} trains on teacher outputs but no annotations were given: "
                "run `stepdistill annotate` on the training split first and pass its run directory "
                "as `annotations`, or use method `standard` (gold labels)"
            )
        return annotations


METHODS: Registry[Method] = Registry("method")


def get_method(cfg: MethodConfig) -> Method:
    """`get_method(MethodConfig(name="distill"))` -> a DistillMethod. Unknown names list the valid ones."""
    return METHODS.get(cfg.name)(cfg)
