"""A local transformers causal LM as the teacher: hub id, local folder or GGUF file."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from stepdistill.config import TeacherConfig
from stepdistill.tasks.base import Task
from stepdistill.teachers.base import TEACHERS, Completion, Request, Teacher, portable_name, cut_at_stop


@TEACHERS.register("hf")
class HFTeacher(Teacher):
    kind = "hf"

    def __init__(self, cfg: TeacherConfig, *, task: Task, split: str, data_path: str | Path | None):
        self.require_model(cfg, "a hub id, folder or .gguf file")
        self.cfg, self.task = cfg, task
        self._student = None  # loaded lazily: a fully cached rerun never loads the model

    def identity(self) -> dict[str, Any]:
        return self.generation_identity(model=portable_name(self.cfg.model), gguf_file=self.cfg.gguf_file)

    @property
    def threads(self) -> int | None:
        """CPU threads the generation runs on (the report's CPU-seconds); None on a GPU."""
        import torch

        return None if torch.cuda.is_available() else torch.get_num_threads()

    def _load(self):
        if self._student is None:
            from stepdistill.students import load_pretrained

            self._student = load_pretrained(self.cfg.model, self.cfg.gguf_file, kind="causal")
            self._student.model.eval()
            self._student.tokenizer.padding_side = "left"
        return self._student

    @torch.inference_mode()
    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        student = self._load()
        model, tok = student.model, student.tokenizer
        s = self.cfg.sampling
        for i in range(0, len(requests), self.cfg.batch_size):
            batch = requests[i : i + self.cfg.batch_size]
            t0 = time.perf_counter()
            enc = tok([r.prompt for r in batch], return_tensors="pt", padding=True)
            gen_kwargs: dict[str, Any] = dict(max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id)
            if self.task.stop:
                gen_kwargs.update(stop_strings=list(self.task.stop), tokenizer=tok)
            if s.temperature > 0:
                # seeded by the batch's content, so a resumed run samples what an unbroken one would
                torch.manual_seed(s.seed + batch[0].sample + int(hashlib.sha256(batch[0].prompt.encode()).hexdigest()[:8], 16))
                gen_kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
            else:
                gen_kwargs.update(do_sample=False)
            out = model.generate(**enc, **gen_kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            seconds = (time.perf_counter() - t0) / len(batch)
            for j, req in enumerate(batch):
                ids = new[j]
                n_new = int((ids != tok.pad_token_id).sum()) if tok.pad_token_id is not None else len(ids)
                text = cut_at_stop(tok.decode(ids, skip_special_tokens=True), self.task.stop)
                yield req, Completion(text, int(enc["attention_mask"][j].sum()), n_new, seconds)
