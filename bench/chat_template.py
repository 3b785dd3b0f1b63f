"""Does the student's chat template help? The quickstart student with and without it.

The quickstart's student (SmolLM2-135M-Instruct's first 4 layers, whose tokenizer carries the
instruct chat template) is trained on the quickstart task's gold labels twice per seed, with
`student.chat_template: off` (the prompt is `predict: ` + the problem) and `on` (the same text as
the user turn of SmolLM2's template, the answer as the assistant turn), for the quickstart's
steps, then scored on the test split by greedy decoding. The comparison's unit is the test item
(report.compare: sign-flip permutation over items, seeds averaged within each item).

    python bench/chat_template.py                 # 3 seeds, about 10 minutes on 2 CPU cores
    python bench/chat_template.py --steps 600 --out bench/results/chat_template_600   # 3x the steps
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from common import write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="training steps (default: the quickstart's, epochs x problems / batch)")
    p.add_argument("--work", default="runs/bench-chat-template")
    p.add_argument("--out", default=str(HERE / "results" / "chat_template"))
    args = p.parse_args()

    from stepdistill import api
    from stepdistill.files import read_jsonl
    from stepdistill.quickstart import SIZES, cut_student
    from stepdistill.report import compare, verdict_of
    from stepdistill.students import smollm2_gguf

    s = SIZES["default"]
    student = cut_student(smollm2_gguf(), s["student_layers"])
    steps = args.steps or s["epochs"] * s["n_train"] // s["batch_size"]
    work = Path(args.work) / f"steps-{steps}"
    scored, rows = {}, []
    for template in ("off", "on"):
        per_seed = {}
        for seed in args.seeds:
            run = work / f"template-{template}-s{seed}"
            if not (run / "metrics.json").is_file():
                api.train({"task": {"name": "quickstart"}, "student": {"model": str(student), "chat_template": template},
                           "limit": s["n_train"], "val_split": "valid", "method": {"name": "standard"},
                           "training": {"max_steps": steps, "batch_size": s["batch_size"], "learning_rate": s["lr"],
                                        "max_input_length": 128, "max_target_length": 96, "val_size": s["val_size"],
                                        "bf16": True, "seed": seed}}, run, overwrite=run.exists())
                shutil.rmtree(run / "checkpoints", ignore_errors=True)  # resume points; model/ is what is scored
            e = run / "eval-test"
            if not (e / "metrics.json").is_file():
                api.evaluate({"task": {"name": "quickstart"}, "model": str(run), "split": "test"}, e, overwrite=True)
            per_seed[seed] = {r["id"]: bool(r["correct"]) for r in read_jsonl(e / "predictions.jsonl")}
        scored[template] = per_seed
        accs = [100 * sum(c.values()) / len(c) for c in per_seed.values()]
        rows.append({"chat_template": template, "accuracy_per_seed": [round(a, 1) for a in accs],
                     "accuracy": round(sum(accs) / len(accs), 1)})
    c = compare(scored["on"], scored["off"])
    result = {"benchmark": "chat_template", "command": "python " + " ".join(sys.argv), "steps": steps,
              "student": str(student), "seeds": args.seeds, "rows": rows,
              "on_vs_off": {k: c[k] for k in ("diff", "low", "high", "p", "seeds", "items")},
              "verdict": verdict_of({**c, "significant": c["p"] < 0.05, "within_noise": c["p"] >= 0.05}, ("on", "off"))}
    lines = ["# The student's chat template on the quickstart task", "",
             f"Command: `{result['command']}`. Student: SmolLM2-135M-Instruct's first {s['student_layers']} layers "
             f"(the quickstart's), standard fine-tuning on {s['n_train']} gold labels, {steps} steps of "
             f"{s['batch_size']}, bf16; test: the quickstart test split ({c['items']} problems), greedy; "
             f"{os.cpu_count()} CPUs.", "",
             "| student.chat_template | test accuracy (mean of seeds) | per seed |", "|---|---:|---|"]
    lines += [f"| {r['chat_template']} | {r['accuracy']:.1f}% | {', '.join(map(str, r['accuracy_per_seed']))} |"
              for r in rows]
    lines += ["", f"on minus off: {100 * c['diff']:+.1f} points (95% interval {100 * c['low']:+.1f} to "
              f"{100 * c['high']:+.1f}), p {c['p']:.2g} ({c['seeds']} seeds x {c['items']} items, the item the unit): "
              f"{result['verdict']}."]
    write_results(result, Path(args.out), lines)


if __name__ == "__main__":
    main()
