"""stepdistill sweep: the grid runs, subsets are nested and fixed across methods and seeds, a
failed cell is recorded while the rest go on, and a rerun does no finished cell again."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from stepdistill import api, cli
from stepdistill.data import nested_subset
from stepdistill.config import SweepRun
from stepdistill.errors import RunExistsError
from stepdistill.sweep import cells, summarise, sweep
from stepdistill.tasks import get_task
from tiny_models import annotated_svamp

QUESTIONS = get_task("quickstart").load("train")[:24]


def test_nested_subsets_are_nested_and_fixed():
    exs = get_task("quickstart").load("train")
    small, half, whole = (nested_subset(exs, f, seed=7) for f in (0.125, 0.5, 1.0))
    assert len(small) == 25 and len(half) == 100 and whole == exs
    assert set(e.id for e in small) < set(e.id for e in half)
    assert [e.index for e in half] == sorted(e.index for e in half)  # original order kept
    assert nested_subset(exs, 0.5, seed=7) == half  # deterministic
    assert nested_subset(exs, 0.5, seed=8) != half  # the data seed decides


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = annotated_svamp(tmp_path_factory.mktemp("sweep"), QUESTIONS)
    data = d / "data.jsonl"
    cfg = {"task": {"name": "svamp", "path": str(data)}, "annotations": str(d / "ann"),
           "methods": ["standard", "step-by-step", {"name": "step-by-step", "task_marker": "decoder"}],
           "fractions": [0.5, 1.0], "students": [str(d / "student")], "seeds": [0, 1],
           "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "val_fraction": 0.25, "bf16": False},
           "eval": {"limit": 6, "dtype": "bfloat16"}}
    return d, cfg


def test_sweep_runs_the_grid_records_failures_and_resumes(setup, monkeypatch):
    d, cfg = setup
    out = d / "run"
    lines = []
    results = sweep(cfg, out, echo=lines.append)
    rows = results["cells"]
    assert len(rows) == 12 == len(cells(SweepRun(**cfg)))
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(done) == 8 and len(failed) == 4  # a causal student cannot take the decoder marker
    assert all("task_marker=decoder needs an encoder-decoder student" in r["error"] for r in failed)
    assert all((out / "cells" / r["cell"] / "error.txt").is_file() for r in failed)
    for r in done:
        train = json.loads((out / "cells" / r["cell"] / "train" / "metrics.json").read_text())
        assert train["n_train"] == (9 if r["fraction"] == 0.5 else 18)  # 24 - 6 validation, then the share
        assert 0 <= r["accuracy"] <= 1 and r["n"] == 6
        assert "dtype: bfloat16" in (out / "cells" / r["cell"] / "eval" / "config.yaml").read_text()
    summary = {(s["method"], s["fraction"]): s for s in results["summary"]}
    assert summary[("standard", 0.5)]["seeds"] == 2 and summary[("step-by-step", 1.0)]["seeds"] == 2
    assert summary[("step-by-step-decoder", 1.0)]["failed"] == 2 and summary[("step-by-step-decoder", 1.0)]["mean"] is None
    # a failed cell stays failed in a table that does not run it again
    collected = sweep(cfg, out, echo=lambda _: None, collect=True)
    assert [(r["status"], r.get("error")) for r in collected["cells"] if r["status"] != "done"] == [
        ("failed", r["error"]) for r in failed]
    old_style = out / "cells" / failed[0]["cell"] / "error.txt"  # written before the summary line existed
    old_style.write_text("Traceback (most recent call last):\n  File \"x.py\"\nValueError: an old failure\n")
    assert sweep(cfg, out, echo=lambda _: None, collect=True)["cells"][[r["cell"] for r in rows].index(
        failed[0]["cell"])]["error"] == "ValueError: an old failure"
    assert any("| standard |" in line for line in lines)  # the table is printed
    with open(out / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (out / "cells.csv").is_file() and (out / "results.json").is_file()

    # its report: the table as JSON, and examples with the step-by-step student's own rationales
    from stepdistill.report import report

    rep = report(out, d / "report")
    table = json.loads((rep / "results.json").read_text())
    assert len(table["cells"]) == 12 and {c["a"] for c in table["comparisons"]} and "predictions" not in table["cells"][0]
    md = (rep / "report.md").read_text()
    assert "best step-by-step student" in md and md.count("student's own rationale:") == 5

    # a rerun trains and evaluates nothing that finished
    calls = []
    monkeypatch.setattr(api, "train", lambda *a, **k: calls.append("train"))
    monkeypatch.setattr(api, "evaluate", lambda *a, **k: calls.append("eval"))
    again = sweep(cfg, out, echo=lambda _: None)
    assert calls == ["train", "eval"] * 4  # only the 4 failed cells are tried again
    assert [r["accuracy"] for r in again["cells"] if r["status"] == "done"] == [r["accuracy"] for r in done]


def test_sweep_refuses_a_changed_config_in_the_same_directory(setup):
    d, cfg = setup
    out = d / "run2"
    small = {**cfg, "methods": ["standard"], "fractions": [1.0], "seeds": [0]}
    sweep(small, out, echo=lambda _: None)
    with pytest.raises(RunExistsError, match="differs in training.learning_rate"):
        sweep({**small, "training": {**small["training"], "learning_rate": 1e-2}}, out, echo=lambda _: None)


def test_a_resumed_sweep_may_add_seeds_and_methods_and_reuses_only_identical_cells(setup, monkeypatch):
    d, cfg = setup
    out = d / "run3"
    small = {**cfg, "methods": ["standard", "step-by-step"], "fractions": [1.0], "seeds": [0],
             "training": {**cfg["training"], "eval_steps": 1}}
    first = sweep(small, out, echo=lambda _: None)
    for r in first["cells"]:  # where each cell's time went, from its calls' wall times and the training log
        parts = r["steps_s"] + r["validation_s"] + r["test_eval_s"] + r["other_s"]
        assert r["wall_s"] > 0 and r["steps_s"] > 0 and r["validation_s"] >= 0 and abs(parts - r["wall_s"]) < 0.3
    calls = []
    real_train = api.train
    monkeypatch.setattr(api, "train", lambda c, o, **k: (calls.append(Path(o).parent.name), real_train(c, o, **k))[1])
    grown = sweep({**small, "methods": ["standard"], "seeds": [0, 1]}, out, echo=lambda _: None)
    assert calls == ["standard__student__f1__s1"]  # seed 0 is reused, not retrained
    # a run naming part of the folder's grid keeps the rest: step-by-step's cell stays in the table
    assert [(r["cell"], r["status"]) for r in grown["cells"]] == [
        ("standard__student__f1__s0", "done"), ("standard__student__f1__s1", "done"),
        ("step-by-step__student__f1__s0", "done"), ("step-by-step__student__f1__s1", "not run")]
    assert grown["cells"][0]["accuracy"] == first["cells"][0]["accuracy"]
    saved = SweepRun(**yaml.safe_load((out / "config.yaml").read_text()))
    assert [m.name for m in saved.methods] == ["standard", "step-by-step"] and saved.seeds == [0, 1]
    # the grid shrinks only by --collect, which names the cells it leaves out
    lines = []
    shrunk = sweep({**small, "methods": ["standard"], "seeds": [0, 1]}, out, echo=lines.append, collect=True)
    assert [r["cell"] for r in shrunk["cells"]] == ["standard__student__f1__s0", "standard__student__f1__s1"]
    assert any("outside this grid" in line and "step-by-step__student__f1__s0" in line for line in lines)
    # the same tag with other options would reuse a cell that trained something else: refused
    with pytest.raises(RunExistsError, match="cell step-by-step__student__f1__s0 on disk trained another config.*alpha"):
        sweep({**small, "methods": ["standard", {"name": "step-by-step", "alpha": 0.9, "tag": "step-by-step"}]}, out,
              echo=lambda _: None)
    # where the curves go changes no result: a resume may add a tracker
    sweep({**small, "methods": ["standard"], "seeds": [0, 1], "training": {**small["training"], "report_to": ["tensorboard"]}},
          out, echo=lambda _: None)
    with pytest.raises(RunExistsError, match="differs in training.max_steps"):  # not a grid axis
        sweep({**small, "training": {**small["training"], "max_steps": 3}}, out, echo=lambda _: None)


def test_a_grid_run_in_parts_is_collected_into_one_table_without_training(setup, monkeypatch):
    """Several sweeps side by side (one seed each, as on one GPU), their cells copied into the
    folder of a `--collect` sweep, then `--collect` again: every copied cell is in the table, the
    grid's other cells are marked "not run", and nothing trains."""
    import shutil

    d, cfg = setup
    small = {**cfg, "methods": ["standard"], "fractions": [1.0]}
    for seed in (0, 1):
        sweep({**small, "seeds": [seed]}, d / f"part{seed}", echo=lambda _: None)
    merged = d / "merged"
    with pytest.raises(RunExistsError, match="not a stepdistill sweep output"):  # a folder it did not make
        (merged / "cells").mkdir(parents=True)
        sweep({**small, "seeds": [0, 1, 2]}, merged, echo=lambda _: None, collect=True)
    shutil.rmtree(merged)
    empty = sweep({**small, "seeds": [0, 1, 2]}, merged, echo=lambda _: None, collect=True)  # makes the folder
    assert [r["status"] for r in empty["cells"]] == ["not run"] * 3
    for seed in (0, 1):
        for c in (d / f"part{seed}" / "cells").iterdir():
            shutil.copytree(c, merged / "cells" / c.name)
    monkeypatch.setattr(api, "train", lambda *a, **k: pytest.fail("--collect trained a cell"))
    monkeypatch.setattr(api, "evaluate", lambda *a, **k: pytest.fail("--collect evaluated a cell"))
    lines = []
    results = sweep({**small, "seeds": [0, 1, 2]}, merged, echo=lines.append, collect=True)
    assert [(r["seed"], r["status"]) for r in results["cells"]] == [(0, "done"), (1, "done"), (2, "not run")]
    assert results["summary"][0]["seeds"] == 2 and results["summary"][0]["not_run"] == 1
    assert any("1 cells not run (--collect)" in line for line in lines)
    assert any("2 (1 not run)" in line for line in lines)  # the printed table says so too
    from stepdistill.report import report

    md = (report(merged, d / "merged-report") / "report.md").read_text()
    assert "## Cells not run" in md and "`standard__student__f1__s2`" in md


