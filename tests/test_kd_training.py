"""Soft-label KD and co-distillation in the training loop, with tiny models built in the test:
who gets gradients, what is saved, the top-k cache, and the vocabulary check."""

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stepdistill.config import KDConfig, MethodConfig, TrainingConfig
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import load_trained
from stepdistill.methods import get_method
from stepdistill.students import Student
from stepdistill.training import fit
from tiny_models import FakeTask, annotations, examples, llama_student, t5_student

STUDENTS = {"t5": t5_student, "llama": llama_student}
TRAINING = TrainingConfig(max_steps=12, learning_rate=1e-2, batch_size=8, logging_steps=4, eval_steps=6)


def save_teacher(kind, path, seed=7):
    t = STUDENTS[kind](seed)
    t.model.save_pretrained(path)
    t.tokenizer.save_pretrained(path)
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def _records(method, n=16):
    exs = examples(n)
    ann = annotations(exs) if method.name == "step-by-step" else None
    return get_method(method).records(exs, ann).records, exs


def _changed(before, model):
    after = model.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("name", ["standard", "step-by-step"])
def test_kd_trains_the_student_and_leaves_the_teacher_untouched(kind, name, tmp_path, monkeypatch):
    teacher_dir = tmp_path / "teacher"
    teacher_before = save_teacher(kind, teacher_dir)
    # weight 1: pure distillation, so the divergence to the (random) teacher must fall
    kd = KDConfig(teacher=str(teacher_dir), kind="forward_kl", temperature=2.0, weight=1.0)
    method = MethodConfig(name=name, kd=kd)
    student = STUDENTS[kind](0)
    before = {k: v.detach().clone() for k, v in student.model.state_dict().items()}

    seen = {}
    import stepdistill.training.fitting as training

    real = training.load_kd_teacher

    def spy(*a, **k):
        seen["teacher"] = real(*a, **k)
        return seen["teacher"]

    monkeypatch.setattr(training, "load_kd_teacher", spy)
    records, exs = _records(method)
    m = fit(student, method, TRAINING, records, exs[:8], FakeTask(), tmp_path / "run", progress=False)
    assert _changed(before, student.model)
    teacher = seen["teacher"].model
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())  # frozen, no grad
    assert not _changed(teacher_before, teacher)
    logged = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    kd_logs = [x["kd_loss"] for x in logged if "kd_loss" in x]
    assert kd_logs and kd_logs[-1] < kd_logs[0]  # the student moves towards the teacher
    if name == "step-by-step":
        assert any("rat_kd_loss" in x for x in logged)  # the rationale task is distilled too
    info = json.loads((tmp_path / "run" / "model" / "stepdistill.json").read_text())
    assert info["kd"]["teacher"] == str(teacher_dir) and m["steps"] == 12


def test_kd_weight_zero_is_plain_cross_entropy(tmp_path):
    """weight 0 must give exactly the losses of training without kd (the teacher term vanishes)."""
    save_teacher("llama", tmp_path / "teacher")
    losses = {}
    for tag, kd in (("plain", None), ("kd0", KDConfig(teacher=str(tmp_path / "teacher"), weight=0.0))):
        method = MethodConfig(name="standard", kd=kd)
        records, exs = _records(method)
        training = TRAINING.model_copy(update={"bf16": False})  # the same math; bf16 would round the two paths apart
        m = fit(llama_student(0), method, training, records, [], FakeTask(), tmp_path / tag, progress=False)
        losses[tag] = [loss for _, loss in m["train_loss"]]
    assert losses["plain"] == pytest.approx(losses["kd0"], rel=1e-5)


def test_co_distillation_trains_and_saves_both_models(tmp_path):
    teacher_dir = tmp_path / "teacher"
    teacher_before = save_teacher("llama", teacher_dir)
    kd = KDConfig(teacher=str(teacher_dir), weight=0.5, warmup_steps=4)
    method = MethodConfig(name="co-distill", kd=kd)
    records, exs = _records(method)
    student = llama_student(0)
    m = fit(student, method, TRAINING, records, exs[:8], FakeTask(), tmp_path / "run", progress=False)
    saved_teacher, info = load_trained(tmp_path / "run" / "teacher_model")
    assert info["co_distill_role"] == "teacher"
    assert _changed(teacher_before, saved_teacher.model)  # the teacher learned too
    assert m["teacher_val_accuracy"] is not None and m["best_val_accuracy"] is not None
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-12" / "teacher" / "config.json").is_file()
    logged = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("teacher_loss" in x for x in logged)


