"""Experiment trackers (`training.report_to`): the Trainer's own integrations, kept offline.

    with tracking(["tensorboard"], run_dir, run_name="standard-s0", tags={"method": "standard"}) as (to, cbs):
        TrainingArguments(..., report_to=to, run_name=...); Trainer(..., callbacks=[*cbs])

Every curve the Trainer logs reaches them: the loss, each task's loss and the KD terms (the
trainer's `note`), and validation accuracy. Nothing leaves the machine unless the user's own
environment says so:
  - tensorboard writes event files to `<folder>/tensorboard/<run_name>` (one folder per sweep cell,
    so `tensorboard --logdir <sweep>/tensorboard` shows them side by side);
  - mlflow logs to a file store, `<folder>/mlruns`, unless MLFLOW_TRACKING_URI is set (e.g. to
    `sqlite:///mlflow.db`, mlflow 3's preferred local store, which needs sqlalchemy);
  - wandb runs offline (WANDB_MODE=offline, files under `<folder>`) unless WANDB_MODE is set;
  - trackio writes its local database under `<folder>/trackio` (TRACKIO_DIR, which trackio reads
    once, when first imported: a process's later runs log where its first did) unless TRACKIO_DIR
    is set; the project is the sweep's name (or `stepdistill`) and the tags go into the run's
    config. Nothing goes to a Space unless TRACKIO_SPACE_ID says so.
`tags` (a sweep cell's method, student, fraction and seed) go where each tracker groups runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator

from transformers import TrainerCallback

from stepdistill.errors import ConfigError

# the package each tracker needs (tensorboard: torch's SummaryWriter writes through it)
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_installed(report_to: list[str]) -> None:
    """Before anything trains: a tracker that is not installed is a one-line error, not a crash at step 0."""
    missing = [t for t in report_to if importlib.util.find_spec(_PACKAGES[t]) is None]
    if missing:
        raise ConfigError(f"training.report_to={missing} needs {' '.join(_PACKAGES[t] for t in missing)}: "
                          f"pip install {' '.join(_PACKAGES[t] for t in missing)}, or drop it from report_to")


@contextlib.contextmanager
def tracking(report_to: list[str], folder: Path, *, run_name: str, tags: dict[str, str] | None = None
             ) -> Iterator[tuple[list[str] | str, list[TrainerCallback]]]:
    """The Trainer's `report_to` and the callbacks to add, with the trackers' environment set for
    the length of the training (and restored after, so the cells of a sweep do not share it)."""
    check_installed(report_to)
    tags = tags or {}
    env: dict[str, str] = {}
    callbacks: list[TrainerCallback] = []
    integrations = [t for t in report_to if t != "tensorboard"]
    if "tensorboard" in report_to:
        from transformers.integrations import TensorBoardCallback

        tb = TensorBoardCallback()
        tb.logging_dir = str(folder / "tensorboard" / run_name)
        callbacks += [tb, _TensorBoardTags(tb, tags)]
    if "mlflow" in report_to:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
        else:  # a plain local file store: no database package needed (mlflow 3 asks to be told it is wanted)
            env["MLFLOW_TRACKING_URI"] = (folder / "mlruns").resolve().as_uri()
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        env["MLFLOW_TAGS"] = json.dumps(tags)
    if "wandb" in report_to:
        env["WANDB_MODE"] = os.environ.get("WANDB_MODE", "offline")
        env["WANDB_DIR"] = os.environ.get("WANDB_DIR", str(folder))
        if tags:  # an empty WANDB_TAGS is one empty tag, which wandb refuses
            env["WANDB_TAGS"] = ",".join(f"{k}={v}" for k, v in tags.items())
        if "sweep" in tags:
            env["WANDB_RUN_GROUP"] = tags["sweep"]
    if "trackio" in report_to:
        env["TRACKIO_DIR"] = os.environ.get("TRACKIO_DIR", str(folder / "trackio"))
        callbacks.append(_TrackioRun(tags.get("sweep") or "stepdistill", tags))
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield (integrations or "none"), callbacks
    finally:
        if "wandb" in report_to:  # the Trainer leaves its wandb run open: close it, or the next sweep cell logs into it
            import wandb

            if wandb.run is not None:
                wandb.finish()
            wandb.teardown()  # its settings (WANDB_DIR among them) are read once per setup: the next run reads its own
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _TensorBoardTags(TrainerCallback):
    """The run's tags as a text summary, beside the curves."""

    def __init__(self, tb, tags: dict[str, str]):
        self.tb, self.tags = tb, tags

    def on_train_begin(self, args, state, control, **kwargs):
        if self.tags and state.is_world_process_zero and self.tb.tb_writer is not None:
            self.tb.tb_writer.add_text("stepdistill/tags", json.dumps(self.tags))


class _TrackioRun(TrainerCallback):
    """The Trainer's trackio callback logs into `args.project` (the Trainer's default: `huggingface`)
    with no tags: name the project, and put the tags in the run's config once trackio has started
    it (the integrations' callbacks run before the ones passed in)."""

    def __init__(self, project: str, tags: dict[str, str]):
        self.project, self.tags = project, tags

    def on_init_end(self, args, state, control, **kwargs):
        args.project = self.project

    def on_train_begin(self, args, state, control, **kwargs):
        if self.tags and state.is_world_process_zero:
            import trackio

            trackio.config.update({f"stepdistill/{k}": v for k, v in self.tags.items()})
