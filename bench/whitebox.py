"""White-box distillation, offline: SmolLM2-135M-Instruct teaches a student pruned from itself.

One table per task (quickstart, and SVAMP from ../shared/data/sbs with PaLM rationales), same
seed, same optimizer steps, same data for every trained row:

  teacher, few-shot CoT          SmolLM2 answering with chain-of-thought (llama.cpp when installed)
  teacher, fine-tuned            SmolLM2 fine-tuned on gold labels: the soft-label KD teacher
  student, pruned, untrained     every few layers of SmolLM2 kept (pruning.cut_layers, "spread")
  student, fine-tuned            standard: gold labels
  + soft-label KD                standard + forward KL (T = 2, weight 0.5) to the fine-tuned teacher
  + step-by-step                 gold labels + teacher rationales, alpha 0.5
  + both                         step-by-step + soft-label KD
  co-distillation                the pruned student and the pretrained teacher trained together

Columns: test accuracy, parameters, size on disk and ms per prediction (batch 16, greedy).

    python bench/whitebox.py                            # both tasks (about 1-2 hours on 2 CPU cores)
    python bench/whitebox.py --tasks quickstart --steps 60   # a quicker look
    python bench/whitebox.py --kd --seeds 0 1 2         # the KD table (below; about an hour)

The KD table (`--kd`, quickstart task): the same pruned student, steps, data and seeds for every
row, the test item the unit of each paired test (report.compare: a sign-flip permutation over
items, seeds averaged within each item), wall time per row:

  standard                       gold labels, no teacher (the reference)
  off-policy KD                  on-policy with lmbda 0: teacher-forced generalised JSD (beta 0.5)
  on-policy KD, lmbda 0.5 / 1.0  the same loss on the student's own samples, half / all batches
  step-by-step + off-policy KD   two tasks, alpha 0.5, each with the teacher-forced JSD
  step-by-step + on-policy KD    the same, lmbda 0.5: the student also writes its own rationale
  top-20 cache KD                forward KL over the local teacher's top 20 (kd.cache)
  server-logprob KD              the same teacher as GGUF behind llama.cpp's server (kd.base_url)
  cross-tokenizer KD (ULD)       gemma-3-270m (262k tokens) fine-tuned on the labels, as teacher
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import has_llama_cpp, write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent
SHARED = HERE.parent.parent / "shared" / "data" / "sbs"

TASKS = {
    # train/val/test sources; the quickstart's teacher rationales come from SmolLM2 itself
    "quickstart": {"task": {"name": "quickstart"}, "val_split": "valid", "steps": 150, "test_limit": None},
    "svamp": {"task": {"name": "svamp", "path": str(SHARED)}, "val_split": None, "steps": 270, "test_limit": None},
}


def folder_mb(path: Path) -> float:
    from stepdistill.pruning import folder_bytes

    return round(folder_bytes(path) / 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--layers", type=int, default=8, help="decoder layers the student keeps (of 30)")
    p.add_argument("--steps", type=int, help="optimizer steps per trained row (default: per task)")
    p.add_argument("--work", default="runs/bench-whitebox", help="where the runs go (reused when present)")
    p.add_argument("--out", default=str(HERE / "results" / "whitebox"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--kd", action="store_true", help="the KD table (quickstart task) instead of the main tables")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--kd: training seeds per row")
    args = p.parse_args()
    if args.kd:
        import whitebox_kd  # bench/whitebox_kd.py

        return whitebox_kd.main(args)

    from stepdistill import api
    from stepdistill.evaluation import load_trained
    from stepdistill.students import model_folder
    from stepdistill.pruning import cut_layers
    from stepdistill.students import _gguf_cache_dir, count_parameters, load_pretrained, smollm2_gguf
    from stepdistill.teachers import TEACHERS

    os.environ.setdefault("STEPDISTILL_HOME", str(Path(args.work) / "home"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = str(smollm2_gguf())
    cot_kind = "llamacpp" if has_llama_cpp() and "llamacpp" in TEACHERS else "hf"
    student_base = work / f"student-{args.layers}l"
    if not student_base.exists():
        cut_layers(gguf, args.layers, student_base, strategy="spread")
    results = {"benchmark": "whitebox", "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
               "command": "python " + " ".join(sys.argv), "student_layers": args.layers, "tasks": {}}

    for name in args.tasks:
        spec = TASKS[name]
        steps = args.steps or spec["steps"]
        task = spec["task"]
        d = work / name
        d.mkdir(exist_ok=True)
        rows = []
        t_task = time.time()

        def annotate(split, teacher, out, **extra):
            if not (out / "summary.json").is_file():
                api.annotate({"task": task, "split": split, "teacher": teacher, **extra}, out, overwrite=True)
            return json.loads((out / "summary.json").read_text())

        # teacher, few-shot CoT, on test (and its rationales on train, for the quickstart)
        cot = {"kind": cot_kind, "model": gguf, "sampling": {"max_new_tokens": 96}}
        s = annotate("test", cot, d / "teacher-cot-test", verify={"against": "none"})
        teacher_params = count_parameters(load_pretrained(gguf, kind="causal").model)[1]
        rows.append(row(f"teacher SmolLM2-135M, few-shot CoT ({cot_kind})", s["teacher_accuracy"], teacher_params,
                        folder_mb(_gguf_cache_dir(Path(gguf))), s["ms_per_example"]))
        if name == "quickstart":
            annotate("train", cot, d / "rationales-train")  # verified against gold (the default)
            rationales = d / "rationales-train"
        else:
            annotate("train", {"kind": "paper"}, d / "rationales-train", verify={"against": "none"})  # the paper: all PaLM rationales
            rationales = d / "rationales-train"

        def train(tag, model, method, *, lr=3e-4):
            out = d / tag
            if not (out / "metrics.json").is_file():  # an interrupted row resumes from its last checkpoint
                started = out.is_dir() and (out / "config.yaml").is_file()
                api.train({"task": task, "student": {"model": str(model)}, "method": method,
                           "annotations": str(rationales), "val_split": spec["val_split"],
                           "training": {"max_steps": steps, "batch_size": 8, "learning_rate": lr, "bf16": True,
                                        "seed": args.seed, "val_size": 40, "eval_steps": max(steps // 3, 1),
                                        "max_target_length": 128, "max_input_length": 256}},
                          out, resume=started)
            return out

        def evaluate(tag, run):
            out = d / f"{tag}-test"
            if not (out / "metrics.json").is_file():
                api.evaluate({"task": task, "model": str(run), "split": "test", "limit": spec["test_limit"],
                              "max_new_tokens": 24}, out, overwrite=True)
            return json.loads((out / "metrics.json").read_text())

        def add(label, tag, run):
            m = evaluate(tag, run)
            student, _ = load_trained(run)
            rows.append(row(label, m["accuracy"], count_parameters(student.model)[1], folder_mb(model_folder(run)),
                            m["ms_per_example"], path=str(run)))

        ft_teacher = train("teacher-ft", gguf, {"name": "standard"}, lr=1e-4)
        add("teacher, fine-tuned on labels (the KD teacher)", "teacher-ft", ft_teacher)
        rows.append(untrained_row(student_base, task, d, args))
        kd = {"teacher": str(ft_teacher), "kind": "forward_kl", "temperature": 2.0, "weight": 0.5}
        add(f"student {args.layers}/30 layers, fine-tuned on labels", "standard",
            train("standard", student_base, {"name": "standard"}))
        add("  + soft-label KD", "standard-kd", train("standard-kd", student_base, {"name": "standard", "kd": kd}))
        add("  + step-by-step", "sbs", train("sbs", student_base, {"name": "step-by-step", "alpha": 0.5}))
        add("  + both", "sbs-kd", train("sbs-kd", student_base, {"name": "step-by-step", "alpha": 0.5, "kd": kd}))
        co = train("co-distill", student_base, {"name": "co-distill", "kd": {
            "teacher": gguf, "kind": "forward_kl", "temperature": 2.0, "weight": 0.5, "warmup_steps": steps // 5}})
        add("co-distillation (student)", "co-distill", co)
        add("co-distillation (teacher)", "co-distill-teacher", co / "teacher_model")
        retime(rows, task)
        results["tasks"][name] = {"steps": steps, "rows": rows, "minutes": round((time.time() - t_task) / 60, 1)}
        write(results, Path(args.out))
    write(results, Path(args.out))



def untrained_row(student_base: Path, task: dict, d: Path, args) -> dict:
    """The pruned student before any training, scored with the raw input (no label prefix)."""
    from stepdistill.evaluation import predict
    from stepdistill.methods.formatting import Format
    from stepdistill.students import count_parameters, load_pretrained
    from stepdistill.tasks import get_task, load_examples

    t = get_task(task["name"])
    exs = load_examples(t, "test", task.get("path"))
    s = load_pretrained(str(student_base), kind="causal")
    s.fmt = Format(kind="causal", max_input_length=256, max_target_length=128)
    t0 = time.perf_counter()
    preds = predict(s, [e.input for e in exs], prefix="predict: ", max_new_tokens=24)
    ms = 1000 * (time.perf_counter() - t0) / len(exs)
    return row(f"student {args.layers}/30 layers, pruned, untrained", t.accuracy(preds, exs),
               count_parameters(s.model)[1], folder_mb(student_base), round(ms, 1))


def row(label, accuracy, params, mb, ms, path=None) -> dict:
    return {"model": label, "accuracy": accuracy, "params": params, "size_mb": mb, "ms_per_prediction": ms,
            "path": path}


def retime(rows: list[dict], task: dict, repeats: int = 3) -> None:
    """ms/prediction of every trained model again, one after another in one quiet pass (the
    evaluations' own timings ran beside training jobs): the same 32 test inputs, batch 16, the
    label task, best of `repeats`. The few-shot CoT teacher keeps its annotation timing."""
    from stepdistill.evaluation import load_trained, predict
    from stepdistill.tasks import get_task, load_examples

    inputs = [e.input for e in load_examples(get_task(task["name"]), "test", task.get("path"))[:32]]
    for r in rows:
        if not r.get("path"):
            continue
        student, info = load_trained(r["path"])
        predict(student, inputs[:4], prefix=info["label_prefix"], max_new_tokens=24)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            predict(student, inputs, prefix=info["label_prefix"], batch_size=16, max_new_tokens=24)
            best = min(best, (time.perf_counter() - t0) / len(inputs))
        r["ms_per_prediction_eval"] = r["ms_per_prediction"]
        r["ms_per_prediction"] = round(1000 * best, 1)


def write(results: dict, out: Path) -> None:
    lines = ["# White-box distillation: SmolLM2-135M-Instruct teaching a student pruned from itself", "",
             f"{results['machine']}. Command: `{results['command']}`", ""]
    for name, r in results["tasks"].items():
        lines += [f"## {name} ({r['steps']} optimizer steps per trained row, batch 8, bf16; {r['minutes']} min in the last pass, finished rows reused)", "",
                  "| model | test accuracy | parameters | size on disk (MB) | ms/prediction |", "|---|---:|---:|---:|---:|"]
        for x in r["rows"]:
            acc = "-" if x["accuracy"] is None else f"{100 * x['accuracy']:.1f}%"
            lines.append(f"| {x['model']} | {acc} | {x['params'] / 1e6:.1f}M | {x['size_mb'] or '-'} | "
                         f"{x['ms_per_prediction'] or '-'} |")
        lines.append("")
    write_results(results, out, lines)


if __name__ == "__main__":
    main()
