"""The teacher interface and registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from stepdistill.config import TeacherConfig
from stepdistill.errors import StepDistillError
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
    own_scoring: bool = False  # has a published scoring of its own: reference_accuracy() is asked for it

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def prompt(self, task: Task, example: Example) -> str:
        """The few-shot prompt, with `cfg.n_shots` exemplars when the teacher's config sets it."""
        n_shots = getattr(getattr(self, "cfg", None), "n_shots", None)
        return task.teacher_prompt(example) if n_shots is None else task.teacher_prompt(example, n_shots=n_shots)

    @classmethod
    def require_model(cls, cfg: TeacherConfig, what: str) -> str:
        """cfg.model, or the error that says what this kind of teacher needs it to name."""
        if not cfg.model:
            raise StepDistillError(f"the {cls.kind} teacher needs a model: set teacher.model (--model) to {what}")
        return cfg.model

    def generation_identity(self, **model: Any) -> dict[str, Any]:
        """identity() of a teacher that generates: its kind, what names its model (`model`), and
        the settings that change the text (shots, sampling, stop strings) from `cfg` and `task`."""
        c = self.cfg  # type: ignore[attr-defined]
        return {"kind": self.kind, **model, "n_shots": c.n_shots, "sampling": c.sampling.model_dump(),
                "stop": list(self.task.stop)}  # type: ignore[attr-defined]

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        raise NotImplementedError

    def generate_ready(self, requests: list[Request]) -> Iterator[list[tuple[Request, Completion]]]:
        """Like generate(), but yields every completion that is ready at once, so the caller can
        commit them in one transaction (group commit). Teachers with concurrent requests override it."""
        for item in self.generate(requests):
            yield [item]

    def usage(self) -> dict[str, Any]:
        """Live spend of this run so far (tokens, cost, retries) for the progress bar and the summary."""
        return {}

    def reference_accuracy(self, completions: list[str], examples: list[Example]) -> float | None:
        """Accuracy under the teacher's own published scoring, where it has one (paper: PaLM)."""
        return None


def portable_name(model: str | None) -> str | None:
    """A local file or folder is named by its file name and size, not its absolute path, so
    the store serves another checkout or virtual environment holding the same model."""
    if model and Path(model).is_file():
        return f"{Path(model).name}:{Path(model).stat().st_size}"
    return model


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Generation stops a batch only when every row hits a stop string; cut each row here."""
    cut = len(text)
    for s in stops:
        j = text.find(s)
        if j != -1:
            cut = min(cut, j)
    return text[:cut]


TEACHERS: Registry[Teacher] = Registry("teacher")


def make_teacher(cfg: TeacherConfig, task: Task, split: str, data_path: str | Path | None) -> Teacher:
    """>>> make_teacher(TeacherConfig(kind="paper"), get_task("svamp"), "test", "../shared/data/sbs")"""
    return TEACHERS.get(cfg.kind)(cfg, task=task, split=split, data_path=data_path)
