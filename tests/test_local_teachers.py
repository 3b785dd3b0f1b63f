"""The local-engine teachers: vllm (glue only) and llamacpp (glue, plus a real GGUF model when slow).

The vllm tests run against a stand-in `vllm` module injected into sys.modules: they check our
glue code (the sampling parameters we pass, chunking, how we read vLLM's RequestOutput, the
errors), not vLLM itself, which needs a GPU this suite does not have.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from stepdistill import api
from stepdistill.config import SamplingConfig, TeacherConfig
from stepdistill.errors import StepDistillError
from stepdistill.tasks import get_task, load_examples
from stepdistill.teachers import Request, make_teacher
from stepdistill.teachers import llamacpp as _llamacpp  # noqa: F401  (registers it)
from stepdistill.teachers import vllm as _vllm  # noqa: F401  (registers it)

# ------------------------------------------------------------------ vllm, against a stand-in


class FakeVLLM:
    """A stand-in `vllm` module: records what LLM() and generate() get; answers like vLLM would."""

    def __init__(self):
        self.engines: list[dict] = []
        self.calls: list[tuple[list[str], list]] = []
        fake = self

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        class LLM:
            def __init__(self, **kw):
                fake.engines.append(kw)

            def generate(self, prompts, params, use_tqdm=True):
                assert isinstance(params, list) and len(params) == len(prompts), "one SamplingParams per prompt"
                fake.calls.append((list(prompts), list(params)))
                if any("TOO LONG" in p for p in prompts):
                    raise ValueError("The decoder prompt (length 9999) is longer than the maximum model length of 4096")
                return [_request_output(p, sp.kw) for p, sp in zip(prompts, params)]

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


def _request_output(prompt: str, kw: dict):
    # shaped like vllm.RequestOutput: prompt_token_ids, outputs[0].{text, token_ids, finish_reason}
    text = f" 2 plus 3 is 5. The answer is (2 + 3). [seed {kw['seed']}]"
    gen = SimpleNamespace(index=0, text=text, token_ids=list(range(len(text.split()))), finish_reason="stop")
    return SimpleNamespace(prompt=prompt, prompt_token_ids=list(range(len(prompt.split()))), outputs=[gen])


@pytest.fixture
def fake_vllm(monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    return fake


def _requests(teacher, task, n: int, samples: int = 1) -> list[Request]:
    exs = load_examples(task, "test", None, n)
    return [Request(ex, teacher.prompt(task, ex), sample=k) for ex in exs for k in range(samples)]


def test_vllm_passes_sampling_params_and_reads_outputs(fake_vllm):
    task = get_task("quickstart")
    cfg = TeacherConfig(kind="vllm", model="org/teacher", batch_size=1, engine_args={"tensor_parallel_size": 2},
                        sampling=SamplingConfig(max_new_tokens=33, temperature=0.7, top_p=0.9, seed=5))
    teacher = make_teacher(cfg, task, "test", None)
    reqs = _requests(teacher, task, 5, samples=2)  # 10 requests
    out = list(teacher.generate(reqs))

    assert fake_vllm.engines == [{"model": "org/teacher", "seed": 5, "tensor_parallel_size": 2}]
    assert [len(p) for p, _ in fake_vllm.calls] == [8, 2], "chunks of batch_size * 8, each yielded when done"
    params = [sp.kw for _, sps in fake_vllm.calls for sp in sps]
    assert params[0] == {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 33,
                         "stop": list(task.stop), "seed": 5}
    assert [p["seed"] for p in params] == [5 + r.sample for r in reqs] == [5, 6] * 5
    assert [r for r, _ in out] == reqs
    for req, comp in out:
        assert comp.error is None and comp.text.startswith(" 2 plus 3 is 5.")
        assert f"[seed {5 + req.sample}]" in comp.text
        assert comp.prompt_tokens == len(req.prompt.split()) and comp.completion_tokens > 0
        assert comp.finish_reason == "stop"
    assert teacher.usage()["requests"] == 10 and teacher.usage()["completion_tokens"] > 0


def test_vllm_one_bad_prompt_fails_alone(fake_vllm):
    task = get_task("quickstart")
    teacher = make_teacher(TeacherConfig(kind="vllm", model="org/teacher", batch_size=1), task, "test", None)
    reqs = _requests(teacher, task, 3)
    reqs[1] = Request(reqs[1].example, reqs[1].prompt + " TOO LONG")
    out = {r.prompt: c for r, c in teacher.generate(reqs)}
    assert len(out) == 3
    assert "longer than the maximum model length" in out[reqs[1].prompt].error
    assert out[reqs[1].prompt].text == ""
    assert out[reqs[0].prompt].error is None and out[reqs[2].prompt].error is None


def test_vllm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    task = get_task("quickstart")
    teacher = make_teacher(TeacherConfig(kind="vllm", model="org/teacher"), task, "test", None)
    assert teacher.identity()["model"] == "org/teacher"  # building it and keying the store need no vllm
    with pytest.raises(StepDistillError, match=r"needs vllm and a GPU: pip install 'stepdistill\[vllm\]'"):
        list(teacher.generate(_requests(teacher, task, 1)))


def test_vllm_annotate_then_rerun_from_store(fake_vllm, tmp_path):
    cfg = {"task": {"name": "quickstart"}, "split": "test", "limit": 3,
           "teacher": {"kind": "vllm", "model": "org/teacher"}}
    first = api.annotate(cfg, out=tmp_path / "a1", store_path=tmp_path / "s.sqlite", echo=lambda *a: None)
    assert first["generated"] == 3 and len(fake_vllm.engines) == 1
    second = api.annotate(cfg, out=tmp_path / "a2", store_path=tmp_path / "s.sqlite", echo=lambda *a: None)
    assert second["generated"] == 0 and len(fake_vllm.engines) == 1, "a cached rerun never starts the engine"


# ------------------------------------------------------------------ llamacpp, fast


def test_llamacpp_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(StepDistillError, match="GGUF file .*nope.gguf not found"):
        make_teacher(TeacherConfig(kind="llamacpp", model=str(tmp_path / "nope.gguf")), get_task("quickstart"), "test", None)
    with pytest.raises(StepDistillError, match="needs a model"):
        make_teacher(TeacherConfig(kind="llamacpp"), get_task("quickstart"), "test", None)


def test_llamacpp_missing_module_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    task = get_task("quickstart")
    teacher = make_teacher(TeacherConfig(kind="llamacpp", model=str(gguf)), task, "test", None)
    # the store key names the file by name and size, never by this machine's path
    assert teacher.identity()["model"] == "m.gguf:64" and str(tmp_path) not in json.dumps(teacher.identity())
    with pytest.raises(StepDistillError, match=r"needs llama-cpp-python: pip install 'stepdistill\[llamacpp\]'"):
        list(teacher.generate(_requests(teacher, task, 1)))


# ------------------------------------------------------------------ llamacpp, real (slow)


def _smollm2() -> Path:
    from stepdistill.students import smollm2_gguf

    try:
        return smollm2_gguf()
    except StepDistillError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_llamacpp_annotates_with_real_gguf(tmp_path):
    pytest.importorskip("llama_cpp")
    cfg = {"task": {"name": "quickstart"}, "split": "test", "limit": 3, "verify": {"against": "none"},
           "teacher": {"kind": "llamacpp", "model": str(_smollm2()), "sampling": {"max_new_tokens": 48}}}
    t0 = time.perf_counter()
    summary = api.annotate(cfg, out=tmp_path / "ann", store_path=tmp_path / "s.sqlite")
    print(f"llamacpp annotated 3 examples in {time.perf_counter() - t0:.1f}s (model load included)")
    rows = [json.loads(line) for line in (tmp_path / "ann" / "annotations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["completion"].strip() for r in rows)
    assert summary["generated"] == 3

    # the demo model's name resolves to the same file and so to the same store keys: nothing to generate
    cfg["teacher"]["model"] = "smollm2-135m-instruct"
    again = api.annotate(cfg, out=tmp_path / "ann2", store_path=tmp_path / "s.sqlite")
    assert again["generated"] == 0


@pytest.mark.slow
def test_llamacpp_prompt_too_long_fails_that_request_only():
    pytest.importorskip("llama_cpp")
    task = get_task("quickstart")
    cfg = TeacherConfig(kind="llamacpp", model=str(_smollm2()), engine_args={"n_ctx": 256},
                        sampling=SamplingConfig(max_new_tokens=16))
    teacher = make_teacher(cfg, task, "test", None)
    ex = load_examples(task, "test", None, 1)[0]
    short, long = Request(ex, "Q: What is 2 + 3?\nA:"), Request(ex, teacher.prompt(task, ex))
    out = {r.prompt: c for r, c in teacher.generate([long, short])}
    assert out[long.prompt].error and "raise teacher.engine_args.n_ctx" in out[long.prompt].error
    assert out[short.prompt].error is None and out[short.prompt].completion_tokens > 0
    assert out[short.prompt].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_openai_teacher_against_llama_cpp_server(tmp_path):
    """The openai teacher end to end against a real OpenAI-compatible server: llama.cpp's."""
    pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server]")
    pytest.importorskip("stepdistill.teachers.openai")  # registers the openai teacher
    _annotate_via_server(tmp_path, _smollm2())


def _annotate_via_server(tmp_path: Path, gguf: Path) -> None:
    from stepdistill.testing.llama_server import llama_server

    with llama_server(gguf, tmp_path / "server.log", "--n_ctx", "2048", timeout=120) as url:
        cfg = {"task": {"name": "quickstart"}, "split": "test", "limit": 3, "verify": {"against": "none"},
               "teacher": {"kind": "openai", "base_url": url, "model": "smollm2",
                           "endpoint": "completions", "concurrency": 2, "sampling": {"max_new_tokens": 48}}}
        t0 = time.perf_counter()
        summary = api.annotate(cfg, out=tmp_path / "ann", store_path=tmp_path / "s.sqlite")
        print(f"openai teacher via llama_cpp.server annotated 3 examples in {time.perf_counter() - t0:.1f}s")
        rows = [json.loads(line) for line in (tmp_path / "ann" / "annotations.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all(r["completion"].strip() for r in rows)
        assert summary["usage"]["completion_tokens"] > 0
