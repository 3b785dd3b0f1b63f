"""Fit a student: records -> token features -> the shared Trainer -> best model on disk.

    metrics = fit(student, method_cfg, training_cfg, records, val_examples, task, Path("runs/x"))

out_dir layout after fit: checkpoints/ (sealed Trainer checkpoints, for resume), train_log.jsonl
(every Trainer log line), model/ (best model + tokenizer + stepdistill.json), and whatever else
the method trains (co-distillation: teacher_model/).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments

from stepdistill.config import MethodConfig, TrainingConfig
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import label_token_limit, label_vocab
from stepdistill.memory import check_training, resolve_bf16
from stepdistill.methods import get_method
from stepdistill.methods.base import TrainRecord
from stepdistill.methods.batches import Collator, feature_length
from stepdistill.methods.formatting import Format, chat_wrapper
from stepdistill.methods.kd import attach_topk_cache, load_kd_teacher
from stepdistill.runs import is_main_process, write_error, write_json
from stepdistill.students import Student, count_parameters
from stepdistill.tasks.base import Example, Task
from stepdistill.methods.cross_tokenizer import check_cross_tokenizer, teacher_rows
from stepdistill.methods.on_policy import check_on_policy
from stepdistill.training.checkpoints import (
    SEALS, JsonlLog, SealCheckpoint, checkpoint_step, failed_write, find_checkpoints, refused_pickle, trim_log,
)
from stepdistill.training.speedups import use_fast_dropout, use_fused_gelu
from stepdistill.training.tracking import tracking
from stepdistill.training.trainer import StepDistillTrainer

VAL_AS_TEST_BATCH = 32  # validation scored as the test (val_as_test): at least the batch the CPU sweeps evaluate at

log = logging.getLogger("stepdistill.training")


def make_format(student: Student, training: TrainingConfig, task_marker: str = "encoder") -> Format:
    if task_marker == "decoder" and not student.is_seq2seq:
        raise StepDistillError("method.task_marker=decoder needs an encoder-decoder student (T5, BART): "
                               "use task_marker=encoder with a causal LM")
    head = tail = ""
    has_template = bool(getattr(student.tokenizer, "chat_template", None))
    if student.chat_template == "on" and (student.is_seq2seq or not has_template):
        raise StepDistillError("student.chat_template=on needs a causal student whose tokenizer has a chat template, "
                               "and this one has none: set student.chat_template=off (or auto)")
    if student.chat_template in ("on", "auto") and has_template and not student.is_seq2seq:
        head, tail = chat_wrapper(student.tokenizer, student.chat_system)
    return Format(
        kind=student.kind,
        max_input_length=training.max_input_length,
        max_target_length=training.max_target_length,
        task_marker=task_marker,
        chat_head=head,
        chat_tail=tail,
    )


def build_trainer(
    student: Student,
    method_cfg: MethodConfig,
    training: TrainingConfig,
    train_records: list[TrainRecord],
    val_examples: list[Example],
    task: Task | None,
    out_dir: Path,
    *,
    progress: bool = True,
    teacher_from: Path | None = None,
    report_to: list[str] | str = "none",
    run_name: str | None = None,
    extra_callbacks: tuple[TrainerCallback, ...] = (),
) -> StepDistillTrainer:
    """The configured Trainer `fit` runs (exposed for tests and custom loops). `teacher_from`:
    a checkpoint's teacher folder to resume a co-distillation from. `report_to`, `run_name` and
    `extra_callbacks`: the experiment trackers (training/tracking.py)."""
    if not train_records:
        raise StepDistillError("no training records: the method kept none of the examples (see its summary)")
    method = get_method(method_cfg)
    student.fmt = method.shape_format(make_format(student, training, method_cfg.task_marker))
    start = getattr(student.model.config, "decoder_start_token_id", None) if student.is_seq2seq else None
    feats = method.features(student.tokenizer, student.fmt, train_records, decoder_start=start)
    kd, teacher = method_cfg.kd, None
    if kd is not None and kd.cache:
        feats = attach_topk_cache(kd, student, feats, batch_size=training.batch_size)
    elif kd is not None:
        teacher = load_kd_teacher(kd, student, trainable=method.trains_teacher, weights_from=teacher_from)
        teacher.fmt = student.fmt
        if kd.cross_tokenizer:  # the teacher's own rows of the same text, and the positions they share
            feats = teacher_rows(student.tokenizer, teacher.tokenizer, feats)
    has_val = bool(val_examples)
    if has_val and task is None:
        raise StepDistillError("validation examples given without their task: pass task= to score them")
    if has_val and all(e.label is None for e in val_examples):
        raise StepDistillError(
            "the validation examples have no gold labels, so accuracy cannot select a model: "
            "validate on a labelled split (or pass no validation examples)"
        )
    strategy = "steps" if training.eval_steps else "epoch"
    bf16 = resolve_bf16(training.bf16)
    fast_dropout = not torch.cuda.is_available() if training.fast_dropout is None else training.fast_dropout
    trained = [student] + ([teacher] if method.trains_teacher else [])
    for s in trained if fast_dropout else ():
        use_fast_dropout(s.model)
    for s in trained if training.fused_gelu else ():
        use_fused_gelu(s.model)
    longest_label = max(len(method.answer_ids(f)) for f in feats)  # what the label task generates, eos included
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=training.batch_size,
        # validation scored as the test is (val_as_test) runs at least the evaluation's batch
        per_device_eval_batch_size=max(training.batch_size, VAL_AS_TEST_BATCH) if training.val_as_test else training.batch_size,
        gradient_accumulation_steps=training.grad_accum,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        warmup_steps=training.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
        lr_scheduler_type="linear",
        eval_strategy=strategy if has_val else "no",
        save_strategy=strategy,
        eval_steps=training.eval_steps,
        save_steps=training.eval_steps,
        save_total_limit=None,  # _SealCheckpoint rotates (keeping the best), once the new checkpoint is sealed
        load_best_model_at_end=has_val,
        metric_for_best_model="accuracy" if has_val else None,
        greater_is_better=True,
        logging_steps=training.logging_steps,
        bf16=bf16,
        # on a machine without a GPU, say the CPU is meant: Trainer refuses bf16 otherwise (CPU
        # autocast is real), and sets up no DDP under torchrun / accelerate launch (gloo on CPUs)
        use_cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available(),
        activation_checkpointing=training.gradient_checkpointing,
        seed=training.seed,
        report_to=report_to,
        run_name=run_name,
        remove_unused_columns=False,  # our batches carry rat_* keys the model's forward lacks
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    callbacks: list[TrainerCallback] = [JsonlLog(out_dir / "train_log.jsonl")]
    if has_val and training.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training.patience))
    callbacks += method.callbacks(teacher)
    callbacks += extra_callbacks
    callbacks.append(SealCheckpoint())  # last: after every file of the checkpoint is written
    return StepDistillTrainer(
        model=student.model,
        args=args,
        train_dataset=feats,
        eval_dataset=val_examples if has_val else None,
        data_collator=Collator(student.tokenizer.pad_token_id),
        processing_class=student.tokenizer,
        callbacks=callbacks,
        method=method,
        student=student,
        task=task,
        # a chain-of-thought student writes its rationale before the label: validation lets it
        val_max_new_tokens=min(training.max_target_length if student.fmt.answer_after else training.val_max_new_tokens,
                               training.max_target_length,
                               label_token_limit({"max_label_tokens": longest_label})),
        teacher=teacher,
        lengths=[feature_length(f) for f in feats] if training.group_by_length else None,
        fuse_tasks=student.is_seq2seq if training.fuse_tasks is None else training.fuse_tasks,
        target_logits_only=training.target_logits_only, fused_loss=training.fused_loss,
        max_label_tokens=longest_label,
        val_as_test=training.val_as_test,
        label_vocab=label_vocab((method.answer_ids(f) for f in feats), student.tokenizer.eos_token_id),
    )


def _train(trainer: StepDistillTrainer, student: Student, method, resume: bool, last: Path | None, ckpt_root: Path
           ) -> None:
    """The Trainer's loop, with the checks before it and the errors after it made clear."""
    # a clear error now rather than an out-of-memory kill minutes in (activations not counted)
    check_training(student.model, device=trainer.args.device)
    if method.trains_teacher:
        check_training(trainer.teacher.model, device=trainer.args.device, what="co-distillation's teacher")
    try:
        trainer.train(resume_from_checkpoint=str(last) if resume and last else None)
    except Exception as e:
        if resume and last and refused_pickle(e):
            raise StepDistillError(
                f"--resume refused: a file in {last} holds more than tensors (torch's weights-only loader refused "
                f"it, and nothing in it ran); move {last.name} aside to resume from an earlier checkpoint, "
                "or start a new run with another --out") from e
        err = failed_write(e, ckpt_root, trainer.state.global_step)
        if err is None:
            raise
        raise err from e


