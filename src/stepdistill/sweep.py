"""`stepdistill sweep`: how little data and how small a student can you get away with?

A grid of training runs, methods x data fractions x students x seeds, each trained and then
evaluated on the same test items:

    stepdistill sweep --config configs/paper/svamp_cpu.yaml --out runs/sweep-svamp

- **Nested, deterministic subsets.** The validation carve and the data subsets come from one
  `data_seed`: the 12.5% subset lies inside the 25% subset, and is the same for every method
  and every training seed (the paper's code drew a new subset per seed).
- **Resumable.** A cell whose evaluation is written is never run again; a cell stopped while
  training resumes from its last checkpoint. A failed cell is recorded (cells/<cell>/error.txt)
  and the sweep goes on. A run into the folder that names part of its grid (`--set
  "methods=[distill]" --set "seeds=[3]"`) trains that part and keeps the rest in the results.
- **Collectable.** `--collect` trains nothing: it gathers the cells already on disk into the
  table and marks the rest "not run", for a grid run in parts (several sweeps side by side on
  one GPU, or on several machines) whose cells were copied into one folder.
- **One table.** results.json and cells.csv (one row per cell) and summary.csv (per method,
  student and fraction: mean, standard error and spread over seeds).
- **Carried between machines.** `pack_cells` writes the finished cells' light files (configs,
  training logs, metrics, per-item predictions; no weights) into one small archive, which
  `stepdistill report` commits beside the report as cells.tar.gz. `--cells FILE` starts a sweep
  from such an archive: its cells missing from --out are restored (checked against the grid like
  any cell on disk), not retrained, so a sweep too long for one machine grows seed by seed.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from stepdistill.config import SweepRun, coerce
from stepdistill.ownership import MARKER
from stepdistill.runs import create_run, write_json, write_text

Printer = Callable[[str], None]


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40] or "x"


def _method_tag(m) -> str:
    """A method configuration's name in tables: its name and the options that set it apart."""
    from stepdistill.methods import get_method

    return (m.name + ("-teacher-labels" if m.label_source == "teacher" else "") + ("-kd" if m.kd else "")
            + ("-decoder" if m.task_marker == "decoder" else "") + ("-correct" if m.rationales == "correct" else "")
            + ("-token-weighted" if m.weighting == "token" else "")
            + ("-rat-only" if m.label_only == "drop" and get_method(m).multitask else ""))  # where it acts


def _method_key(m) -> str:
    """The name a method takes in cell names, tables and the union of two grids."""
    return _tag(m.tag or _method_tag(m))


def _student_key(s) -> str:
    return _tag(Path(s.model).name)


def cells(cfg: SweepRun) -> list[dict[str, Any]]:
    """The grid, in run order: student, method, fraction, then seed (so every cell of a row of
    the final table is done before the next row starts)."""
    method_tags = [_method_key(m) for m in cfg.methods]
    if len(set(method_tags)) < len(method_tags):  # the same method twice, configured differently
        method_tags = [f"{t}{i}" for i, t in enumerate(method_tags)]
    student_tags = [_student_key(s) for s in cfg.students]
    if len(set(student_tags)) < len(student_tags):
        student_tags = [f"{t}{i}" for i, t in enumerate(student_tags)]
    out = []
    for (si, s), (mi, m), f, seed in itertools.product(enumerate(cfg.students), enumerate(cfg.methods),
                                                       cfg.fractions, cfg.seeds):
        out.append({"name": f"{method_tags[mi]}__{student_tags[si]}__f{f:g}__s{seed}", "method": m,
                    "method_tag": method_tags[mi], "student": s, "student_tag": student_tags[si],
                    "fraction": f, "seed": seed})
    return out


GRID_AXES = ("methods", "fractions", "students", "seeds")


