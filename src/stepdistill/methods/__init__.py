"""Training methods: what the student learns from (records) and the losses (losses.py).

    standard      gold labels, label task only
    distill       teacher labels, label task only
    step-by-step  label task + teacher-rationale task, loss = alpha*label + (1-alpha)*rationale
    co-distill    gold labels; a teacher trained beside the student, each learning from the other
    label-rationale  label then rationale in one sequence; inference stops after the label
    rationale-label  rationale then label in one sequence: a chain-of-thought student
    on-policy     KD on the student's own samples too (GKD); kd.lmbda does it under any method

Any method takes `kd:` (soft-label distillation from a white-box teacher, on the fly or from a
top-k cache): each task's loss becomes (1 - w) * cross-entropy + w * divergence (kd.py, losses.py).
"""

from stepdistill.methods.base import METHODS, Method, RecordSet, TrainRecord, get_method
from stepdistill.methods import (  # noqa: F401  (each registers itself)
    co_distill as _co_distill, on_policy as _on_policy, one_sequence as _one_sequence, standard as _standard,
    step_by_step as _step_by_step,
)
from stepdistill.methods.formatting import Format
from stepdistill.methods.losses import multitask_loss, token_cross_entropy

__all__ = [
    "METHODS", "Method", "RecordSet", "TrainRecord", "get_method", "Format",
    "multitask_loss", "token_cross_entropy",
]
