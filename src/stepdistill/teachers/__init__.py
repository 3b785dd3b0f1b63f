"""Teachers: anything that turns prompts into chain-of-thought completions.

Every kind implements the same small interface (`Teacher`), is registered by name in
`TEACHERS`, and is built from a `TeacherConfig`. HTTP API teachers slot in the same way.
"""

from __future__ import annotations

from stepdistill.teachers.base import Completion, Request, Teacher, TEACHERS, make_teacher
from stepdistill.teachers import hf as _hf, llamacpp as _llamacpp, openai as _openai, paper as _paper, vllm as _vllm  # noqa: F401  (register)

__all__ = ["Completion", "Request", "Teacher", "TEACHERS", "make_teacher"]
