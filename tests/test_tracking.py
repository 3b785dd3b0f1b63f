"""training.report_to: the Trainer's trackers get every curve, offline, and only when asked."""

from __future__ import annotations

import pytest

from stepdistill import api
from stepdistill.errors import ConfigError
from stepdistill.tasks import get_task
from tiny_models import annotated_svamp

QUESTIONS = get_task("quickstart").load("train")[:24]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return annotated_svamp(tmp_path_factory.mktemp("tracking"), QUESTIONS)


def config(d, **training):
    return {"task": {"name": "svamp", "path": str(d / "data.jsonl")}, "student": {"model": str(d / "student")},
            "method": {"name": "step-by-step"}, "annotations": str(d / "ann"),
            "training": {"max_steps": 4, "batch_size": 4, "val_fraction": 0.25, "eval_steps": 2, "logging_steps": 1,
                         "learning_rate": 1e-3, "bf16": False, **training}}


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = [p.parent for p in folder.rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_tensorboard_gets_the_loss_each_tasks_loss_and_validation_accuracy(setup):
    pytest.importorskip("tensorboard")
    out = setup / "tb"
    api.train(config(setup, report_to="tensorboard"), out, echo=lambda _: None,
              tags={"run": "cell-a", "method": "step-by-step", "seed": "0"})
    curves, acc = scalars(out / "tensorboard" / "cell-a")
    for tag in ("train/loss", "train/label_loss", "train/rationale_loss", "eval/accuracy"):
        assert tag in curves, sorted(curves)
    assert len(curves["train/loss"]) == 4 and len(curves["eval/accuracy"]) == 2
    assert all(0 <= a <= 1 for a in curves["eval/accuracy"])
    assert "stepdistill/tags/text_summary" in acc.Tags()["tensors"]  # the cell's tags, beside its curves


def test_no_tracker_unless_asked(setup):
    out = setup / "quiet"
    api.train(config(setup), out, echo=lambda _: None)
    assert not list(out.rglob("events.out.tfevents.*")) and not (out / "tensorboard").exists()


def test_a_tracker_that_is_not_installed_stops_the_run_before_it_starts(setup, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to=\['wandb'\] needs wandb: pip install wandb"):
        api.train(config(setup, report_to=["wandb"]), setup / "nope", echo=lambda _: None)
    assert not (setup / "nope").exists()


def test_an_unknown_tracker_is_refused_by_the_config():
    from stepdistill.config import TrainingConfig

    with pytest.raises(Exception, match="tensorbord"):
        TrainingConfig(report_to=["tensorbord"])
    assert TrainingConfig(report_to="none").report_to == [] and TrainingConfig(report_to="tensorboard,mlflow").report_to == [
        "tensorboard", "mlflow"]


def test_mlflow_logs_every_curve_and_the_tags_to_a_local_file_store(setup, monkeypatch):
    pytest.importorskip("mlflow")  # mlflow-skinny, in the dev extra
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = setup / "mlf"
    api.train(config(setup, report_to="mlflow"), out, echo=lambda _: None,
              tags={"run": "cell-m", "method": "step-by-step", "seed": "1"})
    (run,) = [p.parent for p in (out / "mlruns").rglob("meta.yaml") if (p.parent / "metrics").is_dir()]
    metrics = {p.name for p in (run / "metrics").iterdir()}
    for name in ("loss", "label_loss", "rationale_loss", "eval_accuracy"):
        assert name in metrics, sorted(metrics)
    tags = {p.name: p.read_text() for p in (run / "tags").iterdir()}
    assert tags.get("method") == "step-by-step" and tags.get("seed") == "1" and tags.get("mlflow.runName") == "cell-m"
    assert "MLFLOW_TRACKING_URI" not in __import__("os").environ  # set for the run only


def test_wandb_runs_offline_into_the_run_folder(setup, monkeypatch):
    pytest.importorskip("wandb")
    for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    out = setup / "wb"
    api.train(config(setup, report_to="wandb"), out, echo=lambda _: None,
              tags={"run": "cell-w", "method": "step-by-step", "sweep": "sw"})
    (run_dir,) = list((out / "wandb").glob("offline-run-*"))  # offline: nothing was sent
    (data,) = list(run_dir.glob("*.wandb"))
    # the run's records, protobuf in a LevelDB-style log: its keys and names are stored as plain UTF-8
    raw = data.read_bytes()
    for key in (b"train/loss", b"train/label_loss", b"train/rationale_loss", b"eval/accuracy",
                b"cell-w", b"method=step-by-step", b"sw"):
        assert key in raw, key
    # the next cell is a run of its own, not more steps of this one (the Trainer leaves wandb's run open)
    api.train(config(setup, report_to="wandb"), setup / "wb2", echo=lambda _: None, tags={"run": "cell-w2"})
    (second,) = list((setup / "wb2" / "wandb").glob("offline-run-*/*.wandb"))
    assert b"cell-w2" in second.read_bytes() and b"cell-w2" not in data.read_bytes()


def test_trackio_logs_every_curve_and_the_tags_into_a_local_database(setup, monkeypatch):
    import importlib.util
    import sqlite3
    import sys

    if importlib.util.find_spec("trackio") is None:  # in the dev extra
        pytest.skip("trackio is not installed")

    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)
    if "trackio" in sys.modules:  # trackio reads TRACKIO_DIR once, at import: this run's folder must be the first
        pytest.skip("trackio was imported before this test")
    out = setup / "tio"
    api.train(config(setup, report_to="trackio"), out, echo=lambda _: None,
              tags={"run": "cell-t", "method": "step-by-step", "seed": "1", "sweep": "sw"})
    (db,) = list((out / "trackio").glob("*.db"))
    assert db.stem == "sw"  # the sweep's name is the project
    con = sqlite3.connect(db)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    text = "\n".join(str(row) for t in tables for row in con.execute(f"SELECT * FROM {t}"))
    for key in ("train/loss", "train/label_loss", "train/rationale_loss", "eval/accuracy", "cell-t",
                "stepdistill/method", "step-by-step"):
        assert key in text, (key, tables)
    assert "TRACKIO_DIR" not in __import__("os").environ  # set for the run only
