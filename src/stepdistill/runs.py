"""Run directories: every command writes one, holding what is needed to trust and redo it.

    runs/svamp-sbs/
      config.yaml     the resolved config (after YAML + --set overrides)
      env.json        package versions, git revision, seed, command line, start time
      log.txt         the run's log
      ...             the stage's outputs (annotations.jsonl, model/, metrics.json, ...)

An existing run directory is never overwritten unless the caller asks (`--overwrite`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stepdistill.config import to_yaml
from stepdistill.errors import RunExistsError

log = logging.getLogger("stepdistill")

_PACKAGES = ("stepdistill", "torch", "transformers", "datasets", "accelerate", "peft", "safetensors", "gguf")


def home() -> Path:
    """Where state shared between runs lives (annotation store, model cache). Tests point it at a temp dir."""
    return Path(os.environ.get("STEPDISTILL_HOME", Path.home() / ".cache" / "stepdistill"))


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


def write_json(path: Path, data: Any) -> None:
    """Atomic write: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Run:
    dir: Path
    _handler: logging.Handler | None = None

    def path(self, name: str) -> Path:
        return self.dir / name

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger("stepdistill").removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def create_run(out: str | Path, config: BaseModel, *, command: str, seed: int | None = None,
               overwrite: bool = False, resume: bool = False) -> Run:
    """Make (or, with `resume`, reopen) a run directory and record config, versions and git revision.

    >>> run = create_run("runs/x", cfg, command="train")  # RunExistsError if runs/x holds a run
    """
    d = Path(out)
    if d.exists() and any(d.iterdir()) and not resume:
        if not overwrite:
            raise RunExistsError(
                f"run directory {d} already exists: pass --overwrite to replace it, "
                f"--resume to continue it, or choose another --out"
            )
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(f"# written by: stepdistill {command}\n" + to_yaml(config))
    env = {
        "command": command,
        "argv": sys.argv,
        "versions": _versions(),
        "git_revision": _git_revision(),
        "seed": seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
    }
    write_json(d / "env.json", env)
    handler = logging.FileHandler(d / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("stepdistill")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return Run(d, handler)
