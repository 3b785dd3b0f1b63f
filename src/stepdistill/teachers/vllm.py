"""A local model served by vLLM's offline engine as the teacher: batched generation on a GPU.

    teacher: {kind: vllm, model: Qwen/Qwen2.5-7B-Instruct, engine_args: {tensor_parallel_size: 2}}

Untested on CPU machines: this project's CI has no GPU and no vllm, so this module is tested
here only against a stand-in `vllm` module that checks the arguments we pass and the shape of
what we read back (tests/test_local_teachers.py), not vLLM itself. To serve the model
over HTTP instead, run `vllm serve` and use the `openai` teacher.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stepdistill.config import TeacherConfig
from stepdistill.errors import StepDistillError
from stepdistill.tasks.base import Task
from stepdistill.teachers.base import TEACHERS, Completion, Request, Teacher, cut_at_stop, portable_name

CHUNK = 8  # prompts per generate() call = batch_size * CHUNK; vLLM batches them itself, we commit after each


@TEACHERS.register("vllm")
class VLLMTeacher(Teacher):
    kind = "vllm"

    def __init__(self, cfg: TeacherConfig, *, task: Task, split: str, data_path: str | Path | None):
        self.require_model(cfg, "a hub id or local folder")
        from stepdistill.students import resolve_model_name

        self.cfg, self.task = cfg, task
        self.model = resolve_model_name(cfg.model)
        self._llm = None  # loaded lazily: a fully cached rerun never starts the engine (nor needs vllm)
        self._usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0}

    def identity(self) -> dict[str, Any]:
        return self.generation_identity(model=portable_name(self.model))

    def usage(self) -> dict[str, Any]:
        return dict(self._usage)

    def _vllm(self):
        try:
            import vllm
        except ImportError:
            raise StepDistillError("the vllm teacher needs vllm and a GPU: pip install 'stepdistill[vllm]'") from None
        return vllm

    def _load(self):
        if self._llm is None:
            self._llm = self._vllm().LLM(model=self.model, seed=self.cfg.sampling.seed, **self.cfg.engine_args)
        return self._llm

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        if not requests:
            return
        vllm, llm = self._vllm(), self._load()
        s = self.cfg.sampling

        def params(req: Request):
            # a seed per request: vLLM then samples the same text whatever it is batched with, so a
            # resumed run samples what an unbroken one would; `sample` gives each of k samples its own
            return vllm.SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                       stop=list(self.task.stop), seed=s.seed + req.sample)

        size = self.cfg.batch_size * CHUNK
        for i in range(0, len(requests), size):
            chunk = requests[i : i + size]
            t0 = time.perf_counter()
            try:
                outputs = llm.generate([r.prompt for r in chunk], [params(r) for r in chunk], use_tqdm=False)
            except ValueError:
                # vLLM rejects a whole call for one bad prompt (e.g. longer than max_model_len): rerun
                # this chunk one by one so only that prompt fails
                yield from self._one_by_one(llm, chunk, params)
                continue
            seconds = (time.perf_counter() - t0) / len(chunk)
            for req, out in zip(chunk, outputs, strict=True):
                yield req, self._completion(out, seconds)

    def _one_by_one(self, llm, chunk: list[Request], params) -> Iterator[tuple[Request, Completion]]:
        for req in chunk:
            t0 = time.perf_counter()
            try:
                (out,) = llm.generate([req.prompt], [params(req)], use_tqdm=False)
            except ValueError as e:
                self._usage["errors"] += 1
                yield req, Completion("", error=f"vLLM rejected this prompt: {e}: shorten it (teacher.n_shots) "
                                                "or raise teacher.engine_args.max_model_len")
                continue
            yield req, self._completion(out, time.perf_counter() - t0)

    def _completion(self, out, seconds: float) -> Completion:
        """A vLLM RequestOutput (prompt_token_ids, outputs[0].text/.token_ids/.finish_reason) -> Completion."""
        gen = out.outputs[0]
        comp = Completion(cut_at_stop(gen.text, self.task.stop), prompt_tokens=len(out.prompt_token_ids or ()),
                          completion_tokens=len(gen.token_ids), seconds=seconds, finish_reason=gen.finish_reason)
        self._usage["requests"] += 1
        self._usage["prompt_tokens"] += comp.prompt_tokens or 0
        self._usage["completion_tokens"] += comp.completion_tokens or 0
        return comp
