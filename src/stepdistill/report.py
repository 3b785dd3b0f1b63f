"""`stepdistill report`: a sweep as a report a person wants to read.

    stepdistill report runs/sweep-svamp --teacher runs/svamp-palm-test --out docs/results/svamp-cpu

writes report.html (one self-contained file, plots embedded) and report.md (its twin, plots as
PNG files beside it), from the sweep's own files:

- accuracy against the share of training data, per method, with standard-error bars over seeds;
- accuracy against student size, with the teacher as a reference line;
- teacher against student: accuracy, ms and CPU-seconds per 1,000 predictions, parameters, size;
- paired comparisons between methods on the same test items, with the item as the unit: a
  sign-flip permutation test and a bootstrap interval over items (seeds averaged within an item),
  Holm's adjustment, and McNemar's test per seed and on majority votes for reference;
- training curves, each loss term on its own; annotation statistics; a confusion matrix for
  classification tasks; a few test items with gold label, teacher rationale and predictions.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from stepdistill.errors import StepDistillError
from stepdistill.runs import write_json, write_text
from stepdistill.stats import holm, mcnemar, paired_bootstrap, sign_flip_test
from stepdistill.sweep import pack_cells, table



# ---------------------------------------------------------------- reading a sweep


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def load_sweep(d: str | Path) -> dict[str, Any]:
    d = Path(d)
    results = _json(d / "results.json")
    if results is None:
        raise StepDistillError(f"{d} holds no sweep results (results.json): run `stepdistill sweep` into it first")
    cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
    for row in results["cells"]:
        c = d / "cells" / row["cell"]
        row["predictions"] = _jsonl(c / "eval" / "predictions.jsonl")
        row["log"] = _jsonl(c / "train" / "train_log.jsonl")
        row["size_mb"] = _size_mb(c / "train" / "model")
    results["config"], results["dir"] = cfg, str(d)
    ann = cfg.get("annotations")
    results["annotation_summary"] = _json(Path(ann) / "summary.json") if ann else None
    return results


def _size_mb(folder: Path) -> float | None:
    files = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
    return round(sum(p.stat().st_size for p in files) / 1e6, 1) if files else None


# ---------------------------------------------------------------- statistics


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pair of methods at each (student, fraction), on the test items both were scored on.

    The test item is the unit: `p` is the sign-flip permutation test over items and the interval a
    bootstrap over items (seeds kept inside each item); `p_holm` adjusts `p` over all the
    comparisons listed. Beside them, for reference: McNemar's exact test on each item's majority
    vote over seeds, and on each seed alone."""
    by = {}
    for r in results["cells"]:
        if r["status"] == "done" and r["predictions"]:
            by.setdefault((r["student"], r["fraction"], r["method"]), {})[r["seed"]] = {
                p["id"]: bool(p.get("correct")) for p in r["predictions"]}
    out = []
    keys = sorted({(s, f) for s, f, _ in by})
    for student, fraction in keys:
        methods = sorted(m for s, f, m in by if (s, f) == (student, fraction))
        for ma, mb in itertools.combinations(methods, 2):
            c = compare(by[(student, fraction, ma)], by[(student, fraction, mb)])
            if c:
                out.append({"student": student, "fraction": fraction, "fraction_b": fraction, "a": ma, "b": mb, **c})
    # the paper's data-efficiency claim: rationales on less data against each baseline on its most
    # (standard fine-tuning on all the gold labels is the claim's yardstick, whatever labels the
    # rationale method used)
    for mine, other in _efficiency_pairs(results):
        for student, fraction, m in sorted(by):
            most = max((f for s, f, b in by if s == student and b == other), default=None)
            if m == mine and most is not None and fraction < most:
                c = compare(by[(student, fraction, mine)], by[(student, most, other)])
                if c:
                    out.append({"student": student, "fraction": fraction, "fraction_b": most, "a": mine, "b": other, **c})
    for c, adjusted in zip(out, holm([c["p"] for c in out])):
        c["p_holm"] = adjusted
        # significant across the whole table (Holm): a sweep of m methods makes m(m-1)/2 comparisons
        c["significant"] = adjusted < 0.05
        c["within_noise"] = c["p"] >= 0.05
    return out