def fit(
    student: Student,
    method_cfg: MethodConfig,
    training: TrainingConfig,
    train_records: list[TrainRecord],
    val_examples: list[Example],
    task: Task,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    tags: dict[str, str] | None = None,
    tracking_dir: Path | None = None,
) -> dict[str, Any]:
    """Train `student` on `train_records`, keep the model with the best validation accuracy,
    save it to out_dir/model, return the metrics. `tags` and `tracking_dir` (default out_dir):
    how the trackers of `training.report_to` name and group the run; tags["run"] is its name.

    Returns {"train_loss": [(step, loss), ...], "best_val_accuracy", "best_step", "steps",
    "seconds", "trainable_params", "total_params", "train_records", "rationale_records"}.
    After fit, `student.model` is the saved model (LoRA adapters merged into the weights).
    """
    out_dir = Path(out_dir)
    method = get_method(method_cfg)
    check_on_policy(method, student)  # before anything is written (a kd cache among it)
    check_cross_tokenizer(method, student)
    ckpt_root = out_dir / "checkpoints"
    last, incomplete = find_checkpoints(ckpt_root)
    if last and not resume:
        raise StepDistillError(
            f"{out_dir} already holds training checkpoints ({last.name}): pass resume=True to "
            "continue that run, or choose a new output directory"
        )
    if resume and not last:
        log.warning("resume requested but %s has no complete checkpoint: training from the start", ckpt_root)
    main = is_main_process()  # under torchrun / accelerate launch, rank 0 alone writes the run
    for p in incomplete if main else ():  # a run was stopped while writing them: never resume from half a checkpoint
        log.warning("removing %s: incomplete (the run stopped while writing it)", p)
        shutil.rmtree(p)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out_dir, e) from e
    start_step = checkpoint_step(last) if resume and last else 0
    if main and not (ckpt_root / SEALS).is_file():  # from here on, a checkpoint counts only once sealed
        write_json(ckpt_root / SEALS, {"sealed_after": start_step})
    if main:
        trim_log(out_dir / "train_log.jsonl", start_step)
    if start_step:
        log.info("resuming from %s (step %d)", last, start_step)
    teacher_from = method.resume_teacher_from(last) if resume else None
    tags = dict(tags or {})
    run_name = tags.pop("run", None) or out_dir.name
    with tracking(training.report_to, Path(tracking_dir or out_dir), run_name=run_name, tags=tags) as (report_to, cbs):
        trainer = build_trainer(student, method_cfg, training, train_records, val_examples, task, out_dir,
                                progress=progress, teacher_from=teacher_from, report_to=report_to,
                                run_name=run_name, extra_callbacks=tuple(cbs))
        trainable, total = count_parameters(student.model)
        start = time.time()
        _train(trainer, student, method, resume, last, ckpt_root)
    seconds = time.time() - start
    state = trainer.state

    # Trainer has reloaded the best checkpoint (load_best_model_at_end) into trainer.model.
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # peft: ship one self-contained model folder
        model = model.merge_and_unload()
    student.model = model
    model_dir = out_dir / "model"
    info = {
        "method": method_cfg.name,
        "label_prefix": method_cfg.label_prefix,
        "rationale_prefix": method_cfg.rationale_prefix,
        "alpha": method_cfg.alpha,
        "label_source": method_cfg.label_source,
        "format": student.fmt.to_dict(),
        "base_model": getattr(model.config, "name_or_path", None) or None,
        "best_val_accuracy": state.best_metric,
        "best_step": state.best_global_step,
        # the longest label target (tokens, eos included): evaluation's task-aware generation limit
        "max_label_tokens": trainer.max_label_tokens,
        # every token of the trained labels, and eos: label_decoding=vocab decodes within them
        "label_vocab": trainer.label_vocab,
    }
    if method_cfg.kd is not None:
        info["kd"] = method_cfg.kd.model_dump()
    extra: dict[str, Any] = {}
    if main:
        trainer.save_trained(model_dir, student, info)
        extra = method.finish(trainer, info, out_dir, val_examples, task)

    history = state.log_history
    return {**extra,
        "train_loss": [(h["step"], h["loss"]) for h in history if "loss" in h],
        "val_accuracy": [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h],
        "best_val_accuracy": state.best_metric,
        "best_step": state.best_global_step,
        "steps": state.global_step,
        "seconds": round(seconds, 2),
        "trainable_params": trainable,
        "total_params": total,
        "train_records": len(train_records),
        "rationale_records": sum(1 for r in train_records if r.rationale),
    }
