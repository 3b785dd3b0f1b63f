"""Untrusted models, secrets and memory.

- Weights: a pickle weights file with a payload is refused and its payload never runs; a plain
  pickle checkpoint is read tensor-only (or refused with `safetensors_only`), with a conversion
  hint that works; code shipped with a model (auto_map) never runs unless trust_remote_code is set.
- Secrets: a planted API key reaches the server's Authorization header and no file, log line,
  store row, report or message, through retries, a 401 and the CLI.
- Memory: a model that cannot fit is refused before its weights are read, with the fix in the message.
"""

import ast
import importlib.util
import json
import logging
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from stepdistill import api, memory
from stepdistill.config import LoraConfig, StudentConfig
from stepdistill.errors import StepDistillError
from stepdistill.students import apply_lora, count_parameters, load_pretrained, load_student
from stepdistill.testing import openai_server
from stepdistill.testing.openai_server import FakeOpenAIServer
from tiny_models import llama_student, t5_student

SRC = Path(__file__).resolve().parents[1] / "src" / "stepdistill"


def _save(student, path: Path) -> Path:
    student.model.save_pretrained(path)
    student.tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- pickle weights


class _SystemPayload:
    """Unpickling it runs a shell command (GLOBAL posix.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpenPayload:
    """Unpickling it creates a file (GLOBAL builtins.open), no shell needed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickle_only_folder(tmp_path: Path, name: str = "m") -> Path:
    folder = _save(llama_student(), tmp_path / name)
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("payload", [_SystemPayload, _OpenPayload])
@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_a_pickle_weights_file_with_a_payload_is_refused_and_never_runs(tmp_path, payload, container):
    folder = _pickle_only_folder(tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    bad = {"model.embed_tokens.weight": payload(marker)}
    if container == "torch.save":
        torch.save(bad, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(bad, protocol=2))

    with pytest.raises(StepDistillError, match="refused to load") as e:
        load_pretrained(str(folder))
    assert not marker.exists()
    msg = str(e.value)
    assert "safetensors" in msg and "save_pretrained" in msg  # how to convert
    assert "only if you trust" in msg.lower()  # converting such a file runs it: the user must decide
    with pytest.raises(StepDistillError, match="refused to load"):
        load_student(StudentConfig(model=str(folder)))  # the config path takes the same loader
    assert not marker.exists()

    # control: the payload is live, so the assertions above mean something
    pickle.loads(pickle.dumps(payload(marker)))
    assert marker.exists()


def test_a_tensor_only_pickle_checkpoint_loads_and_safetensors_only_refuses_it_with_a_working_fix(tmp_path, monkeypatch):
    original = llama_student()
    folder = _pickle_only_folder(tmp_path)
    torch.save(original.model.state_dict(), folder / "pytorch_model.bin")

    loaded = load_pretrained(str(folder))  # read with torch.load(weights_only=True)
    for (name, a), b in zip(original.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(StepDistillError, match="only pickle weights .* safetensors_only") as e:
        load_pretrained(str(folder), safetensors_only=True)
    # the hint is a runnable command: run its code, then the converted folder passes the strict check
    code = re.search(r'python -c "(.+)"', str(e.value)).group(1)
    assert "weights_only=False" not in code  # a tensor-only checkpoint converts without trusting it
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    converted = load_pretrained(str(tmp_path / "converted"), safetensors_only=True)
    assert (tmp_path / "converted" / "model.safetensors").is_file()
    assert torch.equal(converted.model.lm_head.weight, original.model.lm_head.weight)


# ---------------------------------------------------------------- remote code


_CONFIG_CODE = """
from pathlib import Path
Path({marker!r}).write_text("imported")
from transformers import PretrainedConfig

class EvilConfig(PretrainedConfig):
    model_type = "stepdistill_evil"
"""


def _remote_code_folder(tmp_path: Path, marker: Path) -> Path:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "stepdistill_evil",  # unknown to transformers: only the shipped code can build it
        "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilModel"},
    }))
    (folder / "configuration_evil.py").write_text(_CONFIG_CODE.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    return folder


def test_code_shipped_with_a_model_never_runs_unless_trusted(tmp_path, monkeypatch):
    marker = tmp_path / "REMOTE_CODE_RAN"
    folder = _remote_code_folder(tmp_path, marker)
    # transformers asks on stdin when trust_remote_code is left unset: a user answering "y" must
    # not be the way code gets in. Explicit False means no question is asked.
    monkeypatch.setattr("builtins.input", lambda *a, **k: "y")

    assert StudentConfig(model="x").trust_remote_code is False
    for load in (lambda: load_pretrained(str(folder)), lambda: load_student(StudentConfig(model=str(folder)))):
        with pytest.raises(StepDistillError, match="ships its own Python code") as e:
            load()
        assert "trust_remote_code: true" in str(e.value) and str(folder) in str(e.value)
        assert not marker.exists()

    # control: importing the shipped code does run it
    spec = importlib.util.spec_from_file_location("configuration_evil_control", folder / "modeling_evil.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert marker.exists()


def test_trust_remote_code_reaches_the_loader_only_from_the_config(monkeypatch):
    import stepdistill.students as students

    seen = []
    monkeypatch.setattr(students, "load_pretrained", lambda *a, **k: seen.append(k["trust_remote_code"]) or
                        students.Student(None, None, False))
    load_student(StudentConfig(model="m"))
    load_student(StudentConfig(model="m", trust_remote_code=True))
    assert seen == [False, True]


def test_no_module_loads_weights_unsafely_or_trusts_remote_code():
    """A guard for new code: no pickle/torch.load call, no weights_only=False, no literal trust_remote_code=True."""
    problems = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            if func in ("torch.load", "pickle.load", "pickle.loads", "dill.load", "joblib.load", "cloudpickle.load"):
                problems.append(f"{path.name}:{node.lineno} {func}")
            for kw in node.keywords:
                if (kw.arg, getattr(kw.value, "value", None)) in (("weights_only", False), ("trust_remote_code", True)):
                    problems.append(f"{path.name}:{node.lineno} {kw.arg}={kw.value.value}")
    assert not problems, problems


# ---------------------------------------------------------------- secrets

KEY = "sk-stepdistill-PLANTED-7f3a9c2e41b0d5"
KEY_ENV = "SD_SECURITY_TEST_KEY"
CANARY = "canary-value-5be2d19a"  # an unrelated variable: finding it means the environment was dumped


def _answer(prompt: str, body: dict) -> str:
    return "Let me think step by step. The answer is 4."


def _annotate_cfg(srv, n: int) -> dict:
    return {"task": {"name": "quickstart"}, "split": "train", "limit": n,
            "teacher": {"kind": "openai", "base_url": srv.url, "model": "fake-model", "api_key_env": KEY_ENV,
                        "concurrency": 2, "timeout": 5, "backoff": 0.01, "backoff_max": 0.05, "max_retries": 2,
                        "sampling": {"max_new_tokens": 32}}}


@pytest.fixture
def recording_server(monkeypatch):
    """The fake server, plus the Authorization header of every request (it does not record headers)."""
    auth: list[str | None] = []
    serve = openai_server._Handler._serve

    def recording(self):
        auth.append(self.headers.get("Authorization"))
        return serve(self)

    monkeypatch.setattr(openai_server._Handler, "_serve", recording)
    with FakeOpenAIServer(_answer) as srv:
        yield srv, auth


def _files_holding(root: Path, needle: str) -> list[str]:
    raw = needle.encode()
    return [str(f) for f in root.rglob("*") if f.is_file() and raw in f.read_bytes()]


def test_the_api_key_reaches_the_server_and_is_written_nowhere(recording_server, tmp_path, monkeypatch, capfd, caplog):
    from stepdistill import cli

    srv, auth = recording_server
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the CLI's default variable too
    monkeypatch.setenv("SD_SECURITY_CANARY", CANARY)
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's included, at its most talkative

    # 1. a 500 then success: one retry, every input annotated, the store written
    srv.inject("500", times=1)
    summary = api.annotate(_annotate_cfg(srv, 3), tmp_path / "runs" / "ok", echo=print)
    assert summary["kept"] + summary["dropped"] == 3 and summary["usage"]["retries"] == 1

    # 2. a refused key, through the Python API: the run stops with a message naming the variable only
    srv.inject("401", times=10)
    with pytest.raises(StepDistillError, match=f"API key was refused.*\\${KEY_ENV}") as e:
        api.annotate(_annotate_cfg(srv, 6), tmp_path / "runs" / "refused", echo=print)
    assert KEY not in str(e.value) and KEY not in repr(e.value)

    # 3. the same through the CLI, whose error line goes to stderr
    argv = ["annotate", "--task", "quickstart", "--split", "train", "--limit", "8", "--teacher", "openai",
            "--base-url", srv.url, "--model", "fake-model", "--out", str(tmp_path / "runs" / "cli"),
            "--set", "teacher.max_retries=0"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 1

    out, err = capfd.readouterr()
    assert "API key was refused" in err  # the CLI did print its error line
    # the key went where it must: every request carried it
    assert len(auth) >= 5 and set(auth) == {f"Bearer {KEY}"}
    # ... and nowhere else: run directories (config, env.json, log.txt, outputs), STEPDISTILL_HOME
    # (the annotation store's sqlite file and its -wal/-shm), stdout, stderr, log records
    home = Path(os.environ["STEPDISTILL_HOME"])
    assert (home / "annotations.sqlite").is_file()
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"ok", "refused", "cli"}
    assert _files_holding(tmp_path, KEY) == []
    assert KEY not in out and KEY not in err
    assert not [r.getMessage() for r in caplog.records if KEY in r.getMessage()]
    # env.json records versions and the command line, never the environment
    for run in ("ok", "refused", "cli"):
        env = json.loads((tmp_path / "runs" / run / "env.json").read_text())
        assert CANARY not in json.dumps(env) and not {"env", "environ", "environment"} & set(env)
    assert f"api_key_env: {KEY_ENV}" in (tmp_path / "runs" / "ok" / "config.yaml").read_text()


def test_a_server_that_echoes_the_key_in_its_errors_does_not_leak_it(recording_server, tmp_path, monkeypatch):
    srv, _ = recording_server
    send_error = openai_server._Handler._send_error

    def echoing(self, entry, status, message, retry_after=None):  # like "Incorrect API key provided: sk-..."
        return send_error(self, entry, status, f"{message} (key {self.headers.get('Authorization')})", retry_after)

    monkeypatch.setattr(openai_server._Handler, "_send_error", echoing)
    monkeypatch.setenv(KEY_ENV, KEY)
    srv.inject("503", times=3)  # one input fails for good: its error is written to the run and the store
    api.annotate(_annotate_cfg(srv, 2), tmp_path / "a", echo=lambda _: None)
    srv.inject("401", times=5)
    with pytest.raises(StepDistillError) as e:
        api.annotate(_annotate_cfg(srv, 4), tmp_path / "b", echo=lambda _: None)
    assert KEY not in str(e.value)
    assert _files_holding(tmp_path, KEY) == []


# ---------------------------------------------------------------- memory


def test_estimates_count_the_real_parameters(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    for student, auto in ((llama_student(), AutoModelForCausalLM), (t5_student(), AutoModelForSeq2SeqLM)):
        n = count_parameters(student.model)[1]
        folder = _save(student, tmp_path / type(student.model).__name__)
        assert memory.parameters_from_config(student.model.config, auto) == n
        on_disk = memory.parameters_on_disk(folder)
        assert on_disk == n or (student.is_seq2seq and on_disk < n)  # tied weights are stored once
    n = 1_000_000
    assert memory.load_bytes(n) == int(n * 4 * 1.2)
    assert memory.load_bytes(n, torch.bfloat16) == memory.load_bytes(n) // 2
    assert memory.training_bytes(n) == int(n * 16 * 1.2)  # fp32 + Adam: 4x the weights
    assert memory.training_bytes(n, n_trainable=n // 100) < 1.1 * memory.load_bytes(n)  # LoRA: about the weights


def test_a_model_that_cannot_fit_is_refused_before_its_weights_are_read(tmp_path, monkeypatch):
    import transformers

    folder = _save(llama_student(), tmp_path / "m")
    n = count_parameters(llama_student().model)[1]
    monkeypatch.setattr(memory, "available_memory", lambda device=None: n * 4 // 2)  # half the weights

    def no_read(*a, **k):
        raise AssertionError("the weights were read")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_read)
        with pytest.raises(memory.InsufficientMemoryError,
                           match=r"needs about .* GiB of memory, and .* GiB is available: use a smaller model.*bfloat16"):
            load_pretrained(str(folder))
    assert issubclass(memory.InsufficientMemoryError, StepDistillError)  # the CLI prints it as one line

    monkeypatch.setenv(memory.SKIP_ENV, "1")  # the escape hatch the message names
    assert load_pretrained(str(folder)).model is not None
    monkeypatch.delenv(memory.SKIP_ENV)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 100 * n * 4)
    assert load_pretrained(str(folder)).model is not None


def test_pre_quantised_checkpoints_are_not_guessed_at():
    from transformers import AutoModelForCausalLM

    config = llama_student().model.config
    assert memory.check_load(config, AutoModelForCausalLM, what="x", available=10**12) > 0
    with pytest.raises(memory.InsufficientMemoryError):
        memory.check_load(config, AutoModelForCausalLM, what="x", available=1)
    config.quantization_config = {"quant_method": "gptq", "bits": 4}  # 4 bits, not 32: no fp32 estimate
    assert memory.check_load(config, AutoModelForCausalLM, what="x", available=1) is None


def test_gguf_conversion_is_refused_before_dequantising_when_it_cannot_fit(tmp_path, monkeypatch):
    gguf = tmp_path / "big.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the parameter count is what a 7B file would give
    monkeypatch.setattr(memory, "parameters_in_gguf", lambda path: 7_000_000_000)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 16 * memory.GiB)
    with pytest.raises(memory.InsufficientMemoryError, match=r"converting big.gguf \(7,000.0M parameters\) needs about 62.6 GiB"):
        load_pretrained(str(gguf))


def test_training_check_counts_gradients_and_adam_moments(monkeypatch):
    student = t5_student()
    params = {id(p): p for p in student.model.parameters()}.values()
    weights = sum(p.numel() * 4 for p in params)
    # CPU: the weights are already in memory; gradients + two moments must still fit (12 bytes/param)
    assert memory.check_training(student.model, available=10**12) == int(weights * 3 * 1.2)
    with pytest.raises(memory.InsufficientMemoryError, match="use LoRA"):
        memory.check_training(student.model, available=weights)
    # GPU: the weights move too
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 10**12)
    assert memory.check_training(student.model, device="cuda:0") == int(weights * 4 * 1.2)
    # LoRA: only the adapters get gradients and moments
    lora = apply_lora(student, LoraConfig(r=2, target_modules=["q", "v"]))
    assert memory.check_training(lora.model, available=weights // 4) < weights // 4


def test_available_memory_reads_cgroup_limits_and_meminfo(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1000000\n")
    (v2 / "memory.current").write_text("600000\n")
    (v2 / "memory.stat").write_text("anon 400000\ninactive_file 100000\n")
    assert memory._cgroup_available(v2) == 1000000 - (600000 - 100000)  # page cache can be reclaimed
    (v2 / "memory.max").write_text("max\n")
    assert memory._cgroup_available(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2000000\n")
    (v1 / "memory.usage_in_bytes").write_text("500000\n")
    assert memory._cgroup_available(tmp_path / "v1") == 1500000
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert memory._cgroup_available(tmp_path / "v1") is None
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  2048 kB\nMemFree:  100 kB\nMemAvailable:  1024 kB\n")
    assert memory._meminfo_available(meminfo) == 1024 * 1024
    assert memory.available_memory() > 0  # this machine's, read for real
