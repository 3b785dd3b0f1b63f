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
    sample: int = 0  # which of the k self-consistency samples (seeds sampling; part of the store key)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float | None = None  # wall time attributed to this completion
    finish_reason: str | None = None  # "stop", or "length" when cut at max_new_tokens
    error: str | None = None  # set when the request failed for good: `text` is then empty and nothing is stored


class Teacher:
    """Turns requests into completions, yielding each as soon as it is ready so it can be stored.

    `identity()` is everything that determines the output (kind, model, sampling settings); it
    is hashed into the annotation key, so changing any of it means new teacher calls.
    """

    kind: str
    samples: bool = True  # can give k different samples per input (self-consistency); False for recorded outputs

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def prompt(self, task: Task, example: Example) -> str:
        return task.teacher_prompt(example)

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        raise NotImplementedError

    def usage(self) -> dict[str, Any]:
        """Live spend of this run so far (tokens, cost, retries) for the progress bar and the summary."""
        return {}

    def reference_accuracy(self, completions: list[str], examples: list[Example]) -> float | None:
        """Accuracy under the teacher's own published scoring, where it has one (paper: PaLM)."""
        return None


TEACHERS: Registry[Teacher] = Registry("teacher")


def make_teacher(cfg: TeacherConfig, task: Task, split: str, data_path: str | Path | None) -> Teacher:
    """>>> make_teacher(TeacherConfig(kind="paper"), get_task("svamp"), "test", "../shared/data/sbs")"""
    return TEACHERS.get(cfg.kind)(cfg, task=task, split=split, data_path=data_path)
