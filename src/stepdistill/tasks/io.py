"""Reading task data: user files (JSONL / JSON list / CSV), the paper's layout, and the hub.

Every problem becomes a DataError whose one line names the file, the line and the fix.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from stepdistill.errors import DataError

SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json", ".csv")


def read_records(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The records of a .jsonl, .json (a JSON list, or JSON lines as in the paper's files) or
    .csv file, each checked for the `required` fields.

    >>> read_records("data/train.jsonl", required=("question", "choices"))
    [{'question': '...', 'choices': [...], 'answer': '...'}, ...]
    """
    return [record for _, record in iter_records(path, required)]


def iter_records(path: str | Path, required: Iterable[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or record number, record) of a data file, read one record at a time: JSON lines
    and CSV files of any size stream in bounded memory. A JSON list is one document and is read
    whole (write large data as JSON lines). Every problem is a DataError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file: check the path (a .jsonl, .json or .csv file)")
    required = tuple(required)
    count, where = 0, "line"
    try:
        # newline="": lines end only at \n, \r\n or \r and are not translated (a quoted CSV field
        # keeps its "\r"; U+2028, which JSON allows inside a string, ends nothing); utf-8-sig: a
        # byte-order mark (Excel's CSV, Notepad's JSON) is dropped, not glued to the first field name
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".csv":
                rows = _csv_rows(path, f)
            elif _first_char(f) == "[":
                rows, where = enumerate(_json(f.read(), path, "", "fix the JSON list"), start=1), "record"
            else:
                rows = _json_lines(path, f)
            for n, row in rows:
                if not isinstance(row, dict):
                    raise DataError(f"{path} {where} {n}: not a JSON object: each {where} must be an object "
                                    f"with fields {_names(required)}")
                for name in required:
                    if row.get(name) in (None, ""):
                        raise DataError(f"{path} {where} {n}: no field {name!r}: each {where} needs {_names(required)}")
                count += 1
                yield n, row
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e}): it must be a UTF-8 text file") from e
    if not count:
        raise DataError(f"{path}: holds no records: add at least one {where} with fields {_names(required)}")


def _first_char(f: TextIO) -> str:
    """The first non-blank character of a text file, which is left at its start."""
    while chunk := f.read(1 << 16):
        if chunk.strip():
            f.seek(0)
            return chunk.lstrip()[0]
    f.seek(0)
    return ""


def _json_lines(path: Path, f: TextIO) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(f, start=1):
        if line.strip():
            yield n, _json(line, path, f" line {n}", "each line must be one JSON object")


def _json(text: str, path: Path, where: str, fix: str) -> Any:
    """json.loads, with every failure a DataError: bad syntax, nesting too deep for the parser
    (RecursionError), an integer over Python's 4300-digit limit (a plain ValueError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = where or f" line {e.lineno}"
        raise DataError(f"{path}{where}: not valid JSON ({e.msg}): {fix}") from e
    except RecursionError as e:
        raise DataError(f"{path}{where}: JSON nested too deeply to read: {fix}") from e
    except ValueError as e:
        raise DataError(f"{path}{where}: unreadable JSON value ({e}): {fix}") from e


def _csv_rows(path: Path, f: TextIO) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(f)  # quoted fields may span lines
    try:
        for r in reader:
            if None in r:  # DictReader files a row's surplus fields under the key None
                raise DataError(
                    f"{path} line {reader.line_num}: {len(reader.fieldnames) + len(r[None])} fields but the header has "
                    f"{len(reader.fieldnames)}: quote fields that contain commas (\"a, b\")"
                )
            yield reader.line_num, dict(r)
    except csv.Error as e:  # e.g. a field over the csv module's 128 KiB limit
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({e}): fix the file") from e


def _names(fields: tuple[str, ...]) -> str:
    return " and ".join(repr(f) for f in fields) if fields else "the task's fields"


def check_split(split: str, valid: Iterable[str] = SPLITS) -> None:
    valid = tuple(valid)
    if split not in valid:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(valid)}")


def paper_file(path: str | Path, task: str, split: str) -> Path:
    """`{task}_{split}.json` in the paper's layout; `path` is the sbs root or the task folder.

    >>> paper_file("../shared/data/sbs", "svamp", "train")
    PosixPath('../shared/data/sbs/svamp/svamp_train.json')
    """
    path = Path(path)
    folder = path if any(path.glob(f"{task}_*.json")) else path / task
    file = folder / f"{task}_{split}.json"
    if file.is_file():
        return file
    have = [s for s in SPLITS if (folder / f"{task}_{s}.json").is_file()]
    if not have:
        raise DataError(
            f"{path}: no {task}_<split>.json files here or in {path / task}: "
            f"point the data path at the paper's data folder or at a .jsonl/.json/.csv file"
        )
    raise DataError(f"{folder}: no {split!r} split for {task} (have: {', '.join(have)}): choose one of those splits")


def hub_records(dataset: str, config: str | None, split: str) -> Iterator[dict[str, Any]]:
    """The rows of one split of a Hugging Face hub dataset, as plain dicts, one at a time (the
    split is memory-mapped Arrow on disk; needs the internet the first time)."""
    import datasets  # heavy; and tests monkeypatch datasets.load_dataset, so look it up at call time

    try:
        args = (dataset, config) if config else (dataset,)
        ds = datasets.load_dataset(*args, split=split)
    except Exception as e:  # network, auth, a renamed dataset: all end the same way for the user
        raise DataError(
            f"cannot load {dataset} split {split!r} from the Hugging Face hub ({type(e).__name__}: {e}): "
            f"check the internet connection, or pass a local data path"
        ) from e
    return (dict(r) for r in ds)


def as_list(value: Any, what: str) -> list[str]:
    """A list field that may come from JSON (a list) or from CSV (a JSON list string or `a|b|c`)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                return [str(v) for v in json.loads(s)]
            except (ValueError, RecursionError) as e:  # bad syntax, too deep, an int over 4300 digits
                why = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
                raise DataError(f"{what}: not a valid JSON list ({why}): write it as [\"x\", \"y\"] or x|y") from e
        return [v.strip() for v in s.split("|")]
    raise DataError(f"{what}: expected a list of strings, got {type(value).__name__}")
