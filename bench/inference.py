"""Inference: the teacher thinking aloud against the distilled student answering.

The same quickstart test problems for every row:

  teacher, few-shot CoT        SmolLM2-135M-Instruct writing its chain of thought and answer
                               (transformers; and llama.cpp when installed), up to 72 new tokens
                               as in the quickstart
  student, fixed limit          the quickstart student (SmolLM2's first 4 layers, fine-tuned)
                               predicting the label only, greedy, max_new_tokens 64 (the old default)
  student, task-aware limit    the same, with evaluation's limit from the longest trained label
  ..., bf16 weights            the same, weights in bfloat16 (evaluation's --dtype bfloat16)
  ..., label vocabulary        the same, decoding within the tokens of the trained labels
                               (evaluation's --label-decoding vocab): the output layer is cut
                               from 49,152 rows to those few

Columns: ms per prediction at batch 1 and at batch 32, predictions/s at batch 32, peak memory
(resident, above the process before the model was loaded: weights included), parameters, and
accuracy on the problems run. Each row runs in its own process (clean memory figures).

    python bench/inference.py                                   # about 5 minutes on 2 CPU cores
    python bench/inference.py --student runs/quickstart/student-standard
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import has_llama_cpp, write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent
ROWS = ["teacher, few-shot CoT (transformers)", "teacher, few-shot CoT (llama.cpp)",
        "student, fixed limit (64 tokens)", "student, task-aware limit", "student, task-aware limit, bf16 weights",
        "student, task-aware limit, bf16 weights, label vocabulary"]
TEACHER_TOKENS = 72


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="runs/quickstart/student-standard",
                   help="a trained quickstart student (make quickstart writes runs/quickstart/student-*)")
    p.add_argument("--batch1", type=int, default=8, help="problems timed one at a time (teacher rows are slow)")
    p.add_argument("--batch32", type=int, default=32, help="problems timed in batches of 32")
    p.add_argument("--out", default=str(HERE / "results" / "inference"))
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = p.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return
    if not (Path(args.student) / "model").is_dir() and not (Path(args.student) / "config.json").is_file():
        sys.exit(f"{args.student}: no trained student here: run `make quickstart` first, or pass --student")
    rows = []
    for name in ROWS:
        if "llama.cpp" in name and not has_llama_cpp():
            print(f"skipped {name}: llama-cpp-python is not installed (make setup-llamacpp)")
            continue
        cmd = [sys.executable, __file__, "--row", name, "--student", args.student, "--batch1", str(args.batch1),
               "--batch32", str(args.batch32)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{name}: {r}", flush=True)
        rows.append(r)
    teacher = rows[0]
    for r in rows:
        r["speedup_b1"] = round(teacher["ms_b1"] / r["ms_b1"], 1)
        r["speedup_b32"] = round(teacher["ms_b32"] / r["ms_b32"], 1) if r["ms_b32"] and teacher["ms_b32"] else None
    result = {"benchmark": "inference", "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
              "command": "python " + " ".join(sys.argv), "student": args.student, "task": "quickstart (test split)",
              "batch1_problems": args.batch1, "batch32_problems": args.batch32, "rows": rows}
    write(result, Path(args.out))



class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.mb = round((self.peak - self.base) / 1e6, 1)


def run_row(name: str, args) -> dict:
    import torch  # noqa: F401  (imported before the memory baseline: the runtime is not the model)

    from stepdistill.tasks import get_task, load_examples

    task = get_task("quickstart")
    exs = load_examples(task, "test", None)[: max(args.batch1, args.batch32)]
    with PeakMemory() as mem:
        if name.startswith("teacher"):
            predict, params, limit = _teacher(name, task)
        else:
            predict, params, limit = _student(name, args.student)
        predict(exs[:1], 1)  # warm-up
        t0 = time.perf_counter()
        preds_b1 = predict(exs[: args.batch1], 1)
        ms_b1 = 1000 * (time.perf_counter() - t0) / args.batch1
        ms_b32 = None
        if "llama.cpp" not in name:  # llama.cpp answers one prompt at a time
            t0 = time.perf_counter()
            preds = predict(exs[: args.batch32], 32)
            ms_b32 = 1000 * (time.perf_counter() - t0) / args.batch32
        else:
            preds = preds_b1
    n = len(preds)
    params = params()
    return {"row": name, "ms_b1": round(ms_b1, 1), "ms_b32": ms_b32 and round(ms_b32, 1),
            "predictions_per_s_b32": ms_b32 and round(1000 / ms_b32, 1), "peak_mb": mem.mb, "params": params,
            "max_new_tokens": limit, "accuracy": task.accuracy(preds, exs[:n]), "accuracy_n": n}


def _teacher(name: str, task):
    from stepdistill.config import TeacherConfig
    from stepdistill.students import count_parameters, load_pretrained, smollm2_gguf
    from stepdistill.teachers import Request, make_teacher

    gguf = str(smollm2_gguf())
    kind = "llamacpp" if "llama.cpp" in name else "hf"
    t = make_teacher(TeacherConfig(kind=kind, model=gguf, sampling={"max_new_tokens": TEACHER_TOKENS}), task, "test",
                     None)

    def predict(exs, batch):
        t.cfg = t.cfg.model_copy(update={"batch_size": batch})  # one model, either batch size
        out = {id(r.example): c.text for r, c in t.generate([Request(e, t.prompt(task, e), 0) for e in exs])}
        return [task.parse(out[id(e)], e).label for e in exs]

    # counted outside the memory measurement: this loads the model a second time
    return predict, lambda: count_parameters(load_pretrained(gguf, kind="causal").model)[1], TEACHER_TOKENS


def _student(name: str, path: str):
    from stepdistill.evaluation import label_token_limit, load_trained, predict as generate
    from stepdistill.students import count_parameters

    student, info = load_trained(path, dtype="bfloat16" if "bf16" in name else "float32")
    if "max_label_tokens" not in info or "label_vocab" not in info:
        # a model trained before they were recorded: what training records, from the same labels
        from stepdistill.evaluation import label_vocab
        from stepdistill.methods.formatting import encode_target
        from stepdistill.tasks import get_task, load_examples

        targets = [encode_target(student.tokenizer, student.fmt, e.label)
                   for e in load_examples(get_task("quickstart"), "train", None)]
        info["max_label_tokens"] = max(len(t) for t in targets)
        info["label_vocab"] = label_vocab(targets, student.tokenizer.eos_token_id)
    limit = 64 if "fixed" in name else label_token_limit(info)
    vocab = info["label_vocab"] if "label vocabulary" in name else None

    def predict(exs, batch):
        return generate(student, [e.input for e in exs], prefix=info["label_prefix"], batch_size=batch,
                        max_new_tokens=limit, vocab=vocab)

    return predict, lambda: count_parameters(student.model)[1], limit


def write(result: dict, out: Path) -> None:
    lines = ["# Inference: the teacher's chain of thought vs the distilled student's label", "",
             f"{result['machine']}. Command: `{result['command']}`", "",
             f"Task: {result['task']}; batch 1 timed on {result['batch1_problems']} problems, batch 32 on "
             f"{result['batch32_problems']}; greedy decoding. Speed-up: the transformers teacher's ms/prediction "
             "divided by the row's.", "",
             "| model | params | max new tokens | ms/prediction, batch 1 | ms/prediction, batch 32 | predictions/s, "
             "batch 32 | speed-up b1 | speed-up b32 | peak memory (MB) | accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}% of {r['accuracy_n']}"
        lines.append(f"| {r['row']} | {r['params'] / 1e6:.1f}M | {r['max_new_tokens']} | {r['ms_b1']} | "
                     f"{r['ms_b32'] or '-'} | {r['predictions_per_s_b32'] or '-'} | {r['speedup_b1']}x | "
                     f"{str(r['speedup_b32']) + 'x' if r['speedup_b32'] else '-'} | {r['peak_mb']} | {acc} |")
    write_results(result, out, lines)


if __name__ == "__main__":
    main()