def folder_grid(cfg: SweepRun, out: str | Path) -> SweepRun:
    """The grid a sweep into `out` tables and records in its config.yaml: a run that covers part
    of the grid the folder holds (one method, one seed more) keeps the folder's other cells in the
    results, so a report made from the folder still compares them. Each axis is the folder's
    values, then this run's new ones; a method or student under a tag the folder holds takes this
    run's config (the cell check refuses it where that cell trained another). A grid shrinks only
    by `--collect`, which tables exactly the grid it is given."""
    from stepdistill.resuming import saved_config
    from stepdistill.ownership import output_kind

    saved = saved_config(Path(out)) if output_kind(out) == "sweep" else None
    if not saved:
        return cfg
    try:
        old = coerce(SweepRun, {**cfg.model_dump(mode="json"), **{a: saved[a] for a in GRID_AXES if a in saved}})
    except ValueError:  # a grid the current code no longer reads: this run's grid alone
        return cfg
    keys = {"methods": _method_key, "students": _student_key, "fractions": lambda f: f, "seeds": lambda s: s}
    merged = {}
    for axis, key in keys.items():
        before, now = getattr(old, axis), getattr(cfg, axis)
        if len({key(x) for x in before}) < len(before) or len({key(x) for x in now}) < len(now):
            return cfg  # a grid that names one cell twice keeps the numbered names `cells` gives it
        union = {key(x): x for x in before}
        union.update({key(x): x for x in now})  # a key already there keeps its place, with this run's config
        merged[axis] = list(union.values())
    return cfg.model_copy(update=merged)


def _train_config(cfg: SweepRun, c: dict[str, Any]) -> dict[str, Any]:
    """What one cell trains: the sweep's shared settings with the cell's student, method,
    seed and data fraction."""
    return {"task": cfg.task.model_dump(), "student": c["student"].model_dump(),
            "method": c["method"].model_dump(), "annotations": cfg.annotations,
            "split": cfg.split, "limit": cfg.limit, "val_split": cfg.val_split,
            "training": {**cfg.training.model_dump(), "seed": c["seed"], "data_seed": cfg.data_seed,
                         "data_fraction": c["fraction"]}}


def _check_cells_on_disk(cfg: SweepRun, grid: list[dict[str, Any]], folder: Path, echo: Printer,
                         only: set[str] | None = None) -> None:
    """Before anything runs: every cell of the grid found on disk (or those named in `only`) trained
    this cell's config (a method whose options changed under the same tag would otherwise reuse the
    old cell), and the cells on disk that the grid no longer holds are named, since the results will
    not show them."""
    from stepdistill.config import TrainRun
    from stepdistill.errors import RunExistsError
    from stepdistill.resuming import config_changes

    names = {c["name"] for c in grid}
    for c in (c for c in grid if only is None or c["name"] in only):
        changed = config_changes(folder / c["name"] / "train", coerce(TrainRun, _train_config(cfg, c)))
        if changed:
            raise RunExistsError(f"cell {c['name']} on disk trained another config than this sweep's cell of that "
                                 f"name ({', '.join(changed)}): give the method a new tag, or sweep into another --out")
    outside = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in names) if folder.is_dir() else []
    if outside:
        echo(f"note: {len(outside)} cell(s) on disk are outside this grid and not in its results: {', '.join(outside)}")