def test_co_distillation_clears_the_teachers_gradients_every_step(tmp_path, monkeypatch):
    """Trainer zeroes only the student's gradients: the teacher's must not pile up across steps."""
    save_teacher("llama", tmp_path / "teacher")
    method = MethodConfig(name="co-distill", kd=KDConfig(teacher=str(tmp_path / "teacher")))
    records, exs = _records(method)
    import stepdistill.training as training

    norms = []
    real = training.StepDistillTrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        grads = [p.grad for p in self.teacher.model.parameters() if p.grad is not None]
        norms.append(sum(float(g.norm()) for g in grads))  # before this micro-step's backward
        return real(self, model, inputs, *a, **k)

    monkeypatch.setattr(training.StepDistillTrainer, "compute_loss", spy)
    fit(llama_student(0), method, TRAINING.model_copy(update={"max_steps": 4, "eval_steps": None}), records, [],
        FakeTask(), tmp_path / "run", progress=False)
    assert norms and all(n == 0 for n in norms)


def test_co_distillation_warmup_keeps_the_distillation_term_out(tmp_path):
    """During warm-up each model learns from the labels only: a warm-up longer than the run
    gives the student exactly the losses of plain training (same seed, same data)."""
    save_teacher("llama", tmp_path / "teacher")
    method = MethodConfig(name="co-distill", kd=KDConfig(teacher=str(tmp_path / "teacher"), warmup_steps=1000))
    records, exs = _records(method)
    training = TRAINING.model_copy(update={"bf16": False})  # the same math; bf16 would round the two paths apart
    m = fit(llama_student(0), method, training, records, [], FakeTask(), tmp_path / "co", progress=False)
    plain = fit(llama_student(0), MethodConfig(name="standard"), training, records, [], FakeTask(), tmp_path / "p",
                progress=False)
    logged = [json.loads(x) for x in (tmp_path / "co" / "train_log.jsonl").read_text().splitlines()]
    student_ce = [x["student_loss"] for x in logged if "loss" in x]
    assert all(x["loss"] == pytest.approx(x["student_loss"] + x["teacher_loss"], rel=1e-3) for x in logged if "loss" in x)
    assert student_ce == pytest.approx([loss for _, loss in plain["train_loss"]], rel=1e-4)
    assert m["steps"] == 12


def test_topk_cache_is_written_once_then_read_without_the_teacher(tmp_path, monkeypatch):
    save_teacher("llama", tmp_path / "teacher")
    kd = KDConfig(teacher=str(tmp_path / "teacher"), cache=str(tmp_path / "cache"), top_k=4)
    method = MethodConfig(name="step-by-step", kd=kd)
    records, exs = _records(method)
    fit(llama_student(0), method, TRAINING, records, [], FakeTask(), tmp_path / "a", progress=False)
    assert (tmp_path / "cache" / "topk.safetensors").is_file()
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["top_k"] == 4 and meta["features"] == 16

    import stepdistill.methods.kd as kdmod

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded although the cache holds its distributions")

    monkeypatch.setattr(kdmod, "load_kd_teacher", no_teacher)
    m = fit(llama_student(0), method, TRAINING, records, [], FakeTask(), tmp_path / "b", progress=False)
    logged = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert m["steps"] == 12 and any("kd_loss" in x for x in logged)

    other = MethodConfig(name="step-by-step", kd=kd.model_copy(update={"temperature": 5.0}))
    with pytest.raises(StepDistillError, match="written for another teacher, temperature"):
        fit(llama_student(0), other, TRAINING, records, [], FakeTask(), tmp_path / "c", progress=False)
    save_teacher("llama", tmp_path / "teacher", seed=8)  # retrained in place: same path, new weights
    with pytest.raises(StepDistillError, match="written for another teacher"):
        fit(llama_student(0), method, TRAINING, records, [], FakeTask(), tmp_path / "d", progress=False)


