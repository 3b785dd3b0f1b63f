"""One small extension mechanism: a dict registry per kind of thing (tasks, teachers, methods).

Each registry lives in the package whose modules register into it (`tasks.TASKS`,
`teachers.TEACHERS`, `methods.METHODS`). Config validation, at the bottom of the layers, checks a
name with `check_name(kind, name)`, which loads that package by name when no code has yet: the
registry finds providers, so config never imports the layers above it.
"""

from __future__ import annotations

import importlib

from typing import Callable, Generic, TypeVar

from stepdistill.errors import StepDistillError

T = TypeVar("T")

_REGISTRIES: dict[str, "Registry"] = {}  # kind -> its registry, once the module that makes it is imported
PROVIDERS = {"task": "stepdistill.tasks", "teacher": "stepdistill.teachers", "method": "stepdistill.methods"}


def check_name(kind: str, name: str) -> str:
    """For a config validator: `name` if the `kind` registry knows it, else a ValueError listing the
    valid names (loading the package that registers them, the first time)."""
    if kind not in _REGISTRIES and kind in PROVIDERS:
        importlib.import_module(PROVIDERS[kind])
    registry = _REGISTRIES.get(kind)
    if registry is not None and name not in registry:
        raise ValueError(f"unknown {kind} {name!r}: choose one of {', '.join(registry.names())}")
    return name


class Registry(Generic[T]):
    """Name -> factory. Unknown names raise an error that lists the valid ones.

    >>> TASKS = Registry("task"); TASKS.register("svamp")(SvampTask)
    >>> TASKS.get("svamp")  # -> SvampTask
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        _REGISTRIES[kind] = self

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            assert name not in self._items, f"{self.kind} {name!r} registered twice"
            self._items[name] = factory
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            raise StepDistillError(
                f"unknown {self.kind} {name!r}: choose one of {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
