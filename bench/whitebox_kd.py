"""The KD table of bench/whitebox.py (`python bench/whitebox.py --kd`): off-policy, on-policy,
on-policy + step-by-step, top-k cache, server-logprob and cross-tokenizer KD, like for like.

Every row trains the same pruned student (SmolLM2-135M's layers, spread) on the same quickstart
training problems, for the same steps, at the same seeds; model selection on the valid split;
accuracy on the test split by greedy decoding. Each row is compared with its reference by
`report.compare`: the test item is the unit (sign-flip permutation over items, each item's score
averaged over the seeds; bootstrap interval over items). Rows resume: a finished run is reused.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

from common import write_results

HERE = Path(__file__).parent
TASK = {"name": "quickstart"}
# kd.kind jsd with beta 0.5 (GKD's generalised JSD) on the fly; the cache and the server hold the
# teacher's top k only, which supports forward KL
JSD = {"kind": "jsd", "beta": 0.5, "temperature": 1.0, "weight": 0.5}
TOPK = {"kind": "forward_kl", "temperature": 1.0, "weight": 0.5, "top_k": 20}


def rows(teacher: str, gemma: str, server: str) -> list[dict]:
    """(tag, label, method, reference tag): the reference is the row it is tested against."""
    kd = {"teacher": teacher, **JSD}
    return [
        dict(tag="standard", label="standard (gold labels, no teacher)", method={"name": "standard"}, ref=None),
        dict(tag="offpolicy", label="off-policy KD (JSD, teacher-forced; on-policy with lmbda 0)",
             method={"name": "on-policy", "kd": {**kd, "lmbda": 0.0}}, ref="standard"),
        dict(tag="onpolicy-0.5", label="on-policy KD, lmbda 0.5", method={"name": "on-policy", "kd": {**kd, "lmbda": 0.5}},
             ref="offpolicy"),
        dict(tag="onpolicy-1.0", label="on-policy KD, lmbda 1.0", method={"name": "on-policy", "kd": {**kd, "lmbda": 1.0}},
             ref="offpolicy"),
        dict(tag="sbs-offpolicy", label="step-by-step + off-policy KD (alpha 0.5)",
             method={"name": "step-by-step", "alpha": 0.5, "kd": {**kd, "lmbda": 0.0}}, ref="offpolicy"),
        dict(tag="sbs-onpolicy", label="step-by-step + on-policy KD, lmbda 0.5 (it writes its own rationale)",
             method={"name": "step-by-step", "alpha": 0.5, "kd": {**kd, "lmbda": 0.5}}, ref="sbs-offpolicy"),
        dict(tag="cache-top20", label="top-20 cache KD (forward KL, local teacher)",
             method={"name": "standard", "kd": {"teacher": teacher, **TOPK}}, ref="standard", cache=True),
        dict(tag="server-top20", label="server-logprob KD (the same teacher, f16 GGUF, llama.cpp server)",
             method={"name": "standard", "kd": {"teacher": teacher, "base_url": server, **TOPK}}, ref="cache-top20",
             cache=True),
        dict(tag="uld", label="cross-tokenizer KD (ULD) from gemma-3-270m fine-tuned on the labels",
             method={"name": "standard", "kd": {"teacher": gemma, "cross_tokenizer": "uld", "weight": 0.5,
                                                "temperature": 1.0}}, ref="standard"),
    ]


def _seconds(run: Path) -> float | None:
    """A finished run's wall time, from its env.json (so a resumed bench still reports it)."""
    m = json.loads((run / "env.json").read_text())
    if m.get("status") != "done" or not m.get("finished"):
        return None
    fmt = "%Y-%m-%dT%H:%M:%S%z"
    return (datetime.strptime(m["finished"], fmt) - datetime.strptime(m["started"], fmt)).total_seconds()


