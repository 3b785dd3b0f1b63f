"""What a `--resume` may change: a run's saved config against the config it goes on with.

A resumed run must compute what it began computing, so `create_run` refuses a changed field,
except the fields no value of which changes a result (`NEVER_CHANGES_RESULTS`), a sweep's grid
axes, and fields added to stepdistill since the run began, which take the value it ran with
(`resumed_config`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from stepdistill.config import ADDED_FIELDS
from stepdistill.errors import RunExistsError
from stepdistill.ownership import output_kind

log = logging.getLogger("stepdistill")


# Fields a resume may change in any run, because no value changes what the run computes.
NEVER_CHANGES_RESULTS = ("training.report_to",)
# The exact speed-ups: every value computes the paper step's loss and gradients, to float rounding, for
# the same dropout masks (tests/test_speedups.py checks each). With dropout on, fuse_tasks draws the masks
# over one stacked pass, so a changed value draws other masks, as another seed would. A resume keeps the
# value the run began with unless its config sets one (`resumed_config`); an explicit change, and a
# sweep's cell on disk made with another value (a sweep sets every field), are accepted, the old value
# logged. Not here: group_by_length (other batches), fast_dropout (other masks, from 16-bit draws), bf16
# (other numerics).
SPEED_ONLY = ("training.fuse_tasks", "training.target_logits_only", "training.fused_loss", "training.fused_gelu")


def is_under(field: str, fields: tuple[str, ...]) -> bool:
    return any(field == f or field.startswith(f + ".") for f in fields)


def all_changes(d: Path, config: BaseModel) -> dict[str, tuple[Any, Any]]:
    """Every dotted field in which `config` differs from the one run `d` saved, with the saved value
    (as the current code reads it) and the new one; empty where it saved none."""
    saved = saved_config(d)
    if saved is None:
        return {}
    saved = _with_added_fields(type(config), saved)
    now = config.model_dump(mode="json")

    def diff(a: Any, b: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: v for key in sorted(set(a) | set(b)) for k, v in diff(a.get(key), b.get(key), f"{prefix}{key}.").items()}
        return {} if a == b else {prefix.rstrip("."): (a, b)}

    return diff(saved, now)


def config_changes(d: Path, config: BaseModel, may_change: tuple[str, ...] = ()) -> list[str]:
    """The dotted fields in which `config` differs from the one run `d` saved (none where it saved
    none), leaving out `may_change`, the fields that change no result and the exact speed-ups."""
    return [k for k in all_changes(d, config) if not is_under(k, (*may_change, *NEVER_CHANGES_RESULTS, *SPEED_ONLY))]


M = TypeVar("M", bound=BaseModel)


def resumed_config(out: str | Path, config: M) -> M:
    """The config a `--resume` of `out` goes on with. A field its saved config lacks was added to
    stepdistill after the run started: unless `config` sets it, it takes the value the run started
    with (`config.ADDED_FIELDS`), so the resumed run goes on as it began. An exact speed-up
    (`SPEED_ONLY`) that `config` does not set keeps the value the run began with, for the same
    reason (its default may have changed since: fuse_tasks' did on 2026-12-06).

    >>> cfg = resumed_config("runs/x", cfg)  # then create_run("runs/x", cfg, resume=True)
    """
    saved = saved_config(Path(out))
    if saved is None:
        return config
    now = config.model_dump(mode="json")
    changed = False
    for path, old in ADDED_FIELDS.items():
        *parents, name = path.split(".")
        saved_section, now_section, model = _section(saved, parents), _section(now, parents), _model_at(config, parents)
        if (saved_section is not None and name not in saved_section and now_section is not None
                and model is not None and name not in model.model_fields_set and now_section.get(name) != old):
            log.info("resume: %s takes %r, the value %s ran with before the field existed", path, old, out)
            now_section[name] = old
            changed = True
    filled = _with_added_fields(type(config), saved)
    for path in SPEED_ONLY:
        *parents, name = path.split(".")
        saved_section, now_section, model = _section(filled, parents), _section(now, parents), _model_at(config, parents)
        if saved_section is None or now_section is None or model is None or name not in saved_section:
            continue
        if name not in model.model_fields_set and now_section.get(name) != saved_section[name]:
            log.info("resume: %s stays %r, the value %s began with (the default is now %r)", path,
                     saved_section[name], out, now_section.get(name))
            now_section[name] = saved_section[name]
            changed = True
    return type(config).model_validate(now) if changed else config


def _model_at(config: BaseModel, parents: list[str]) -> BaseModel | None:
    """The nested config section at `parents` (None where it has none): its fields_set says what was set."""
    model: Any = config
    for part in parents:
        model = getattr(model, part, None)
    return model if isinstance(model, BaseModel) else None


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
