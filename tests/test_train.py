"""Training loop: smoke tests per student kind, exact gradient accumulation, resume, LoRA,
early stopping. Tiny models built in the test; each test runs in seconds on 2 CPU cores."""

import json

import pytest
import torch
from transformers import Trainer

from stepdistill.config import LoraConfig, MethodConfig, TrainingConfig
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import load_trained, predict
from stepdistill.methods import get_method
from stepdistill.methods.base import TrainRecord
from stepdistill.students import apply_lora
from stepdistill.training import build_trainer, fit
from tiny_models import FakeTask, annotations, examples, llama_student, t5_student

STUDENTS = {"t5": t5_student, "llama": llama_student}
SBS = MethodConfig(name="step-by-step", alpha=0.5)


def _records(method: MethodConfig, n: int = 16):
    exs = examples(n)
    ann = None if method.name == "standard" else annotations(exs, bad={"ex3"})
    return get_method(method).records(exs, ann).records, exs


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_step_by_step_smoke(kind, tmp_path):
    student = STUDENTS[kind]()
    records, exs = _records(SBS)
    before = _snapshot(student.model)
    training = TrainingConfig(max_steps=30, learning_rate=1e-2, batch_size=8, eval_steps=15, logging_steps=5)
    m = fit(student, SBS, training, records, exs[:8], FakeTask(), tmp_path / "run", progress=False)

    losses = [loss for _, loss in m["train_loss"]]
    assert losses[-1] < 0.5 * losses[0], losses
    after = student.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    assert m["steps"] == 30 and m["trainable_params"] == m["total_params"] > 0
    assert m["rationale_records"] == 15 and m["train_records"] == 16  # ex3 unparsed: label task only
    assert m["best_val_accuracy"] is not None and len(m["val_accuracy"]) == 2

    model_dir = tmp_path / "run" / "model"
    info = json.loads((model_dir / "stepdistill.json").read_text())
    assert info["method"] == "step-by-step" and info["label_prefix"] == "predict: "
    assert info["format"]["kind"] == ("seq2seq" if kind == "t5" else "causal")
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in x for x in logged)
    assert all("label_loss" in x and "rationale_loss" in x for x in logged if "loss" in x)  # per-task losses

    loaded, info2 = load_trained(tmp_path / "run")  # the run dir works, as does the model dir
    inputs = [e.input for e in exs[:6]]
    preds = predict(loaded, inputs, prefix=info2["label_prefix"], batch_size=4)
    assert preds == predict(student, inputs, prefix="predict: ", batch_size=3)  # same formatting, same model
    assert FakeTask().accuracy(preds, exs[:6]) >= 0.5
    rationales = predict(loaded, inputs[:2], prefix=info2["rationale_prefix"], max_new_tokens=8)
    assert len(rationales) == 2 and all(isinstance(r, str) for r in rationales)


@pytest.mark.parametrize("name", ["standard", "distill"])
def test_single_task_methods_train_label_task_only(name, tmp_path):
    method = MethodConfig(name=name)
    records, exs = _records(method)
    assert all(r.rationale is None for r in records)
    student = t5_student()
    trainer = build_trainer(student, method, TrainingConfig(batch_size=4), records, [], None, tmp_path, progress=False)
    batch = trainer.data_collator(trainer.train_dataset[:4])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    m = fit(t5_student(), method, TrainingConfig(max_steps=8, learning_rate=1e-2, batch_size=4, logging_steps=2),
            records, exs[:4], FakeTask(), tmp_path / "run", progress=False)
    assert m["steps"] == 8 and m["rationale_records"] == 0
    assert json.loads((tmp_path / "run" / "model" / "stepdistill.json").read_text())["method"] == name


