"""Measuring what pruning bought: parameters, size on disk, latency and accuracy, and the
before/after table the CLI prints.

    measure(model, tokenizer, prompts=DEFAULT_PROMPTS)     # parameters, MB on disk, ms/prediction
    latency([original, pruned], tok)                       # one result per model, timed alternately
    table(before, after)                                   # prune()'s before/after table, line by line
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

DEFAULT_PROMPTS = [
    "What is 12 + 7?",
    "Name a colour of the sky.",
    "Sam has 3 apples and buys 4 more. How many apples does he have?",
    "Translate 'cat' to French.",
    "Is a rose a plant or an animal?",
    "Complete: one, two, three,",
    "What is the capital of France?",
    "Write a word that rhymes with 'sun'.",
]


# --- measuring ------------------------------------------------------------------------------

def folder_bytes(folder: str | Path) -> int:
    """Size on disk of a saved model: the bytes of every file under `folder`."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def measure(model, tokenizer, *, prompts: list[str] | None = None, max_new_tokens: int = 8, repeats: int = 3,
            task: Any = None, split: str = "test", data: str | Path | None = None, limit: int | None = None,
            prefix: str = "", fmt: Any = None, batch_size: int = 16, timed: bool = True) -> dict[str, Any]:
    """Parameters, size on disk and latency of a causal LM, measured; accuracy when a task is given.

    size: the files save_pretrained writes (safetensors + config), in bytes and MB.
    latency (unless timed=False): see `latency`, in ms per prompt.
    accuracy: `task` (a name or a Task) on `split` with evaluation.predict, reading the task
    with `prefix` and `fmt` (a trained model's label prefix and Format from stepdistill.json).

    >>> measure(model, tok, prompts=["What is 2 + 3?"])
    {'parameters': 134515008, 'size_bytes': ..., 'size_mb': 538.1, 'ms_per_prediction': 41.2, ...}
    """
    from stepdistill.students import count_parameters

    out: dict[str, Any] = {"parameters": count_parameters(model)[1]}
    with tempfile.TemporaryDirectory(prefix="stepdistill-measure-") as d, _quiet_progress():
        model.save_pretrained(d)
        size = folder_bytes(d)
    out.update(size_bytes=size, size_mb=round(size / 1e6, 2))
    if timed:
        out.update(latency([model], tokenizer, prompts=prompts, max_new_tokens=max_new_tokens, repeats=repeats)[0])
    if task is not None:
        out.update(_accuracy(model, tokenizer, task, split, data, limit, prefix, fmt, batch_size))
    return out


def latency(models: list, tokenizer, *, prompts: list[str] | None = None, max_new_tokens: int = 8,
            repeats: int = 3) -> list[dict[str, Any]]:
    """ms per prediction of each model: greedy generation of exactly `max_new_tokens` tokens for
    the batch `prompts` (left-padded) under torch.inference_mode, the median of `repeats` timed
    runs after one warm-up. Exactly that many tokens, so a model that stops early does not look
    faster. With several models the runs alternate, round by round, so a machine that gets busier
    halfway slows them all alike and their ratio stays fair.

    >>> before, after = latency([original, pruned], tok)
    >>> after["ms_per_prediction"] / before["ms_per_prediction"]
    0.19
    """
    prompts = prompts or DEFAULT_PROMPTS
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                  pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    modes = [m.training for m in models]
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode():
            for m in models:
                m.eval()
                device = next(m.parameters()).device
                m.generate(**{k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")},
                           **kwargs)  # warm-up: first-call allocations and lazy inits
            for _ in range(max(1, repeats)):
                for m, t in zip(models, times):
                    device = next(m.parameters()).device
                    inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                    t0 = time.perf_counter()
                    m.generate(**inputs, **kwargs)
                    t.append(time.perf_counter() - t0)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return [{"ms_per_prediction": round(1000 * statistics.median(t) / len(prompts), 2),
             "latency_runs_ms": [round(1000 * x, 1) for x in t], "prompts": len(prompts), "new_tokens": max_new_tokens}
            for t in times]


@contextlib.contextmanager
def _quiet_progress():
    """No "Writing model shards" bars in the middle of the CLI's output."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _accuracy(model, tokenizer, task, split, data, limit, prefix, fmt, batch_size) -> dict[str, Any]:
    from stepdistill.evaluation import predict
    from stepdistill.students import Student
    from stepdistill.tasks import get_task, load_examples

    task = get_task(task) if isinstance(task, str) else task
    examples = load_examples(task, split, data, limit)
    preds = predict(Student(model, tokenizer, is_seq2seq=False, fmt=fmt), [e.input for e in examples],
                    prefix=prefix, batch_size=batch_size)
    return {"task": task.name, "split": split, "n": len(examples), "accuracy": task.accuracy(preds, examples)}


# --- the before/after table -----------------------------------------------------------------

def _fmt_row(name: str, before: Any, after: Any, fmt: Callable[[Any], str], ratio: bool = True) -> str:
    b, a = fmt(before), fmt(after)
    r = f"{after / before:.2f}x" if ratio and isinstance(before, (int, float)) and before else ""
    return f"{name:<16}{b:>14}{a:>14}{r:>14}"


def table(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The before/after table the CLI prints, one string per line."""
    lines = [f"{'':<16}{'before':>14}{'after':>14}{'after/before':>14}",
             _fmt_row("parameters", before["parameters"], after["parameters"], lambda x: f"{x / 1e6:.2f}M"),
             _fmt_row("size on disk", before["size_mb"], after["size_mb"], lambda x: f"{x:.1f} MB"),
             _fmt_row("ms/prediction", before["ms_per_prediction"], after["ms_per_prediction"], lambda x: f"{x:.1f}")]
    if "accuracy" in before:
        def pct(x):
            return "n/a" if x is None else f"{x:.1%}"
        lines.append(_fmt_row(f"accuracy (n={after['n']})", before["accuracy"], after["accuracy"], pct, ratio=False))
    lines.append(_fmt_row("zero weights", before["zero_fraction"], after["zero_fraction"], lambda x: f"{x:.1%}",
                          ratio=False))
    return lines
