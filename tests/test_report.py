"""stepdistill report: the statistics against hand-computed values, and a report written from a
sweep directory built in the test (no training)."""

import json
import random

import pytest

from stepdistill import cli
from stepdistill.errors import StepDistillError
from stepdistill.report import comparisons, load_sweep, report
from stepdistill.stats import holm, mcnemar, paired_bootstrap, sign_flip_test
from stepdistill.sweep import summarise


def test_mcnemar_exact():
    a = [True] * 10 + [False] * 10
    b = [True] * 10 + [True] * 2 + [False] * 8  # b right on 2 items a got wrong, never the reverse
    r = mcnemar(a, b)
    assert (r["only_a"], r["only_b"]) == (0, 2) and r["p"] == pytest.approx(0.5)  # 2 * (1/2)^2
    assert mcnemar([True] * 10 + [False] * 10, [False] * 10 + [True] * 10)["p"] == 1.0  # 10 each way: no evidence
    r = mcnemar([True] * 20, [False] * 20)  # 20 one way, none the other
    assert (r["only_a"], r["only_b"]) == (20, 0) and r["p"] == pytest.approx(2 / 2 ** 20)
    r = mcnemar([True] * 9 + [False], [False] * 9 + [True])  # 9 vs 1: p = 2 * (1 + 10) / 1024
    assert r["p"] == pytest.approx(22 / 1024)
    assert mcnemar([True, False], [True, False])["p"] == 1.0


def test_paired_bootstrap_interval():
    rng = random.Random(0)
    a = [[rng.random() < 0.8 for _ in range(200)] for _ in range(3)]
    b = [[x and rng.random() < 0.7 for x in row] for row in a]  # clearly worse
    r = paired_bootstrap(a, b)
    assert r["low"] <= r["diff"] <= r["high"] and r["low"] > 0
    same = paired_bootstrap(a, a)
    assert same["diff"] == same["low"] == same["high"] == 0


def test_pooling_seeds_overstates_significance_and_the_item_level_test_does_not():
    """Three seeds that agree on every item are one measurement of each item, not three. A gets 9
    items right that B misses and B 2 that A misses: on the items, p = McNemar's 9 vs 2 = 0.065.
    Pooled over seeds x items it looks like 27 vs 6 (p = 0.0003) - significant by accident."""
    a_seed = [True] * 9 + [False] * 2 + [True] * 20 + [False] * 19
    b_seed = [False] * 9 + [True] * 2 + [True] * 20 + [False] * 19
    a, b = [a_seed] * 3, [b_seed] * 3
    pooled = mcnemar([x for row in a for x in row], [x for row in b for x in row])["p"]
    assert pooled < 0.001
    assert sign_flip_test(a, b) == pytest.approx(mcnemar(a_seed, b_seed)["p"]) == pytest.approx(2 * 67 / 2048)
    assert sign_flip_test(a, b) > 0.05


def test_sign_flip_test_by_hand_and_against_many_items():
    # one seed, 2 items only A got right: the 4 sign flips give |sum| 2, 0, 0, 2 -> p = 2/4
    assert sign_flip_test([[True, True, False]], [[False, False, False]]) == pytest.approx(0.5)
    # seeds averaged within items: differences (+2/3, +1/3); the flips give |sums| 1, 1/3, 1/3, 1 -> p = 0.5
    a = [[True, True], [True, False], [False, False]]
    b = [[False, False], [False, False], [False, False]]
    assert sign_flip_test(a, b) == pytest.approx(0.5)
    assert sign_flip_test(a, a) == 1.0
    # many differing items (Monte Carlo): 60 vs 30 one-seed discordant items, McNemar p = 0.0021
    a = [[True] * 60 + [False] * 30 + [True] * 100]
    b = [[False] * 60 + [True] * 30 + [True] * 100]
    assert sign_flip_test(a, b) == pytest.approx(mcnemar(a[0], b[0])["p"], abs=0.002)


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([]) == []


