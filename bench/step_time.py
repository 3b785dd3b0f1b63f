"""Seconds and page faults per training step of the throughput benchmark's T5, steady state.

A quick look at one configuration (bench/train_throughput.py is the benchmark): the default
step-by-step step, or the default with TrainingConfig fields changed, for `--steps` steps on
the benchmark's SVAMP data; steps 5 to the last are timed, and minor page faults
(ru_minflt) counted, since the kernel zeroing freshly mapped pages is a real share of a CPU step.

    python bench/step_time.py                                   # the default
    python bench/step_time.py --set fused_loss=false            # one speed-up off
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import yaml

import train_throughput as tt  # bench/ is on sys.path when run as a script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a TrainingConfig field")
    p.add_argument("--work", default="runs/bench-train-throughput")
    args = p.parse_args()
    from transformers import TrainerCallback

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    trainer = tt.default_trainer(Path(args.work), args.steps, "step-time", **overrides)
    marks = []

    class Mark(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    trainer.add_callback(Mark())
    trainer.train()
    (t0, f0), (t1, f1) = marks[4], marks[-1]
    n = len(marks) - 5
    print(f"{overrides or 'default'}: {(t1 - t0) / n:.3f} s/step, {(f1 - f0) / n:.0f} minor page faults/step "
          f"(steps 5-{len(marks)})")


if __name__ == "__main__":
    main()