def sweep(cfg: SweepRun | dict, out: str | Path, *, echo: Printer = print, collect: bool = False,
          cells_from: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) every cell of the grid; write and return the collected results. With
    `collect`, train nothing: cells not evaluated on disk are recorded as "not run". With
    `cells_from` (an archive from `pack_cells`), first restore its cells that --out lacks."""
    from stepdistill import api

    cfg = coerce(SweepRun, cfg)
    todo = {c["name"] for c in cells(cfg)}
    if not collect:
        cfg = folder_grid(cfg, out)
    grid = cells(cfg)
    from stepdistill.resuming import config_changes

    # where a non-grid field changed, create_run refuses below, naming the field
    checked = not config_changes(Path(out), cfg, GRID_AXES)
    if checked:  # before config.yaml is rewritten
        _check_cells_on_disk(cfg, grid, Path(out) / "cells", lambda _: None)
    # a resumed sweep may grow its grid (more seeds, another method; shrink it by --collect): each cell on
    # disk is reused only if it trained exactly what this grid's cell of that name would
    with create_run(out, cfg, command="sweep", resume=True, inputs=(cfg.task.path, cfg.annotations),
                    may_change=GRID_AXES) as run:
        echo = run.tee(echo)
        echo(f"sweep: {len(grid)} cells ({len(cfg.methods)} methods x {len(cfg.fractions)} fractions x "
             f"{len(cfg.students)} students x {len(cfg.seeds)} seeds) in {run.dir}"
             + (f"; this run trains the {len(todo)} its config names, the folder holds the rest" if len(todo) < len(grid) else ""))
        restored = []
        if cells_from is not None:
            restored = restore_cells(cells_from, run.dir / "cells")
            echo(f"restored {len(restored)} finished cell(s) from {cells_from}" + (f": {', '.join(restored)}" if restored else
                 " (every cell it holds is on disk already)"))
        _check_cells_on_disk(cfg, grid, run.dir / "cells", echo, only=set(restored) if checked else None)
        rows = []
        for i, c in enumerate(grid, start=1):
            d = run.dir / "cells" / c["name"]
            row = {"cell": c["name"], "method": c["method_tag"], "student": c["student_tag"],
                   "fraction": c["fraction"], "seed": c["seed"]}
            done = d / "eval" / "metrics.json"
            if done.is_file():
                row.update(_metrics(d), status="done")
                rows.append(row)
                continue
            if collect or c["name"] not in todo:  # a cell this run does not train: failed before, or not run
                lines = (d / "error.txt").read_text(errors="replace").strip().splitlines() if (d / "error.txt").is_file() else []
                error = (lines[-1] if lines[0].startswith("Traceback") else lines[0])[:300] if lines else ""  # older: traceback only
                rows.append({**row, "status": "failed", "error": error} if error else {**row, "status": "not run"})
                continue
            echo(f"[{i}/{len(grid)}] {c['name']}")
            try:
                train_cfg = _train_config(cfg, c)
                t0 = time.perf_counter()
                trained_now = not (d / "train" / "metrics.json").is_file()
                started = (d / "train").is_dir() and any((d / "train").iterdir())
                if trained_now:
                    api.train(train_cfg, d / "train", resume=started, echo=lambda _: None,
                              tags={"run": c["name"], "sweep": run.dir.name, "method": c["method_tag"],
                                    "student": c["student_tag"], "fraction": str(c["fraction"]),
                                    "seed": str(c["seed"])}, tracking_dir=run.dir)
                t1 = time.perf_counter()
                api.evaluate({"task": cfg.task.model_dump(), "model": str(d / "train"), "split": cfg.eval.split,
                              "limit": cfg.eval.limit, "batch_size": cfg.eval.batch_size,
                              "dtype": cfg.eval.dtype, "label_decoding": cfg.eval.label_decoding}, d / "eval",
                             overwrite=(d / "eval").exists(), echo=lambda _: None)
                t2 = time.perf_counter()
                if trained_now and not started:  # a cell resumed part-way has no whole-cell timing
                    write_json(d / "timing.json", cell_timing(d, train_call=t1 - t0, eval_call=t2 - t1))
                row.update(_metrics(d), status="done")
                (d / "error.txt").unlink(missing_ok=True)
                echo((f"    accuracy {row['accuracy']:.2%}" if row["accuracy"] is not None else "    accuracy n/a")
                     + (f" ({_shares(row)})" if row.get("wall_s") else ""))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a failed cell is recorded; the sweep goes on
                d.mkdir(parents=True, exist_ok=True)
                row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
                write_text(d / "error.txt", row["error"] + "\n\n" + "".join(traceback.format_exception(e)))  # summary first
                echo(f"    failed: {row['error']} (details in {d / 'error.txt'})")
            rows.append(row)
        results = {"task": cfg.task.name, "split": cfg.eval.split, "cells": rows, "summary": summarise(rows)}
        write_json(run.path("results.json"), results)
        write_text(run.path("cells.csv"), _csv(rows, ["cell", "method", "student", "fraction", "seed", "status",
                                                      "accuracy", "n", "ms_per_example", "parameters", *TIMING,
                                                      "error"]))
        write_text(run.path("summary.csv"), _csv(results["summary"], ["method", "student", "fraction", "seeds",
                                                                      "mean", "sem", "min", "max", "failed", "not_run"]))
        echo(table(results["summary"]))
        timed = [r for r in rows if r.get("wall_s")]
        if timed:
            total = {k: sum(r[k] for r in timed) for k in TIMING}
            echo(f"time in the {len(timed)} cells with a whole-cell timing: {_shares(total)}")
        failed = sum(r["status"] == "failed" for r in rows)
        missing = sum(r["status"] == "not run" for r in rows)
        echo(f"wrote {run.path('results.json')}, cells.csv, summary.csv" + (f"; {failed} cells failed" if failed else "")
             + (f"; {missing} cells not run" + (" (--collect)" if collect else "") if missing else ""))
    return results


# what a finished cell keeps when it travels: enough to table, test and report it (the per-item
# predictions and the learning curve), and to check it against a grid (its configs); no weights
LIGHT_FILES = ("timing.json", "train/config.yaml", "train/env.json", "train/metrics.json", "train/train_log.jsonl",
               "eval/config.yaml", "eval/env.json", "eval/metrics.json", "eval/predictions.jsonl",
               f"train/{MARKER}", f"eval/{MARKER}")  # the run markers: a restored cell is stepdistill's own


def pack_cells(sweep_dir: str | Path, archive: str | Path) -> list[str]:
    """Write the finished cells of `sweep_dir` (those whose evaluation is written), their
    LIGHT_FILES, to the gzipped tar `archive`; return the cells' names. The
    bytes depend only on the files' contents (fixed times and owners), so an unchanged sweep
    packs to an unchanged file."""
    import gzip
    import tarfile

    root = Path(sweep_dir) / "cells"
    names = sorted(c.name for c in root.iterdir() if (c / "eval" / "metrics.json").is_file()) if root.is_dir() else []
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            for rel in LIGHT_FILES:
                f = root / name / rel
                if f.is_file():
                    data = f.read_bytes()
                    info = tarfile.TarInfo(f"cells/{name}/{rel}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
    write_text(Path(archive), buf.getvalue())
    return names


def restore_cells(archive: str | Path, cells_dir: Path) -> list[str]:
    """Unpack from a `pack_cells` archive each cell that `cells_dir` lacks (a cell already on
    disk is never touched); return their names. Each cell lands whole or not at all."""
    import tarfile
    import tempfile
    import zlib

    from stepdistill.errors import StepDistillError

    archive = Path(archive)
    try:
        tar = tarfile.open(archive, mode="r:gz")
        members = tar.getmembers()  # reads it all: a truncated archive fails here, before anything lands
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        raise StepDistillError(f"--cells {archive}: not a cells archive ({e}); pass the cells.tar.gz that "
                               "`stepdistill report` wrote beside a sweep's report") from e
    restored = []
    with tar:
        # only what pack_cells writes: plain files, a cell's name as `cells` makes it, one of LIGHT_FILES
        bad = [m.name for m in members if not m.isfile() or not re.fullmatch(r"cells/[A-Za-z0-9][A-Za-z0-9._-]*/.+", m.name)
               or m.name.split("/", 2)[2] not in LIGHT_FILES]
        if bad:
            raise StepDistillError(f"--cells {archive}: holds {bad[0]!r}, which no cells archive holds; pass the "
                                   "cells.tar.gz that `stepdistill report` wrote")
        cells_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted({m.name.split("/")[1] for m in members}):
            if (cells_dir / name).exists():
                continue
            with tempfile.TemporaryDirectory(dir=cells_dir, prefix=f".{name}.") as tmp:
                tar.extractall(tmp, members=[m for m in members if m.name.split("/")[1] == name], filter="data")
                (Path(tmp) / "cells" / name).rename(cells_dir / name)
            restored.append(name)
    return restored


def _metrics(d: Path) -> dict[str, Any]:
    m = json.loads((d / "eval" / "metrics.json").read_text())
    timing = json.loads((d / "timing.json").read_text()) if (d / "timing.json").is_file() else {}
    return {"accuracy": m.get("accuracy"), "n": m.get("n"), "ms_per_example": m.get("ms_per_example"),
            "threads": m.get("threads"), "parameters": m.get("parameters"), **{k: timing.get(k) for k in TIMING}}


# where a cell's wall time goes (seconds): training steps, validation passes inside training, the
# test evaluation (model load included), and the rest (student load, tokenisation, checkpoints, saving)
TIMING = ("wall_s", "steps_s", "validation_s", "test_eval_s", "other_s")


def cell_timing(d: Path, *, train_call: float, eval_call: float) -> dict[str, float]:
    """A cell's time breakdown, from the wall times of its two calls and what training logged:
    the Trainer's loop time (metrics.json `seconds`) and each validation pass (`eval_runtime`)."""
    loop = json.loads((d / "train" / "metrics.json").read_text()).get("seconds") or 0.0
    log = d / "train" / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    validation = sum(json.loads(x).get("eval_runtime", 0.0) for x in lines if "eval_runtime" in x)
    steps = max(loop - validation, 0.0)
    wall = train_call + eval_call
    return {k: round(v, 1) for k, v in {"wall_s": wall, "steps_s": steps, "validation_s": validation,
                                        "test_eval_s": eval_call, "other_s": max(wall - steps - validation - eval_call, 0.0)
                                        }.items()}


