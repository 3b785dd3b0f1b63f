"""Which folders are stepdistill's: the one check every command makes before it writes or deletes.

A folder is stepdistill's only when it carries the marker of the command's own kind (or, for a run
written before the marker, that command's own env.json and config.yaml): only such a folder is
resumed, overwritten (`--overwrite`) or deleted, and never one holding the command's inputs, the
working directory or a home folder. `claim_output` is that check.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from stepdistill.errors import RunExistsError
from stepdistill.files import TMP_SUFFIX, write_error, write_json


def home() -> Path:
    """Where state shared between runs lives (annotation store, model cache). Tests point it at a temp dir."""
    return Path(os.environ.get("STEPDISTILL_HOME", Path.home() / ".cache" / "stepdistill"))


def _inside(a: Path, b: Path) -> bool:
    """Is `a` the same as, or inside, `b`?"""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


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
