"""The prune command: load a model, prune it (layers -> structured -> magnitude), measure it
before and after, and save it with a report. `stepdistill prune` runs this.

    prune("smollm2-135m-instruct", "models/smol-8l", layers=8, heads=1, ffn=0.25)   # all of it, saved
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Literal

from stepdistill.errors import StepDistillError
from stepdistill.pruning.layers import Strategy, decoder_layers, keep_layers, select_layers
from stepdistill.pruning.magnitude import MAGNITUDE_NOTE, prune_magnitude, sparsity_report
from stepdistill.pruning.measuring import latency, measure, table
from stepdistill.pruning.structured import Importance, plan_structured, prune_structured, taylor_batches
from stepdistill.ownership import MARKER, new_marker, protected_path


# --- the whole pipeline, as the CLI runs it -------------------------------------------------

def _load(model: str):
    """(student, stepdistill.json info or None, the folder holding stepdistill.json or None)."""
    from stepdistill.evaluation import load_trained
    from stepdistill.students import MODEL_INFO, model_folder
    from stepdistill.students import load_pretrained

    d = model_folder(model)
    if (d / MODEL_INFO).is_file():
        student, info = load_trained(d)
        if student.is_seq2seq:
            decoder_layers(student.model)  # the clear error
        return student, info, d
    student = load_pretrained(model)
    decoder_layers(student.model)  # a seq2seq or other unsupported model: the clear error, before any work
    return student, None, None


def prune(model: str, out: str | Path, *, layers: int | None = None, strategy: Strategy = "spread",
          heads: int = 0, ffn: float = 0.0, importance: Importance = "magnitude", sparsity: float = 0.0,
          scope: Literal["global", "layer"] = "global", task: str | None = None, data: str | None = None,
          split: str | None = None, limit: int | None = None, taylor_examples: int = 32,
          latency_repeats: int = 5, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Load `model`, prune it (layers -> structured -> magnitude), save it to `out` with its
    tokenizer, stepdistill.json (when it has one) and prune_report.json, and print a before/after
    table. Returns the report.

    `model`: hub id, folder, .gguf, `smollm2-135m-instruct`, or a training run / its model folder
    (then accuracy uses its label prefix and format). `layers`: how many to keep (the step, for
    strategy "every"). `task`/`split`/`data`/`limit`: measure accuracy before and after; taylor
    importance draws its gradients from the first `taylor_examples` of the task's train split.
    Latency: the original (a copy kept in memory) and the pruned model, timed alternately.

    >>> prune("smollm2-135m-instruct", "models/smol-8l", layers=8, heads=1, ffn=0.25)["after"]["parameters"]
    """
    from stepdistill.students import MODEL_INFO, save_atomic

    out = Path(out)
    if out.exists():
        raise StepDistillError(f"{out} exists: choose a new --out (prune never overwrites)")
    if (hit := protected_path(out, (model,))) is not None:
        raise StepDistillError(f"--out {out} holds {hit}: choose another --out")
    if importance == "taylor" and task is None:
        raise StepDistillError("taylor importance needs --task: its gradients come from the task's training examples")
    if not (layers or heads or ffn or sparsity):
        raise StepDistillError("nothing to prune: give --layers, --heads, --ffn or --sparsity")
    student, info, info_dir = _load(model)
    net = student.model
    n_layers = len(decoder_layers(net))
    # Check every option before the slow measurements, so a typo costs seconds, not minutes.
    indices = select_layers(n_layers, layers, strategy) if layers else None
    plan_structured(net, heads, ffn)
    if not 0 <= sparsity < 1:
        raise StepDistillError(f"--sparsity {sparsity}: the share of weights to zero must be in [0, 1)")
    prefix = info["label_prefix"] if info else ""
    split = split or "test"
    measure_kw: dict[str, Any] = {}
    if task is not None:
        measure_kw = dict(task=task, split=split, data=data, limit=limit, prefix=prefix, fmt=student.fmt)
        if info is None:
            echo(f"note: {model} is not a trained stepdistill model: accuracy reads the raw input (no label prefix)")

    def snapshot() -> dict[str, Any]:
        return {**measure(net, student.tokenizer, timed=False, **measure_kw),
                "zero_fraction": sparsity_report(net)["overall"]}

    echo(f"measuring {model} ({n_layers} layers) ...")
    before = snapshot()
    # The original is timed beside the pruned model at the end, run for run: timing them minutes
    # apart on a shared machine measured the same model at 100 and 290 ms/prediction.
    original = copy.deepcopy(net)
    steps: dict[str, Any] = {}
    if indices is not None:
        steps["layers"] = {"strategy": strategy, **keep_layers(net, indices)}
    if heads or ffn:
        batches = None
        if importance == "taylor":
            from stepdistill.tasks import get_task, load_examples

            train = load_examples(get_task(task), "train", data, taylor_examples)
            batches = taylor_batches(student, train, prefix=prefix)
        steps["structured"] = prune_structured(net, heads=heads, ffn=ffn, importance=importance, batches=batches)
    if sparsity:
        rep = prune_magnitude(net, sparsity, scope)
        steps["magnitude"] = {k: v for k, v in rep.items() if k != "modules"}
    echo("measuring the pruned model ...")
    after = snapshot()
    t_before, t_after = latency([original, net], student.tokenizer, repeats=latency_repeats)
    before.update(t_before)
    after.update(t_after)
    del original
    report = {"source": str(model), "out": str(out), "steps": steps, "before": before, "after": after,
              "options": {"layers": layers, "strategy": strategy, "heads": heads, "ffn": ffn,
                          "importance": importance, "sparsity": sparsity, "scope": scope,
                          "task": task, "split": split if task else None, "limit": limit}}
    if sparsity:
        report["note"] = MAGNITUDE_NOTE
    files = {"prune_report.json": json.dumps(report, indent=2) + "\n",
             MARKER: json.dumps(new_marker("prune"), indent=2) + "\n"}
    if info_dir is not None:
        files[MODEL_INFO] = (info_dir / MODEL_INFO).read_text()
    save_atomic(net, student.tokenizer, out, source=Path(str(model)), extra_files=files)
    for line in table(before, after):
        echo(line)
    if sparsity:
        echo(f"note: {MAGNITUDE_NOTE} (compare the size and ms rows above)")
    echo(f"wrote {out} and {out / 'prune_report.json'}")
    return report
