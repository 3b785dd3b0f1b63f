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