def _one_step_update(make, records, batch_size, accum, tmp_path, *, hf_default=False):
    """Parameter change after one SGD(lr=1) step = -(clipped) gradient of the full batch of 4."""
    student = make(seed=0)
    training = TrainingConfig(batch_size=batch_size, grad_accum=accum, max_steps=1, learning_rate=1.0, bf16=False)
    trainer = build_trainer(student, SBS, training, records, [], None, tmp_path / f"{batch_size}x{accum}{hf_default}",
                            progress=False)
    trainer.args.max_grad_norm = 0.0  # no clipping: compare raw gradients
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=1.0)
    if hf_default:  # what plain Trainer does: per-micro-batch mean, divided by the accumulation steps
        trainer.get_batch_samples = lambda it, n, dev: Trainer.get_batch_samples(trainer, it, n, dev)
        trainer.loss_is_scaled_for_ga = False
    before = _snapshot(trainer.model)
    trainer.train()
    after = trainer.model.state_dict()
    return {k: after[k] - before[k] for k in before}


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_gradient_accumulation_is_exact(kind, tmp_path):
    """batch 4 x accum 1 == batch 2 x accum 2 for step-by-step, with rationales of unequal length
    (3 to 13 tokens) and one record without a rationale."""
    exs = examples(4)
    ann = annotations(exs)
    records = [TrainRecord(e.id, e.input, e.label, ann[e.id].rationale if i != 3 else None)
               for i, e in enumerate(exs)]
    assert len({len(r.rationale.split()) for r in records if r.rationale}) == 3
    full = _one_step_update(STUDENTS[kind], records, 4, 1, tmp_path)
    accum = _one_step_update(STUDENTS[kind], records, 2, 2, tmp_path)
    assert any(d.abs().max() > 1e-4 for d in full.values())
    for k in full:
        torch.testing.assert_close(accum[k], full[k], atol=1e-6, rtol=1e-4, msg=k)
    # The test can fail: plain Trainer averaging gives a different update.
    naive = _one_step_update(STUDENTS[kind], records, 2, 2, tmp_path, hf_default=True)
    assert any(not torch.allclose(naive[k], full[k], atol=1e-6, rtol=1e-4) for k in full)


def test_resume_continues_from_last_checkpoint(tmp_path):
    records, exs = _records(SBS, 8)
    run = tmp_path / "run"
    cfg = TrainingConfig(max_steps=6, learning_rate=1e-2, batch_size=4, eval_steps=3, logging_steps=1)
    fit(t5_student(), SBS, cfg, records, exs[:4], FakeTask(), run, progress=False)
    assert (run / "checkpoints" / "checkpoint-6").is_dir()

    longer = cfg.model_copy(update={"max_steps": 9})
    with pytest.raises(StepDistillError, match="resume=True"):
        fit(t5_student(), SBS, longer, records, exs[:4], FakeTask(), run, progress=False)
    m = fit(t5_student(seed=1), SBS, longer, records, exs[:4], FakeTask(), run, resume=True, progress=False)
    assert m["steps"] == 9
    assert [s for s, _ in m["train_loss"]] == list(range(1, 10))  # history carried over from the checkpoint
    logged = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x] == list(range(1, 10))  # steps 1-6 not run again


