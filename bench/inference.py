"""Inference: the teacher thinking aloud against the distilled student answering.

The same quickstart test problems for every row:

  teacher, few-shot CoT        SmolLM2-135M-Instruct writing its chain of thought and answer
                               (transformers; and llama.cpp when installed), up to 72 new tokens
                               as in the quickstart
  student, fixed limit          the quickstart student (SmolLM2's first 4 layers, fine-tuned)
                               predicting the label only, greedy, max_new_tokens 64 (the old default)
  student, task-aware limit    the same, with evaluation's limit from the longest trained label
  ..., bf16 weights            the same, weights in bfloat16 (evaluation's --dtype bfloat16)
  ..., label vocabulary        the same, decoding within the tokens of the trained labels
                               (evaluation's --label-decoding vocab): the output layer is cut
                               from 49,152 rows to those few
  student on llama.cpp, f16 / q8_0 / q4_k_m   the same student exported to GGUF (`stepdistill export
                               --format gguf`), greedy on llama.cpp with the task-aware limit: the
                               same engine as the llama.cpp teacher, so their ratio is like for like

Columns: ms per prediction at batch 1 and at batch 32, predictions/s at batch 32 (llama.cpp rows,
which answer one prompt at a time: at the best concurrency of 1 or 2 model copies in threads, the
cores split between them), peak memory (resident, above the process before the model was loaded:
weights included), the model's file size, parameters, and accuracy on the problems run. Each row
runs in its own process (clean memory figures).

    python bench/inference.py                                   # about 10 minutes on 2 CPU cores
    python bench/inference.py --student runs/quickstart/student-standard
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import PeakMemory, has_llama_cpp, write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent
ROWS = ["teacher, few-shot CoT (transformers)", "teacher, few-shot CoT (llama.cpp)",
        "student, fixed limit (64 tokens)", "student, task-aware limit", "student, task-aware limit, bf16 weights",
        "student, task-aware limit, bf16 weights, label vocabulary", "student on llama.cpp, GGUF f16",
        "student on llama.cpp, GGUF q8_0", "student on llama.cpp, GGUF q4_k_m"]
QUANTS = ("f16", "q8_0", "q4_k_m")  # q4_k_m: 4-bit, as the teacher's file (Q4_1; q4_1 export: gguf_student.py)
TEACHER_TOKENS = 72


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="runs/quickstart/student-standard",
                   help="a trained quickstart student (make quickstart writes runs/quickstart/student-*)")
    p.add_argument("--batch1", type=int, default=8, help="problems timed one at a time (teacher rows are slow)")
    p.add_argument("--batch32", type=int, default=32, help="problems timed in batches of 32")
    p.add_argument("--out", default=str(HERE / "results" / "inference"))
    p.add_argument("--work", default="runs/bench-inference", help="where the student's GGUF export goes")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = p.parse_args()
    if args.row:
        # flushed at once: a run of the llama.cpp teacher once ended with exit 0 and its stdout lost
        print(json.dumps(run_row(args.row, args)), flush=True)
        return
    if not (Path(args.student) / "model").is_dir() and not (Path(args.student) / "config.json").is_file():
        sys.exit(f"{args.student}: no trained student here: run `make quickstart` first, or pass --student")
    rows = []
    gguf_dir = _gguf_dir(args)  # the student as GGUF, exported once
    if has_llama_cpp() and not all((gguf_dir / f"{gguf_dir.name}.{q}.gguf").is_file() for q in QUANTS):
        from stepdistill.deploy import export

        export(args.student, gguf_dir, gguf=QUANTS, overwrite=gguf_dir.exists())  # the bench's own export
    for name in ROWS:
        if "llama.cpp" in name and not has_llama_cpp():
            print(f"skipped {name}: llama-cpp-python is not installed (make setup-llamacpp)")
            continue
        cmd = [sys.executable, __file__, "--row", name, "--student", args.student, "--batch1", str(args.batch1),
               "--batch32", str(args.batch32), "--work", args.work]
        done = subprocess.run(cmd, capture_output=True, text=True)
        out = done.stdout.strip().splitlines()
        if done.returncode != 0 or not out or not out[-1].startswith("{"):
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            sys.exit(f"row {name!r} failed (exit {done.returncode}, stdout {out[-1:]}):\n{tail}")
        r = json.loads(out[-1])
        print(f"{name}: {r}", flush=True)
        rows.append(r)
    teacher = rows[0]
    same_engine = next((r for r in rows if r["row"] == "teacher, few-shot CoT (llama.cpp)"), None)
    for r in rows:
        r["speedup_b1"] = round(teacher["ms_b1"] / r["ms_b1"], 1)
        r["speedup_b32"] = round(teacher["ms_b32"] / r["ms_b32"], 1) if r["ms_b32"] and teacher["ms_b32"] else None
        if same_engine and r["row"].startswith("student on llama.cpp"):
            # like for like: both on llama.cpp, at batch 1 and at each one's best concurrency
            r["speedup_vs_llamacpp_teacher_b1"] = round(same_engine["ms_b1"] / r["ms_b1"], 1)
            r["speedup_vs_llamacpp_teacher_throughput"] = round(
                r["predictions_per_s_b32"] / same_engine["predictions_per_s_b32"], 1)
    result = {"benchmark": "inference", "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
              "command": "python " + " ".join(sys.argv), "student": args.student, "task": "quickstart (test split)",
              "batch1_problems": args.batch1, "batch32_problems": args.batch32, "rows": rows}
    write(result, Path(args.out))



def run_row(name: str, args) -> dict:
    import torch  # noqa: F401  (imported before the memory baseline: the runtime is not the model)

    from stepdistill.tasks import get_task, load_examples

    task = get_task("quickstart")
    exs = load_examples(task, "test", None)[: max(args.batch1, args.batch32)]
    with PeakMemory() as mem:
        if name.startswith("teacher"):
            predict, params, limit = _teacher(name, task)
        else:
            predict, params, limit = _student(name, args)
        predict(exs[:1], 1)  # warm-up
        llm = getattr(predict, "llm", lambda: None)()  # llama.cpp rows: its own count of tokens and time
        if llm is not None:
            import llama_cpp

            llama_cpp.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        preds = predict(exs[: args.batch1], 1)
        ms_b1 = 1000 * (time.perf_counter() - t0) / args.batch1
        split = _time_split(llm, args.batch1, ms_b1) if llm is not None else None
        ms_b32, concurrency = None, None
        if "llama.cpp" not in name:
            t0 = time.perf_counter()
            preds = predict(exs[: args.batch32], 32)
            ms_b32 = 1000 * (time.perf_counter() - t0) / args.batch32
            per_s = 1000 / ms_b32
    if "llama.cpp" in name:  # one prompt at a time: 1 or 2 copies in threads (outside the memory figure)
        preds, per_s, concurrency = _llamacpp_throughput(name, args, task, exs[: args.batch32])
    n = len(preds)
    params = params()
    return {"row": name, "ms_b1": round(ms_b1, 1), "ms_b32": ms_b32 and round(ms_b32, 1),
            "predictions_per_s_b32": round(per_s, 2), "concurrency": concurrency, "peak_mb": mem.mb,
            "params": params, "file_mb": _file_mb(name, args), "max_new_tokens": limit,
            "accuracy": task.accuracy(preds, exs[:n]), "accuracy_n": n, "llamacpp_split_b1": split}


def _time_split(llm, n: int, ms_b1: float) -> dict:
    """Where a llama.cpp prediction's time went at batch 1, by llama.cpp's own counters: prompt
    tokens evaluated (a prefix cached from the previous prompt is not evaluated again) and
    tokens generated, per prediction, and the milliseconds of each; the rest is outside llama.cpp
    (tokenising, sampling, Python)."""
    import llama_cpp

    p = llama_cpp.llama_perf_context(llm.ctx)
    prompt_ms, gen_ms = p.t_p_eval_ms / n, p.t_eval_ms / n
    return {"prompt_tokens": round(p.n_p_eval / n, 1), "prompt_ms": round(prompt_ms, 1),
            "generated_tokens": round(p.n_eval / n, 1), "generated_ms": round(gen_ms, 1),
            "ms_per_generated_token": round(p.t_eval_ms / max(p.n_eval, 1), 2),
            "other_ms": round(ms_b1 - prompt_ms - gen_ms, 1)}


def _gguf_dir(args) -> Path:
    """The export of --student as GGUF, named after the student's path."""
    return Path(args.work) / ("gguf-" + str(Path(args.student).resolve()).strip("/").replace("/", "_"))


