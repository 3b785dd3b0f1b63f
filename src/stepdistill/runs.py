"""Run directories: every command writes one, holding what is needed to trust and redo it.

    runs/svamp-sbs/
      config.yaml     the resolved config (after YAML + --set overrides)
      env.json        package versions, git revision, seed, command line, start time
      log.txt         the run's log
      .stepdistill-run.json   the marker: which command made the folder, and a random id
      ...             the stage's outputs (annotations.jsonl, model/, metrics.json, ...)

A folder is stepdistill's only when it carries the marker of the command's own kind (or, for a run
written before the marker, that command's own env.json and config.yaml): only such a folder is
resumed, overwritten (`--overwrite`) or deleted, and never one holding the command's inputs, the
working directory or a home folder. `claim_output` is the one check every command makes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from pydantic import BaseModel

from stepdistill.config import ADDED_FIELDS, to_yaml
from stepdistill.errors import RunExistsError, StepDistillError
from stepdistill.files import (  # noqa: F401  (re-exported: a run's files are written with these)
    TMP_SUFFIX, fsync_dir, fsync_tree, read_jsonl, remove_stale_temp_files, write_error, write_json, write_jsonl,
    write_text,
)
from stepdistill.redaction import redact_secrets

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


def _inside(a: Path, b: Path) -> bool:
    """Is `a` the same as, or inside, `b`?"""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun, accelerate launch set RANK), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Processes of a distributed launch (torchrun, accelerate launch set WORLD_SIZE), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


MARKER = ".stepdistill-run.json"  # written by stepdistill alone, first, into every folder it makes
OUTPUT_KINDS = ("annotate", "train", "eval", "sweep", "quickstart", "export", "prune")
_QUICKSTART_ENTRIES = {"annotate-train", "annotate-test", "student-standard", "student-step-by-step",
                       "student-distill", "student-label-rationale", "summary.json", "table.txt"}


def new_marker(kind: str) -> dict[str, Any]:
    """What marks a folder that `stepdistill <kind>` made; the random id tells two outputs apart."""
    return {"kind": kind, "id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_marker(d: Path, kind: str) -> dict[str, Any]:
    """Mark `d` as a folder that `stepdistill <kind>` made: only such a folder is ever resumed,
    overwritten or deleted."""
    marker = new_marker(kind)
    write_json(d / MARKER, marker)
    return marker


def _legacy_kind(d: Path) -> str | None:
    """What a folder written before the marker existed holds, judged by the content of the files
    the command wrote (never by a file's name alone); None when it is no stepdistill output."""
    try:
        env = json.loads((d / "env.json").read_text())
        header = (d / "config.yaml").read_text().split("\n", 1)[0]
    except (OSError, ValueError, UnicodeDecodeError):
        env, header = None, ""
    if isinstance(env, dict) and env.get("command") in OUTPUT_KINDS and header == f"# written by: stepdistill {env['command']}":
        return env["command"]
    entries = {p.name for p in d.iterdir()}
    if entries and entries <= _QUICKSTART_ENTRIES and "annotate-train" in entries and output_kind(d / "annotate-train") == "annotate":
        return "quickstart"
    try:
        card = (d / "README.md").read_text().split("\n", 1)[0]
    except (OSError, UnicodeDecodeError):
        card = ""
    if (d / "stepdistill.json").is_file() and card.startswith("# ") and card.endswith(" distilled with stepdistill"):
        return "export"
    return None


def output_kind(d: str | Path) -> str | None:
    """The kind of stepdistill output `d` holds ("train", "export", ...), or None when it holds none."""
    d = Path(d)
    if d.is_symlink() or not d.is_dir():
        return None
    try:
        marker = json.loads((d / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        marker = None
    if isinstance(marker, dict) and marker.get("kind") in OUTPUT_KINDS:
        return marker["kind"]
    return _legacy_kind(d)


def _is_empty(d: Path) -> bool:
    """No entries but the temp file of a marker write that a killed process never finished."""
    return all(p.name.startswith(f".{MARKER}.") and p.name.endswith(TMP_SUFFIX) for p in d.iterdir())


def protected_path(d: Path, inputs: Iterable[str | Path | None]) -> Path | None:
    """The first place that deleting `d` would take with it and that is not ours to delete: the
    working directory, the home folder, /, stepdistill's own state, or an input of the command."""
    for p in (Path.cwd(), Path.home(), Path("/"), home(), *(Path(i) for i in inputs if i)):
        try:
            if p.exists() and _inside(p, d):
                return p
        except (OSError, RuntimeError):  # an unresolvable path (a link loop): refuse rather than guess
            return p
    return None


def claim_output(out: str | Path, kind: str, *, overwrite: bool = False, resume: bool = False,
                 inputs: Iterable[str | Path | None] = (), create: bool = True) -> str:
    """The one check every command makes before it writes into `out` or deletes it.

    A missing or empty `out` is made and marked as `kind`'s. An existing one is resumed
    (`resume`) or deleted and made afresh (`overwrite`) only when it carries `kind`'s marker,
    and it is never deleted when it holds the working directory, the home folder, /, the
    stepdistill home or one of the command's `inputs`. Returns "new", "resume" or "overwrite".
    With `create=False` nothing is made or deleted (the caller stages its output elsewhere).

    >>> claim_output("runs/x", "train", overwrite=True, inputs=("runs/ann",))
    """
    d = Path(out)
    what = f"a stepdistill {kind} output"
    if d.is_symlink():
        raise RunExistsError(f"--out {d} is a symbolic link: choose a real folder as --out")
    if d.exists() and not d.is_dir():
        raise RunExistsError(f"--out {d} is a file, not a directory: choose another --out")
    state = "new"
    if d.exists() and not _is_empty(d):
        owner = output_kind(d)
        if resume:
            if owner != kind:
                raise RunExistsError(f"--resume refused: {d} is not {what} ({_owner_words(owner)}); "
                                     "choose the run's own folder, or a new --out")
            state = "resume"
        elif not overwrite:
            if owner == kind:
                how = "--resume to continue it, --overwrite to replace it" if kind in ("annotate", "train") else "--overwrite to replace it"
                raise RunExistsError(f"{d} already holds {what}: pass {how}, or choose another --out")
            raise RunExistsError(f"{d} already exists and is not {what} ({_owner_words(owner)}): "
                                 "choose another --out (stepdistill never writes into a folder it did not make)")
        else:
            if owner != kind:
                raise RunExistsError(f"--overwrite refused: {d} is not {what} ({_owner_words(owner)}), so it is "
                                     "not stepdistill's to delete; choose another --out")
            state = "overwrite"
    hit = protected_path(d, inputs) if state == "overwrite" or not create else None
    if hit is not None:
        raise RunExistsError(f"refused: --out {d} holds {hit}, which this command must not delete or replace "
                             "(an input, the working directory or a home folder); choose another --out")
    if not create:
        return state
    try:
        if state == "overwrite":
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(d, e) from e
    if state != "resume" or not (d / MARKER).is_file():  # a run from before the marker is marked on resume
        write_marker(d, kind)
    return state


def _owner_words(owner: str | None) -> str:
    return f"it holds a stepdistill {owner} output" if owner else f"it has no {MARKER} marker"


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
    if state == "resume":  # --resume continues the same run: a changed config would mix two experiments
        changed = config_changes(d, config, may_change)
        if changed:
            raise RunExistsError(f"--resume refused: the config of {d} differs in {', '.join(changed)}; "
                                 f"resume with the same config, or start a new run with another --out")
        for p in remove_stale_temp_files(d):
            log.info("removed %s: a write the interrupted run never finished", p)
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
    try:
        handler = _LogFile(d / "log.txt")
    except OSError as e:
        raise write_error(d / "log.txt", e) from e
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("stepdistill")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return Run(d, handler)


# fields a resume may change in any run: where a run reports its curves changes nothing it computes
NEVER_CHANGES_RESULTS = ("training.report_to",)


def config_changes(d: Path, config: BaseModel, may_change: tuple[str, ...] = ()) -> list[str]:
    """The dotted fields in which `config` differs from the one run `d` saved (none where it saved
    none), leaving out `may_change` and the fields that change no result."""
    saved = saved_config(d)
    if saved is None:
        return []
    saved = _with_added_fields(type(config), saved)
    now = config.model_dump(mode="json")

    def diff(a: Any, b: Any, prefix: str = "") -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for key in sorted(set(a) | set(b)) for k in diff(a.get(key), b.get(key), f"{prefix}{key}.")]
        return [] if a == b else [prefix.rstrip(".")]

    free = (*may_change, *NEVER_CHANGES_RESULTS)
    return [k for k in diff(saved, now) if not any(k == f or k.startswith(f + ".") for f in free)]


M = TypeVar("M", bound=BaseModel)


def resumed_config(out: str | Path, config: M) -> M:
    """The config a `--resume` of `out` goes on with. A field its saved config lacks was added to
    stepdistill after the run started: unless `config` sets it, it takes the value the run started
    with (`config.ADDED_FIELDS`), so the resumed run goes on as it began.

    >>> cfg = resumed_config("runs/x", cfg)  # then create_run("runs/x", cfg, resume=True)
    """
    saved = saved_config(Path(out))
    if saved is None:
        return config
    now = config.model_dump(mode="json")
    changed = False
    for path, old in ADDED_FIELDS.items():
        *parents, name = path.split(".")
        saved_section, now_section = _section(saved, parents), _section(now, parents)
        model: Any = config
        for part in parents:
            model = getattr(model, part, None)
        if (saved_section is not None and name not in saved_section and now_section is not None
                and isinstance(model, BaseModel) and name not in model.model_fields_set and now_section.get(name) != old):
            log.info("resume: %s takes %r, the value %s ran with before the field existed", path, old, out)
            now_section[name] = old
            changed = True
    return type(config).model_validate(now) if changed else config


def saved_config(d: Path) -> dict | None:
    """The config a run directory was started with; None where there is no run (yet) to read."""
    import yaml

    saved_file = d / "config.yaml"
    if output_kind(d) is None or not saved_file.is_file():
        return None
    fix = "restore it from a copy, or start a new run with another --out"
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunExistsError(f"--resume refused: {saved_file} is damaged ({reason}); {fix}") from e
    if saved is None:
        return {}
    if not isinstance(saved, dict):
        raise RunExistsError(f"--resume refused: {saved_file} is damaged (it holds a {type(saved).__name__}, "
                             f"not a config); {fix}")
    return saved


def _with_added_fields(model: type[BaseModel], saved: dict) -> dict:
    """A saved config as the current code reads it: fields added since it was written filled with
    the value the run ran with (ADDED_FIELDS), or else their default."""
    filled = copy.deepcopy(saved)
    for path, old in ADDED_FIELDS.items():
        *parents, name = path.split(".")
        section = _section(filled, parents)
        if section is not None:
            section.setdefault(name, old)
    try:
        return model.model_validate(filled).model_dump(mode="json")
    except ValueError:  # written by a version whose fields no longer validate: compare as saved
        return saved


def _section(config: dict, parents: list[str]) -> dict | None:
    """The nested section of a config dict at `parents` (None where it has none)."""
    section: Any = config
    for part in parents:
        section = section.get(part) if isinstance(section, dict) else None
    return section if isinstance(section, dict) else None
