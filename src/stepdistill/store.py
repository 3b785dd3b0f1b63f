"""The annotation store: the single source of truth for "what did the teacher say".

Content-addressed: a record's key is a hash of (teacher identity incl. model and sampling
settings, prompt, task template version). Each completion is committed as it arrives, so an
interrupted `annotate` loses nothing and a rerun pays for nothing twice. SQLite in WAL mode:
one file, atomic commits, safe against a crash mid-write.

Parsing is not stored: it is cheap, and a better parser must not need a new teacher call.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,
    teacher TEXT NOT NULL,        -- JSON of the teacher identity (kind, model, sampling, ...)
    prompt TEXT NOT NULL,
    completion TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    seconds REAL,
    created REAL NOT NULL
);
"""


def annotation_key(identity: dict[str, Any], prompt: str, template_version: str) -> str:
    """sha256 over a canonical JSON of everything that determines the completion."""
    blob = json.dumps({"teacher": identity, "prompt": prompt, "template": template_version},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class StoredCompletion:
    key: str
    completion: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float | None = None


class AnnotationStore:
    """>>> store = AnnotationStore(home() / "annotations.sqlite"); store.get_many([key])"""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def get_many(self, keys: Iterable[str]) -> dict[str, StoredCompletion]:
        keys = list(keys)
        found: dict[str, StoredCompletion] = {}
        for i in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = keys[i : i + 500]
            rows = self._db.execute(
                "SELECT key, completion, prompt_tokens, completion_tokens, seconds FROM completions "
                f"WHERE key IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for row in rows:
                found[row[0]] = StoredCompletion(*row)
        return found

    def put(self, key: str, identity: dict[str, Any], prompt: str, completion: str, *,
            prompt_tokens: int | None = None, completion_tokens: int | None = None,
            seconds: float | None = None) -> None:
        with self._db:  # one transaction per record: committed before the next is generated
            self._db.execute(
                "INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, json.dumps(identity, sort_keys=True), prompt, completion,
                 prompt_tokens, completion_tokens, seconds, time.time()),
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def read_annotations(run_dir: str | Path, task, split: str | None = None, examples=None) -> dict:
    """Parsed teacher outputs of an annotation run, by example id (unparsed ones carry `error`).

    With `examples`, every annotated id must carry the same input text as the example it is
    matched to: ids such as "train-12" are positions, so a run made on another file would
    otherwise attach its rationales to the wrong problems.
    """
    from stepdistill.errors import DataError
    from stepdistill.runs import read_jsonl
    from stepdistill.tasks.base import Parsed

    d = Path(run_dir)
    summary_path, rows_path = d / "summary.json", d / "annotations.jsonl"
    if not rows_path.is_file() or not summary_path.is_file():
        raise DataError(f"{d} is not an annotation run (no annotations.jsonl/summary.json): "
                        f"run `stepdistill annotate --out {d}` first")
    summary = json.loads(summary_path.read_text())
    if summary.get("task") != task.name:
        raise DataError(f"annotations in {d} are for task {summary.get('task')!r}, not {task.name!r}: point to the right run")
    if split is not None and summary.get("split") != split:
        raise DataError(f"annotations in {d} are for split {summary.get('split')!r}, not {split!r}: annotate that split")
    rows = read_jsonl(rows_path)
    if examples is not None:
        inputs = {e.id: e.input for e in examples}
        for row in rows:
            if row["id"] in inputs and row.get("input") != inputs[row["id"]]:
                raise DataError(f"annotations in {d} do not belong to this data: example {row['id']} has another "
                                f"input there; annotate this data (same --data and --split) first")
    # A parser fix needs no new teacher calls: rerun `annotate`, which reads the store.
    return {row["id"]: Parsed(row.get("rationale"), row.get("label"), row.get("error")) for row in rows}
