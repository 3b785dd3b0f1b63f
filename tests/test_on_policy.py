"""On-policy distillation (methods/on_policy.py): the loss on the student's own samples against a
hand computation, lmbda = 0 against off-policy KD, who gets gradients, the rationale task, seeding,
and the configurations it refuses. (Resume after kill -9: tests/test_crash.py.)"""

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from stepdistill.config import KDConfig, MethodConfig, TrainingConfig
from stepdistill.errors import ConfigError
from stepdistill.methods import get_method
from stepdistill.methods.batches import Collator
from stepdistill.methods.formatting import Format
from stepdistill.methods.on_policy import lmbda, on_policy_loss, sample_batch
from stepdistill.training import fit
from test_kd_training import STUDENTS, _changed, _records, save_teacher
from tiny_models import FakeTask

TRAINING = TrainingConfig(max_steps=8, learning_rate=1e-2, batch_size=8, logging_steps=2, bf16=False)


def _log(run):
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def _stub(kind, kd, seed=0):
    """What on_policy_loss reads of a trainer: the student, the teacher, kd and the step."""
    student, teacher = STUDENTS[kind](seed), STUDENTS[kind](7)
    method = get_method(MethodConfig(name="on-policy", kd=kd))
    notes = {}
    trainer = SimpleNamespace(student=student, teacher=teacher, kd=kd, method=method, kd_vocab=None,
                              state=SimpleNamespace(global_step=3), autocast=contextlib.nullcontext,
                              note=lambda k, v: notes.__setitem__(k, v))
    return trainer, notes


def _batch(trainer):
    method = trainer.method
    records, _ = _records(method.cfg, n=4)
    fmt = Format(kind="seq2seq" if trainer.student.is_seq2seq else "causal")
    feats = method.features(trainer.student.tokenizer, fmt, records)
    return Collator(trainer.student.tokenizer.pad_token_id)(feats)


