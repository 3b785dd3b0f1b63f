"""The teacher interface and registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from stepdistill.config import TeacherConfig
from stepdistill.registry import Registry
from stepdistill.tasks.base import Example, Task


@dataclass(frozen=True)
class Request:
    example: Example
    prompt: str  # the full few-shot prompt; the completion continues it


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float | None = None  # wall time attributed to this completion


class Teacher:
    """Turns requests into completions, yielding each as soon as it is ready so it can be stored.

    `identity()` is everything that determines the output (kind, model, sampling settings); it
    is hashed into the annotation key, so changing any of it means new teacher calls.
    """

    kind: str

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def prompt(self, task: Task, example: Example) -> str:
        return task.teacher_prompt(example)

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        raise NotImplementedError

    def reference_accuracy(self, completions: list[str], examples: list[Example]) -> float | None:
        """Accuracy under the teacher's own published scoring, where it has one (paper: PaLM)."""
        return None


TEACHERS: Registry[Teacher] = Registry("teacher")


def make_teacher(cfg: TeacherConfig, task: Task, split: str, data_path: str | Path | None) -> Teacher:
    """>>> make_teacher(TeacherConfig(kind="paper"), get_task("svamp"), "test", "../shared/data/sbs")"""
    return TEACHERS.get(cfg.kind)(cfg, task=task, split=split, data_path=data_path)
