"""Training methods: what the student learns from (records) and the losses (losses.py).

    standard      gold labels, label task only
    distill       teacher labels, label task only
    step-by-step  label task + teacher-rationale task, loss = alpha*label + (1-alpha)*rationale
"""

from stepdistill.methods.base import METHODS, Method, RecordSet, TrainRecord, get_method
from stepdistill.methods import standard as _standard, step_by_step as _step_by_step  # noqa: F401  (register)
from stepdistill.methods.formatting import Format
from stepdistill.methods.losses import multitask_loss, token_cross_entropy

__all__ = [
    "METHODS", "Method", "RecordSet", "TrainRecord", "get_method", "Format",
    "multitask_loss", "token_cross_entropy",
]
