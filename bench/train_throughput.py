"""Step-by-step training throughput: the paper's two-pass step against stepdistill's.

One small T5 (d_model 256, d_ff 1024, 4+4 layers, 4 heads, random init with a fixed seed, the
SmolLM2 tokenizer), SVAMP train with the paper's PaLM rationales (../shared/data/sbs), batch 8,
alpha 0.5, AdamW at 5e-4, the same number of optimizer steps for every row:

  reference                 the paper's TaskPrefixTrainer, re-implemented here: per batch one
                            forward for the label task and one for the rationale task, each padded
                            by DataCollatorForSeq2Seq, the models' own mean losses, float32
  stepdistill, all off      stepdistill's Trainer with every speed-up below turned off
  + <one speed-up>          that speed-up alone: bf16 autocast, length-grouped batches, both
                            tasks in one forward pass, the output layer at target tokens only
                            (and that layer fused with the cross-entropy, training.fused_loss),
                            the encoder once per input (task marker on the decoder side), dropout
                            masks from 16-bit draws (training.fast_dropout), T5's tanh-GELU as
                            torch's fused kernel (training.fused_gelu)
  stepdistill default       TrainingConfig's defaults (on this CPU: all of the above but the
                            decoder marker, which changes the formulation and is opt-in)

Rows run in one process, alternating, `--repeats` times; examples/s is the median. Useful FLOP/s:
3 x the forward matmul FLOPs of the paper's step on real tokens only (each example's two tasks
run one at a time, unpadded, under torch's FlopCounterMode: encoder, decoder, cross-attention and
the vocabulary projection at target positions), over the row's seconds; the same work for every
row, so the rows differ by their seconds alone. The peak is measured in the same run by a matmul
probe (2048^3, float32 and bfloat16) before every repeat and at the end, the best kept; each row's
fraction is of the peak of the precision its matmuls run in. Peak memory is measured per row in a
separate short process (resident memory sampled every 5 ms, above the process before). Quality at equal examples: after the
same steps, every row's model is scored by one float32 function on held-out SVAMP test items: the
reference's loss (alpha * label + (1 - alpha) * rationale) and label accuracy (greedy).

    python bench/train_throughput.py                 # about 30 minutes on 2 CPU cores
    python bench/train_throughput.py --train-examples 80 --repeats 1 --held-out 32   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import MatmulPeaks, PeakMemory, selected_rows, write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent
SHARED = HERE.parent.parent / "shared" / "data" / "sbs"
ALPHA, BATCH, LR, SEED = 0.5, 8, 5e-4, 0

PLAIN = {"bf16": False, "group_by_length": False, "fuse_tasks": False, "target_logits_only": False,
         "fused_loss": False, "fast_dropout": False, "fused_gelu": False}
ROWS = {  # name: (TrainingConfig overrides, method overrides); None: the reference
    "reference (paper's two-pass step)": None,
    "stepdistill, all speed-ups off": (PLAIN, {}),
    "+ bf16 autocast": ({**PLAIN, "bf16": True}, {}),
    "+ length-grouped batches": ({**PLAIN, "group_by_length": True}, {}),
    "+ both tasks in one forward pass": ({**PLAIN, "fuse_tasks": True}, {}),
    "+ output layer at targets only": ({**PLAIN, "target_logits_only": True}, {}),
    "+ ... fused with the loss": ({**PLAIN, "target_logits_only": True, "fused_loss": True}, {}),
    "+ encode once (decoder marker)": (PLAIN, {"task_marker": "decoder"}),
    "+ cheaper dropout masks": ({**PLAIN, "fast_dropout": True}, {}),
    "+ fused GELU kernel": ({**PLAIN, "fused_gelu": True}, {}),
    "stepdistill default": ({}, {}),
    "stepdistill default + decoder marker": ({}, {"task_marker": "decoder"}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-examples", type=int, default=320,
                   help="the first N SVAMP training examples; each row trains one epoch over them, so every row "
                        "sees the same examples (length grouping reorders an epoch, it does not pick the short ones)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--held-out", type=int, default=96, help="SVAMP test items scored after training")
    p.add_argument("--work", default="runs/bench-train-throughput")
    p.add_argument("--out", default=str(HERE / "results" / "train_throughput"))
    p.add_argument("--rows", nargs="+", help="only these rows (names as in the table)")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one row's peak memory
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("STEPDISTILL_HOME", str(work / "home"))
    setup = Setup(work, args.train_examples)
    args.steps = -(-len(setup.records) // BATCH)
    if args.memory_probe:
        print(json.dumps({"peak_mb": memory_probe(setup, args.memory_probe, work)}))
        return

    peaks = MatmulPeaks()

    flops = setup.useful_flops()  # one epoch's, the same for every row
    rows = selected_rows(p, args.rows, ROWS)
    runs: dict[str, list[dict]] = {r: [] for r in rows}
    for rep in range(args.repeats):
        peaks.probe()
        for name in rows:  # alternating: drift in the machine's speed hits every row alike
            r = run_row(setup, name, args.steps, work / "runs" / f"{rep}")
            if rep == 0:
                r.update(setup.quality(r.pop("model"), r.pop("marker"), args.held_out))
            else:
                r.pop("model"), r.pop("marker")
            runs[name].append(r)
            print(f"repeat {rep + 1}/{args.repeats} {name}: {r['examples_per_s']:.2f} ex/s", flush=True)
    peaks.probe()
    peak = peaks.best
    ref_name = next(iter(ROWS))
    ref = statistics.median(x["examples_per_s"] for x in runs[ref_name]) if ref_name in runs else None
    table = []
    for name in rows:
        eps = [x["examples_per_s"] for x in runs[name]]
        first = runs[name][0]
        mem = json.loads(subprocess.run(
            [sys.executable, __file__, "--memory-probe", name, "--work", str(work)],
            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])["peak_mb"]
        seconds = statistics.median(x["seconds"] for x in runs[name])
        precision = row_precision(name)
        table.append({"row": name, "examples_per_s": round(statistics.median(eps), 2),
                      "examples_per_s_all": [round(e, 2) for e in eps],
                      "speedup": round(statistics.median(eps) / ref, 2) if ref else None,
                      "useful_gflop_per_s": round(flops / seconds / 1e9, 1), "precision": precision,
                      "peak_fraction": round(flops / seconds / peak[precision], 3),
                      "peak_mb": mem, "train_loss_curve": first["curve"],
                      "held_out_loss": first["held_out_loss"], "held_out_label_loss": first["held_out_label_loss"],
                      "held_out_accuracy": first["held_out_accuracy"]})
    result = {"benchmark": "train_throughput", "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
              "command": "python " + " ".join(sys.argv), "steps": args.steps, "repeats": args.repeats,
              "batch_size": BATCH, "alpha": ALPHA, "learning_rate": LR, "held_out": args.held_out,
              "train_examples": len(setup.records), "model": setup.model_desc, "useful_gflop_per_epoch":
              round(flops / 1e9, 1), **peaks.as_json(),
              "rows": table}
    write(result, Path(args.out))


class Setup:
    """The student template, the training records and the held-out items, made once."""

    def __init__(self, work: Path, n_train: int):
        from stepdistill import api
        from stepdistill.methods import get_method
        from stepdistill.config import MethodConfig
        from stepdistill.store import read_annotations
        from stepdistill.students import count_parameters, load_pretrained, new_t5, smollm2_gguf
        from stepdistill.tasks import get_task, load_examples

        self.t5 = work / "t5-256-4x4"
        if not self.t5.exists():
            import torch

            torch.manual_seed(SEED)
            new_t5(str(smollm2_gguf()), self.t5, n_layers=4, d_model=256, n_heads=4, d_ff=1024)
        n = count_parameters(load_pretrained(str(self.t5), kind="seq2seq").model)[1]
        self.model_desc = f"T5 d_model 256, d_ff 1024, 4+4 layers, 4 heads, {n / 1e6:.1f}M parameters, SmolLM2 tokenizer"
        self.task = get_task("svamp")
        for split in ("train", "test"):
            out = work / f"palm-{split}"
            if not (out / "summary.json").is_file():
                api.annotate({"task": {"name": "svamp", "path": str(SHARED)}, "split": split,
                              "teacher": {"kind": "paper"}, "verify": {"against": "none"}}, out, overwrite=True,
                             echo=lambda _: None)
        method = MethodConfig(name="step-by-step", alpha=ALPHA)
        train = load_examples(self.task, "train", SHARED)
        recs = get_method(method).records(train, read_annotations(work / "palm-train", self.task, "train", train))
        self.records = [r for r in recs.records if r.rationale][:n_train]  # both tasks for every example, as in the paper
        test = load_examples(self.task, "test", SHARED)
        ann = read_annotations(work / "palm-test", self.task, "test", test)
        self.held_out = [(e, ann[e.id].rationale) for e in test if ann.get(e.id) and ann[e.id].rationale]

    def student(self):
        import torch

        from stepdistill.students import load_pretrained

        torch.manual_seed(SEED)
        return load_pretrained(str(self.t5), kind="seq2seq")

    def useful_flops(self) -> int:
        """3 x the forward matmul FLOPs of one epoch of the paper's step on real tokens: each
        example's label task and rationale task, unpadded, one at a time (FlopCounterMode counts
        the encoder, decoder, cross-attention and the vocabulary projection at target positions)."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from stepdistill.methods.formatting import Format

        student = self.student()
        model, fmt = student.model.eval(), Format(kind="seq2seq")
        total = 0
        with torch.no_grad():
            for r in self.records:
                for prefix, target in (("predict: ", r.label), ("explain: ", r.rationale)):
                    batch = features(student, fmt, prefix, [(r.input, target)])
                    with FlopCounterMode(display=False) as counter:
                        model(**batch)
                    total += counter.get_total_flops()
        return 3 * total

    def quality(self, model_dir: Path, marker: str, n: int) -> dict:
        """The reference's loss in float32 on held-out items, and label accuracy (greedy)."""
        import torch

        from stepdistill.evaluation import load_trained, predict
        from stepdistill.methods.formatting import Format

        student, info = load_trained(model_dir)
        model = student.model.eval()
        fmt = Format(kind="seq2seq", task_marker=marker)
        items = self.held_out[:n]
        sums = {"predict: ": [0.0, 0], "explain: ": [0.0, 0]}
        with torch.no_grad():
            for pre, target_of in (("predict: ", lambda it: it[0].label), ("explain: ", lambda it: it[1])):
                for i in range(0, len(items), 16):
                    batch = features(student, fmt, pre, [(e.input, target_of((e, r))) for e, r in items[i:i + 16]])
                    logits = model(**batch).logits
                    mask = batch["labels"] != -100
                    ce = torch.nn.functional.cross_entropy(logits[mask].float(), batch["labels"][mask], reduction="sum")
                    sums[pre][0] += float(ce)
                    sums[pre][1] += int(mask.sum())
        label, rationale = (s / c for s, c in sums.values())
        preds = predict(student, [e.input for e, _ in items], prefix=info["label_prefix"], max_new_tokens=32)
        acc = self.task.accuracy(preds, [e for e, _ in items])
        return {"held_out_loss": round(ALPHA * label + (1 - ALPHA) * rationale, 4),
                "held_out_label_loss": round(label, 4), "held_out_accuracy": acc}


