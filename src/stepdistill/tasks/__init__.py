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
"""

from __future__ import annotations

import hashlib
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


__all__ = ["TASKS", "Example", "ExampleStream", "Parsed", "Task", "get_task", "load_examples", "stream_examples"]


def load_examples(task: Task, split: str, path: str | Path | None, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of a split (all when None), in a list; an empty split is refused."""
    examples = list(islice(task.iter_load(split, path), limit or None))
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
        examples = islice(self.task.iter_load(self.split, self.path), self.limit or None)
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
