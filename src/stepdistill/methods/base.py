"""The Method interface: what a student learns from, and its loss.

A method owns three things, each a method of its class:
  * `records`: task examples + teacher annotations -> `TrainRecord`s (what it keeps, and why not);
  * `features`: records -> token rows (one per task it trains; methods/batches.py's layout);
  * `compute_loss`: the loss of one micro-batch, built from the shared Trainer's helpers
    (`trainer.task_loss`, `trainer.target_losses`, ...) and noting the terms it wants logged.
The shared Trainer (training/trainer.py) only counts tokens exactly across accumulation,
validates, selects and checkpoints. Adding a method is one file in methods/ that subclasses
Method and registers itself with `@METHODS.register("name")`, plus its import in
methods/__init__.py (docs/architecture.md walks through one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from stepdistill.config import MethodConfig
from stepdistill.errors import StepDistillError
from stepdistill.methods.formatting import Format, encode_example
from stepdistill.methods.losses import IGNORE_INDEX
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
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"examples": 100, "dropped_unverified": 3}

    def summary(self) -> str:
        """`"95 of 100 examples kept (3 unparsed teacher outputs dropped, ...)"`."""
        n = self.counts.get("examples", len(self.records))
        notes = [f"{v} {k.replace('_', ' ')}" for k, v in self.counts.items() if k != "examples" and v]
        return f"{len(self.records)} of {n} examples kept" + (f" ({', '.join(notes)})" if notes else "")


def dropped_because(p: Parsed | None) -> str:
    """The records count an unusable annotation goes to: never annotated, dropped by the teacher's
    verification (its answer disagreed with gold, or no clear majority), the teacher failed, or
    its output did not parse."""
    from stepdistill.verify import FAILED, NO_MAJORITY, WRONG

    if p is None:
        return "dropped_not_annotated"
    if (p.error or "").startswith((WRONG, NO_MAJORITY)):
        return "dropped_unverified"
    if (p.error or "").startswith(FAILED):
        return "dropped_teacher_failed"
    return "dropped_unparsed"


class Method:
    """Base class: the label task alone, on gold labels.

    Class attributes: `needs_annotations` (a teacher must have annotated the split first),
    `multitask` (a rationale task is trained beside the label task), `trains_teacher` (the
    KD teacher is trained too, in the student's optimizer)."""

    name: ClassVar[str]
    needs_annotations: ClassVar[bool] = True
    multitask: ClassVar[bool] = False
    trains_teacher: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    # -- data ------------------------------------------------------------------------------
    def records(self, examples: list[Example], annotations: Mapping[str, Parsed] | None) -> RecordSet:
        raise NotImplementedError

    @property
    def teacher_labels(self) -> bool:
        """Are the label targets the teacher's (so their accuracy is worth a note)?"""
        return False

    def features(self, tokenizer, fmt: Format, records: list[TrainRecord], *,
                 decoder_start: int | None = None) -> list[dict]:
        """Token rows of the records: {'input_ids', 'labels'} for the label task."""
        return [encode_example(tokenizer, fmt, self.cfg.label_prefix, r.input, r.label, decoder_start=decoder_start)
                for r in records]

    def shape_format(self, fmt: Format) -> Format:
        """The token layout the method trains (and its students predict) with: `fmt` as it is,
        unless the method writes more than the label in the label task's sequence."""
        return fmt

    def answer_ids(self, feature: dict) -> list[int]:
        """The target tokens the label task generates at inference (eos included): what sets the
        generation limit and the label vocabulary saved with the model."""
        return [t for t in feature["labels"] if t != IGNORE_INDEX]

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, trainer, model, inputs: dict, counts: dict):
        """The label task's loss (cross-entropy; with `kd`, mixed with the divergence to the teacher)."""
        return trainer.task_loss(model, inputs, "", counts.get(""))

    def kd_weight(self, step: int) -> float:
        """The weight of the KD divergence in a task's loss at optimizer step `step`."""
        return self.cfg.kd.weight if self.cfg.kd is not None else 0.0

    # -- hooks for methods that train more than the student (co-distillation) --------------
    def callbacks(self, teacher) -> list:
        """Trainer callbacks the method needs beyond the shared ones."""
        return []

    def extend_optimizer(self, trainer, optimizer) -> None:
        """Add what else the method trains to the student's optimizer."""

    def resume_teacher_from(self, checkpoint: Path | None) -> Path | None:
        """Where a resumed run's trained teacher is (None: the teacher is loaded as configured)."""
        return None

    def finish(self, trainer, info: dict[str, Any], out_dir: Path, val_examples: list[Example],
               task) -> dict[str, Any]:
        """After training: save and score what else the method trained; extra metrics."""
        return {}

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