def features(student, fmt, prefix: str, pairs: list[tuple[str, str]]) -> dict:
    """A padded batch with explicit decoder inputs (either task-marker layout)."""
    import torch

    from stepdistill.methods.formatting import encode_example
    from stepdistill.methods.batches import decoder_inputs

    cfg = student.model.config
    rows = [encode_example(student.tokenizer, fmt, prefix, x, y, decoder_start=cfg.decoder_start_token_id)
            for x, y in pairs]

    def pad(seqs, value):
        w = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (w - len(s)) for s in seqs])

    ids = pad([r["input_ids"] for r in rows], student.tokenizer.pad_token_id)
    labels = pad([r["labels"] for r in rows], -100)
    dec = (pad([r["decoder_input_ids"] for r in rows], cfg.pad_token_id) if "decoder_input_ids" in rows[0]
           else decoder_inputs(labels, cfg))
    return {"input_ids": ids, "attention_mask": (ids != student.tokenizer.pad_token_id).long(),
            "decoder_input_ids": dec, "labels": labels}


def default_trainer(work: Path, steps: int, name: str, *, logging_steps: int = 5, **overrides):
    """stepdistill's step-by-step Trainer on the benchmark's T5 and data, TrainingConfig's
    defaults but for `overrides`, no checkpoints (bench/step_time.py, bench/step_ab.py)."""
    from stepdistill.config import MethodConfig, TrainingConfig
    from stepdistill.training import build_trainer

    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("STEPDISTILL_HOME", str(work / "home"))
    setup = Setup(work, steps * BATCH)
    training = TrainingConfig(max_steps=steps, batch_size=BATCH, learning_rate=LR, logging_steps=logging_steps,
                              seed=SEED, **overrides)
    trainer = build_trainer(setup.student(), MethodConfig(name="step-by-step", alpha=ALPHA), training,
                            setup.records, [], None, work / name, progress=False)
    trainer.args.save_strategy = "no"
    return trainer


