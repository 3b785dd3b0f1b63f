"""Tasks: the datasets a student is distilled on, one module per family.

    svamp, asdiv         tasks/svamp.py       arithmetic word problems (label = expression)
    cqa                  tasks/cqa.py         CommonsenseQA (label = choice text)
    esnli, anli1/2/3     tasks/nli.py         entailment / neutral / contradiction
    generic              tasks/generic.py     your own data, described by a YAML spec
    quickstart           tasks/quickstart.py  generated arithmetic problems for the offline demo

>>> task = get_task("svamp")
>>> examples = task.load("train", "../shared/data/sbs")
>>> task.parse("42 / 2 = 21. The answer is (42 / 2).").label
'(42 / 2)'

A split may be carved, as in Hugging Face datasets: `train[:-1221]` is all of train but its last
1,221 examples, `train[-1221:]` those, `valid[:50%]` the first half of valid. A carve keeps the
file's order (e-SNLI lists each premise's hypotheses together, so a contiguous carve keeps a
premise on one side), and its examples keep the ids and positions they have in the whole split,
so annotations of the whole split serve every carve of it.
"""

from __future__ import annotations

import hashlib
import re
from itertools import islice
from pathlib import Path
from typing import Iterator

from stepdistill.errors import ConfigError, DataError
from stepdistill.registry import Registry
from stepdistill.tasks.base import Example, Parsed, Task

TASKS = Registry[Task]("task")

# imported for their @TASKS.register side effect; after TASKS exists, as they import it
from stepdistill.tasks import cqa, generic, nli, quickstart, svamp  # noqa: E402,F401


def get_task(name: str, spec: str | Path | None = None) -> Task:
    """The task called `name`; `spec` is the YAML file that configures the generic task."""
    factory = TASKS.get(name)
    if name == "generic":
        return factory(spec)
    if spec is not None:
        raise ConfigError(f"task {name!r} takes no spec (only 'generic' does): remove task.spec")
    return factory()


__all__ = ["TASKS", "Example", "ExampleStream", "Parsed", "Task", "get_task", "load_examples", "stream_examples",
           "split_base"]

_CARVE = re.compile(r"^(?P<base>[A-Za-z_][\w-]*)\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\]$")


def split_base(split: str) -> str:
    """`"train[:-1221]"` -> `"train"`: the split a carve is cut from (a plain split is its own base)."""
    m = _CARVE.match(split)
    return m["base"] if m else split


def _carve(split: str) -> tuple[str, str | None, str | None] | None:
    if "[" not in split:
        return None
    m = _CARVE.match(split)
    if not m or not (m["start"] or m["stop"]):
        raise DataError(f"split {split!r}: a carve reads like train[:-1000], train[-1000:] or valid[:50%] "
                        "(integers or percentages, either end may be left out)")
    return m["base"], m["start"], m["stop"]


def _bound(value: str | None, n: int | None) -> int | None:
    if value is None:
        return None
    if value.endswith("%"):
        pct = int(value[:-1])
        if not -100 <= pct <= 100:
            raise DataError(f"split carve {value}: a percentage lies within -100% and 100%")
        return round(n * pct / 100)  # type: ignore[operator]  (n is counted for percentages)
    return int(value)


def _carved(task: Task, split: str, path: str | Path | None) -> Iterator[Example]:
    """The examples of a split or of a carve of it, each with its place in the whole split."""
    carve = _carve(split)
    if carve is None:
        yield from task.iter_load(split, path)
        return
    base, start, stop = carve
    relative = any(v is not None and (v.startswith("-") or v.endswith("%")) for v in (start, stop))
    n = sum(1 for _ in task.iter_load(base, path)) if relative else None  # bounds from the end: count first
    lo, hi = _bound(start, n), _bound(stop, n)
    if n is not None:
        lo, hi, _ = slice(lo, hi).indices(n)
    yield from islice(task.iter_load(base, path), lo or 0, hi)


def load_examples(task: Task, split: str, path: str | Path | None, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of a split or carve (all when None), in a list; an empty one is refused."""
    examples = list(islice(_carved(task, split, path), limit or None))
    if not examples:
        raise _no_examples(task, split, path)
    return examples


class ExampleStream:
    """The examples of a split, read from their source one at a time on every iteration, so a
    dataset of any size is handled in bounded memory. Built by a first pass over the source
    that checks every record and counts them: a bad line stops a run before it starts."""

    def __init__(self, task: Task, split: str, path: str | Path | None, limit: int | None = None,
                 shard: tuple[int, int] | None = None):
        self.task, self.split, self.path, self.limit, self.shard = task, split, path, limit, shard
        self.n = sum(1 for _ in self)
        if not self.n:
            raise _no_examples(task, split, path)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Example]:
        examples = islice(_carved(self.task, self.split, self.path), self.limit or None)
        if self.shard is None:
            return examples
        i, n = self.shard
        return (e for e in examples if shard_of(e, n) == i)


def shard_of(example: Example, n: int) -> int:
    """Which of n shards an example belongs to: a hash of its id and input, the same in every
    process and on every machine."""
    digest = hashlib.sha256(f"{example.id}\n{example.input}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def _no_examples(task: Task, split: str, path: str | Path | None) -> DataError:
    return DataError(f"{task.name} split {split!r} has no examples at {path or 'the hub'}: check --data and --split")


def stream_examples(task: Task, split: str, path: str | Path | None, limit: int | None = None,
                    shard: tuple[int, int] | None = None) -> ExampleStream:
    """The first `limit` examples of a split (all when None), streamed, optionally only shard
    (i, n) of them; an empty split is refused."""
    return ExampleStream(task, split, path, limit, shard)
