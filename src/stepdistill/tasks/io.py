"""Reading task data: user files (JSONL / JSON list / CSV), the paper's layout, and the hub.

Every problem becomes a DataError whose one line names the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable

from stepdistill.errors import DataError

SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json", ".csv")


def read_records(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The records of a .jsonl, .json (a JSON list, or JSON lines as in the paper's files) or
    .csv file, each checked for the `required` fields.

    >>> read_records("data/train.jsonl", required=("question", "choices"))
    [{'question': '...', 'choices': [...], 'answer': '...'}, ...]
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file: check the path (a .jsonl, .json or .csv file)")
    try:
        # bytes, not read_text: no newline translation (a quoted CSV field keeps its "\r"); a
        # byte-order mark (Excel's CSV, Notepad's JSON) is dropped, not glued to the first field name
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e}): it must be a UTF-8 text file") from e
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, text)
        where = "line"
    elif text.lstrip().startswith("["):
        data = _json(text, path, "", "fix the JSON list")
        rows = list(enumerate(data, start=1))
        where = "record"
    else:
        rows = list(_json_lines(path, text))
        where = "line"
    required = tuple(required)
    records = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(
                f"{path} {where} {n}: not a JSON object: each {where} must be an object with fields {_names(required)}"
            )
        for name in required:
            if row.get(name) in (None, ""):
                raise DataError(f"{path} {where} {n}: no field {name!r}: each {where} needs {_names(required)}")
        records.append(row)
    if not records:
        raise DataError(f"{path}: holds no records: add at least one {where} with fields {_names(required)}")
    return records


def _json_lines(path: Path, text: str):
    # only \n, \r\n and \r end a JSON line: splitlines() also splits on U+2028, U+2029 and
    # U+0085, which JSON allows unescaped inside a string (json.dumps(ensure_ascii=False) writes them)
    for n, line in enumerate(_LINE_END.split(text), start=1):
        if line.strip():
            yield n, _json(line, path, f" line {n}", "each line must be one JSON object")


_LINE_END = re.compile(r"\r\n|\r|\n")


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


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may span lines
    rows = []
    try:
        for r in reader:
            if None in r:  # DictReader files a row's surplus fields under the key None
                raise DataError(
                    f"{path} line {reader.line_num}: {len(reader.fieldnames) + len(r[None])} fields but the header has "
                    f"{len(reader.fieldnames)}: quote fields that contain commas (\"a, b\")"
                )
            rows.append((reader.line_num, dict(r)))
    except csv.Error as e:  # e.g. a field over the csv module's 128 KiB limit
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({e}): fix the file") from e
    return rows


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


def hub_records(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """All rows of one split of a Hugging Face hub dataset, as plain dicts (needs the internet)."""
    import datasets  # heavy; and tests monkeypatch datasets.load_dataset, so look it up at call time

    try:
        args = (dataset, config) if config else (dataset,)
        ds = datasets.load_dataset(*args, split=split)
    except Exception as e:  # network, auth, a renamed dataset: all end the same way for the user
        raise DataError(
            f"cannot load {dataset} split {split!r} from the Hugging Face hub ({type(e).__name__}: {e}): "
            f"check the internet connection, or pass a local data path"
        ) from e
    return [dict(r) for r in ds]


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