def run_row(setup: Setup, name: str, steps: int, out: Path, *, timed: bool = True) -> dict:
    """Train one row for `steps` steps; its examples/s and loss curve (every 5 steps)."""
    import shutil

    from stepdistill.config import MethodConfig, TrainingConfig

    spec = ROWS[name]
    d = out / slug(name)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    if spec is None:
        trainer = reference_trainer(setup, steps, d)
        marker = "encoder"
    else:
        from stepdistill.training import build_trainer

        training = TrainingConfig(max_steps=steps, batch_size=BATCH, learning_rate=LR, logging_steps=5, seed=SEED,
                                  **spec[0])
        method = MethodConfig(name="step-by-step", alpha=ALPHA, **spec[1])
        marker = method.task_marker
        trainer = build_trainer(setup.student(), method, training, setup.records, [], None, d, progress=False)
        trainer.args.save_strategy = "no"
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    curve = [(h["step"], round(h["loss"], 4)) for h in trainer.state.log_history if "loss" in h]
    model_dir = d / "model"
    save(trainer, model_dir, marker)
    return {"examples_per_s": steps * BATCH / seconds, "seconds": seconds, "curve": curve, "model": model_dir,
            "marker": marker}


def save(trainer, model_dir: Path, marker: str) -> None:
    """The trained model in stepdistill's layout, so predict() formats its inputs as trained."""
    from stepdistill.students import MODEL_INFO
    from stepdistill.methods.formatting import Format

    trainer.model.save_pretrained(model_dir)
    trainer.processing_class.save_pretrained(model_dir)
    info = {"method": "step-by-step", "label_prefix": "predict: ", "rationale_prefix": "explain: ", "alpha": ALPHA,
            "format": Format(kind="seq2seq", task_marker=marker).to_dict()}
    (model_dir / MODEL_INFO).write_text(json.dumps(info))


