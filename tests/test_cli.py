"""The CLI: thin over the API; every domain error is one line on stderr and exit code 1."""

import json

import pytest

from stepdistill.cli import main


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _one_line_error(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stepdistill: error: "), err
    return lines[0]


def test_list_names_everything(capsys):
    code, out, _ = _run(capsys, "list")
    assert code == 0
    for name in ["svamp", "cqa", "esnli", "anli1", "asdiv", "generic", "quickstart", "paper", "hf", "step-by-step", "distill", "standard"]:
        assert name in out


def test_unknown_task_teacher_method_list_valid_ones(capsys, tmp_path):
    code, _, err = _run(capsys, "annotate", "--task", "svmap", "--teacher", "paper", "--out", str(tmp_path / "r"))
    assert code == 1 and "svamp" in _one_line_error(err) and "svmap" in err
    code, _, err = _run(capsys, "annotate", "--task", "svamp", "--data", str(tmp_path), "--teacher", "gpt9", "--out", str(tmp_path / "r"))
    assert code == 1 and "paper" in _one_line_error(err)
    code, _, err = _run(capsys, "train", "--task", "svamp", "--student", "x", "--method", "magic", "--out", str(tmp_path / "r"))
    assert code == 1 and "step-by-step" in _one_line_error(err)


def test_missing_file_and_bad_line_are_named(capsys, tmp_path):
    code, _, err = _run(capsys, "annotate", "--task", "svamp", "--data", str(tmp_path / "nope.jsonl"), "--teacher", "paper", "--out", str(tmp_path / "r"))
    assert code == 1 and "nope.jsonl" in _one_line_error(err)
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"input": "a", "label": "(1 + 2)"}) + "\n" + json.dumps({"question": "b", "label": "(1)"}) + "\n")
    code, _, err = _run(capsys, "annotate", "--task", "svamp", "--data", str(f), "--teacher", "hf", "--model", "m", "--out", str(tmp_path / "r"))
    line = _one_line_error(err)
    assert code == 1 and "line 2" in line and "input" in line
    assert not (tmp_path / "r").exists()  # nothing written for a run that could not start


def test_config_with_several_mistakes_reports_all(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: {name: svamp}\nmethod: {name: step-by-step, alpha: 2}\ntraining: {epochs: -1, lerning_rate: 1}\n")
    code, _, err = _run(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "r"))
    line = _one_line_error(err)
    assert code == 1 and "4 problems" in line
    for part in ["student", "method.alpha", "training.epochs", "training.lerning_rate"]:
        assert part in line


def test_annotate_paper_from_cli(capsys, tmp_path):
    d = tmp_path / "svamp"
    (d / "llm").mkdir(parents=True)
    (d / "svamp_test.json").write_text(json.dumps({"input": "1 and 2?", "label": "( 1.0 + 2.0 )"}) + "\n")
    (d / "llm" / "test_CoT_0.json").write_text(json.dumps(["1 plus 2. The answer is (1 + 2)."]))
    code, out, err = _run(capsys, "annotate", "--task", "svamp", "--data", str(d), "--split", "test", "--teacher", "paper", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "teacher_accuracy=100.00%" in out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["parsed"] == 1
    code, _, err = _run(capsys, "annotate", "--task", "svamp", "--data", str(d), "--split", "test", "--teacher", "paper", "--out", str(tmp_path / "r"))
    assert code == 1 and "--overwrite" in _one_line_error(err)
