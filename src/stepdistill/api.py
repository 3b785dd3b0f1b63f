"""The Python API: annotate(), train(), evaluate(). The CLI is a thin layer over these.

>>> import stepdistill as sd
>>> sd.annotate({"task": {"name": "svamp", "path": "../shared/data/sbs"}, "split": "test",
...              "teacher": {"kind": "paper"}}, out="runs/svamp-paper-test")
>>> sd.train({"task": {...}, "student": {"model": "google/t5-v1_1-small"},
...           "method": {"name": "step-by-step"}, "annotations": "runs/svamp-paper-train"}, out="runs/sbs")
>>> sd.evaluate({"task": {...}, "model": "runs/sbs", "split": "test"})

Each takes a config (a validated model from `stepdistill.config` or a plain dict) and the run
directory to write, and returns the stage's summary dict. Each stage's engine lives in its own
module: annotation.py, training/ (with data.py choosing the examples), evaluation.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from stepdistill.annotation import annotate  # noqa: F401  (the first stage)
from stepdistill.config import TrainRun, coerce
from stepdistill.data import keep_correct, nested_subset, note_gold_verified, split_validation
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import evaluate  # noqa: F401  (the third stage, beside predict())
from stepdistill.resuming import resumed_config
from stepdistill.runs import create_run, world_size, write_json
from stepdistill.store import read_annotations
from stepdistill.tasks import get_task, load_examples, split_base

__all__ = ["annotate", "train", "evaluate"]

Printer = Callable[[str], None]


def train(cfg: TrainRun | dict, out: str | Path, *, overwrite: bool = False, resume: bool = False,
          echo: Printer = print, tags: dict[str, str] | None = None, tracking_dir: str | Path | None = None
          ) -> dict[str, Any]:
    """Train a student with `standard`, `distill` or `step-by-step`; the best model goes to `out/model`.
    `tags`, `tracking_dir`: how `training.report_to`'s trackers name and group the run (a sweep's cells)."""
    from stepdistill.methods import get_method
    from stepdistill.students import load_student
    from stepdistill.training import fit
    from stepdistill.training.tracking import check_installed

    cfg = coerce(TrainRun, cfg)
    if resume:
        cfg = resumed_config(out, cfg)
    check_installed(cfg.training.report_to)  # a missing tracker stops us before anything is loaded or written
    task = get_task(cfg.task.name, cfg.task.spec)
    method = get_method(cfg.method)
    examples = load_examples(task, cfg.split, cfg.task.path, cfg.limit)
    annotations = read_annotations(cfg.annotations, task, cfg.split, examples) if cfg.annotations else None
    if annotations is not None and method.teacher_labels:
        note_gold_verified(cfg.annotations, examples, echo)
    if annotations is not None and method.multitask and cfg.method.rationales == "correct":
        annotations = keep_correct(annotations, examples, task, echo)
    tcfg = cfg.training
    data_seed = tcfg.seed if tcfg.data_seed is None else tcfg.data_seed  # the validation carve and the subset
    global_batch = tcfg.batch_size * tcfg.grad_accum * world_size()
    if cfg.val_split and split_base(cfg.val_split) == "test":
        raise StepDistillError(f"val_split={cfg.val_split}: selecting a model on the test split inflates its score; "
                               "use a validation split, or unset val_split to carve one from the training split")
    if split_base(cfg.split) == "test":
        raise StepDistillError(f"split={cfg.split}: training on the test split leaves no unbiased test; train on "
                               "train (or a carve of another split, e.g. valid[:-2000]) and evaluate on test")
    if cfg.val_split:  # the task's own validation split, when it has one
        train_ex = examples
        val_ex = load_examples(task, cfg.val_split, cfg.task.path, tcfg.val_size)
        val_from = f"split {cfg.val_split}"
    else:
        train_ex, val_ex = split_validation(examples, tcfg.val_fraction, data_seed, tcfg.val_size)
        val_from = f"carved from {cfg.split}"
    if tcfg.data_fraction < 1:
        train_ex = nested_subset(train_ex, tcfg.data_fraction, data_seed)
    if tcfg.train_size:
        train_ex = train_ex[: tcfg.train_size]
    if val_ex and all(e.label is None for e in val_ex) and annotations is not None:
        # Sequence-level distillation of unlabelled data: select the model on agreement with the
        # teacher's (verified) labels, since no gold exists to select on.
        val_ex = [dataclasses.replace(e, label=annotations[e.id].label) for e in val_ex
                  if e.id in annotations and annotations[e.id].ok]
        val_from += ", no gold labels: scored against the teacher's labels"
    record_set = method.records(train_ex, annotations)
    records = record_set.records
    with create_run(out, cfg, command="train", seed=tcfg.seed, overwrite=overwrite, resume=resume,
                    inputs=(cfg.task.path, cfg.annotations, cfg.student.model,
                            cfg.method.kd.teacher if cfg.method.kd else None, cfg.method.kd.cache if cfg.method.kd else None)) as run:
        echo = run.tee(echo)
        echo(f"train {cfg.method.name} on {task.name}/{cfg.split}: {record_set.summary()}; "
             f"{len(val_ex)} validation examples ({val_from}); student {cfg.student.model}; global batch "
             f"{global_batch} ({tcfg.batch_size} per device x {tcfg.grad_accum} "
             f"accumulation x {world_size()} process{'es' if world_size() > 1 else ''})")
        # LoRA adapters (and rows added for a new pad token) start random: from the run's seed, not from
        # whatever state the process's generator is in, so a seed names one run and a rerun repeats it
        from transformers import set_seed

        set_seed(tcfg.seed)
        student = load_student(cfg.student)
        metrics = fit(student, cfg.method, tcfg, records, val_ex, task, run.dir, resume=resume, tags=tags,
                      tracking_dir=Path(tracking_dir) if tracking_dir else None)
        metrics.update({"task": task.name, "method": cfg.method.name, "n_train": len(records),
                        "n_val": len(val_ex), "records": record_set.counts,
                        "world_size": world_size(), "global_batch_size": global_batch})
        if run.main:
            write_json(run.path("metrics.json"), metrics)
        echo(f"best validation accuracy {metrics.get('best_val_accuracy')}; model in {run.path('model')}")
    return metrics