def reference_trainer(setup: Setup, steps: int, out: Path):
    """The paper's training step (google-research/distilling-step-by-step, TaskPrefixTrainer and
    TaskPrefixDataCollator), on the same token ids as every other row."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from stepdistill.methods.formatting import Format, encode_example

    student = setup.student()
    tok, fmt = student.tokenizer, Format(kind="seq2seq")
    feats = []
    for r in setup.records:
        pred = encode_example(tok, fmt, "predict: ", r.input, r.label)
        expl = encode_example(tok, fmt, "explain: ", r.input, r.rationale)
        feats.append({"input_ids": pred["input_ids"], "labels": pred["labels"],
                      "expl_input_ids": expl["input_ids"], "aux_labels": expl["labels"]})
    base = DataCollatorForSeq2Seq(tokenizer=tok, model=student.model)

    def collate(features):
        pred = [{"input_ids": f["input_ids"], "attention_mask": [1] * len(f["input_ids"]), "labels": f["labels"]}
                for f in features]
        expl = [{"input_ids": f["expl_input_ids"], "attention_mask": [1] * len(f["expl_input_ids"]),
                 "labels": f["aux_labels"]} for f in features]
        return {"pred": base(pred), "expl": base(expl)}

    class TaskPrefixTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pred_outputs = model(**inputs["pred"])
            expl_outputs = model(**inputs["expl"])
            return ALPHA * pred_outputs.loss + (1.0 - ALPHA) * expl_outputs.loss

    args = TrainingArguments(output_dir=str(out / "checkpoints"), per_device_train_batch_size=BATCH, max_steps=steps,
                             learning_rate=LR, lr_scheduler_type="linear", logging_steps=5, save_strategy="no",
                             seed=SEED, report_to="none", remove_unused_columns=False, disable_tqdm=True,
                             dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available())
    return TaskPrefixTrainer(model=student.model, args=args, train_dataset=feats, data_collator=collate,
                             processing_class=tok)


def memory_probe(setup: Setup, name: str, work: Path) -> float:
    """Peak resident memory while one row trains 5 steps, above the process just before (MB):
    sampled every 5 ms in a thread (ru_maxrss would count the set-up's own peak)."""
    with PeakMemory() as mem:
        run_row(setup, name, 5, work / "probe")
    return mem.mb


def row_precision(name: str) -> str:
    """The precision a row's matmuls run in: bfloat16 where its bf16 setting resolves on (TrainingConfig's
    default, auto, is on only where this CPU has fast bf16)."""
    from stepdistill.config import TrainingConfig
    from stepdistill.memory import resolve_bf16

    spec = ROWS[name]
    bf16 = TrainingConfig(**spec[0]).bf16 if spec is not None else False
    return "bfloat16" if resolve_bf16(bf16) else "float32"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")[:60]


def write(result: dict, out: Path) -> None:
    pk = result["matmul_peak_gflop_per_s"]
    lines = ["# Step-by-step training throughput: the paper's two-pass step vs stepdistill", "",
             f"{result['machine']}. Command: `{result['command']}`", "",
             f"{result['model']}; SVAMP train with PaLM rationales ({result['train_examples']} examples), batch "
             f"{result['batch_size']}, alpha {result['alpha']}, AdamW lr {result['learning_rate']}, {result['steps']} "
             f"optimizer steps per row (one epoch); examples/s is the median of {result['repeats']} alternating repeats. "
             f"Held-out: {result['held_out']} SVAMP test items after training, scored by one float32 function.", "",
             f"Useful work: {result['useful_gflop_per_epoch']} GFLOP an epoch (3 x the paper step's forward matmuls on "
             f"real tokens); matmul peak, the best of the probes before each repeat and at the end: float32 {pk['float32']} GFLOP/s, bfloat16 "
             f"{pk['bfloat16']} GFLOP/s.", "",
             "| row | examples/s | vs reference | useful GFLOP/s | of the peak (precision) | peak memory (MB) | "
             "held-out loss | held-out label loss | held-out accuracy |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        acc = "-" if r["held_out_accuracy"] is None else f"{100 * r['held_out_accuracy']:.1f}%"
        lines.append(f"| {r['row']} | {r['examples_per_s']:.2f} | {r['speedup']:.2f}x | {r['useful_gflop_per_s']} | "
                     f"{100 * r['peak_fraction']:.0f}% ({r['precision']}) | {r['peak_mb']} | "
                     f"{r['held_out_loss']} | {r['held_out_label_loss']} | {acc} |")
    lines += ["", "Training loss (logged every 5 steps), first repeat:", ""]
    for r in result["rows"]:
        lines.append(f"- {r['row']}: " + ", ".join(f"{s}: {v}" for s, v in r["train_loss_curve"]))
    write_results(result, out, lines)


if __name__ == "__main__":
    main()
