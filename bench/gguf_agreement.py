"""A trained causal student as GGUF on llama.cpp against itself on transformers: agreement of the
greedy labels, accuracy, ms per prediction at batch 1, file size.

The same test items for every row; each GGUF is exported by `stepdistill export --format gguf`
(llama.cpp's own converter) and run by `--engine llamacpp`, which feeds llama.cpp the student's own
token ids. Agreement: the share of items whose label equals the transformers float32 student's.

    python bench/gguf_agreement.py --model runs/sweep-esnli-cpu/cells/standard__smollm2-135m-instruct__f1__s0/train \\
        --task esnli --split "valid[-1000:]" --n 200      # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import write_results  # bench/common.py (the script's folder is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a training run of a causal student (or its model/ folder)")
    ap.add_argument("--task", required=True)
    ap.add_argument("--data", default="../shared/data/sbs")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=200, help="test items")
    ap.add_argument("--quant", action="append", help="GGUF quantisations (default f16 and q8_0)")
    ap.add_argument("--out", default="bench/results/gguf")
    args = ap.parse_args()

    import torch

    from stepdistill.deploy import export
    from stepdistill.evaluation import label_token_limit, load_trained, predict
    from stepdistill.tasks import get_task, load_examples

    quants = args.quant or ["f16", "q8_0"]
    task = get_task(args.task)
    items = load_examples(task, args.split, args.data, args.n)
    texts = [e.input for e in items]
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(args.model, Path(tmp) / "student", gguf=tuple(quants))
        for engine, quant in [("transformers", None), *[("llamacpp", q) for q in quants]]:
            student, info = load_trained(folder, dtype="float32", engine=engine, quant=quant)
            limit = label_token_limit(info)
            predict(student, texts[:2], prefix=info["label_prefix"], batch_size=1, max_new_tokens=limit)  # warm-up
            t0 = time.perf_counter()
            labels = predict(student, texts, prefix=info["label_prefix"], batch_size=1, max_new_tokens=limit)
            ms = 1000 * (time.perf_counter() - t0) / len(texts)
            ref = labels if ref is None else ref
            size = (sum(p.stat().st_size for p in folder.glob("*.safetensors")) if quant is None
                    else next(folder.glob(f"*.{quant}.gguf")).stat().st_size)
            rows.append({"engine": engine, "weights": quant or "float32 (safetensors)", "n": len(texts),
                         "agreement": sum(a == b for a, b in zip(labels, ref)) / len(texts),
                         "accuracy": task.accuracy(labels, items), "ms_per_prediction_batch1": round(ms, 1),
                         "file_mb": round(size / 2**20, 1)})
            if hasattr(student.model, "close"):
                student.model.close()
    cmd = "python " + shlex.join(sys.argv)
    lines = ["# A causal student as GGUF on llama.cpp against transformers", "",
             f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, Python "
             f"{platform.python_version()}. Command: `{cmd}`", "",
             f"Student: `{args.model}`. Task: {args.task}, split {args.split}, {len(texts)} items; greedy labels at "
             "batch 1. Agreement: the share of items whose label equals the transformers float32 student's.", "",
             "| engine | weights | agreement | accuracy | ms/prediction, batch 1 | file (MB) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['engine']} | {r['weights']} | {r['agreement']:.1%} | {r['accuracy']:.1%} | "
              f"{r['ms_per_prediction_batch1']} | {r['file_mb']} |" for r in rows]
    write_results({"command": cmd, "model": args.model, "task": args.task, "split": args.split, "rows": rows},
                  Path(args.out), lines)


if __name__ == "__main__":
    main()