def test_lora_trains_only_adapters(tmp_path):
    student = apply_lora(t5_student(), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q", "v"]))
    base = _snapshot(student.model.get_base_model())
    records, exs = _records(SBS, 8)
    m = fit(student, SBS, TrainingConfig(max_steps=10, learning_rate=1e-2, batch_size=4), records, exs[:4],
            FakeTask(), tmp_path / "run", progress=False)
    assert 0 < m["trainable_params"] < m["total_params"] / 4
    merged = student.model.state_dict()  # adapters merged into q/v; everything else untouched
    assert set(merged) == {k.replace("base_layer.", "") for k in base if "lora_" not in k}
    for k in merged:
        changed = not torch.equal(merged[k], base.get(k, base.get(k.replace(".weight", ".base_layer.weight"))))
        assert changed == (k.endswith((".q.weight", ".v.weight"))), k
    loaded, _ = load_trained(tmp_path / "run" / "model")  # a plain model folder: no peft needed
    assert not hasattr(loaded.model, "peft_config")


class _NeverRight(FakeTask):
    def is_correct(self, prediction, example):
        return False


def test_early_stopping_on_validation_accuracy(tmp_path):
    records, exs = _records(SBS, 8)
    cfg = TrainingConfig(max_steps=40, batch_size=4, eval_steps=2, patience=2, learning_rate=1e-3)
    m = fit(t5_student(), SBS, cfg, records, exs[:4], _NeverRight(), tmp_path / "run", progress=False)
    assert m["steps"] == 6  # evaluations at 2, 4, 6: no improvement after the first, patience 2
    assert m["best_step"] == 2 and m["best_val_accuracy"] == 0.0


def test_empty_records_or_unlabelled_validation_are_clear_errors(tmp_path):
    with pytest.raises(StepDistillError, match="no training records"):
        fit(t5_student(), SBS, TrainingConfig(), [], [], FakeTask(), tmp_path / "run", progress=False)
    records, exs = _records(SBS, 4)
    unlabelled = [type(e)(e.id, e.input, None) for e in exs]
    with pytest.raises(StepDistillError, match="no gold labels"):
        fit(t5_student(), SBS, TrainingConfig(), records, unlabelled, FakeTask(), tmp_path / "run", progress=False)


def test_bf16_autocast_trains_and_saves_fp32(tmp_path):
    records, exs = _records(SBS, 8)
    cfg = TrainingConfig(max_steps=4, batch_size=4, bf16=True, learning_rate=1e-2)
    trainer = build_trainer(llama_student(), SBS, cfg, records, [], None, tmp_path / "t", progress=False)
    assert trainer.accelerator.mixed_precision == "bf16"
    m = fit(llama_student(), SBS, cfg, records, exs[:4], FakeTask(), tmp_path / "run", progress=False)
    assert m["steps"] == 4
    loaded, _ = load_trained(tmp_path / "run")
    assert next(loaded.model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


@pytest.mark.parametrize("bf16", [False, True])
def test_validation_scores_the_model_the_test_evaluation_loads(bf16, tmp_path, monkeypatch):
    """training.val_as_test: validation generates with what the saved model will be
    (LoRA merged, bf16 where training ran in bf16), so its predictions are the test evaluation's
    on the saved model, and it leaves training's own weights and curve untouched."""
    from stepdistill.training import trainer as trainer_module

    calls = []

    def recording_predict(student, inputs, **kw):
        out = predict(student, inputs, **kw)
        calls.append((student.model, inputs, kw, out))
        return out

    monkeypatch.setattr(trainer_module, "predict", recording_predict)
    records, exs = _records(SBS, 8)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    runs = {}
    for as_test in (True, False):
        student = apply_lora(llama_student(), lora)
        cfg = TrainingConfig(max_steps=6, eval_steps=6, batch_size=4, bf16=bf16, learning_rate=1e-2,
                             val_as_test=as_test)
        runs[as_test] = fit(student, SBS, cfg, records, exs[:6], FakeTask(), tmp_path / str(as_test), progress=False)
        model, inputs, kw, out = calls[-1]
        if as_test:
            assert not hasattr(model, "peft_config") and kw["batch_size"] == 32
            assert next(model.parameters()).dtype == (torch.bfloat16 if bf16 else torch.float32)
            loaded, _ = load_trained(tmp_path / "True", dtype="bfloat16" if bf16 else "float32")
            assert predict(loaded, inputs, **kw) == out  # validation saw what the test evaluation sees
        else:
            assert hasattr(model, "peft_config") and kw["batch_size"] == 4  # the training weights themselves
    assert runs[True]["train_loss"] == runs[False]["train_loss"]  # the copy changes nothing in training


def test_lora_adapters_start_from_the_runs_seed_so_a_rerun_repeats_it(tmp_path):
    """LoRA's A matrices are drawn when the adapters are made. They came from whatever state torch's
    generator was in (on SmolLM2 two runs of one config and seed parted at step 2), and now come from
    training.seed: the same config trains the same adapters after any other use of the generator."""
    from stepdistill import api
    from tiny_models import llama_student

    data = tmp_path / "data.jsonl"
    from stepdistill.tasks import get_task

    problems = get_task("quickstart").load("train")[:12]
    data.write_text("".join(json.dumps({"input": e.input, "label": e.label}) + "\n" for e in problems))
    s = llama_student(0)
    s.model.save_pretrained(tmp_path / "student")
    s.tokenizer.save_pretrained(tmp_path / "student")

    def adapters(out, seed):
        api.train({"task": {"name": "svamp", "path": str(data)}, "method": {"name": "standard"},
                   "student": {"model": str(tmp_path / "student"),
                               "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
                   "training": {"max_steps": 2, "batch_size": 4, "val_fraction": 0.25, "bf16": False, "seed": seed,
                                "learning_rate": 1e-2}},
                  tmp_path / out, echo=lambda _: None)
        from safetensors.torch import load_file

        return load_file(tmp_path / out / "model" / "model.safetensors")  # LoRA merged in

    first = adapters("a", 0)
    torch.rand(100)  # the generator moved on, as other work in the process moves it
    again, other = adapters("b", 0), adapters("c", 1)
    assert first.keys() == again.keys() and first
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
