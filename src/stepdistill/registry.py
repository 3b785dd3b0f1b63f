"""One small extension mechanism: a dict registry per kind of thing (tasks, teachers, methods)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from stepdistill.errors import StepDistillError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory. Unknown names raise an error that lists the valid ones.

    >>> TASKS = Registry("task"); TASKS.register("svamp")(SvampTask)
    >>> TASKS.get("svamp")  # -> SvampTask
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

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
