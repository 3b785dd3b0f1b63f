"""Files that survive a crash: written to a temp file, fsynced and renamed into place, so a reader
sees the old file or the new one, never half of one; a failed write is one clear error.

    write_json(Path("runs/x/metrics.json"), {"accuracy": 0.9})
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from stepdistill.errors import StepDistillError


TMP_SUFFIX = ".tmp"  # write_text's temp files: ".<name>.<random>.tmp" beside the file


def write_error(path: str | Path, err: BaseException) -> StepDistillError:
    """A failed write (full disk, read-only folder, size limit) as one line naming the path and the fix."""
    reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    where = Path(path)
    folder = where if where.is_dir() else where.parent
    return StepDistillError(f"cannot write {where}: {reason}: free disk space or make {folder} writable "
                            "(or choose another --out), then rerun")


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in `path` durable (a file's fsync does not cover its name)."""
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory: nothing to do there
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: str | Path) -> dict[str, int]:
    """fsync every file and folder under `root` (written by code we do not control, e.g. Trainer);
    returns {relative path: size} of the files, to record what a complete folder holds."""
    root = Path(root)
    sizes: dict[str, int] = {}
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            p = Path(dirpath) / name
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                sizes[p.relative_to(root).as_posix()] = os.fstat(fd).st_size
            finally:
                os.close(fd)
        fsync_dir(dirpath)
    return sizes


def write_text(path: Path, text: str | bytes | Iterable[str]) -> None:
    """Atomic and durable: write a temp file beside `path`, flush and fsync it, rename it over
    `path`, fsync the folder. A crash (kill -9, power loss) leaves the old file or the new one,
    never half of one; a failed write (full disk, read-only folder) raises one clear
    StepDistillError and leaves the old file and no temp file. `text` may be an iterable of
    pieces, written as they come (a large file never has to be held in memory); bytes are
    written as they are."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            for piece in [text] if isinstance(text, (str, bytes)) else text:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # incl. KeyboardInterrupt: never leave the temp file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        raise
    fsync_dir(path.parent)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Temp files of writes a killed process never finished (kill -9 runs no cleanup)."""
    stale = [p for p in folder.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    return stale


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))  # streamed, row by row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