def _shares(t: dict[str, Any]) -> str:
    wall = t["wall_s"] or 1.0
    return (f"{t['wall_s']:.0f} s: training steps {t['steps_s'] / wall:.0%}, validation {t['validation_s'] / wall:.0%}, "
            f"test evaluation {t['test_eval_s'] / wall:.0%}, other {t['other_s'] / wall:.0%}")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, student, fraction): mean accuracy over seeds, its standard error
    (sample standard deviation / sqrt(seeds)), min and max."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["student"], r["fraction"]), []).append(r)
    out = []
    for (method, student, fraction), rs in groups.items():
        accs = [r["accuracy"] for r in rs if r["status"] == "done" and r.get("accuracy") is not None]
        n = len(accs)
        mean = sum(accs) / n if n else None
        sem = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1) / n) if n > 1 else None
        out.append({"method": method, "student": student, "fraction": fraction, "seeds": n,
                    "mean": mean, "sem": sem, "min": min(accs) if accs else None, "max": max(accs) if accs else None,
                    "failed": sum(r["status"] == "failed" for r in rs),
                    "not_run": sum(r["status"] == "not run" for r in rs)})
    return out


def table(summary: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table: accuracy mean ± standard error (seeds)."""
    lines = ["| method | student | data | accuracy (mean ± s.e.) | seeds | range |", "|---|---|---:|---:|---:|---:|"]
    for s in summary:
        acc = "-" if s["mean"] is None else f"{100 * s['mean']:.1f}%" + (
            f" ± {100 * s['sem']:.1f}" if s["sem"] is not None else "")
        rng = "-" if s["min"] is None else f"{100 * s['min']:.1f}-{100 * s['max']:.1f}%"
        seeds = (f"{s['seeds']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
                 + (f" ({s['not_run']} not run)" if s.get("not_run") else ""))
        lines.append(f"| {s['method']} | {s['student']} | {100 * s['fraction']:g}% | {acc} | {seeds} | {rng} |")
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()