def _jsd_by_hand(s_logits, t_logits, T, beta):
    """Generalised JSD per position, times T^2, from the definitions."""
    p_s, p_t = torch.softmax(s_logits / T, -1), torch.softmax(t_logits / T, -1)
    m = beta * p_t + (1 - beta) * p_s
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    return (beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)) * T * T


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_the_loss_is_the_divergence_on_the_students_own_samples_by_hand(kind):
    kd = KDConfig(teacher="unused", kind="jsd", beta=0.3, temperature=2.0, weight=0.8, lmbda=1.0)
    trainer, notes = _stub(kind, kd)
    batch = _batch(trainer)
    model = trainer.student.model
    sampled = sample_batch(trainer, model, batch, "", torch.Generator().manual_seed(5))
    again = sample_batch(trainer, model, batch, "", torch.Generator().manual_seed(5))
    assert all(torch.equal(sampled[k], again[k]) for k in sampled)  # seeded: the same samples
    labels = sampled["labels"]
    eos = trainer.student.tokenizer.eos_token_id
    for row in labels:  # each sample ends at its first eos, or runs to the longest target's length
        toks = row[row.ne(-100)].tolist()
        assert toks and (eos not in toks[:-1])
    if kind == "llama":  # the prompts are kept, and the labels sit where the sampled tokens are
        for i in range(labels.shape[0]):
            start = int(batch["labels"][i].ne(-100).nonzero()[0, 0])
            assert torch.equal(sampled["input_ids"][i, :start], batch["input_ids"][i, :start])
            assert labels[i, :start].eq(-100).all()
            n = int(labels[i].ne(-100).sum())
            assert torch.equal(sampled["input_ids"][i, start:start + n], labels[i, start:start + n])
    else:
        assert torch.equal(sampled["input_ids"], batch["input_ids"])

    torch.manual_seed(0)
    loss = on_policy_loss(trainer, model, batch, "", None, torch.Generator().manual_seed(5))
    kw = {k: sampled[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in sampled}
    with torch.no_grad():
        s_logits = model(**kw).logits
        t_logits = trainer.teacher.model(**kw).logits
    if kind == "llama":  # logits at t predict token t + 1
        s_logits, t_logits, labels = s_logits[:, :-1], t_logits[:, :-1], labels[:, 1:]
    at = labels.ne(-100)
    expected = 0.8 * _jsd_by_hand(s_logits[at].float(), t_logits[at].float(), 2.0, 0.3).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert notes["onpolicy_share"].item() == 1.0 and notes["onpolicy_gen_s"].item() >= 0
    loss.backward()  # gradients reach the student only
    assert any(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in trainer.teacher.model.parameters())


def test_lmbda_zero_is_exactly_off_policy_kd(tmp_path):
    save_teacher("llama", tmp_path / "teacher")
    runs = {}
    for tag, name, share in (("off", "standard", None), ("on0", "on-policy", 0.0)):
        kd = KDConfig(teacher=str(tmp_path / "teacher"), kind="jsd", weight=0.5, lmbda=share)
        method = MethodConfig(name=name, kd=kd)
        records, exs = _records(method)
        student = STUDENTS["llama"](0)
        m = fit(student, method, TRAINING, records, [], FakeTask(), tmp_path / tag, progress=False)
        runs[tag] = ([loss for _, loss in m["train_loss"]], student.model.state_dict())
    assert runs["off"][0] == runs["on0"][0]
    assert all(torch.equal(runs["off"][1][k], runs["on0"][1][k]) for k in runs["off"][1])


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_on_policy_training_moves_the_student_only_and_logs_its_sampling(kind, tmp_path):
    teacher_before = save_teacher(kind, tmp_path / "teacher")
    kd = KDConfig(teacher=str(tmp_path / "teacher"), kind="jsd", weight=1.0, lmbda=1.0)
    method = MethodConfig(name="on-policy", kd=kd)
    records, exs = _records(method)
    student = STUDENTS[kind](0)
    before = {k: v.detach().clone() for k, v in student.model.state_dict().items()}
    fit(student, method, TRAINING, records, exs[:4], FakeTask(), tmp_path / "run", progress=False)
    assert _changed(before, student.model)
    from safetensors.torch import load_file

    saved_teacher = load_file(tmp_path / "teacher" / "model.safetensors")
    assert all(torch.equal(saved_teacher[k], teacher_before[k]) for k in saved_teacher)
    logged = [x for x in _log(tmp_path / "run") if "kd_loss" in x]
    assert logged and all(x["onpolicy_share"] == 1.0 and x["onpolicy_gen_s"] > 0 for x in logged)


def test_step_by_step_samples_the_rationale_too_and_a_seeded_run_repeats(tmp_path):
    save_teacher("llama", tmp_path / "teacher")
    kd = KDConfig(teacher=str(tmp_path / "teacher"), kind="jsd", weight=0.5, lmbda=0.5)
    method = MethodConfig(name="step-by-step", kd=kd)
    records, exs = _records(method)
    losses = []
    for run in ("a", "b"):
        m = fit(STUDENTS["llama"](0), method, TRAINING, records, [], FakeTask(), tmp_path / run, progress=False)
        losses.append([loss for _, loss in m["train_loss"]])
    assert losses[0] == losses[1]  # the coin and the samples are seeded
    logged = _log(tmp_path / "a")
    shares = [x["onpolicy_share"] for x in logged if "onpolicy_share" in x]
    assert shares and any(0 < s for s in shares)  # some micro-batches were sampled...
    assert any("rat_kd_loss" in x for x in logged)
    other = fit(STUDENTS["llama"](0), method, TRAINING.model_copy(update={"seed": 1}), records, [], FakeTask(),
                tmp_path / "c", progress=False)
    assert [loss for _, loss in other["train_loss"]] != losses[0]  # ...and another seed samples others


def test_lmbda_defaults_and_refusals(tmp_path):
    kd = {"teacher": "t"}
    assert lmbda(get_method(MethodConfig(name="on-policy", kd=kd))) == 0.5
    assert lmbda(get_method(MethodConfig(name="standard", kd=kd))) == 0.0
    assert lmbda(get_method(MethodConfig(name="step-by-step", kd={**kd, "lmbda": 0.25}))) == 0.25
    with pytest.raises(ConfigError, match="set method.kd.teacher"):
        get_method(MethodConfig(name="on-policy"))
    with pytest.raises(ValueError, match="kd.cache holds the teacher's distributions on the data's targets only"):
        KDConfig(teacher="t", cache=str(tmp_path / "c"), lmbda=0.5)
    save_teacher("llama", tmp_path / "teacher")
    records, exs = _records(MethodConfig(name="standard"))
    for m, match in ((MethodConfig(name="co-distill", kd={"teacher": str(tmp_path / "teacher"), "lmbda": 0.5}),
                      "does not sample on-policy"),
                     (MethodConfig(name="on-policy", kd={"teacher": str(tmp_path / "teacher"), "cache": str(tmp_path / "c")}),
                      "kd.cache holds")):
        with pytest.raises(ConfigError, match=match):
            fit(STUDENTS["llama"](0), m, TRAINING, records, [], FakeTask(), tmp_path / "x", progress=False)
        assert not (tmp_path / "c").exists()