def _fake_sweep(d, task="esnli"):
    """A finished sweep's files: 2 methods x 2 fractions x 2 seeds, 40 test items."""
    rng = random.Random(1)
    classes = ["entailment", "neutral", "contradiction"]
    gold = [rng.choice(classes) for _ in range(40)]
    rows = []
    for method, skill in (("standard", 0.5), ("step-by-step", 0.8)):
        for fraction in (0.5, 1.0):
            for seed in (0, 1):
                name = f"{method}__s__f{fraction:g}__s{seed}"
                c = d / "cells" / name
                (c / "eval").mkdir(parents=True)
                (c / "train" / "model").mkdir(parents=True)
                (c / "train" / "model" / "model.safetensors").write_bytes(b"x" * 1000)
                preds = [g if rng.random() < skill * fraction + 0.1 else rng.choice(classes) for g in gold]
                (c / "eval" / "predictions.jsonl").write_text("".join(json.dumps(
                    {"id": f"t{i}", "input": f"premise {i}", "gold": g, "prediction": p, "correct": p == g}) + "\n"
                    for i, (g, p) in enumerate(zip(gold, preds))))
                (c / "train" / "train_log.jsonl").write_text("".join(json.dumps(
                    {"step": s, "loss": 3 / s, "label_loss": 2 / s, "rationale_loss": 4 / s}) + "\n" for s in range(1, 6)))
                acc = sum(p == g for p, g in zip(preds, gold)) / 40
                rows.append({"cell": name, "method": method, "student": "s", "fraction": fraction, "seed": seed,
                             "status": "done", "accuracy": acc, "n": 40, "ms_per_example": 2.5, "parameters": 1000})
    rows.append({"cell": "broken", "method": "distill", "student": "s", "fraction": 1.0, "seed": 0,
                 "status": "failed", "error": "StepDistillError: no annotations"})
    (d / "results.json").write_text(json.dumps({"task": task, "split": "test", "cells": rows,
                                                "summary": summarise(rows)}))
    (d / "config.yaml").write_text("task: {name: esnli}\n")
    return d


