"""Co-distillation (deep mutual learning, Zhang et al. 2018; Anil et al. 2018): `kd.teacher` and
the student are trained together on gold labels, each also matching the other's distribution
after `kd.warmup_steps`. The records are the standard method's; the two-model loss lives in
training.py (StepDistillTrainer with co_distill=True). Both models are saved and scored.
"""

from __future__ import annotations

from stepdistill.methods.base import METHODS
from stepdistill.methods.standard import StandardMethod


@METHODS.register("co-distill")
class CoDistillMethod(StandardMethod):
    name = "co-distill"