def test_a_sweep_goes_on_from_another_machines_cells_archive(setup, monkeypatch, tmp_path):
    """The finished cells packed (no weights) and restored into a fresh folder: the sweep trains
    only the cells the archive lacks, its table and report hold the restored ones, the archive's
    bytes depend only on the cells, a cell on disk is never replaced, a restored cell that trained
    another config is refused, and a file that is not such an archive is one clear error."""
    from stepdistill.errors import StepDistillError
    from stepdistill.report import report
    from stepdistill.sweep import pack_cells

    d, cfg = setup
    small = {**cfg, "methods": ["standard"], "fractions": [1.0]}
    first = sweep({**small, "seeds": [0]}, tmp_path / "machine1", echo=lambda _: None)
    archive = tmp_path / "cells.tar.gz"
    assert pack_cells(tmp_path / "machine1", archive) == ["standard__student__f1__s0"]
    weights = [p.name for p in (tmp_path / "machine1").rglob("*.safetensors")]
    assert weights and archive.stat().st_size < 20_000
    again = tmp_path / "again.tar.gz"
    pack_cells(tmp_path / "machine1", again)
    assert again.read_bytes() == archive.read_bytes()  # fixed times and owners: one sweep, one file

    trained = []
    real_train = api.train
    monkeypatch.setattr(api, "train", lambda c, out, **k: (trained.append(Path(out).parent.name), real_train(c, out, **k))[1])
    lines = []
    results = sweep({**small, "seeds": [0, 1]}, tmp_path / "machine2", echo=lines.append, cells_from=archive)
    assert trained == ["standard__student__f1__s1"]  # seed 0 came from the archive
    assert any("restored 1 finished cell(s)" in line for line in lines)
    assert [r["status"] for r in results["cells"]] == ["done", "done"]
    assert results["cells"][0]["accuracy"] == first["cells"][0]["accuracy"]
    md = (report(tmp_path / "machine2", tmp_path / "rep") / "report.md").read_text()
    assert "cells.tar.gz" in md and (tmp_path / "rep" / "cells.tar.gz").is_file()
    assert not any((tmp_path / "machine2" / "cells" / "standard__student__f1__s0").rglob("*.safetensors"))

    kept = tmp_path / "machine2" / "cells" / "standard__student__f1__s0" / "eval" / "metrics.json"
    kept.write_text(kept.read_text() + " ")
    mark = kept.read_text()
    sweep({**small, "seeds": [0, 1]}, tmp_path / "machine2", echo=lambda _: None, cells_from=archive)
    assert kept.read_text() == mark  # on disk already: untouched
    with pytest.raises(RunExistsError, match="trained another config"):
        sweep({**small, "seeds": [0], "training": {**small["training"], "max_steps": 3}}, tmp_path / "machine3",
              echo=lambda _: None, cells_from=archive)
    import io
    import tarfile

    with tarfile.open(tmp_path / "escape.tar.gz", "w:gz") as tar:  # a crafted archive: a path out of its cell
        info = tarfile.TarInfo("cells/x/../../../outside.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(StepDistillError, match="which no cells archive holds"):
        sweep({**small, "seeds": [0]}, tmp_path / "machine5", echo=lambda _: None, cells_from=tmp_path / "escape.tar.gz")
    assert not (tmp_path / "outside.txt").exists()
    (tmp_path / "notes.tar.gz").write_text("not an archive")
    with pytest.raises(StepDistillError, match="not a cells archive"):
        sweep({**small, "seeds": [0]}, tmp_path / "machine4", echo=lambda _: None, cells_from=tmp_path / "notes.tar.gz")


def test_a_cells_time_splits_into_steps_validation_test_evaluation_and_the_rest(tmp_path):
    from stepdistill.sweep import cell_timing

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"seconds": 100.0}))
    (tmp_path / "train" / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"step": 10, "loss": 1.0}, {"step": 60, "eval_accuracy": 0.5, "eval_runtime": 6.0},
        {"step": 120, "eval_accuracy": 0.6, "eval_runtime": 4.0}]))
    t = cell_timing(tmp_path, train_call=110.0, eval_call=30.0)
    assert t == {"wall_s": 140.0, "steps_s": 90.0, "validation_s": 10.0, "test_eval_s": 30.0, "other_s": 10.0}


def test_summary_mean_and_standard_error():
    rows = [{"method": "m", "student": "s", "fraction": 1.0, "status": "done", "accuracy": a} for a in (0.5, 0.7, 0.6)]
    rows.append({"method": "m", "student": "s", "fraction": 1.0, "status": "failed"})
    (s,) = summarise(rows)
    assert s["seeds"] == 3 and s["failed"] == 1
    assert s["mean"] == pytest.approx(0.6) and s["sem"] == pytest.approx(0.1 / 3 ** 0.5)
    assert (s["min"], s["max"]) == (0.5, 0.7)


def test_cli_sweep(setup, tmp_path, capsys):
    import yaml

    d, cfg = setup
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump({**cfg, "methods": ["standard"], "fractions": [1.0]}))
    cli.run(["sweep", "--config", str(f), "--set", "seeds=[3]", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "| standard |" in out and "wrote" in out
