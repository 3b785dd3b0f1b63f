"""Validation scored as the test scores the saved model (`training.val_as_test: true`) against
validation on the training weights themselves (the default), within one run.

At every evaluation of one real sweep cell both are computed on the same weights, in alternating
order (the machine's speed drifts over minutes). The table gives each evaluation's seconds and
accuracy for both, and the step model selection picks with each.

  as test:   a copy with LoRA merged, in bf16 where training runs in bf16, 32 inputs to a batch
             (what `stepdistill eval` does with the saved model)
  training:  the float32 training weights, LoRA unmerged, at the training batch size

    python bench/validation.py          # SVAMP cell of configs/paper/svamp_cpu_lora30.yaml (~15 min; --steps 100: ~6 min)
    python bench/validation.py --config configs/paper/cqa_cpu.yaml --method standard --steps 160
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml
from common import write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/paper/svamp_cpu_lora30.yaml", help="a sweep config (run from the repository root)")
    p.add_argument("--method", default="distill", help="the tag (or name) of one of the sweep's methods")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench-validation")
    p.add_argument("--out", default=str(HERE / "results" / "validation"))
    args = p.parse_args()

    from stepdistill import api
    from stepdistill.config import SweepRun, coerce
    from stepdistill.sweep import _train_config, cells
    from stepdistill.training.trainer import StepDistillTrainer

    sweep = coerce(SweepRun, yaml.safe_load(Path(args.config).read_text()))
    grid = [c for c in cells(sweep) if c["method_tag"] == args.method and c["seed"] == sweep.seeds[0]]
    if not grid:
        raise SystemExit(f"no method {args.method!r} in {args.config}")
    cfg = _train_config(sweep, grid[0])
    cfg["training"].update(max_steps=args.steps, seed=args.seed, val_as_test=True)

    rows = []
    real_evaluate = StepDistillTrainer.evaluate

    def both(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        examples = list(eval_dataset if eval_dataset is not None else self.eval_dataset)
        row = {"step": self.state.global_step}
        order = ("as_test", "training") if len(rows) % 2 == 0 else ("training", "as_test")
        kept = self.val_as_test, self.args.per_device_eval_batch_size
        for mode in order:
            self.val_as_test = mode == "as_test"
            self.args.per_device_eval_batch_size = kept[1] if self.val_as_test else self.args.per_device_train_batch_size
            t0 = time.perf_counter()
            acc = self.validation_accuracy(examples)
            row[mode] = {"seconds": round(time.perf_counter() - t0, 2), "accuracy": acc}
        self.val_as_test, self.args.per_device_eval_batch_size = kept
        rows.append(row)
        print(row, flush=True)
        return real_evaluate(self, eval_dataset, ignore_keys, metric_key_prefix)  # what selection uses

    StepDistillTrainer.evaluate = both
    try:
        api.train(cfg, Path(args.work) / f"{args.method}-s{args.seed}", overwrite=True)
    finally:
        StepDistillTrainer.evaluate = real_evaluate

    def best(mode):  # model selection: the first step with the highest accuracy (Trainer's rule)
        return max(rows, key=lambda r: (r[mode]["accuracy"], -r["step"]))["step"]

    t_test = sum(r["as_test"]["seconds"] for r in rows)
    t_train = sum(r["training"]["seconds"] for r in rows)
    n = sweep.training.val_size or "all"
    lines = ["# Validation scored as the test scores the saved model, against the training weights",
             "", f"Command: `python bench/validation.py --config {args.config} --method {args.method} --steps "
             f"{args.steps}`. One training run (seed {args.seed}); at each evaluation both ways score the same "
             f"weights on the same {n} validation items, in alternating order.", "",
             "| step | as test: s | training weights: s | speed-up | as test: accuracy | training weights: accuracy |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["as_test"], r["training"]
        lines.append(f"| {r['step']} | {a['seconds']:.1f} | {b['seconds']:.1f} | {b['seconds'] / a['seconds']:.2f}x "
                     f"| {a['accuracy']:.3f} | {b['accuracy']:.3f} |")
    lines += [f"| all | {t_test:.1f} | {t_train:.1f} | {t_train / t_test:.2f}x | | |", "",
              f"Model selection picks step {best('as_test')} scoring as the test, step {best('training')} scoring "
              "the training weights."]
    write_results({"config": args.config, "method": args.method, "steps": args.steps, "seed": args.seed,
                   "evaluations": rows, "best_step": {"as_test": best("as_test"), "training": best("training")}},
                  Path(args.out), lines)


if __name__ == "__main__":
    main()