def test_report_writes_html_and_markdown(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "summary.json").write_text(json.dumps({"teacher": {"kind": "paper", "model": "PaLM-540B"},
                                                      "teacher_accuracy": 0.73, "ms_per_example": 900.0, "n": 40}))
    (teacher / "annotations.jsonl").write_text(json.dumps({"id": "t0", "label": "neutral", "rationale": "Because."}) + "\n")
    out = report(sweep, tmp_path / "out", teacher_run=teacher)
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for fig in ("accuracy_vs_data", "accuracy_vs_size", "training_curves", "confusion"):
        assert (out / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"figures/{fig}.png" in md and f'alt="{fig}"' in page
    assert "src=\"http" not in page and page.count("data:image/png;base64,") == 4  # self-contained
    assert "| standard | s | 100% |" in md and "teacher: paper PaLM-540B | 73.0%" in md
    assert "rationale: Because." in md and "broken" in md  # examples with the teacher; failed cells listed
    comps = comparisons(load_sweep(sweep))
    assert {(c["a"], c["b"], c["fraction"]) for c in comps} == {("standard", "step-by-step", 0.5),
                                                                ("standard", "step-by-step", 1.0)}
    assert all(c["seeds"] == 2 and c["items"] == 40 for c in comps)
    verdicts = [line for line in md.splitlines() if "| standard | step-by-step |" in line]
    assert len(verdicts) == 2
    assert "B better" in next(v for v in verdicts if "| 100% |" in v)  # 0.6 vs 0.9 skill on 2 x 40 items
    assert "## The paper's comparisons" not in md  # a config without its methods: no pairs claimed


def test_the_report_opens_with_the_papers_like_for_like_comparisons(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep")
    (sweep / "config.yaml").write_text("task: {name: esnli}\nmethods: [standard, step-by-step, distill]\n"
                                       "fractions: [0.5, 1.0]\nstudents: [s]\nseeds: [0, 1]\n")
    md = (report(sweep, tmp_path / "out") / "report.md").read_text()
    rows = [line for line in md.split("## The paper's comparisons, like for like")[1].split("## Are")[0].splitlines()
            if line.startswith("| s |")]
    # step-by-step (gold labels) against standard, oriented rationales - baseline; distill has no cells here
    assert len(rows) == 3 and all("| step-by-step | standard | gold |" in r for r in rows)
    full = next(r for r in rows if "| 100% |" in r)
    diff = float(full.split("|")[8].split("(")[0])
    assert diff > 0 and "rationales better" in full
    # the data-efficiency row: step-by-step on half the data against standard on all of it
    (half,) = [r for r in rows if "| 50% vs 100% |" in r]
    summary = {(x["method"], x["fraction"]): x["mean"] for x in json.loads((sweep / "results.json").read_text())["summary"]}
    cells = half.split("|")
    assert cells[6].strip().startswith(f"{100 * summary[('step-by-step', 0.5)]:.1f}%")
    assert cells[7].strip().startswith(f"{100 * summary[('standard', 1.0)]:.1f}%")
    comps = comparisons(load_sweep(sweep))
    (cross,) = [c for c in comps if c["fraction"] != c["fraction_b"]]
    assert (cross["a"], cross["fraction"], cross["b"], cross["fraction_b"]) == ("step-by-step", 0.5, "standard", 1.0)
    assert len(comps) == 3 and all(c["p_holm"] >= c["p"] for c in comps)  # Holm over all three
    # one seed on the smaller share (a cell not run for the other): no standard error, said so
    results = json.loads((sweep / "results.json").read_text())
    results["cells"] = [c for c in results["cells"] if c["cell"] != "step-by-step__s__f0.5__s1"]
    results["summary"] = summarise(results["cells"])
    (sweep / "results.json").write_text(json.dumps(results))
    md = (report(sweep, tmp_path / "out1") / "report.md").read_text()
    (half,) = [r for r in md.splitlines() if "| 50% vs 100% |" in r and r.startswith("| s |")][:1]
    assert "(1 seed)" in half.split("|")[6]


def test_the_data_efficiency_rows_hold_a_teacher_label_rationale_student_against_standard_on_gold(tmp_path):
    """The paper's data-efficiency claim is against standard fine-tuning on all the gold labels,
    whatever labels the rationale student used; at equal shares only like-for-like pairs are in the
    paper table (teacher-label rationales against standard is in the full table only)."""
    sweep = _fake_sweep(tmp_path / "sweep")
    results = json.loads((sweep / "results.json").read_text())
    for r in results["cells"]:
        r["method"] = {"step-by-step": "sbs-teacher"}.get(r["method"], r["method"])
    results["summary"] = summarise(results["cells"])
    (sweep / "results.json").write_text(json.dumps(results))
    # no distill in the sweep: no like-for-like pair for the teacher-label method, and still its row
    # against standard fine-tuning on all the gold labels
    (sweep / "config.yaml").write_text("task: {name: esnli}\nmethods: [standard, {name: step-by-step, "
                                       "label_source: teacher, tag: sbs-teacher}]\nfractions: [0.5, 1.0]\n"
                                       "students: [s]\nseeds: [0, 1]\n")
    md = (report(sweep, tmp_path / "out") / "report.md").read_text()
    rows = [line for line in md.split("## The paper's comparisons, like for like")[1].split("## Are")[0].splitlines()
            if line.startswith("| s |")]
    (half,) = rows
    assert "| 50% vs 100% | sbs-teacher | standard | teacher vs gold |" in half
    comps = comparisons(load_sweep(sweep))
    assert {(c["a"], c["fraction"], c["b"], c["fraction_b"]) for c in comps} == {
        ("sbs-teacher", 0.5, "standard", 0.5), ("sbs-teacher", 1.0, "standard", 1.0),
        ("sbs-teacher", 0.5, "standard", 1.0)}


def test_identical_methods_are_within_noise(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep")
    res = load_sweep(sweep)
    for r in res["cells"]:  # step-by-step made a copy of standard
        if r["method"] == "step-by-step":
            twin = next(x for x in res["cells"] if x["method"] == "standard" and x["fraction"] == r["fraction"]
                        and x["seed"] == r["seed"])
            r["predictions"] = twin["predictions"]
    assert all(c["within_noise"] and c["diff"] == 0 for c in comparisons(res))


def test_report_needs_a_sweep(tmp_path):
    with pytest.raises(StepDistillError, match="holds no sweep results"):
        report(tmp_path, tmp_path / "out")


def test_cli_report(tmp_path, capsys):
    sweep = _fake_sweep(tmp_path / "sweep")
    cli.run(["report", str(sweep), "--out", str(tmp_path / "r")])
    assert "report.html" in capsys.readouterr().out and (tmp_path / "r" / "report.html").is_file()


def test_a_verdict_is_significant_only_after_holms_adjustment():
    from stepdistill.report import verdict_of

    assert verdict_of({"diff": 0.03, "significant": True, "within_noise": False}) == "A better"
    assert verdict_of({"diff": -0.02, "significant": False, "within_noise": False}) == "B ahead, not after Holm"
    assert verdict_of({"diff": 0.01, "significant": False, "within_noise": True}) == "within noise"


def test_the_cost_table_measures_cpu_seconds_and_prices_them(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep")
    res = json.loads((sweep / "results.json").read_text())
    for r in res["cells"]:
        r["threads"] = 2
    (sweep / "results.json").write_text(json.dumps(res))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "summary.json").write_text(json.dumps({"teacher": {"kind": "llamacpp", "model": "t.gguf"},
                                                      "teacher_accuracy": 0.7, "ms_per_example": 600.0, "n": 40,
                                                      "threads": 2}))
    (teacher / "annotations.jsonl").write_text("")
    md = (report(sweep, tmp_path / "out", teacher_run=teacher, cpu_hour_usd=0.036) / "report.md").read_text()
    t_row = next(line for line in md.splitlines() if line.startswith("| teacher: llamacpp"))
    s_row = next(line for line in md.splitlines() if line.startswith("| student: "))
    # teacher: 600 ms x 2 threads = 1,200 CPU-s per 1,000 predictions = 1/3 CPU-hour = $0.012
    assert "| 600.0 | 1200 |" in t_row and t_row.endswith("| 0.012 |")
    # student: 2.5 ms x 2 threads = 5 CPU-s per 1,000 = $0.00005
    assert "| 2.5 | 5 |" in s_row and s_row.endswith("| 0.00005 |")
    plain = (report(sweep, tmp_path / "out2", teacher_run=teacher) / "report.md").read_text()
    assert next(line for line in plain.splitlines() if line.startswith("| student: ")).endswith("| - |")
