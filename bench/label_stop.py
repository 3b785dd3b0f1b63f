"""A label-then-rationale student's label, generated until the word that ends it, against
generated to the token limit and cut there afterwards, within one run.

`label-rationale` students write "label because rationale". Only the label is scored, so
generation may stop at "because". Before, each row stopped only at the end-of-sequence token or
the label's token limit, and a batch runs until its last row stops, so every batch ran to the limit.

  stop at the label   predict(): each row stops once its new text holds "because" (the default)
  to the limit        predict(extract=False), then the label cut from the text (the old cost)

Both on the same trained student, the same items, alternating order over repeats; the labels
must be identical (the bench fails otherwise).

    python bench/label_stop.py --model runs/sweep-cqa-cpu-lora30/cells/label-rationale-teacher__smollm2-135m-instruct__f1__s0/train
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained label-rationale run (or its model folder)")
    p.add_argument("--task", default="cqa")
    p.add_argument("--data", default="../shared/data/sbs")
    p.add_argument("--split", default="train[-1221:]", help="the items to predict (default: CQA's development test)")
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "label_stop"))
    args = p.parse_args()

    import torch

    from stepdistill.evaluation import label_token_limit, load_trained, predict
    from stepdistill.methods.formatting import extract_answer
    from stepdistill.tasks import get_task, load_examples

    task = get_task(args.task)
    examples = load_examples(task, args.split, args.data, args.limit)
    inputs = [e.input for e in examples]
    student, info = load_trained(args.model, dtype=args.dtype)
    if student.fmt is None or not student.fmt.answer_end:
        raise SystemExit(f"{args.model} is not a label-then-rationale student (method {info.get('method')})")
    limit = label_token_limit(info)
    kw = {"prefix": info["label_prefix"], "batch_size": args.batch_size, "max_new_tokens": limit}

    def stop() -> list[str]:
        return predict(student, inputs, **kw)

    def to_limit() -> list[str]:
        return [extract_answer(student.fmt, t) for t in predict(student, inputs, **kw, extract=False)]

    ways = {"stop at the label": stop, "to the limit": to_limit}
    seconds = {w: [] for w in ways}
    labels = {}
    for r in range(args.repeats):
        for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            t0 = time.perf_counter()
            labels[way] = ways[way]()
            seconds[way].append(time.perf_counter() - t0)
            print(f"repeat {r}: {way}: {seconds[way][-1]:.1f} s", flush=True)
    a, b = labels.values()
    same = sum(x == y for x, y in zip(a, b))
    if same != len(inputs):
        raise SystemExit(f"the labels differ on {len(inputs) - same} of {len(inputs)} items: stopping is not exact")
    ms = {w: 1000 * statistics.median(s) / len(inputs) for w, s in seconds.items()}
    accuracy = task.accuracy(a, examples)
    lines = ["# A label-then-rationale student: stop at the label, or generate to the limit", "",
             f"`python bench/label_stop.py --model {args.model}` (split {args.split}, {len(inputs)} items, batch "
             f"{args.batch_size}, {args.dtype}, label token limit {limit}, {args.repeats} repeats alternating; "
             f"{torch.get_num_threads()} threads)", "",
             "| generation | ms/prediction (median of repeats) | seconds per repeat | labels equal | accuracy |",
             "|---|---:|---|---:|---:|"]
    for w in ways:
        lines.append(f"| {w} | {ms[w]:.1f} | {', '.join(f'{s:.1f}' for s in seconds[w])} | {same}/{len(inputs)} | "
                     f"{accuracy:.1%} |")
    lines += ["", f"Speed-up of stopping at the label: **{ms['to the limit'] / ms['stop at the label']:.2f}x**."]
    write_results({"model": args.model, "split": args.split, "n": len(inputs), "batch_size": args.batch_size,
                   "dtype": args.dtype, "max_new_tokens": limit, "seconds": seconds, "ms_per_prediction": ms,
                   "labels_equal": same, "accuracy": accuracy}, Path(args.out), lines)


if __name__ == "__main__":
    main()
