"""The annotation store: the single source of truth for "what did the teacher say".

Content-addressed: a record's key is a hash of (teacher identity incl. model and sampling
settings, prompt, task template version). Each completion is committed as it arrives, so an
interrupted `annotate` loses nothing and a rerun pays for nothing twice. SQLite in WAL mode:
one file, atomic commits, safe against a crash mid-write.

Parsing is not stored: it is cheap, and a better parser must not need a new teacher call.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from stepdistill.errors import StepDistillError

log = logging.getLogger("stepdistill")

SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,
    teacher TEXT NOT NULL,        -- JSON of the teacher identity (kind, model, sampling, ...)
    prompt TEXT NOT NULL,
    completion TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    seconds REAL,
    created REAL NOT NULL,
    sample INTEGER NOT NULL DEFAULT 0,  -- which self-consistency sample
    finish_reason TEXT                  -- "length": cut at max_new_tokens
);
-- Why a key has no completion yet, as of the last attempt (retried on the next run).
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY,
    teacher TEXT NOT NULL,
    prompt TEXT NOT NULL,
    sample INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL,
    updated REAL NOT NULL
);
"""
_COLUMNS = ("key", "teacher", "prompt", "completion", "prompt_tokens", "completion_tokens", "seconds", "created",
            "sample", "finish_reason")
_ADDED_COLUMNS = {"sample": "INTEGER NOT NULL DEFAULT 0", "finish_reason": "TEXT"}  # stores made before them


def annotation_key(identity: dict[str, Any], prompt: str, template_version: str, sample: int = 0) -> str:
    """sha256 over a canonical JSON of everything that determines the completion:
    `sha256(json.dumps({"prompt", "sample" (only when > 0), "teacher", "template"}, sort_keys=True))`.

    `sample` (the self-consistency sample index) enters only when > 0, so sample 0 keeps the
    key a single-sample run wrote."""
    return KeyMaker(identity, template_version)(prompt, sample)


class KeyMaker:
    """annotation_key() for many prompts of one teacher: the identity is encoded once, and each
    prompt once for all its samples (JSON-encoding few-shot prompts dominated annotate's overhead)."""

    def __init__(self, identity: dict[str, Any], template_version: str):
        self._teacher = json.dumps(identity, sort_keys=True, ensure_ascii=False)
        self._template = json.dumps(template_version, ensure_ascii=False)
        self._last: tuple[str, str] = ("", '""')

    def __call__(self, prompt: str, sample: int = 0) -> str:
        if self._last[0] != prompt:
            self._last = (prompt, json.dumps(prompt, ensure_ascii=False))
        # exactly json.dumps(fields, sort_keys=True, ensure_ascii=False), assembled from its parts
        sample_part = f', "sample": {int(sample)}' if sample else ""
        blob = f'{{"prompt": {self._last[1]}{sample_part}, "teacher": {self._teacher}, "template": {self._template}}}'
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class StoredCompletion:
    key: str
    completion: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float | None = None
    finish_reason: str | None = None


