"""One speed-up on and off within one training run of the throughput benchmark's T5: median
seconds per step of each.

This machine's speed drifts by up to 2x over minutes, so two separate runs compare the machine
as much as the code. Here one run switches the speed-up every `--every` steps (the first step
after a switch is not counted) and compares the medians of the interleaved steps. The default
configuration otherwise (bench/train_throughput.py is the benchmark of record).

    python bench/step_ab.py --field fused_gelu       # GELUTanh <-> transformers' NewGELU modules
    python bench/step_ab.py --field fast_dropout     # FastDropout <-> torch Dropout modules
    python bench/step_ab.py --field fused_loss       # fused output layer + loss <-> unfused
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import train_throughput as tt  # bench/ is on sys.path when run as a script

FIELDS = ("fused_gelu", "fast_dropout", "fused_loss", "target_logits_only")


def switch(trainer, field: str):
    """(on, off): callables that turn `field` on and off in the built trainer's model."""
    import torch
    from transformers.activations import GELUTanh, NewGELUActivation

    from stepdistill.training.speedups import FastDropout

    if field in ("fused_loss", "target_logits_only"):
        return (lambda: setattr(trainer, field, True)), (lambda: setattr(trainer, field, False))
    fast, slow = {"fused_gelu": (GELUTanh, NewGELUActivation), "fast_dropout": (FastDropout, torch.nn.Dropout)}[field]
    slots = [(parent, name, child) for parent in trainer.model.modules()
             for name, child in parent.named_children() if isinstance(child, (fast, slow))]
    if not slots:
        raise SystemExit(f"the model has no module that {field} swaps")

    def make(cls):
        def apply():
            for parent, name, child in slots:
                setattr(parent, name, cls(child.p) if cls in (FastDropout, torch.nn.Dropout) else cls())
        return apply

    return make(fast), make(slow)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--field", required=True, choices=FIELDS)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--every", type=int, default=4, help="steps between switches")
    p.add_argument("--work", default="runs/bench-train-throughput")
    args = p.parse_args()
    from transformers import TrainerCallback

    trainer = tt.default_trainer(Path(args.work), args.steps, "step-ab", logging_steps=50)
    on, off = switch(trainer, args.field)
    times: dict[bool, list[float]] = {True: [], False: []}
    state = {"on": True, "t0": 0.0}

    class Alternate(TrainerCallback):
        def on_step_begin(self, a, s, c, **k):
            state["on"] = (s.global_step // args.every) % 2 == 0
            (on if state["on"] else off)()
            state["t0"] = time.perf_counter()

        def on_step_end(self, a, s, c, **k):
            if s.global_step > 2 * args.every and s.global_step % args.every != 1:  # warm, not just switched
                times[state["on"]].append(time.perf_counter() - state["t0"])

    trainer.add_callback(Alternate())
    trainer.train()
    t_on, t_off = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.field}: on {t_on:.3f} s/step, off {t_off:.3f} s/step, on/off {t_on / t_off:.3f} "
          f"(medians of {len(times[True])} and {len(times[False])} interleaved steps)")


if __name__ == "__main__":
    main()
