"""Which training examples a student sees: the validation carve, nested data subsets, and the
teacher annotations kept for training.

    train, val = split_validation(examples, fraction=0.1, seed=0)   # model selection never sees test
    train = nested_subset(train, 0.25, seed=0)                      # lies inside the 0.5 subset
    annotations = keep_correct(annotations, train, task)            # method.rationales: correct
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from stepdistill.errors import StepDistillError
from stepdistill.tasks.base import Example, Parsed, Task

Printer = Callable[[str], None]


def keep_correct(annotations: dict[str, Parsed], examples: list[Example], task: Task, echo: Printer = print
                 ) -> dict[str, Parsed]:
    """Only the annotations whose teacher label is right against gold (`method.rationales: correct`)."""
    if any(e.label is None for e in examples):
        raise StepDistillError("method.rationales=correct needs gold labels on every training example: use rationales=all")
    kept = {e.id: annotations[e.id] for e in examples
            if e.id in annotations and annotations[e.id].ok and task.is_correct(annotations[e.id].label, e)}
    echo(f"rationales=correct: keeping {len(kept)} of {len(annotations)} teacher annotations (label right against gold)")
    return kept


def note_gold_verified(annotations: str | Path, examples: list[Example], echo: Printer) -> None:
    """Teacher labels verified against gold are gold labels on a subset: say so, since the
    paper's distillation baseline trains on every teacher answer, wrong ones included."""
    against = json.loads((Path(annotations) / "summary.json").read_text()).get("verify", {}).get("against")
    if against in ("auto", "gold") and any(e.label is not None for e in examples):
        echo(f"note: {annotations} keeps only teacher answers that agree with gold (verify.against={against}), "
             "so these teacher labels are gold labels on a subset; for the paper's distillation baseline, "
             "annotate with --verify none")


def split_validation(examples: list[Example], fraction: float, seed: int, cap: int | None = None
                     ) -> tuple[list[Example], list[Example]]:
    """Carve a validation set from training examples (model selection never looks at test)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(examples) * fraction)))
    if cap:
        n_val = min(n_val, cap)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def nested_subset(examples: list[Example], fraction: float, seed: int) -> list[Example]:
    """`fraction` of the examples (at least one), in their original order: the first of one
    fixed shuffle (by `seed`), so the 12.5% subset lies inside the 25% subset, whatever the method
    or training seed."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    keep = set(order[: max(1, round(len(examples) * fraction))])
    return [e for i, e in enumerate(examples) if i in keep]
