"""Pruning: layers, KV-head groups and FFN neurons really removed (smaller, reloadable, same
outputs where nothing that mattered went); magnitude zeros measured; the prune CLI."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from stepdistill.cli import main
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import load_trained
from stepdistill.methods.formatting import Format
from stepdistill.pruning import (
    cut_layers,
    keep_layers,
    latency,
    measure,
    prune_magnitude,
    prune_structured,
    select_layers,
    sparsity_report,
    taylor_batches,
)
from stepdistill.students import Student, count_parameters
from tiny_models import examples, t5_student, tokenizer

H, LAYERS, HEADS, KV, INTER = 64, 4, 4, 2, 128  # GQA: 2 query heads per KV head, head_dim 16


def tiny_llama(seed: int = 0, **over) -> LlamaForCausalLM:
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok), hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256,
               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
               tie_word_embeddings=False)
    cfg.update(over)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def ids(n: int = 10, batch: int = 2) -> torch.Tensor:
    return torch.randint(4, len(tokenizer()), (batch, n), generator=torch.Generator().manual_seed(1))


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def greedy(model, use_cache=True):
    return model.generate(ids(4, 1), max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=use_cache,
                          pad_token_id=0)


def save(model, path):
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def test_select_layers():
    assert select_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert select_layers(4, 2) == [0, 3] and select_layers(4, 1) == [0] and select_layers(4, 4) == [0, 1, 2, 3]
    assert select_layers(4, 3, "first") == [0, 1, 2]
    assert select_layers(12, 2, "every") == [0, 2, 4, 6, 8, 10] and select_layers(5, 3, "every") == [0, 3]
    with pytest.raises(StepDistillError, match="1..4"):
        select_layers(4, 5)
    with pytest.raises(StepDistillError, match="1..4"):
        select_layers(4, 0, "first")
    with pytest.raises(StepDistillError, match="spread, first or every"):
        select_layers(4, 2, "random")


def test_keep_layers_keeps_those_layers_and_generates():
    full, m = tiny_llama(), tiny_llama()
    rep = keep_layers(m, [0, 2, 3])
    assert rep == {"kept": [0, 2, 3], "num_hidden_layers": [4, 3]}
    assert m.config.num_hidden_layers == 3
    for new, old in enumerate([0, 2, 3]):
        assert m.model.layers[new].self_attn.layer_idx == new
        assert torch.equal(m.model.layers[new].mlp.up_proj.weight, full.model.layers[old].mlp.up_proj.weight)
    # the KV cache finds every layer: cached generation equals recomputing from scratch
    assert torch.equal(greedy(m), greedy(m, use_cache=False))
    with pytest.raises(StepDistillError, match="ascending"):
        keep_layers(m, [2, 0])


def test_qwen2_biases_and_layer_types_follow(tmp_path):
    """Qwen2: q/k/v carry biases and the config a per-layer layer_types list."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer()), hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
                      use_sliding_window=True, sliding_window=8, max_window_layers=2, tie_word_embeddings=False)
    m = Qwen2ForCausalLM(cfg).eval()
    keep_layers(m, [0, 3])
    assert m.config.layer_types == ["full_attention", "sliding_attention"]
    prune_structured(m, heads=1, ffn=0.5)
    assert m.model.layers[0].self_attn.k_proj.bias.shape == (16,)
    back = AutoModelForCausalLM.from_pretrained(save(m, tmp_path / "q")).eval()
    assert torch.allclose(logits(back), logits(m), atol=1e-6) and torch.equal(greedy(m), greedy(m, use_cache=False))


def test_cut_layers_with_a_strategy(tmp_path):
    src = save(tiny_llama(), tmp_path / "src")
    out = cut_layers(str(src), 2, tmp_path / "cut", strategy="spread")
    cut, full = AutoModelForCausalLM.from_pretrained(out), tiny_llama()
    assert cut.config.num_hidden_layers == 2
    assert torch.equal(cut.model.layers[1].self_attn.q_proj.weight, full.model.layers[3].self_attn.q_proj.weight)
    with pytest.raises(StepDistillError, match="already holds a model"):
        cut_layers(str(src), 2, out)


