"""Co-distillation (deep mutual learning, Zhang et al. 2018; Anil et al. 2018): `kd.teacher` and
the student are trained together on gold labels, each also matching the other's distribution
after `kd.warmup_steps`.

    student loss = (1 - w) * CE(student) + w * D(student || teacher)
    teacher loss = (1 - w) * CE(teacher) + w * D(teacher || student)      (each divergence detaches
    loss         = student loss + teacher loss                              the other model's side)

The records are the standard method's. The teacher joins the student's optimizer (same schedule
and decay), its gradients are averaged over processes and clipped like the student's, it is saved
inside every checkpoint (so resume and best-model selection restore both from one step), and after
training it is saved beside the student as `teacher_model/`, scored on validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from stepdistill.errors import ConfigError
from stepdistill.methods.base import METHODS
from stepdistill.methods.kd import load_kd_teacher, mixed_loss, run_teacher
from stepdistill.methods.standard import StandardMethod

TEACHER_DIR = "teacher"  # the trained teacher inside checkpoint-N


@METHODS.register("co-distill")
class CoDistillMethod(StandardMethod):
    name = "co-distill"
    trains_teacher = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.kd is None:
            raise ConfigError("method co-distill trains a teacher beside the student: set method.kd.teacher")
        if cfg.kd.cache:
            raise ConfigError("method co-distill trains the teacher, so its logits change every step: drop kd.cache")

    def compute_loss(self, trainer, model, inputs: dict, counts: dict) -> torch.Tensor:
        labels, n = inputs["labels"], counts.get("")
        kw = trainer.model_inputs(inputs, "")
        logits = model(**kw).logits
        t_logits = run_teacher(trainer, kw, labels, grad=model.training)
        loss = mixed_loss(trainer, logits, t_logits, labels, n, "kd_loss")
        if model.training:  # mutual learning: the teacher learns from the student too
            teacher_loss = mixed_loss(trainer, t_logits, logits, labels, n)
            trainer.note("student_loss", loss)  # `loss` in the log is the sum of both models' losses
            trainer.note("teacher_loss", teacher_loss)
            loss = loss + teacher_loss
        return loss

    def kd_weight(self, step: int) -> float:
        """0 during the warm-up: both models' early predictions are noise."""
        return 0.0 if step < self.cfg.kd.warmup_steps else self.cfg.kd.weight

    def callbacks(self, teacher) -> list:
        return [_TeacherSteps(teacher), _TeacherCheckpoint(teacher)]

    def extend_optimizer(self, trainer, optimizer) -> None:
        """The teacher's weights join the optimizer (same schedule and decay), once."""
        if getattr(trainer, "_teacher_in_optimizer", False):
            return
        teacher = trainer.teacher.model
        decay = set(trainer.get_decay_parameter_names(teacher))  # no decay on norms and biases, as for the student
        base = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "weight_decay")}
        named = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]
        for wd, params in ((trainer.args.weight_decay, [p for n, p in named if n in decay]),
                           (0.0, [p for n, p in named if n not in decay])):
            if params:
                optimizer.add_param_group({**base, "weight_decay": wd, "params": params})
        trainer._teacher_in_optimizer = True

    def resume_teacher_from(self, checkpoint: Path | None) -> Path | None:
        return checkpoint / TEACHER_DIR if checkpoint is not None else None

    def finish(self, trainer, info: dict[str, Any], out_dir: Path, val_examples, task) -> dict[str, Any]:
        """Save the teacher from the selected step beside the student (out_dir/teacher_model,
        loadable like any trained model) and score it on validation."""
        teacher = trainer.teacher
        best = trainer.state.best_model_checkpoint
        if best and (Path(best) / TEACHER_DIR).is_dir():
            teacher = load_kd_teacher(trainer.kd, trainer.student, weights_from=Path(best) / TEACHER_DIR)
            teacher.fmt = trainer.student.fmt
        teacher.model.eval()
        acc = trainer.accuracy(teacher, val_examples) if val_examples and task is not None else None
        teacher_info = {**info, "co_distill_role": "teacher", "base_model": trainer.kd.teacher,
                        "best_val_accuracy": acc, "note": "selected at the student's best validation step"}
        model_dir = out_dir / "teacher_model"
        trainer.save_trained(model_dir, teacher, teacher_info)
        return {"teacher_model": str(model_dir), "teacher_val_accuracy": acc}


class _TeacherSteps(TrainerCallback):
    """Trainer syncs, clips and zeroes only the student's gradients, so the teacher's are averaged
    over processes, clipped (same max_grad_norm) before each optimizer step and cleared after it."""

    def __init__(self, teacher):
        self.teacher = teacher

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if args.world_size > 1:  # the teacher is not DDP-wrapped: average its gradients as DDP does the student's
            for p in self.teacher.model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= args.world_size
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.teacher.model.parameters(), args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.teacher.model.zero_grad(set_to_none=True)


class _TeacherCheckpoint(TrainerCallback):
    """The trained teacher is saved inside every checkpoint (checkpoint-N/teacher)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / TEACHER_DIR
            self.teacher.model.save_pretrained(folder)
            self.teacher.tokenizer.save_pretrained(folder)