def main(args) -> None:
    import os

    from stepdistill import api, deploy
    from stepdistill.files import read_jsonl
    from stepdistill.pruning import cut_layers
    from stepdistill.report import compare, verdict_of
    from stepdistill.students import smollm2_gguf
    from stepdistill.testing.llama_server import free_port, llama_server

    os.environ.setdefault("STEPDISTILL_HOME", str(Path(args.work) / "home"))
    work = Path(args.work)
    d = work / "kd"
    d.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if out == HERE / "results" / "whitebox":
        out = HERE / "results" / "whitebox_kd"
    steps = args.steps or 150
    gguf = str(smollm2_gguf())
    student_base = work / f"student-{args.layers}l"
    if not student_base.exists():
        cut_layers(gguf, args.layers, student_base, strategy="spread")
    rationales = d / "rationales-train"
    if not (rationales / "summary.json").is_file():  # SmolLM2's own CoT, kept where its answer is right
        api.annotate({"task": TASK, "split": "train", "teacher": {"kind": "hf", "model": gguf, "batch_size": 8,
                      "sampling": {"max_new_tokens": 96}}}, rationales, overwrite=True)

    def train(out_dir: Path, model: str, method: dict, seed: int, lr: float = 3e-4) -> Path:
        if not (out_dir / "metrics.json").is_file():  # an interrupted run resumes from its last checkpoint
            started = out_dir.is_dir() and (out_dir / "config.yaml").is_file()
            api.train({"task": TASK, "student": {"model": model}, "method": method, "annotations": str(rationales),
                       "val_split": "valid",
                       "training": {"max_steps": steps, "batch_size": 8, "learning_rate": lr, "bf16": True,
                                    "seed": seed, "val_size": 40, "eval_steps": max(steps // 3, 1),
                                    "max_target_length": 128, "max_input_length": 256}},
                      out_dir, resume=started)
            # the run's resume checkpoints (up to 1.5 GB each for 27 runs): the model/ folder is what is scored
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        return out_dir

    def evaluate(run: Path) -> dict:
        e = run.parent / f"{run.name}-test"
        if not (e / "metrics.json").is_file():
            api.evaluate({"task": TASK, "model": str(run), "split": "test", "max_new_tokens": 24}, e, overwrite=True)
        m = json.loads((e / "metrics.json").read_text())
        m["correct"] = {p["id"]: bool(p["correct"]) for p in read_jsonl(e / "predictions.jsonl")}
        return m

    # the teachers: SmolLM2-135M and gemma-3-270m, each fine-tuned on the gold labels (seed 42)
    teacher = train(d / "teacher-smollm2-ft", gguf, {"name": "standard"}, seed=42, lr=1e-4)
    gemma = train(d / "teacher-gemma3-ft", "gemma3-270m", {"name": "standard"}, seed=42, lr=1e-4)
    teachers = {name: {"accuracy": evaluate(run)["accuracy"], "train_s": _seconds(run)}
                for name, run in (("SmolLM2-135M", teacher), ("gemma-3-270m", gemma))}
    served = d / "teacher-smollm2-ft-gguf"
    if not served.is_dir():
        deploy.export(teacher, served, gguf=("f16",))

    results = {"benchmark": "whitebox_kd", "command": "python bench/whitebox.py --kd " + " ".join(sys.argv[2:]),
               "task": "quickstart", "steps": steps, "batch_size": 8, "student_layers": args.layers,
               "seeds": args.seeds, "teachers": teachers, "rows": []}
    # a fixed port where free: the server's URL is part of its cache's key, so a resumed bench finds its cache
    with llama_server(next(served.glob("*.f16.gguf")), d / "server.log", "--n_ctx", "1024", "--logits_all", "true",
                      port=free_port(8431)) as url:
        specs = rows(str(teacher), str(gemma), url)
        scored = {}
        for spec in specs:
            per_seed, secs = {}, []
            for seed in args.seeds:
                method = copy.deepcopy(spec["method"])
                if spec.get("cache"):  # the row's top-k cache, shared by its seeds (the same training sequences)
                    method["kd"]["cache"] = str(d / f"cache-{spec['tag']}-{url.rsplit(':', 1)[1].split('/')[0]}")
                run = train(d / f"{spec['tag']}-s{seed}", str(student_base), method, seed)
                m = evaluate(run)
                per_seed[seed] = m["correct"]
                secs.append(_seconds(run))
            scored[spec["tag"]] = per_seed
            accs = [100 * sum(c.values()) / len(c) for c in per_seed.values()]
            row = {"tag": spec["tag"], "row": spec["label"], "method": spec["method"], "reference": spec["ref"],
                   "accuracy_per_seed": [round(a, 1) for a in accs], "accuracy": round(sum(accs) / len(accs), 1),
                   "train_s_per_seed": secs, "train_s": round(sum(s or 0 for s in secs) / len(secs), 1)}
            if spec["ref"]:
                c = compare(per_seed, scored[spec["ref"]])
                row["vs_reference"] = {k: c[k] for k in ("diff", "low", "high", "p", "seeds", "items") if k in c}
                row["verdict"] = verdict_of({**c, "significant": c["p"] < 0.05, "within_noise": c["p"] >= 0.05},
                                            (spec["tag"], spec["ref"]))
            results["rows"].append(row)
            write(results, out)


def write(results: dict, out: Path) -> None:
    t = results["teachers"]
    lines = ["# KD on the quickstart task: off-policy, on-policy, cache, server and cross-tokenizer teachers", "",
             f"Command: `{results['command']}`. Student: SmolLM2-135M-Instruct's {results['student_layers']} of 30 "
             f"layers (spread), {results['steps']} steps of {results['batch_size']}, bf16, seeds "
             f"{results['seeds']}; test: the quickstart test split, greedy. Teachers fine-tuned on the gold labels: "
             + ", ".join(f"{k} {100 * v['accuracy']:.1f}% on test" for k, v in t.items()) + ".", "",
             "Each row is tested against its reference: the test item is the unit (sign-flip permutation over items, "
             "seeds averaged within each item), no adjustment for the several rows.", "",
             "| row | test accuracy (mean of seeds) | per seed | train wall s (mean) | vs | difference (95% interval) | p | verdict |",
             "|---|---:|---|---:|---|---:|---:|---|"]
    for r in results["rows"]:
        c = r.get("vs_reference")
        diff = f"{100 * c['diff']:+.1f} ({100 * c['low']:+.1f}, {100 * c['high']:+.1f})" if c else "-"
        lines.append(f"| {r['row']} | {r['accuracy']:.1f}% | {', '.join(map(str, r['accuracy_per_seed']))} | "
                     f"{r['train_s']:.0f} | {r['reference'] or '-'} | {diff} | {c['p']:.2g} | {r['verdict']} |"
                     if c else f"| {r['row']} | {r['accuracy']:.1f}% | {', '.join(map(str, r['accuracy_per_seed']))} | "
                     f"{r['train_s']:.0f} | - | - | - | reference |")
    write_results(results, out, lines)
