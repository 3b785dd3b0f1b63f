"""Golden losses: each method's first training losses on a tiny model with a fixed seed, pinned.

A refactor of training or methods must leave these numbers alone (to float32 rounding): they are
the loss values, per-task terms included, that the code produced before the redesign of issue 16.
To re-pin after an intended change of behaviour, run
    STEPDISTILL_PIN=1 python -m pytest tests/test_golden_losses.py -s
and paste the printed table, saying in the commit message why the numbers moved.
"""

import json
import os

import pytest

from stepdistill.config import KDConfig, MethodConfig, TrainingConfig
from stepdistill.methods import get_method
from stepdistill.training import fit
from tiny_models import FakeTask, annotations, examples, llama_student, t5_student

STUDENTS = {"t5": t5_student, "llama": llama_student}
TERMS = ("loss", "label_loss", "rationale_loss", "kd_loss", "rat_kd_loss", "student_loss", "teacher_loss")


def _teacher(tmp_path, kind):
    t = STUDENTS[kind](7)
    t.model.save_pretrained(tmp_path / "teacher")
    t.tokenizer.save_pretrained(tmp_path / "teacher")
    return str(tmp_path / "teacher")


CASES = {
    "standard-llama": ("llama", lambda tp: MethodConfig(name="standard")),
    "standard-t5": ("t5", lambda tp: MethodConfig(name="standard")),
    "distill-t5": ("t5", lambda tp: MethodConfig(name="distill")),
    "step-by-step-prefix-t5": ("t5", lambda tp: MethodConfig(name="step-by-step", alpha=0.5)),
    "step-by-step-prefix-llama": ("llama", lambda tp: MethodConfig(name="step-by-step", alpha=0.3)),
    "step-by-step-decoder-marker-t5": ("t5", lambda tp: MethodConfig(name="step-by-step", alpha=0.5,
                                                                       task_marker="decoder")),
    "soft-label-kd-llama": ("llama", lambda tp: MethodConfig(name="standard", kd=KDConfig(
        teacher=_teacher(tp, "llama"), kind="forward_kl", temperature=2.0, weight=0.5))),
    "soft-label-kd-step-by-step-t5": ("t5", lambda tp: MethodConfig(name="step-by-step", kd=KDConfig(
        teacher=_teacher(tp, "t5"), kind="jsd", beta=0.5, temperature=1.0, weight=0.5))),
    "co-distill-llama": ("llama", lambda tp: MethodConfig(name="co-distill", kd=KDConfig(
        teacher=_teacher(tp, "llama"), kind="forward_kl", temperature=1.0, weight=0.5, warmup_steps=2))),
}

# (step, {term: value}) for the first 4 optimizer steps, as the code printed them at 97c5c9d
GOLDEN: dict[str, list[dict[str, float]]] = {
    'co-distill-llama': [{'loss': 6.772619, 'kd_loss': 0.013676, 'student_loss': 3.341862, 'teacher_loss': 3.430757}, {'loss': 5.902737, 'kd_loss': 0.014175, 'student_loss': 3.019921, 'teacher_loss': 2.882816}, {'loss': 2.73611, 'kd_loss': 0.017863, 'student_loss': 1.322575, 'teacher_loss': 1.413535}, {'loss': 2.369576, 'kd_loss': 0.015759, 'student_loss': 1.166041, 'teacher_loss': 1.203534}],
    'distill-t5': [{'loss': 4.983761}, {'loss': 3.034448}, {'loss': 2.04262}, {'loss': 1.901387}],
    'soft-label-kd-llama': [{'loss': 1.677725, 'kd_loss': 0.013589}, {'loss': 1.531102, 'kd_loss': 0.016962}, {'loss': 1.345274, 'kd_loss': 0.033879}, {'loss': 1.187195, 'kd_loss': 0.050297}],
    'soft-label-kd-step-by-step-t5': [{'loss': 2.356066, 'label_loss': 2.571647, 'rationale_loss': 2.140485, 'kd_loss': 0.140101, 'rat_kd_loss': 0.159923}, {'loss': 1.673603, 'label_loss': 1.559445, 'rationale_loss': 1.78776, 'kd_loss': 0.187832, 'rat_kd_loss': 0.206855}, {'loss': 1.446197, 'label_loss': 1.36237, 'rationale_loss': 1.530024, 'kd_loss': 0.143839, 'rat_kd_loss': 0.166027}, {'loss': 1.322274, 'label_loss': 1.192454, 'rationale_loss': 1.452093, 'kd_loss': 0.147058, 'rat_kd_loss': 0.16619}],
    'standard-llama': [{'loss': 3.341862}, {'loss': 3.019921}, {'loss': 2.627286}, {'loss': 2.309187}],
    'standard-t5': [{'loss': 5.003193}, {'loss': 2.885375}, {'loss': 2.233059}, {'loss': 1.778992}],
    'step-by-step-decoder-marker-t5': [{'loss': 4.268248, 'label_loss': 4.393487, 'rationale_loss': 4.143008}, {'loss': 3.293157, 'label_loss': 2.999751, 'rationale_loss': 3.586562}, {'loss': 2.774243, 'label_loss': 2.564316, 'rationale_loss': 2.984171}, {'loss': 2.472814, 'label_loss': 2.201187, 'rationale_loss': 2.744441}],
    'step-by-step-prefix-llama': [{'loss': 3.387423, 'label_loss': 3.341862, 'rationale_loss': 3.406949}, {'loss': 3.098512, 'label_loss': 3.061377, 'rationale_loss': 3.114427}, {'loss': 2.816973, 'label_loss': 2.728311, 'rationale_loss': 2.85497}, {'loss': 2.67805, 'label_loss': 2.507991, 'rationale_loss': 2.750932}],
    'step-by-step-prefix-t5': [{'loss': 4.56212, 'label_loss': 5.003193, 'rationale_loss': 4.121048}, {'loss': 3.134916, 'label_loss': 2.914833, 'rationale_loss': 3.355}, {'loss': 2.676112, 'label_loss': 2.484269, 'rationale_loss': 2.867956}, {'loss': 2.391647, 'label_loss': 2.094792, 'rationale_loss': 2.688502}],
}


def _run(name, tmp_path):
    kind, make = CASES[name]
    method = make(tmp_path)
    exs = examples(16)
    ann = annotations(exs, bad={"ex3", "ex6"}) if get_method(method).needs_annotations else None  # two unparsed
    records = get_method(method).records(exs, ann).records
    training = TrainingConfig(max_steps=4, learning_rate=1e-2, batch_size=4, grad_accum=2, logging_steps=1,
                              bf16=False, seed=0)
    fit(STUDENTS[kind](0), method, training, records, [], FakeTask(), tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    return [{k: round(r[k], 6) for k in TERMS if k in r} for r in rows if "loss" in r]


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_losses_are_unchanged(name, tmp_path):
    got = _run(name, tmp_path)
    if os.environ.get("STEPDISTILL_PIN"):
        print(f"\n    {name!r}: {got},")
        return
    want = GOLDEN[name]
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=2e-5, abs=2e-6), (name, k, got)