def expected_parameters(layers, heads, kv, inter, hd=H // HEADS, vocab=len(tokenizer())):
    """By hand from the config numbers: embeddings + lm_head + final norm + per layer
    (q, k, v, o, gate, up, down, two norms)."""
    per_layer = H * heads * hd + 2 * H * kv * hd + heads * hd * H + 3 * H * inter + 2 * H
    return 2 * vocab * H + H + layers * per_layer


def test_structured_pruning_shrinks_saves_and_reloads(tmp_path):
    m = tiny_llama()
    before = count_parameters(m)[1]
    assert before == expected_parameters(LAYERS, HEADS, KV, INTER)
    rep = prune_structured(m, heads=1, ffn=0.25)
    assert rep["num_key_value_heads"] == [2, 1] and rep["num_attention_heads"] == [4, 2]
    assert rep["intermediate_size"] == [128, 96] and len(rep["removed_neurons"]) == LAYERS
    assert count_parameters(m)[1] == expected_parameters(LAYERS, 2, 1, 96) < before
    assert (m.config.num_attention_heads, m.config.num_key_value_heads, m.config.intermediate_size,
            m.config.head_dim) == (2, 1, 96, 16)
    out = logits(m)
    back = AutoModelForCausalLM.from_pretrained(save(m, tmp_path / "p")).eval()
    assert type(back) is LlamaForCausalLM and count_parameters(back)[1] == count_parameters(m)[1]
    assert torch.allclose(logits(back), out, atol=1e-6)
    assert torch.equal(greedy(back), greedy(m)) and torch.equal(greedy(m), greedy(m, use_cache=False))
    size = sum(f.stat().st_size for f in (tmp_path / "p").glob("*.safetensors"))
    save(tiny_llama(), tmp_path / "full")
    assert size < sum(f.stat().st_size for f in (tmp_path / "full").glob("*.safetensors"))


def test_nothing_pruned_changes_nothing():
    m = tiny_llama()
    out = logits(m)
    rep = prune_structured(m, heads=0, ffn=0.0)
    assert rep["removed_neurons"] == [] and torch.equal(logits(m), out)


def _zero_units(m, group=1, neurons=tuple(range(3, 128, 4))):
    """Silence KV group `group` (its k/v rows, its query heads' q rows and o columns) and some
    neurons (gate/up rows, down columns) in every layer: they contribute exactly nothing."""
    hd, rep = H // HEADS, HEADS // KV
    with torch.no_grad():
        for layer in m.model.layers:
            a, f = layer.self_attn, layer.mlp
            q = slice(group * rep * hd, (group + 1) * rep * hd)
            a.q_proj.weight[q] = 0
            a.o_proj.weight[:, q] = 0
            a.k_proj.weight[group * hd:(group + 1) * hd] = 0
            a.v_proj.weight[group * hd:(group + 1) * hd] = 0
            f.gate_proj.weight[list(neurons)] = 0
            f.up_proj.weight[list(neurons)] = 0
            f.down_proj.weight[:, list(neurons)] = 0
    return list(neurons)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_importance_removes_the_silent_units(importance):
    m = tiny_llama()
    neurons = _zero_units(m)
    assert len(neurons) == 32  # = 0.25 * 128
    out = logits(m)
    batches = None
    if importance == "taylor":
        x = ids(8, 4)
        batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}]
    rep = prune_structured(m, heads=1, ffn=0.25, importance=importance, batches=batches)
    assert rep["removed_kv_groups"] == [[1]] * LAYERS and rep["removed_neurons"] == [neurons] * LAYERS
    assert torch.allclose(logits(m), out, atol=1e-5)
    assert all(p.grad is None for p in m.parameters())


def test_taylor_without_batches_and_impossible_requests_say_why():
    m = tiny_llama()
    with pytest.raises(StepDistillError, match="taylor importance needs gradients"):
        prune_structured(m, heads=1, importance="taylor")
    with pytest.raises(StepDistillError, match="remove 0..1"):
        prune_structured(m, heads=2)
    with pytest.raises(StepDistillError, match=r"\[0, 1\)"):
        prune_structured(m, ffn=1.0)
    # 8 heads over 4 KV heads: removing one group leaves 6 heads, which LlamaConfig refuses (64 % 6)
    with pytest.raises(StepDistillError, match=r"choose --heads from \[2, 3\]"):
        prune_structured(tiny_llama(num_attention_heads=8, num_key_value_heads=4, head_dim=8), heads=1)
    assert count_parameters(m)[1] == expected_parameters(LAYERS, HEADS, KV, INTER)  # untouched


