"""Student training: the shared Trainer, and fitting a student with any method.

    from stepdistill.training import fit
    metrics = fit(student, method_cfg, training_cfg, records, val_examples, task, Path("runs/x"))

    fitting.py      records -> features -> Trainer -> best model on disk (and resume)
    trainer.py      the Trainer every method shares: exact token counts across accumulation,
                    the speed-up forward helpers, validation accuracy, per-term loss logs
    checkpoints.py  sealed, crash-safe checkpoints and model folders
    speedups.py     cheaper dropout masks, fused GELU, length-grouped batches (CPU speed-ups)
    placement.py    where a KD teacher lives in a distributed run
    tracking.py     experiment trackers (training.report_to), kept offline

What a student learns and its loss are the method's (methods/).
"""

from stepdistill.training.checkpoints import SEAL, SEALS, find_checkpoints
from stepdistill.training.fitting import build_trainer, fit, make_format
from stepdistill.training.trainer import StepDistillTrainer

__all__ = ["SEAL", "SEALS", "StepDistillTrainer", "build_trainer", "find_checkpoints", "fit", "make_format"]
