"""Seconds and page faults per training step of the throughput benchmark's T5, steady state.

A quick look at one configuration (bench/train_throughput.py is the benchmark): the default
step-by-step step, or the default with TrainingConfig fields changed, for `--steps` steps on
the benchmark's SVAMP data; steps 5 to the last are timed, and minor page faults
(ru_minflt) counted, since the kernel zeroing freshly mapped pages is a real share of a CPU step.

    python bench/step_time.py                                   # the default
    python bench/step_time.py --set fused_loss=false            # one speed-up off
    python bench/step_time.py --profile     # and where the time goes: torch profiler's top operations
                                            # over the timed steps, the matmul FLOPs the steps execute
                                            # against the useful ones, and the step's matmul shapes
                                            # timed alone against a 2048^3 probe
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

import train_throughput as tt  # bench/ is on sys.path when run as a script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a TrainingConfig field")
    p.add_argument("--work", default="runs/bench-train-throughput")
    p.add_argument("--profile", action="store_true", help="where the time goes (see above)")
    args = p.parse_args()
    from transformers import TrainerCallback

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    trainer = tt.default_trainer(Path(args.work), args.steps, "step-time", **overrides)
    marks = []

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else None

    class Mark(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
            if prof is not None and len(marks) == 5:
                prof.start()

    trainer.add_callback(Mark())
    trainer.train()
    if prof is not None:
        prof.stop()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    (t0, f0), (t1, f1) = marks[4], marks[-1]
    n = len(marks) - 5
    print(f"{overrides or 'default'}: {(t1 - t0) / n:.3f} s/step, {(f1 - f0) / n:.0f} minor page faults/step "
          f"(steps 5-{len(marks)}{', under the profiler' if prof else ''})")
    if args.profile:
        executed(args, overrides)
        shapes()


def executed(args, overrides: dict) -> None:
    """The matmul FLOPs a fresh run of the same steps executes (padding included; FlopCounterMode
    around each training step, in a run of its own so that its overhead is not in the timing),
    against the useful FLOPs of the same examples."""
    trainer = tt.default_trainer(Path(args.work), args.steps, "step-flops", **overrides)
    step, seen = trainer.training_step, []

    def counted(*a, **k):
        with FlopCounterMode(display=False) as c:
            out = step(*a, **k)
        seen.append(c.get_total_flops())
        return out

    trainer.training_step = counted
    trainer.train()
    useful = tt.Setup(Path(args.work), args.steps * tt.BATCH).useful_flops()  # the examples those steps trained on
    print(f"matmul FLOPs executed: {sum(seen) / 1e9:.1f} G in {len(seen)} steps; useful (3 x the paper step's "
          f"forward on real tokens): {useful / 1e9:.1f} G; executed / useful {sum(seen) / useful:.2f}")


def shapes(tokens: int = 1200) -> None:
    """The step's matmul shapes timed alone (GFLOP/s, best of 10), beside a 2048^3 probe: the
    vocabulary projection's forward block and its two backward products, and the body's layers
    (about 1,200 token rows a step: 8 examples, two tasks, encoder and decoder)."""
    from common import matmul_peak, matmul_rate

    def rate(*shape, **kw) -> float:  # GFLOP/s
        return matmul_rate(*shape, **kw) / 1e9

    vocab, d, ff, targets = 49152, 256, 1024, 600  # SmolLM2's vocabulary; about 600 target tokens a step
    print(f"matmul peak (2048^3): {matmul_peak('float32') / 1e9:.0f} GFLOP/s; the step's shapes alone: "
          f"vocabulary forward block {rate(4864, d, targets):.0f}, its input gradient "
          f"{rate(targets, vocab, d, a_transposed=True):.0f}, its weight gradient {rate(vocab, targets, d):.0f}; body "
          f"({tokens} tokens) {d}->{ff} {rate(tokens, d, ff):.0f}, {ff}->{d} {rate(tokens, ff, d):.0f}, "
          f"{d}->{d} {rate(tokens, d, d):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
