"""KD from a teacher with another tokenizer (kd.cross_tokenizer: uld, methods/cross_tokenizer.py):
the alignment on the text, the loss against a hand computation, training end to end with a
character-level teacher, and what stays refused."""

import json

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stepdistill.config import KDConfig, MethodConfig, TrainingConfig
from stepdistill.errors import ConfigError, StepDistillError
from stepdistill.methods.cross_tokenizer import align, teacher_rows, uld_loss
from stepdistill.methods.formatting import Format
from stepdistill.methods import get_method
from stepdistill.training import fit
from test_kd_training import _changed, _records
from tiny_models import FakeTask, llama_student, t5_student, tokenizer

CHARS = list("abcdefghijklmnopqrstuvwxyz:.")
TRAINING = TrainingConfig(max_steps=10, learning_rate=1e-2, batch_size=8, logging_steps=2, bf16=False)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Another tokenizer: one token per character, its own ids and special tokens."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Split(Regex("."), behavior="isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def save_char_teacher(path, seed=3):
    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tokens_align_where_they_start_at_the_same_character():
    s_tok, t_tok = tokenizer(), char_tokenizer()
    s = s_tok("cat is animal", add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id]
    t = t_tok("cat is animal", add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
    assert len(s) == 4 and len(t) == 12
    # "cat" starts at character 0 (c), "is" at 3 (i), "animal" at 5 (a), counting no spaces; eos with eos
    assert align(s_tok, s, t_tok, t) == [(0, 0), (1, 3), (2, 5), (3, 11)]
    assert align(t_tok, t, s_tok, s) == [(0, 0), (3, 1), (5, 2), (11, 3)]


def test_teacher_rows_hold_the_same_text_and_positions_that_predict_aligned_tokens():
    s_tok, t_tok = tokenizer(), char_tokenizer()
    method = get_method(MethodConfig(name="step-by-step"))
    records, _ = _records(method.cfg, n=2)
    feats = method.features(s_tok, Format(kind="causal"), records)
    rows = teacher_rows(s_tok, t_tok, feats)
    for f in rows:
        for pre in ("", "rat_"):
            ids, labels = f[pre + "input_ids"], f[pre + "labels"]
            t_ids = f[pre + "kdt_input_ids"]
            text = s_tok.decode(ids, skip_special_tokens=True).replace(" ", "")
            assert t_tok.decode(t_ids, skip_special_tokens=True).replace(" ", "") == text
            for sp, tp in zip(f[pre + "kdt_spos"], f[pre + "kdt_tpos"]):
                s_next = s_tok.convert_ids_to_tokens(ids[sp + 1])
                t_next = t_tok.convert_ids_to_tokens(t_ids[tp + 1])
                assert labels[sp + 1] != -100  # the student's logit there predicts a target token
                assert s_next[0] == t_next or (s_next == "</s>" and t_next == "[EOS]")


def test_uld_is_the_l1_distance_between_sorted_distributions_by_hand():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 6, 11)
    spos, tpos = torch.tensor([[0, 3, -1], [1, 2, 4]]), torch.tensor([[1, 5, -1], [0, 2, 3]])
    expected = 0.0
    for b in range(2):
        for sp, tp in zip(spos[b].tolist(), tpos[b].tolist()):
            if sp < 0:
                continue
            ps = sorted(torch.softmax(s[b, sp] / 2.0, -1).tolist(), reverse=True) + [0.0] * 4
            pt = sorted(torch.softmax(t[b, tp] / 2.0, -1).tolist(), reverse=True)
            expected += sum(abs(x - y) for x, y in zip(ps, pt))
    assert uld_loss(s, t, spos, tpos, temperature=2.0).item() == pytest.approx(expected, rel=1e-5)
    perm = torch.randperm(7)  # the same distribution under other token ids: distance 0
    assert uld_loss(s, s[:, :, perm], spos, spos).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["standard", "step-by-step"])
def test_a_teacher_with_another_tokenizer_teaches_through_uld(name, tmp_path):
    teacher_before = save_char_teacher(tmp_path / "teacher")
    with pytest.raises(StepDistillError, match="different vocabularies.*kd.cross_tokenizer: uld"):
        fit(llama_student(0), MethodConfig(name=name, kd={"teacher": str(tmp_path / "teacher")}), TRAINING,
            *_records(MethodConfig(name=name))[:1], [], FakeTask(), tmp_path / "refused", progress=False)
    kd = KDConfig(teacher=str(tmp_path / "teacher"), cross_tokenizer="uld", weight=1.0, temperature=1.0)
    method = MethodConfig(name=name, kd=kd)
    records, exs = _records(method)
    student = llama_student(0)
    before = {k: v.detach().clone() for k, v in student.model.state_dict().items()}
    fit(student, method, TRAINING, records, exs[:4], FakeTask(), tmp_path / "run", progress=False)
    assert _changed(before, student.model)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "teacher" / "model.safetensors")
    assert all(torch.equal(saved[k], teacher_before[k]) for k in saved)
    logged = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    uld = [x["kd_loss"] for x in logged if "kd_loss" in x]
    assert uld and uld[-1] < uld[0]  # the student's sorted distributions move towards the teacher's
    if name == "step-by-step":
        assert any("rat_kd_loss" in x for x in logged)


def test_what_cross_tokenizer_kd_refuses(tmp_path):
    with pytest.raises(ValueError, match="drop kd.cache"):
        KDConfig(teacher="t", cross_tokenizer="uld", cache=str(tmp_path / "c"))
    save_char_teacher(tmp_path / "teacher")
    records, _ = _records(MethodConfig(name="standard"))
    kd = {"teacher": str(tmp_path / "teacher"), "cross_tokenizer": "uld"}
    for student, method, match in ((t5_student(0), MethodConfig(name="standard", kd=kd), "causal students"),
                                   (llama_student(0), MethodConfig(name="standard", kd={**kd, "lmbda": 0.5}),
                                    "does not combine")):
        with pytest.raises(ConfigError, match=match):
            fit(student, method, TRAINING, records, [], FakeTask(), tmp_path / "x", progress=False)
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_real_pair_gemma3_teaches_a_smollm2_student(tmp_path):
    """The offline pair with different tokenizers: gemma-3-270m (262k tokens) teaches
    SmolLM2-135M-Instruct (49k) through ULD, on text where most target tokens find a partner."""
    from stepdistill.students import load_pretrained

    student = load_pretrained("smollm2-135m-instruct")
    teacher = load_pretrained("gemma3-270m", kind="causal")
    assert (len(teacher.tokenizer), len(student.tokenizer)) == (262144, 49152)
    method = MethodConfig(name="step-by-step", kd={"teacher": "gemma3-270m", "cross_tokenizer": "uld", "weight": 0.5})
    records, _ = _records(method, n=8)
    feats = get_method(method).features(student.tokenizer, Format(kind="causal"), records)
    rows = teacher_rows(student.tokenizer, teacher.tokenizer, feats)
    targets = sum(sum(x != -100 for x in f[p + "labels"]) for f in feats for p in ("", "rat_"))
    aligned = sum(len(f[p + "kdt_spos"]) for f in rows for p in ("", "rat_"))
    assert aligned >= 0.5 * targets, (aligned, targets)
    del teacher
    training = TrainingConfig(max_steps=2, learning_rate=1e-4, batch_size=4, logging_steps=1, bf16=False)
    fit(student, method, training, records, [], FakeTask(), tmp_path / "run", progress=False)
    logged = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    uld = [x["kd_loss"] for x in logged if "kd_loss" in x]
    assert uld and all(0 < v < 2 for v in uld)  # an L1 distance between two distributions lies in [0, 2]
