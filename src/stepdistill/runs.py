"""Run directories: every command writes one, holding what is needed to trust and redo it.

    runs/svamp-sbs/
      config.yaml     the resolved config (after YAML + --set overrides)
      env.json        package versions, git revision, seed, command line, start time
      log.txt         the run's log
      .stepdistill-run.json   the marker: which command made the folder, and a random id
      ...             the stage's outputs (annotations.jsonl, model/, metrics.json, ...)

Which folders a command may resume, overwrite or delete: ownership.py; what a resume may change:
resuming.py.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from stepdistill.config import to_yaml
from stepdistill.errors import RunExistsError, StepDistillError
from stepdistill.files import (  # noqa: F401  (re-exported: a run's files are written with these)
    TMP_SUFFIX, fsync_dir, fsync_tree, read_jsonl, remove_stale_temp_files, write_error, write_json, write_jsonl,
    write_text,
)
from stepdistill.ownership import claim_output, home  # noqa: F401  (home re-exported: the shared state's folder)
from stepdistill.redaction import redact_secrets
from stepdistill.resuming import NEVER_CHANGES_RESULTS, SPEED_ONLY, all_changes, is_under

log = logging.getLogger("stepdistill")

_PACKAGES = ("stepdistill", "torch", "transformers", "datasets", "accelerate", "peft", "safetensors", "gguf")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@dataclass
class Run:
    """A run directory, used as a context manager: env.json records whether the stage finished.

    >>> with create_run("runs/x", cfg, command="train") as run: ...
    """

    dir: Path
    _handler: logging.Handler | None = None
    main: bool = True  # False on the other processes of a distributed run: they write nothing here

    def path(self, name: str) -> Path:
        return self.dir / name

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.main:
            return
        try:
            env = json.loads(self.path("env.json").read_text())
            env["status"] = "done" if exc_type is None else ("interrupted" if exc_type is KeyboardInterrupt else "failed")
            env["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json(self.path("env.json"), env)
        except (OSError, ValueError, StepDistillError) as e:
            if exc_type is None and isinstance(e, StepDistillError):
                raise
            if exc_type is None:
                raise write_error(self.path("env.json"), e) from e
            # the stage already failed (often for the same reason: a full disk): report that error, not this one
            log.warning("could not record the run's status in %s: %s", self.path("env.json"), e)
        finally:
            self.close()

    def tee(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """What a stage tells the user also goes to the run's log.txt (the main process only)."""
        if not self.main:
            return lambda msg: None

        def say(msg: str) -> None:
            log.info(msg)
            echo(msg)
        return say

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger("stepdistill").removeHandler(self._handler)
            self._handler.close()
            self._handler = None


class _LogFile(logging.FileHandler):
    """log.txt copies what the user is told: when the disk is full, a line lost there must not
    bury the one-line error under a logging traceback per message."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun, accelerate launch set RANK), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Processes of a distributed launch (torchrun, accelerate launch set WORLD_SIZE), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def create_run(out: str | Path, config: BaseModel, *, command: str, seed: int | None = None,
               overwrite: bool = False, resume: bool = False, inputs: tuple[str | Path | None, ...] = (),
               may_change: tuple[str, ...] = ()) -> Run:
    """Make (or, with `resume`, reopen) a run directory and record config, versions and git revision.

    Ownership goes through `claim_output`: `--resume` and `--overwrite` act only on a folder
    carrying this command's marker, and `--overwrite` never deletes one holding the command's
    `inputs` (model, annotations, data, store), the working directory or a home folder.

    >>> run = create_run("runs/x", cfg, command="train")  # RunExistsError if runs/x holds a run

    `may_change`: config fields a resume may change (a sweep's grid axes; it checks its cells).
    """
    d = Path(out)
    if not is_main_process():  # torchrun / accelerate launch: rank 0 owns the run directory
        return Run(d, main=False)
    state = claim_output(d, command, overwrite=overwrite, resume=resume, inputs=inputs)
    speed: list[str] = []
    if state == "resume":  # --resume continues the same run: a changed config would mix two experiments
        every = all_changes(d, config)
        changed = [k for k in every if not is_under(k, (*may_change, *NEVER_CHANGES_RESULTS, *SPEED_ONLY))]
        if changed:
            raise RunExistsError(f"--resume refused: the config of {d} differs in {', '.join(changed)}; "
                                 f"resume with the same config, or start a new run with another --out")
        speed = [f"{k} {old!r} -> {new!r}" for k, (old, new) in every.items() if is_under(k, SPEED_ONLY)]
    try:  # opened before config.yaml is rewritten, so the values the run began with are logged first
        handler = _LogFile(d / "log.txt")
    except OSError as e:
        raise write_error(d / "log.txt", e) from e
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("stepdistill")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if state == "resume":
        if speed:
            log.info("resume: exact speed-ups changed since the run began (the same loss and gradients): %s",
                     ", ".join(speed))
        for p in remove_stale_temp_files(d):
            log.info("removed %s: a write the interrupted run never finished", p)
    try:
        write_text(d / "config.yaml", f"# written by: stepdistill {command}\n" + to_yaml(config))
        env = {
            "command": command,
            "argv": [redact_secrets(a)[0] for a in sys.argv],  # a key typed on the command line is not kept
            "versions": _versions(),
            "git_revision": _git_revision(),
            "seed": seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running",
            "host": platform.node(),
        }
        write_json(d / "env.json", env)
    except BaseException:
        logger.removeHandler(handler)
        handler.close()
        raise
    return Run(d, handler)