def test_a_damaged_or_unwritable_topk_cache_is_one_clear_error(tmp_path, monkeypatch):
    """A cache whose file was cut short, overwritten, or whose meta.json is garbage is refused with
    the fix; a write that fails (a full disk) leaves no cache and no temp folder behind."""
    import errno

    import stepdistill.methods.kd as kdmod
    from stepdistill.training import make_format

    save_teacher("llama", tmp_path / "teacher")
    kd = KDConfig(teacher=str(tmp_path / "teacher"), cache=str(tmp_path / "cache"), top_k=4)
    method = MethodConfig(name="standard", kd=kd)
    records, _ = _records(method)
    student = llama_student(0)
    feats = get_method(method).features(student.tokenizer, make_format(student, TRAINING), records)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("safetensors.torch.save_file", full_disk)
        with pytest.raises(StepDistillError, match="cannot write .*cache: No space left on device: free disk space"):
            kdmod.attach_topk_cache(kd, student, feats)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.tmp").exists()

    good = kdmod.attach_topk_cache(kd, student, feats)
    tensors = tmp_path / "cache" / "topk.safetensors"
    whole = tensors.read_bytes()
    for damage, message in ((lambda: tensors.write_bytes(whole[: len(whole) // 2]), "is incomplete"),
                            (lambda: tensors.write_bytes(b"\0" * len(whole)), "is damaged"),
                            (lambda: (tmp_path / "cache" / "meta.json").write_text("{not json"), "cannot be read")):
        damage()
        with pytest.raises(StepDistillError, match=f"top-k cache .*{message}.*delete it"):
            kdmod.attach_topk_cache(kd, student, feats)
        shutil.rmtree(tmp_path / "cache")
        again = kdmod.attach_topk_cache(kd, student, feats)  # rewritten, the same distributions
        assert all(torch.equal(a["kd_vals"], b["kd_vals"]) for a, b in zip(again, good))


def test_a_teacher_with_another_vocabulary_is_a_clear_error(tmp_path):
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<s>", "alpha", "beta"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, pad_token_id=0, eos_token_id=1)
    other = Student(LlamaForCausalLM(cfg), other_tok, is_seq2seq=False)
    other.model.save_pretrained(tmp_path / "teacher")
    other.tokenizer.save_pretrained(tmp_path / "teacher")
    method = MethodConfig(name="standard", kd=KDConfig(teacher=str(tmp_path / "teacher")))
    records, exs = _records(method)
    with pytest.raises(StepDistillError, match="different vocabularies.*cannot be compared.*distil its generated text"):
        fit(llama_student(0), method, TRAINING, records, [], FakeTask(), tmp_path / "run", progress=False)


def test_config_rules_for_kd():
    from stepdistill.config import TrainRun, build
    from stepdistill.errors import ConfigError

    base = {"task": {"name": "quickstart"}, "student": {"model": "m"}}
    with pytest.raises(ConfigError, match="co-distill trains a teacher beside the student: set method.kd.teacher"):
        get_method(build(TrainRun, {**base, "method": {"name": "co-distill"}}).method)  # the method checks its own needs
    with pytest.raises(ConfigError, match="supports kind forward_kl, not jsd"):
        build(TrainRun, {**base, "method": {"kd": {"teacher": "t", "kind": "jsd", "cache": "c"}}})


def test_the_teacher_is_placed_for_the_students_distributed_setup(monkeypatch):
    """One process / DDP / ZeRO-1-2: the frozen teacher moves to the device, unwrapped. FSDP2:
    sharded by accelerate's own preparation, like the student. FSDP1, ZeRO-3 and co-distillation
    under a sharding engine: one clear error with the way out, never a silently unsharded teacher."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import accelerate.utils.fsdp_utils as fsdp_utils
    from stepdistill.training.placement import place_teacher

    def accelerator(kind, fsdp2=False, stage=None):
        plugin = SimpleNamespace(zero_stage=stage) if stage else None
        return SimpleNamespace(distributed_type=kind, device=torch.device("cpu"), is_fsdp2=fsdp2,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    teacher = llama_student(1).model
    for kind, stage in ((DistributedType.NO, None), (DistributedType.MULTI_CPU, None),
                        (DistributedType.MULTI_GPU, None), (DistributedType.DEEPSPEED, 2)):
        assert place_teacher(accelerator(kind, stage=stage), teacher) is teacher  # moved, not wrapped

    sharded = []
    monkeypatch.setattr(fsdp_utils, "fsdp2_prepare_model", lambda acc, m: sharded.append((acc, m)) or m.train())
    acc = accelerator(DistributedType.FSDP, fsdp2=True)
    out = place_teacher(acc, teacher)
    assert sharded == [(acc, teacher)] and out is teacher and not out.training  # sharded, and in eval mode

    for acc, message in ((accelerator(DistributedType.FSDP), "FSDP2 only, not FSDP \\(fsdp_version 1\\)"),
                         (accelerator(DistributedType.DEEPSPEED, stage=3), "not DEEPSPEED ZeRO-3"),
                         (accelerator(DistributedType.FSDP, fsdp2=True), None)):
        if message:
            with pytest.raises(StepDistillError, match=message + ".*kd.cache"):
                place_teacher(acc, teacher)
        with pytest.raises(StepDistillError, match="co-distillation trains the teacher inside .* run it under DDP"):
            place_teacher(acc, teacher, trainable=True)