def compare(A: dict[int, dict[str, bool]], B: dict[int, dict[str, bool]]) -> dict[str, Any] | None:
    """One comparison over the seeds and test items both sides have (None: none shared)."""
    seeds = sorted(set(A) & set(B))
    if not seeds:
        return None
    items = sorted(set.intersection(*(set(A[s]) & set(B[s]) for s in seeds)))
    if not items:
        return None
    a = [[A[s][i] for i in items] for s in seeds]
    b = [[B[s][i] for i in items] for s in seeds]
    majority = mcnemar([2 * sum(col) > len(seeds) for col in zip(*a)], [2 * sum(col) > len(seeds) for col in zip(*b)])
    return {"seeds": len(seeds), "items": len(items), **paired_bootstrap(a, b), "p": sign_flip_test(a, b),
            "test": "sign-flip permutation over items (seeds averaged within each item)",
            "only_a": majority["only_a"], "only_b": majority["only_b"], "p_majority": majority["p"],
            "p_per_seed": [mcnemar(x, y)["p"] for x, y in zip(a, b)]}


def _data(c: dict[str, Any]) -> str:
    """A comparison's data share: `50%`, or `50% vs 100%` where the two sides trained on different shares."""
    f, fb = c["fraction"], c.get("fraction_b", c["fraction"])
    return f"{100 * f:g}%" if f == fb else f"{100 * f:g}% vs {100 * fb:g}%"


def _method_tags(results: dict[str, Any]) -> dict[str, Any]:
    """The sweep's methods by their tag in tables ({} for a sweep written by another version)."""
    from stepdistill.config import SweepRun, coerce
    from stepdistill.sweep import cells

    try:
        return {c["method_tag"]: c["method"] for c in cells(coerce(SweepRun, results["config"]))}
    except Exception:  # noqa: BLE001 - a sweep written by another version: no pairs, the full table stays
        return {}


def _baselines(results: dict[str, Any]) -> dict[str, str]:
    """The sweep's baselines by the labels they train on: the first standard method (gold) and the
    first distill without soft labels (teacher)."""
    out: dict[str, str] = {}
    for t, m in _method_tags(results).items():
        labels = "gold" if m.name == "standard" else "teacher" if m.name == "distill" and not m.kd else None
        if labels and labels not in out:
            out[labels] = t
    return out