def _row_gguf(name: str, args) -> Path:
    """The GGUF file a `student on llama.cpp, GGUF <quant>` row loads."""
    from stepdistill.gguf_student import gguf_file

    return gguf_file(_gguf_dir(args), name.rsplit(" ", 1)[1])


def _file_mb(name: str, args) -> float:
    """The size of what the row loads: the teacher's GGUF, the student's GGUF, or its weights folder."""
    from stepdistill.students import model_folder, smollm2_gguf

    if name.startswith("teacher"):
        files = [smollm2_gguf()]
    elif "GGUF" in name:
        files = [_row_gguf(name, args)]
    else:
        files = [f for f in model_folder(Path(args.student)).iterdir() if f.suffix in (".safetensors", ".bin")]
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


def _llamacpp_throughput(name: str, args, task, exs) -> tuple[list, float, int]:
    """Predictions/s over `exs` at the best of 1 or 2 model copies, each answering its share in
    its own thread with the cores split between them (llama.cpp releases the GIL while it
    computes); the predictions are the one-copy run's."""
    import torch

    cores, best, preds = os.cpu_count() or 1, (0.0, 1), None
    for copies in (1, 2):
        if copies > cores:
            break
        torch.set_num_threads(cores // copies)
        predictors = [(_teacher(name, task, threads=cores // copies) if name.startswith("teacher")
                       else _student(name, args))[0] for _ in range(copies)]
        shares, out = [exs[i::copies] for i in range(copies)], [None] * copies

        def work(i):
            out[i] = predictors[i](shares[i], 1)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(copies)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        per_s = len(exs) / (time.perf_counter() - t0)
        if copies == 1:
            preds = out[0]
        best = max(best, (per_s, copies))
    torch.set_num_threads(cores)
    return preds, best[0], best[1]


def _teacher(name: str, task, threads: int | None = None):
    from stepdistill.config import TeacherConfig
    from stepdistill.students import count_parameters, load_pretrained, smollm2_gguf
    from stepdistill.teachers import Request, make_teacher

    gguf = str(smollm2_gguf())
    kind = "llamacpp" if "llama.cpp" in name else "hf"
    engine = {"n_threads": threads} if threads and kind == "llamacpp" else {}
    t = make_teacher(TeacherConfig(kind=kind, model=gguf, sampling={"max_new_tokens": TEACHER_TOKENS},
                                   engine_args=engine), task, "test", None)

    def predict(exs, batch):
        t.cfg = t.cfg.model_copy(update={"batch_size": batch})  # one model, either batch size
        out = {id(r.example): c.text for r, c in t.generate([Request(e, t.prompt(task, e), 0) for e in exs])}
        return [task.parse(out[id(e)], e).label for e in exs]

    if kind == "llamacpp":
        predict.llm = lambda: t._llm

    # counted outside the memory measurement: this loads the model a second time
    return predict, lambda: count_parameters(load_pretrained(gguf, kind="causal").model)[1], TEACHER_TOKENS


def _student(name: str, args):
    from stepdistill.evaluation import label_token_limit, load_trained, predict as generate
    from stepdistill.students import count_parameters

    if "GGUF" in name:
        student, info = load_trained(_row_gguf(name, args), engine="llamacpp")
    else:
        student, info = load_trained(args.student, dtype="bfloat16" if "bf16" in name else "float32")
    if "max_label_tokens" not in info or "label_vocab" not in info:
        # a model trained before they were recorded: what training records, from the same labels
        from stepdistill.evaluation import label_vocab
        from stepdistill.methods.formatting import encode_target
        from stepdistill.tasks import get_task, load_examples

        targets = [encode_target(student.tokenizer, student.fmt, e.label)
                   for e in load_examples(get_task("quickstart"), "train", None)]
        info["max_label_tokens"] = max(len(t) for t in targets)
        info["label_vocab"] = label_vocab(targets, student.tokenizer.eos_token_id)
    limit = 64 if "fixed" in name else label_token_limit(info)
    vocab = info["label_vocab"] if "label vocabulary" in name else None

    def predict(exs, batch):
        return generate(student, [e.input for e in exs], prefix=info["label_prefix"], batch_size=batch,
                        max_new_tokens=limit, vocab=vocab)

    if "GGUF" in name:  # the file's tensors (the llama.cpp engine has no torch module to count)
        predict.llm = lambda: student.model.llm
        from gguf import GGUFReader

        return predict, lambda: int(sum(t.n_elements for t in GGUFReader(_row_gguf(name, args)).tensors)), limit
    return predict, lambda: count_parameters(student.model)[1], limit


def write(result: dict, out: Path) -> None:
    lines = ["# Inference: the teacher's chain of thought vs the distilled student's label", "",
             f"{result['machine']}. Command: `{result['command']}`", "",
             f"Task: {result['task']}; batch 1 timed on {result['batch1_problems']} problems, batch 32 on "
             f"{result['batch32_problems']}; greedy decoding. Speed-up: the transformers teacher's ms/prediction "
             "divided by the row's. llama.cpp rows answer one prompt at a time: their predictions/s are at the "
             "best concurrency (copies of the model in threads, the cores split between them).", "",
             "| model | params | file (MB) | max new tokens | ms/prediction, batch 1 | ms/prediction, batch 32 | "
             "predictions/s, batch 32 or best concurrency | speed-up b1 | speed-up b32 | peak memory (MB) | accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}% of {r['accuracy_n']}"
        per_s = f"{r['predictions_per_s_b32']}" + (f" ({r['concurrency']} copies)" if r.get("concurrency") else "")
        lines.append(f"| {r['row']} | {r['params'] / 1e6:.1f}M | {r.get('file_mb', '-')} | {r['max_new_tokens']} | "
                     f"{r['ms_b1']} | {r['ms_b32'] or '-'} | {per_s} | {r['speedup_b1']}x | "
                     f"{str(r['speedup_b32']) + 'x' if r['speedup_b32'] else '-'} | {r['peak_mb']} | {acc} |")
    same = [r for r in result["rows"] if "speedup_vs_llamacpp_teacher_b1" in r]
    if same:
        lines += ["", "Same engine (both on llama.cpp), the student against the few-shot CoT teacher:", "",
                  "| student | fewer ms per prediction, batch 1 | more predictions/s, best concurrency |",
                  "|---|---:|---:|"]
        lines += [f"| {r['row']} | {r['speedup_vs_llamacpp_teacher_b1']}x | "
                  f"{r['speedup_vs_llamacpp_teacher_throughput']}x |" for r in same]
    split = [r for r in result["rows"] if r.get("llamacpp_split_b1")]
    if split:
        lines += ["", "Where a llama.cpp prediction's time goes at batch 1 (llama.cpp's own counters, per prediction; "
                  "a prompt prefix cached from the previous prompt is not evaluated again):", "",
                  "| model | prompt tokens evaluated | their ms | tokens generated | their ms | ms per generated token | "
                  "other ms (tokenising, sampling, Python) |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['row']} | {x['prompt_tokens']} | {x['prompt_ms']} | {x['generated_tokens']} | "
                  f"{x['generated_ms']} | {x['ms_per_generated_token']} | {x['other_ms']} |"
                  for r in split for x in [r["llamacpp_split_b1"]]]
    write_results(result, out, lines)


if __name__ == "__main__":
    main()