def test_taylor_batches_from_task_examples():
    s = Student(tiny_llama(), tokenizer(), is_seq2seq=False, fmt=Format(kind="causal"))
    batches = taylor_batches(s, examples(6), prefix="predict: ", batch_size=4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2] and (batches[0]["labels"] == -100).any()
    prune_structured(s.model, ffn=0.25, importance="taylor", batches=batches)
    assert s.model.config.intermediate_size == 96


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_reaches_the_sparsity_and_says_it_is_no_smaller(scope):
    m = tiny_llama()
    tok = tokenizer()
    before = measure(m, tok, prompts=["cat", "the big dog"], max_new_tokens=2, repeats=1)
    embed = m.model.embed_tokens.weight.clone()
    rep = prune_magnitude(m, 0.5, scope)
    assert abs(rep["overall"] - 0.5) < 1e-3 and abs(sparsity_report(m)["overall"] - 0.5) < 1e-3
    assert "no smaller" in rep["note"] and "no faster" in rep["note"]
    if scope == "layer":
        assert all(abs(v - 0.5) < 1e-3 for v in rep["modules"].values())
    assert len(rep["modules"]) == LAYERS * 7
    assert torch.equal(m.model.embed_tokens.weight, embed) and not (m.lm_head.weight == 0).any()
    after = measure(m, tok, prompts=["cat", "the big dog"], max_new_tokens=2, repeats=1)
    assert after["parameters"] == before["parameters"] and after["size_bytes"] == before["size_bytes"]
    assert after["ms_per_prediction"] > 0 and after["new_tokens"] == 2
    both = latency([tiny_llama(), m], tok, prompts=["cat"], max_new_tokens=2, repeats=2)
    assert len(both) == 2 and all(len(t["latency_runs_ms"]) == 2 for t in both)


def test_unsupported_architectures_name_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=40, n_positions=32))
    for model in (gpt2, t5_student().model):
        for call in (lambda: prune_structured(model, ffn=0.5), lambda: keep_layers(model, [0]),
                     lambda: prune_magnitude(model, 0.5)):
            with pytest.raises(StepDistillError, match=r"supports Llama-family causal LMs \(llama, mistral, qwen2"):
                call()


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_prune_cli_end_to_end(tmp_path, capsys):
    src = save(tiny_llama(), tmp_path / "src")
    # a trained model's stepdistill.json travels with it and decides the accuracy's prefix
    info = {"method": "standard", "label_prefix": "predict: ", "rationale_prefix": "explain: ",
            "format": Format(kind="causal").to_dict()}
    (src / "stepdistill.json").write_text(json.dumps(info))
    out = tmp_path / "pruned"
    code, stdout, err = _run(capsys, "prune", "--model", str(src), "--out", str(out), "--layers", "2",
                             "--heads", "1", "--ffn", "0.25", "--sparsity", "0.2", "--task", "quickstart",
                             "--split", "test", "--limit", "3")
    assert code == 0, err
    assert all(w in stdout for w in ("parameters", "size on disk", "ms/prediction", "accuracy", "zero weights"))
    assert "no smaller" in stdout
    report = json.loads((out / "prune_report.json").read_text())
    assert report["before"]["parameters"] == expected_parameters(LAYERS, HEADS, KV, INTER)
    assert report["after"]["parameters"] == expected_parameters(2, 2, 1, 96)
    assert report["steps"]["layers"]["kept"] == [0, 3] and report["after"]["n"] == 3
    assert abs(report["after"]["zero_fraction"] - 0.2) < 1e-3
    student, saved = load_trained(out)  # tokenizer + stepdistill.json came along
    assert saved == info and student.model.config.num_hidden_layers == 2
    assert not list(tmp_path.glob(".pruned-*"))  # no temp folder left behind

    code, _, err = _run(capsys, "prune", "--model", str(src), "--out", str(tmp_path / "taylor"), "--ffn", "0.25",
                        "--importance", "taylor", "--task", "quickstart", "--limit", "2")
    assert code == 0, err
    report = json.loads((tmp_path / "taylor" / "prune_report.json").read_text())
    assert report["steps"]["structured"]["importance"] == "taylor" and report["after"]["parameters"] < report["before"]["parameters"]

    capsys.readouterr()
    code, _, err = _run(capsys, "prune", "--model", str(src), "--out", str(out), "--ffn", "0.5")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "exists" in lines[0] and lines[0].startswith("stepdistill: error: ")


def test_prune_cli_refuses_taylor_without_task_and_unsupported_models(tmp_path, capsys):
    src = save(tiny_llama(), tmp_path / "src")
    code, _, err = _run(capsys, "prune", "--model", str(src), "--out", str(tmp_path / "o"), "--ffn", "0.5",
                        "--importance", "taylor")
    assert code == 1 and "needs --task" in err
    t5 = t5_student()
    t5.model.save_pretrained(tmp_path / "t5")
    t5.tokenizer.save_pretrained(tmp_path / "t5")
    code, _, err = _run(capsys, "prune", "--model", str(tmp_path / "t5"), "--out", str(tmp_path / "o"), "--ffn", "0.5")
    assert code == 1 and "supports Llama-family" in err and not (tmp_path / "o").exists()