def paper_pairs(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The paper's like-for-like comparisons the sweep holds, as (rationale method, baseline,
    labels): each multitask method on gold labels against standard fine-tuning, and on teacher
    labels against distillation (method tags as in the sweep's table)."""
    from stepdistill.methods import get_method

    base = _baselines(results)
    return [(t, base[m.label_source], m.label_source) for t, m in _method_tags(results).items()
            if get_method(m).multitask and m.label_source in base]


def _efficiency_pairs(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(rationale method, baseline) for the data-efficiency rows: every rationale method against
    standard fine-tuning (the paper's yardstick) and against the baseline on its own labels, each
    baseline on the largest share it trained on."""
    from stepdistill.methods import get_method

    base = _baselines(results)
    out = []
    for t, m in _method_tags(results).items():
        if get_method(m).multitask:
            out += [(t, b) for b in dict.fromkeys(base[x] for x in ("gold", m.label_source) if x in base)]
    return out


def _paper_comparisons(results: dict[str, Any], comps: list[dict[str, Any]]) -> list[str]:
    pairs = paper_pairs(results)
    efficiency = set(_efficiency_pairs(results))  # the rationale side on a smaller share
    if not pairs and not efficiency:
        return []
    stats = {(s["method"], s["student"], s["fraction"]): s for s in results["summary"]}
    md = ["## The paper's comparisons, like for like", "",
          "Rationales added to gold labels against standard fine-tuning, and to the teacher's labels against "
          "distillation on those labels: equal steps, the same test items; the test as in the next section. A row "
          "`50% vs 100%` is the paper's data-efficiency claim: the rationale student on half the data against each "
          "baseline on all of it (labels `teacher vs gold`: the rationale student on the teacher's labels against "
          "standard fine-tuning on gold). The accuracies are each side's mean over its seeds; the difference and its test use "
          "only the seeds both sides have (the next section gives their count).", "",
          "| student | data | rationales | baseline | labels | rationales acc. | baseline acc. | difference (95% interval) "
          "| p (items) | Holm p | verdict |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|"]
    label_of = {t: m.label_source for t, m in _method_tags(results).items()}  # the rationale methods'
    label_of.update({t: labels for labels, t in _baselines(results).items()})
    like_for_like = {(mine, other) for mine, other, _ in pairs}  # equal shares
    for c in comps:
        allowed = like_for_like if c["fraction"] == c["fraction_b"] else efficiency
        for mine, other in [p for p in ((c["a"], c["b"]), (c["b"], c["a"])) if p in allowed]:
            labels = (label_of[mine] if label_of[mine] == label_of.get(other)
                      else f"{label_of[mine]} vs {label_of.get(other)}")
            sign = 1 if c["a"] == mine else -1
            lo, hi = sorted((sign * c["low"], sign * c["high"]))
            flipped = {**c, "diff": sign * c["diff"]}
            verdict = verdict_of(flipped, ("rationales", "baseline"))
            f_mine, f_other = (c["fraction"], c["fraction_b"]) if c["a"] == mine else (c["fraction_b"], c["fraction"])
            acc = [stats.get((mine, c["student"], f_mine)), stats.get((other, c["student"], f_other))]
            shown = [("-" if not a or a.get("mean") is None else f"{100 * a['mean']:.1f}%"
                      + (f" ± {100 * a['sem']:.1f}" if a.get("sem") is not None else " (1 seed)")) for a in acc]
            md.append(f"| {c['student']} | {_data(c)} | {mine} | {other} | {labels} | {shown[0]} | "
                      f"{shown[1]} | {100 * sign * c['diff']:+.1f} ({100 * lo:+.1f}, {100 * hi:+.1f}) | {c['p']:.3g} | "
                      f"{c['p_holm']:.3g} | {verdict} |")
    return md + [""]


def verdict_of(c: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """A comparison's verdict, naming the side ahead: significant only after Holm's adjustment
    over the table."""
    better = names[0] if c["diff"] > 0 else names[1]
    if c["significant"]:
        return f"{better} better"
    return "within noise" if c["within_noise"] else f"{better} ahead, not after Holm"


# ---------------------------------------------------------------- plots


def _figures(results: dict[str, Any], teacher: dict[str, Any] | None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, bytes] = {}

    def save(name: str, fig) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        figs[name] = buf.getvalue()

    summary = results["summary"]
    students = sorted({s["student"] for s in summary})
    fig, axes = plt.subplots(1, len(students), figsize=(6 * len(students), 4), squeeze=False)
    for ax, student in zip(axes[0], students):
        for method in sorted({s["method"] for s in summary}):
            pts = sorted((s["fraction"], s["mean"], s["sem"] or 0) for s in summary
                         if s["student"] == student and s["method"] == method and s["mean"] is not None)
            if pts:
                ax.errorbar([100 * p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                            marker="o", capsize=4, label=method)
        if teacher and teacher.get("accuracy") is not None:
            ax.axhline(100 * teacher["accuracy"], color="grey", ls="--", label="teacher")
        ax.set(xlabel="training data used (%)", ylabel="test accuracy (%)", title=f"student {student}")
        ax.grid(alpha=0.3)
        ax.legend()
    save("accuracy_vs_data", fig)

    params = {}
    for r in results["cells"]:
        if r["status"] == "done" and r.get("parameters"):
            params[r["student"]] = r["parameters"]
    if params:
        top = max(s["fraction"] for s in summary)
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({s["method"] for s in summary}):
            pts = sorted((params[s["student"]], s["mean"], s["sem"] or 0) for s in summary
                         if s["method"] == method and s["fraction"] == top and s["mean"] is not None
                         and s["student"] in params)
            if pts:
                ax.errorbar([p[0] / 1e6 for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                            marker="o", capsize=4, label=method)
        if teacher and teacher.get("accuracy") is not None:
            ax.axhline(100 * teacher["accuracy"], color="grey", ls="--", label=f"teacher ({teacher['name']})")
        ax.set(xscale="log", xlabel="student parameters (millions)", ylabel="test accuracy (%)",
               title=f"accuracy vs student size ({100 * top:g}% of the data)")
        ax.grid(alpha=0.3)
        ax.legend()
        save("accuracy_vs_size", fig)

    curves = _curve_cells(results)
    # a term logged along the way (train_loss is the run's one final average: no curve)
    terms = sorted({k for r in curves for h in r["log"] for k in h if k.endswith("loss") and k != "eval_loss"
                    and sum(k in x for x in r["log"]) > 1})
    if terms:
        fig, axes = plt.subplots(1, len(terms), figsize=(4.5 * len(terms), 3.6), squeeze=False)
        for ax, term in zip(axes[0], terms):
            for r in curves:
                pts = [(h["step"], h[term]) for h in r["log"] if term in h]
                if pts:
                    ax.plot(*zip(*pts), label=r["method"])
            ax.set(xlabel="step", ylabel=term, title=term.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save("training_curves", fig)

    cm = _confusion(results)
    if cm:
        labels, counts, cell = cm
        fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.1 * len(labels) + 1.5))
        ax.imshow(counts, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i, j in itertools.product(range(len(labels)), repeat=2):
            ax.text(j, i, counts[i][j], ha="center", va="center")
        ax.set(xlabel="student prediction", ylabel="gold", title=f"confusion: {cell}")
        save("confusion", fig)
    return figs


def _curve_cells(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per method for the training curves: the first seed, the largest data share."""
    done = [r for r in results["cells"] if r["status"] == "done" and r["log"]]
    if not done:
        return []
    top, seed = max(r["fraction"] for r in done), min(r["seed"] for r in done)
    student = sorted(r["student"] for r in done)[0]
    return [r for r in done if (r["fraction"], r["seed"], r["student"]) == (top, seed, student)]


def _confusion(results: dict[str, Any]):
    from stepdistill.tasks import get_task

    try:
        task = get_task(results["task"])
    except StepDistillError:
        return None
    if task.label_kind != "classes" or not task.classes:
        return None
    best = _best_cell(results)
    if best is None:
        return None
    labels = list(task.classes) + ["(other)"]
    idx = {c: i for i, c in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for p in best["predictions"]:
        if p.get("gold") in idx:
            pred = task.normalize(p.get("prediction") or "") or "(other)"
            counts[idx[p["gold"]]][idx.get(pred, len(labels) - 1)] += 1
    return labels, counts, best["cell"]


def _best_cell(results: dict[str, Any], method: str | None = None) -> dict[str, Any] | None:
    """The most accurate finished cell on the largest data share (of `method` only, when given)."""
    done = [r for r in results["cells"] if r["status"] == "done" and r["predictions"] and r.get("accuracy") is not None
            and (method is None or r["method"] == method)]
    return max(done, key=lambda r: (r["fraction"], r["accuracy"])) if done else None


def _multitask(run: Path) -> bool:
    """Was the student of a training run taught a rationale task?"""
    from stepdistill.methods import METHODS
    from stepdistill.students import MODEL_INFO

    name = (_json(run / "model" / MODEL_INFO) or {}).get("method")
    return name in METHODS and METHODS.get(name).multitask


def _student_rationales(results: dict[str, Any], cell: dict[str, Any], inputs: list[str]) -> list[str] | None:
    """The rationale task's output of a cell's student for a few inputs (None if it has no such task)."""
    from stepdistill.evaluation import explain, label_token_limit, load_trained

    run = Path(results["dir"]) / "cells" / cell["cell"] / "train"
    if not _multitask(run):
        return None
    student, info = load_trained(run)
    return explain(student, info, inputs, limit=label_token_limit(info), batch_size=len(inputs))


# ---------------------------------------------------------------- the report


def _teacher(path: str | Path | None) -> dict[str, Any] | None:
    if not path:
        return None
    s = _json(Path(path) / "summary.json")
    if s is None:
        raise StepDistillError(f"--teacher {path}: no annotation summary.json there: pass an annotation run "
                               "of the evaluation split (stepdistill annotate --split test)")
    t = s.get("teacher") or {}
    usage = s.get("usage") or {}
    cost = usage.get("cost_usd")
    return {"name": f"{t.get('kind', '?')} {t.get('model', '')}".strip(), "accuracy": s.get("teacher_accuracy"),
            "ms": s.get("ms_per_example"), "n": s.get("n"), "threads": s.get("threads"),
            "usd_per_1000": 1000 * cost / s["n"] if cost is not None and s.get("n") else None,
            "rows": {r["id"]: r for r in _jsonl(Path(path) / "annotations.jsonl")}}


def _reasons(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{n} {why}" for why, n in counts.items()) if counts else "none"


def _count(n: int | None) -> str:
    return "-" if not n else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def build(sweep_dir: str | Path, teacher_run: str | Path | None = None, cpu_hour_usd: float | None = None
          ) -> tuple[str, str, dict[str, bytes], dict[str, Any]]:
    """(markdown, html, figures, table) of one sweep; the table is the summary, the paired tests and
    every cell's row."""
    results = load_sweep(sweep_dir)
    teacher = _teacher(teacher_run)
    figs = _figures(results, teacher)
    comps = comparisons(results)
    md: list[str] = [f"# {results['task']}: distillation sweep", "",
                     f"Sweep `{results['dir']}`, evaluated on the {results['split']} split. Accuracy is the mean over "
                     "training seeds ± its standard error; every method and seed saw the same nested data subsets.", ""]
    md += ["## Accuracy", "", table(results["summary"]), "", "![accuracy vs data](figures/accuracy_vs_data.png)", ""]
    if "accuracy_vs_size" in figs:
        md += ["![accuracy vs size](figures/accuracy_vs_size.png)", ""]
    md += _paper_comparisons(results, comps)
    md += ["## Are the differences real?", "",
           "Each pair of methods on the same test items, over the seeds both have. The test item is the unit: "
           "each item's score is its accuracy over the seeds, `p` is a two-sided sign-flip permutation test on "
           "the per-item differences (exact up to 16 differing items, else 20,000 random flips), and the interval "
           "is a bootstrap over items, each resampled item keeping all its seeds. Counting every (seed, item) pair "
           "as independent, as a pooled McNemar test does, counts one item once per seed and makes p too small. "
           "Holm's p adjusts for every comparison in this table. For reference: items only A or only B got right "
           "by majority vote over seeds, with McNemar's exact p on those votes, and McNemar's p on each seed "
           "alone. The verdict calls a difference significant when Holm's p < 0.05 (the table's comparisons "
           "together); a p below 0.05 that Holm's adjustment lifts above it reads 'ahead, not after Holm'.", "",
           "| student | data | A | B | seeds x items | A - B (95% interval) | p (items) | Holm p | only A / only B (majority) | McNemar p (majority) | McNemar p per seed | verdict |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in comps:
        verdict = verdict_of(c)
        per_seed = ", ".join(f"{p:.2g}" for p in c["p_per_seed"])
        md.append(f"| {c['student']} | {_data(c)} | {c['a']} | {c['b']} | {c['seeds']} x {c['items']} | "
                  f"{100 * c['diff']:+.1f} ({100 * c['low']:+.1f}, {100 * c['high']:+.1f}) | {c['p']:.3g} | "
                  f"{c['p_holm']:.3g} | {c['only_a']} / {c['only_b']} | {c['p_majority']:.3g} | {per_seed} | {verdict} |")
    md += ["", "## Teacher against student", ""]
    md += _deploy_table(results, teacher, cpu_hour_usd)
    if "training_curves" in figs:
        md += ["## Training", "", "Each loss term separately (first seed, largest data share).", "",
               "![training curves](figures/training_curves.png)", ""]
    ann = results.get("annotation_summary")
    if ann:
        md += ["## Teacher annotations (training split)", "",
               f"- {ann.get('n')} inputs, {ann.get('parsed')} parsed"
               + (f", {ann['kept']} kept" if ann.get("kept") is not None else "")
               + f"; unparsed: {_reasons(ann.get('unparsed_reasons'))}; dropped: {_reasons(ann.get('dropped_reasons'))}",
               f"- teacher accuracy on them: {_pct(ann.get('teacher_accuracy'))}; kept-label accuracy: "
               f"{_pct(ann.get('kept_accuracy'))}; mean agreement of samples: {ann.get('mean_agreement') or '-'}", ""]
    if "confusion" in figs:
        md += ["## Confusion matrix", "", "![confusion](figures/confusion.png)", ""]
    md += _examples(results, teacher)
    failed = [r for r in results["cells"] if r["status"] == "failed"]
    if failed:
        md += ["## Failed cells", ""] + [f"- `{r['cell']}`: {r.get('error')}" for r in failed] + [""]
    missing = [r["cell"] for r in results["cells"] if r["status"] == "not run"]
    if missing:
        md += ["## Cells not run", "", "In the grid but not on disk when the sweep was collected (`--collect`): "
               + ", ".join(f"`{c}`" for c in missing) + ".", ""]
    md += ["## The cells themselves", "", "cells.tar.gz beside this report holds every finished cell's configs, "
           "training log, metrics and per-item predictions (no weights): what every figure above is computed from. "
           "`stepdistill sweep --config <the sweep's config> --out DIR --cells cells.tar.gz` restores them into DIR "
           "on any machine, so the sweep goes on (more seeds, more methods) without retraining them, and "
           "`stepdistill report DIR --out FOLDER` rebuilds this report.", ""]
    text = "\n".join(md) + "\n"
    table_ = {"task": results["task"], "split": results["split"], "summary": results["summary"], "comparisons": comps,
              "teacher": {k: v for k, v in teacher.items() if k != "rows"} if teacher else None,
              "cells": [{k: v for k, v in r.items() if k not in ("predictions", "log")} for r in results["cells"]]}
    return text, to_html(text, figs, results["task"]), figs, table_


def _deploy_table(results: dict[str, Any], teacher: dict[str, Any] | None, cpu_hour_usd: float | None = None
                  ) -> list[str]:
    """The teacher against the best student: accuracy, latency, compute and cost, all measured:
    CPU-seconds are wall time x the threads the run used; dollars come from the API's token
    prices (the teacher's annotation run) or from `cpu_hour_usd` for what ran on a CPU."""
    def cpu_s(ms: float | None, threads: int | None) -> float | None:  # per 1,000 predictions
        return None if not ms or not threads else ms * threads

    def dollars(x: float) -> str:
        return f"{x:.6f}".rstrip("0").rstrip(".") if x else "0"

    def usd(cpu: float | None) -> str:
        return "-" if cpu is None or cpu_hour_usd is None else dollars(cpu / 3600 * cpu_hour_usd)

    rows = ["| model | accuracy | ms/prediction | CPU-s per 1,000 predictions | parameters | size on disk (MB) | "
            "$ per 1,000 predictions |", "|---|---:|---:|---:|---:|---:|---:|"]
    if teacher:
        t_cpu = cpu_s(teacher["ms"], teacher.get("threads"))
        t_usd = dollars(teacher["usd_per_1000"]) if teacher["usd_per_1000"] is not None else usd(t_cpu)
        rows.append(f"| teacher: {teacher['name']} | {_pct(teacher['accuracy'])} | {teacher['ms'] or '-'} | "
                    f"{'-' if t_cpu is None else f'{t_cpu:.0f}'} | - | - | {t_usd} |")
    best = _best_cell(results)
    if best:
        ms = best.get("ms_per_example")
        s_cpu = cpu_s(ms, best.get("threads"))
        rows.append(f"| student: {best['method']} ({best['student']}, {100 * best['fraction']:g}% data, seed "
                    f"{best['seed']}) | {_pct(best['accuracy'])} | {ms or '-'} | "
                    f"{'-' if s_cpu is None else f'{s_cpu:.0f}'} | {_count(best.get('parameters'))} | "
                    f"{best.get('size_mb') or '-'} | {usd(s_cpu)} |")
    price = (f"${cpu_hour_usd:g} per CPU-hour (`--cpu-hour-usd`)" if cpu_hour_usd is not None
             else "no CPU-hour price given (`--cpu-hour-usd`)")
    return rows + ["", "ms/prediction: wall time per prediction as each stage measured it on its machine (the "
                       "teacher: its chain-of-thought generation; the student: the label only). CPU-s per 1,000 "
                       "predictions: that wall time x the threads the stage ran on. Dollars: the API's token prices "
                       f"where the teacher is an API, else CPU-seconds at {price}. '-': not measured (the paper's "
                       "recorded teacher outputs carry no latency or cost).", ""]


def _examples(results: dict[str, Any], teacher: dict[str, Any] | None, n: int = 5) -> list[str]:
    """A few test items: gold, the teacher's label and rationale, the student's label and, for a
    step-by-step student, its own rationale (generated here with its rationale task)."""
    with_rationales = [r for r in results["cells"] if _multitask(Path(results["dir"]) / "cells" / r["cell"] / "train")]
    best = _best_cell({"cells": with_rationales}) or _best_cell(results)
    if not best:
        return []
    items = best["predictions"][:n]
    own = None if any(p.get("rationale") for p in items) else _student_rationales(
        results, best, [p["input"] for p in items])
    out = ["## Examples", "", f"Test items with the best {best['method']} student ({best['cell']}).", ""]
    for i, p in enumerate(items):
        t = (teacher or {}).get("rows", {}).get(p["id"], {})
        out += [f"- **Input:** {p['input'][:400]}", f"  - gold: `{p.get('gold')}`; student: `{p.get('prediction')}` "
                f"({'right' if p.get('correct') else 'wrong'})"]
        if t:
            out.append(f"  - teacher: `{t.get('label')}`; rationale: {(t.get('rationale') or '-')[:400]}")
        why = p.get("rationale") if own is None else own[i]
        if why is not None:
            out.append(f"  - student's own rationale: {why[:400] or '(empty)'}")
    return out + [""]


def to_html(markdown: str, figs: dict[str, bytes], title: str) -> str:
    """A self-contained page from the Markdown above: headings, lists, tables, embedded plots."""
    body, table_rows = [], []

    def flush():
        if table_rows:
            head, *rest = table_rows
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
            table_rows.clear()

    def inline(text: str) -> str:
        text = html.escape(text)
        parts = text.split("`")
        text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
        parts = text.split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                table_rows.append([inline(c) for c in cells])
            continue
        flush()
        if line.startswith("!["):
            name = line.split("(figures/")[1].split(".png")[0]
            if name in figs:
                b64 = base64.b64encode(figs[name]).decode()
                body.append(f'<img alt="{name}" src="data:image/png;base64,{b64}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.lstrip().startswith("- "):
            body.append(f'<li style="margin-left:{len(line) - len(line.lstrip())}em">{inline(line.lstrip()[2:])}</li>')
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;"
           "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
           "img{max-width:100%;margin:1em 0}code{background:#f5f5f5;padding:0 3px}li{list-style:disc}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}: stepdistill report</title>"
            f"<style>{css}</style></head><body>{''.join(body)}</body></html>\n")


def report(sweep_dir: str | Path, out: str | Path, *, teacher_run: str | Path | None = None,
           cpu_hour_usd: float | None = None) -> Path:
    """Write out/report.md, out/report.html, out/results.json (the table), out/figures/*.png and
    out/cells.tar.gz (the finished cells' light files, see `sweep.pack_cells`)."""
    md, page, figs, table_ = build(sweep_dir, teacher_run, cpu_hour_usd)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, png in figs.items():
        (out / "figures" / f"{name}.png").write_bytes(png)
    write_text(out / "report.md", md)
    write_text(out / "report.html", page)
    write_json(out / "results.json", table_)
    pack_cells(sweep_dir, out / "cells.tar.gz")
    return out