class AnnotationStore:
    """>>> store = AnnotationStore(home() / "annotations.sqlite"); store.get_many([key])"""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        deadline = time.monotonic() + 60
        for attempt in itertools.count():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._open()
                break
            except sqlite3.OperationalError as e:
                # Two processes opening one new store race to switch it to WAL and create its
                # tables; SQLite answers some of those races "locked" without waiting on its busy
                # timeout. Opening is idempotent, so wait and open again.
                if ("locked" in str(e) or "duplicate column" in str(e)) and time.monotonic() < deadline:
                    if getattr(self, "_db", None) is not None:
                        self._db.close()
                    time.sleep(min(0.05 * 2 ** attempt, 1.0))
                    continue
                raise self._open_error(e) from e
            except (OSError, sqlite3.Error) as e:
                raise self._open_error(e) from e

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(completions)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                with self._db:
                    self._db.execute(f"ALTER TABLE completions ADD COLUMN {name} {decl}")
        self._failed = {k for (k,) in self._db.execute("SELECT key FROM failures")}

    def _open_error(self, e: Exception) -> StepDistillError:
        return StepDistillError(f"cannot open the annotation store {self.path}: {e}: make {self.path.parent} "
                                "writable (and free disk space), or point --store at another file")

    @contextlib.contextmanager
    def _failed_write(self, what: str):
        """A write SQLite refused (disk full, read-only file or folder, I/O error) as one clear error.
        The transaction is rolled back: every completion committed before stays in the store."""
        try:
            yield
        except sqlite3.DatabaseError as e:  # OperationalError ("database or disk is full", ...) and kin
            raise StepDistillError(
                f"cannot {what} the annotation store {self.path}: {e}: free disk space or make {self.path.parent} "
                "writable, then rerun (with --resume): the completions committed so far are kept") from e

    def _select_keys(self, select: str, keys: Iterable[str]) -> Iterator[tuple]:
        """Rows of `select ... WHERE key IN (keys)`, in chunks: SQLite caps the bound parameters."""
        keys = list(keys)
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            yield from self._db.execute(f"{select} WHERE key IN ({','.join('?' * len(chunk))})", chunk)

    def get_many(self, keys: Iterable[str]) -> dict[str, StoredCompletion]:
        select = "SELECT key, completion, prompt_tokens, completion_tokens, seconds, finish_reason FROM completions"
        return {row[0]: StoredCompletion(*row) for row in self._select_keys(select, keys)}

    def put(self, key: str, identity: dict[str, Any], prompt: str, completion: str, *,
            prompt_tokens: int | None = None, completion_tokens: int | None = None,
            seconds: float | None = None, sample: int = 0, finish_reason: str | None = None) -> bool:
        """Commit one completion. The first answer stored for a key is kept: when two processes
        annotate the same inputs, training sees one answer per key. False if the key was there."""
        return self.put_many([(key, identity, prompt, completion, prompt_tokens, completion_tokens, seconds,
                               sample, finish_reason)]) == 1

    def put_many(self, records: list[tuple]) -> int:
        """Commit completions that arrived together in one transaction (group commit); each record
        is (key, identity, prompt, completion, prompt_tokens, completion_tokens, seconds, sample,
        finish_reason). Returns how many were new."""
        now = time.time()
        rows = [(r[0], json.dumps(r[1], sort_keys=True), *r[2:7], now, *r[7:9]) for r in records]
        with self._failed_write("commit to"), self._db:
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO completions (key, teacher, prompt, completion, prompt_tokens, "
                "completion_tokens, seconds, created, sample, finish_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows)
            added = self._db.total_changes - before
            done = [(r[0],) for r in records if r[0] in self._failed]
            if done:  # their last attempt had failed: those records are now obsolete
                self._db.executemany("DELETE FROM failures WHERE key = ?", done)
        self._failed.difference_update(k for (k,) in done)  # only once committed
        return added

    def put_failure(self, key: str, identity: dict[str, Any], prompt: str, error: str, *, sample: int = 0) -> None:
        """Record why a key could not be annotated (the next run tries it again)."""
        with self._failed_write("commit to"), self._db:
            self._db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?)",
                             (key, json.dumps(identity, sort_keys=True), prompt, sample, error, time.time()))
        self._failed.add(key)

    def failures(self, keys: Iterable[str]) -> dict[str, str]:
        return dict(self._select_keys("SELECT key, error FROM failures", keys))

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every stored completion, oldest first, as plain dicts (the export format)."""
        cur = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM completions ORDER BY created, key")
        for row in cur:
            rec = dict(zip(_COLUMNS, row))
            rec["teacher"] = json.loads(rec["teacher"])
            yield rec

    def export_jsonl(self, path: str | Path) -> int:
        """Write every completion to a JSONL file (atomically); returns the number of rows."""
        from stepdistill.runs import write_jsonl

        rows = list(self.rows())
        write_jsonl(Path(path), rows)
        return len(rows)

    def to_dataset(self):
        """Every completion as a Hugging Face `datasets.Dataset` (the teacher identity as JSON text)."""
        from datasets import Dataset

        rows = [{**rec, "teacher": json.dumps(rec["teacher"], sort_keys=True)} for rec in self.rows()]
        return Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in _COLUMNS})

    def stats(self) -> dict[str, Any]:
        n, = self._db.execute("SELECT COUNT(*) FROM completions").fetchone()
        failed, = self._db.execute("SELECT COUNT(*) FROM failures").fetchone()
        teachers = dict(self._db.execute("SELECT teacher, COUNT(*) FROM completions GROUP BY teacher").fetchall())
        tokens = self._db.execute("SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM completions").fetchone()
        return {"path": str(self.path), "completions": n, "failures": failed, "teachers": teachers,
                "prompt_tokens": tokens[0] or 0, "completion_tokens": tokens[1] or 0}

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        try:
            with self._db:  # failures another process has since annotated
                self._db.execute("DELETE FROM failures WHERE key IN (SELECT key FROM completions)")
        except sqlite3.DatabaseError as e:  # housekeeping only: never hide the error that got us here (a full disk)
            log.warning("annotation store %s: could not tidy the failures table: %s", self.path, e)
        finally:
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
    from stepdistill.tasks import split_base

    # a carve (train[:-1221]) takes the annotations of its whole split: ids and inputs are checked below
    if split is not None and split_base(str(summary.get("split"))) != split_base(split):
        raise DataError(f"annotations in {d} are for split {summary.get('split')!r}, not {split!r}: annotate that split")
    rows = read_jsonl(rows_path)
    if examples is not None:
        inputs = {e.id: e.input for e in examples}
        for row in rows:
            if row["id"] in inputs and row.get("input") != inputs[row["id"]]:
                raise DataError(f"annotations in {d} do not belong to this data: example {row['id']} has another "
                                f"input there; annotate this data (same --data and --split) first")
    # A parser fix needs no new teacher calls: rerun `annotate`, which reads the store.
    by_id = {e.id: e for e in examples} if examples is not None else {}
    return {row["id"]: Parsed(row.get("rationale"), row.get("label"), row.get("error"),
                              _other_rationales(row, task, by_id.get(row["id"])))
            for row in rows}


def _other_rationales(row: dict, task, example) -> tuple[str, ...]:
    """A kept row's further rationales (several teacher samples per input): the other samples
    whose answer is the kept one (by the task's vote key), each text once, in sample order.
    Sample rows written before they recorded their rationale are parsed again from their
    completion."""
    if not row.get("samples") or row.get("error") or not row.get("rationale"):
        return ()
    seen, others = {row["rationale"].strip()}, []
    key = task.vote_key(row["label"], example)  # same answer by meaning: (3 + 4) is (4 + 3)
    for i, s in enumerate(row["samples"]):
        if i == row.get("chosen") or s.get("parse_error") or s.get("label") is None:
            continue
        if task.vote_key(s["label"], example) != key:
            continue
        text = s.get("rationale")
        if text is None and "rationale" not in s and s.get("completion") and example is not None:
            parsed = task.parse(s["completion"], example)
            text = parsed.rationale if parsed.ok else None
        if text and text.strip() not in seen:
            seen.add(text.strip())
            others.append(text.strip())
    return tuple(others)
