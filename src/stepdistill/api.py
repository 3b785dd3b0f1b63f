"""The Python API: annotate(), train(), evaluate(). The CLI is a thin layer over these.

>>> import stepdistill as sd
>>> sd.annotate({"task": {"name": "svamp", "path": "../shared/data/sbs"}, "split": "test",
...              "teacher": {"kind": "paper"}}, out="runs/svamp-paper-test")
>>> sd.train({"task": {...}, "student": {"model": "google/t5-v1_1-small"},
...           "method": {"name": "step-by-step"}, "annotations": "runs/svamp-paper-train"}, out="runs/sbs")
>>> sd.evaluate({"task": {...}, "model": "runs/sbs", "split": "test"})

Each takes a config (a validated model from `stepdistill.config` or a plain dict) and the run
directory to write, and returns the stage's summary dict.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from stepdistill.config import AnnotateRun, TrainRun, coerce
from stepdistill.errors import StepDistillError
from stepdistill.runs import create_run, home, write_json, write_jsonl
from stepdistill.store import AnnotationStore, StoredCompletion, annotation_key, read_annotations
from stepdistill.tasks import get_task, load_examples
from stepdistill.tasks.base import Example, Parsed, Task
from stepdistill.evaluation import evaluate  # noqa: F401  (the third stage, beside predict())

log = logging.getLogger("stepdistill")

Printer = Callable[[str], None]


# ---------------------------------------------------------------- annotate


def annotate(cfg: AnnotateRun | dict, out: str | Path, *, overwrite: bool = False, resume: bool = False,
             store_path: str | Path | None = None, echo: Printer = print) -> dict[str, Any]:
    """Teacher completions for every example of a split, parsed, with the teacher's accuracy.

    Writes `annotations.jsonl` (one row per example: completion, rationale, label, parse error)
    and `summary.json` (`n`, `parsed`, `unparsed`, `unparsed_reasons`, `teacher_accuracy`, ...).
    Completions come from the annotation store when they are there: a rerun costs nothing and
    an interrupted run resumes where it stopped.
    """
    from stepdistill.teachers import make_teacher

    cfg = coerce(AnnotateRun, cfg)
    task = get_task(cfg.task.name, cfg.task.spec)
    examples = load_examples(task, cfg.split, cfg.task.path, cfg.limit)
    teacher = make_teacher(cfg.teacher, task, cfg.split, cfg.task.path)
    with create_run(out, cfg, command="annotate", seed=cfg.teacher.sampling.seed, overwrite=overwrite,
                    resume=resume, inputs=(cfg.task.path,)) as run:
        echo = run.tee(echo)
        t0 = time.perf_counter()
        completions, generated = _complete(teacher, task, examples, store_path, cfg.split, echo)
        summary = _summarise(task, teacher, examples, completions, run, cfg.split)
        summary.update(generated=generated, from_store=len(examples) - generated,
                       seconds=round(time.perf_counter() - t0, 2))
        write_json(run.path("summary.json"), summary)
        acc = "n/a (no gold labels)" if summary["teacher_accuracy"] is None else f"{summary['teacher_accuracy']:.2%}"
        line = f"n={summary['n']} parsed={summary['parsed']} unparsed={summary['unparsed']} teacher_accuracy={acc}"
        if "teacher_accuracy_paper_parsing" in summary:
            line += f" (with the paper's own parsing: {summary['teacher_accuracy_paper_parsing']:.2%})"
        echo(line)
        if summary["unparsed_reasons"]:
            echo("unparsed outputs: " + ", ".join(f"{r}: {c}" for r, c in summary["unparsed_reasons"].items()))
        echo(f"wrote {run.path('summary.json')}")
    return summary


def _complete(teacher, task: Task, examples: list[Example], store_path, split: str, echo: Printer
              ) -> tuple[list[tuple[str, StoredCompletion]], int]:
    """(key, completion) per example: from the store, or generated and committed one by one."""
    from stepdistill.teachers import Request

    store = AnnotationStore(store_path or home() / "annotations.sqlite")
    try:
        identity = teacher.identity()
        requests = [Request(ex, teacher.prompt(task, ex)) for ex in examples]
        keys = [annotation_key(identity, r.prompt, task.template_version) for r in requests]
        have = store.get_many(keys)
        todo = {k: r for k, r in zip(keys, requests) if k not in have}  # a repeated prompt generates once
        echo(f"annotate {task.name}/{split} with {teacher.kind} teacher: {len(examples)} examples, "
             f"{len(examples) - len(todo)} already in the store, {len(todo)} to generate")
        key_of = {id(r): k for k, r in todo.items()}
        with tqdm(total=len(todo), desc="teacher", unit="ex", disable=not todo) as bar:
            for req, comp in teacher.generate(list(todo.values())):
                store.put(key_of[id(req)], identity, req.prompt, comp.text, prompt_tokens=comp.prompt_tokens,
                          completion_tokens=comp.completion_tokens, seconds=comp.seconds)
                bar.update(1)
        have = store.get_many(keys)
    finally:
        store.close()
    return [(k, have[k]) for k in keys], len(todo)


def _summarise(task: Task, teacher, examples: list[Example], completions, run, split: str) -> dict[str, Any]:
    """Parse every completion, write annotations.jsonl, and count what parsed and what was right."""
    rows, reasons = [], Counter()
    parsed_n = correct = gold_n = tokens = 0
    secs = []
    for ex, (key, rec) in zip(examples, completions):
        if rec.seconds is not None:
            secs.append(rec.seconds)
        p = task.parse(rec.completion, ex)
        parsed_n += p.ok
        if not p.ok:
            reasons[p.error or "no label"] += 1
        is_correct = None
        if ex.label is not None:
            gold_n += 1
            is_correct = bool(p.ok and task.is_correct(p.label, ex))
            correct += is_correct
        tokens += rec.completion_tokens or 0
        rows.append({"id": ex.id, "index": ex.index, "input": ex.input, "gold": ex.label,
                     "completion": rec.completion, "rationale": p.rationale, "label": p.label if p.ok else None,
                     "error": None if p.ok else (p.error or "no label"), "correct": is_correct, "key": key})
    write_jsonl(run.path("annotations.jsonl"), rows)
    summary = {
        "task": task.name, "split": split, "teacher": teacher.identity(),
        "n": len(examples), "parsed": parsed_n, "unparsed": len(examples) - parsed_n,
        "unparsed_reasons": dict(reasons.most_common()),
        "teacher_accuracy": correct / gold_n if gold_n else None,
        "completion_tokens": tokens,
        # the teacher's latency per prediction (its CoT generation), as measured when generated
        "ms_per_example": round(1000 * sum(secs) / len(secs), 1) if secs else None,
    }
    ref = teacher.reference_accuracy([rec.completion for _, rec in completions], examples) if gold_n else None
    if ref is not None:
        summary["teacher_accuracy_paper_parsing"] = ref
    return summary


# ---------------------------------------------------------------- train


def keep_correct(annotations: dict[str, Parsed], examples: list[Example], task: Task, echo: Printer = print
                 ) -> dict[str, Parsed]:
    """Only the annotations whose teacher label is right against gold (`method.rationales: correct`)."""
    if any(e.label is None for e in examples):
        raise StepDistillError("method.rationales=correct needs gold labels on every training example: use rationales=all")
    kept = {e.id: annotations[e.id] for e in examples
            if e.id in annotations and annotations[e.id].ok and task.is_correct(annotations[e.id].label, e)}
    echo(f"rationales=correct: keeping {len(kept)} of {len(annotations)} teacher annotations (label right against gold)")
    return kept


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


def train(cfg: TrainRun | dict, out: str | Path, *, overwrite: bool = False, resume: bool = False,
          echo: Printer = print) -> dict[str, Any]:
    """Train a student with `standard`, `distill` or `step-by-step`; the best model goes to `out/model`."""
    from stepdistill.methods import get_method
    from stepdistill.students import load_student
    from stepdistill.training import fit

    cfg = coerce(TrainRun, cfg)
    task = get_task(cfg.task.name, cfg.task.spec)
    method = get_method(cfg.method)
    examples = load_examples(task, cfg.split, cfg.task.path, cfg.limit)
    annotations = read_annotations(cfg.annotations, task, cfg.split, examples) if cfg.annotations else None
    if annotations is not None and method.multitask and cfg.method.rationales == "correct":
        annotations = keep_correct(annotations, examples, task, echo)
    tcfg = cfg.training
    if cfg.val_split == "test":
        raise StepDistillError("val_split=test: selecting a model on the test split inflates its score; use a validation split")
    if cfg.val_split:  # the task's own validation split, when it has one
        train_ex = examples
        val_ex = load_examples(task, cfg.val_split, cfg.task.path, tcfg.val_size)
        val_from = f"split {cfg.val_split}"
    else:
        train_ex, val_ex = split_validation(examples, tcfg.val_fraction, tcfg.seed, tcfg.val_size)
        val_from = f"carved from {cfg.split}"
    if tcfg.train_size:
        train_ex = train_ex[: tcfg.train_size]
    record_set = method.records(train_ex, annotations)
    records = record_set.records
    with create_run(out, cfg, command="train", seed=tcfg.seed, overwrite=overwrite, resume=resume,
                    inputs=(cfg.task.path, cfg.annotations, cfg.student.model)) as run:
        echo = run.tee(echo)
        echo(f"train {cfg.method.name} on {task.name}/{cfg.split}: {record_set.summary()}; "
             f"{len(val_ex)} validation examples ({val_from}); student {cfg.student.model}")
        student = load_student(cfg.student)
        metrics = fit(student, cfg.method, tcfg, records, val_ex, task, run.dir, resume=resume)
        metrics.update({"task": task.name, "method": cfg.method.name, "n_train": len(records),
                        "n_val": len(val_ex), "records": record_set.counts})
        write_json(run.path("metrics.json"), metrics)
        echo(f"best validation accuracy {metrics.get('best_val_accuracy')}; model in {run.path('model')}")
    return metrics

