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

from pathlib import Path

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


__all__ = ["TASKS", "Example", "Parsed", "Task", "get_task"]


def load_examples(task: Task, split: str, path: str | Path | None, limit: int | None = None) -> list[Example]:
    """`task.load`, refusing an empty split and keeping the first `limit` examples."""
    examples = task.load(split, path)
    if not examples:
        raise DataError(f"{task.name} split {split!r} has no examples at {path or 'the hub'}: check --data and --split")
    return examples[:limit] if limit else examples
