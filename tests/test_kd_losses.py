"""Soft-label KD losses against references written with plain Python loops (no torch formulas)."""

import math

import pytest
import torch

from stepdistill.methods.losses import (
    KD_KINDS,
    count_targets,
    kd_loss,
    kd_loss_topk,
    soften,
    topk_logprobs,
)

# batch 2, seq 3, vocab 4; four of the six positions are targets (label values matter only as a mask)
STUDENT = [
    [[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.3, -0.5], [0.2, 0.2, 0.2, 0.2]],
    [[3.0, 1.0, 0.0, -2.0], [-1.0, 0.0, 1.0, 0.7], [2.0, -1.0, 0.4, 0.1]],
]
TEACHER = [
    [[2.0, -1.0, 0.0, 1.5], [0.5, 1.0, 1.2, -1.0], [1.0, 0.0, -0.3, 0.6]],
    [[0.0, 2.5, -0.5, 1.0], [1.3, -0.2, 0.8, 0.0], [0.1, 1.7, -1.2, 0.9]],
]
LABELS = [[0, 1, -100], [-100, 2, 3]]


def _probs(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl_ref(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _divergence_ref(kind, student_row, teacher_row, temperature, beta):
    ps, pt = _probs(student_row, temperature), _probs(teacher_row, temperature)
    if kind == "forward_kl":
        return _kl_ref(pt, ps) * temperature**2
    if kind == "reverse_kl":
        return _kl_ref(ps, pt) * temperature**2
    if kind == "jsd":
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        return (beta * _kl_ref(pt, m) + (1 - beta) * _kl_ref(ps, m)) * temperature**2
    assert kind == "tv"
    return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))


def _targets(labels, shift):
    """(b, t) of the logit positions scored, with the causal shift done by hand."""
    out = []
    for b, row in enumerate(labels):
        for t in range(len(row) - 1 if shift else len(row)):
            if row[t + 1 if shift else t] != -100:
                out.append((b, t))
    return out


def _kd_ref(kind, student, teacher, labels, *, temperature=1.0, beta=0.5, shift=False, n=None):
    positions = _targets(labels, shift)
    total = sum(_divergence_ref(kind, student[b][t], teacher[b][t], temperature, beta) for b, t in positions)
    return total / max(len(positions) if n is None else n, 1)


def _tensors():
    return torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_each_kind_matches_hand_reference(kind, temperature):
    student, teacher, labels = _tensors()
    got = kd_loss(student, teacher, labels, kind=kind, temperature=temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_kd_ref(kind, STUDENT, TEACHER, LABELS, temperature=temperature), rel=1e-5)


def test_pinned_values():
    """The reference's numbers, written out, so a wrong reference cannot hide a wrong loss."""
    assert _kd_ref("forward_kl", STUDENT, TEACHER, LABELS) == pytest.approx(0.6951398, rel=1e-6)
    assert _kd_ref("forward_kl", STUDENT, TEACHER, LABELS, temperature=2.0) == pytest.approx(0.7587471, rel=1e-6)
    assert _kd_ref("tv", STUDENT, TEACHER, LABELS) == pytest.approx(0.4147117, rel=1e-6)


def test_temperature_squared_factor():
    """At T=2, the KL kinds are the KL between the softened distributions times 4; tv is not rescaled."""
    student, teacher, labels = _tensors()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        got = kd_loss(student, teacher, labels, kind=kind, temperature=2.0).item()
        unscaled = kd_loss(student / 2, teacher / 2, labels, kind=kind).item()
        assert got == pytest.approx(4 * unscaled, rel=1e-5)
    tv = kd_loss(student, teacher, labels, kind="tv", temperature=2.0).item()
    assert tv == pytest.approx(kd_loss(student / 2, teacher / 2, labels, kind="tv").item(), rel=1e-5)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_fully_masked_batch_gives_exact_zero(kind):
    student, teacher, _ = _tensors()
    student.requires_grad_(True)
    got = kd_loss(student, teacher, torch.full((2, 3), -100), kind=kind)
    assert got.item() == 0.0 and not torch.isnan(got)
    got.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_masked_positions_are_ignored():
    """Changing logits at -100 positions changes nothing, even to inf/NaN garbage."""
    student, teacher, labels = _tensors()
    before = kd_loss(student, teacher, labels).item()
    student[0, 2] = float("nan")
    teacher[1, 0] = float("inf")
    assert kd_loss(student, teacher, labels).item() == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_num_items_in_batch_divides_the_sum(kind):
    student, teacher, labels = _tensors()
    assert kd_loss(student, teacher, labels, 10, kind=kind).item() == pytest.approx(
        _kd_ref(kind, STUDENT, TEACHER, LABELS, n=10), rel=1e-5
    )
    assert kd_loss(student, teacher, labels, torch.tensor(7), kind=kind).item() == pytest.approx(
        _kd_ref(kind, STUDENT, TEACHER, LABELS, n=7), rel=1e-5
    )


@pytest.mark.parametrize("kind", KD_KINDS)
def test_shift_for_causal_lms(kind):
    student, teacher, labels = _tensors()
    # shift: logit position t scores label t+1; the targets (0,1), (1,1), (1,2) move to logits (0,0), (1,0), (1,1)
    assert _targets(LABELS, shift=True) == [(0, 0), (1, 0), (1, 1)]
    got = kd_loss(student, teacher, labels, kind=kind, temperature=2.0, shift=True)
    expected = _kd_ref(kind, STUDENT, TEACHER, LABELS, temperature=2.0, shift=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_identical_teacher_and_student_give_zero(kind):
    student, _, labels = _tensors()
    assert kd_loss(student, student.clone(), labels, kind=kind, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_forward_and_reverse_kl_differ():
    student, teacher, labels = _tensors()
    forward = kd_loss(student, teacher, labels, kind="forward_kl").item()
    reverse = kd_loss(student, teacher, labels, kind="reverse_kl").item()
    assert forward != pytest.approx(reverse, rel=1e-2)
    # and swapping the models swaps them
    assert kd_loss(teacher, student, labels, kind="reverse_kl").item() == pytest.approx(forward, rel=1e-5)


def test_jsd_symmetric_at_half_and_bounded():
    student, teacher, labels = _tensors()
    jsd = kd_loss(student, teacher, labels, kind="jsd", beta=0.5).item()
    assert kd_loss(teacher, student, labels, kind="jsd", beta=0.5).item() == pytest.approx(jsd, rel=1e-5)
    assert kd_loss(teacher, student, labels, kind="jsd", beta=0.3).item() != pytest.approx(
        kd_loss(student, teacher, labels, kind="jsd", beta=0.3).item(), rel=1e-3
    )
    # disjoint distributions reach the bound ln 2 (times T**2)
    far_s, far_t = torch.tensor([[[50.0, 0.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 50.0, 0.0, 0.0]]])
    assert kd_loss(far_s, far_t, torch.tensor([[0]]), kind="jsd").item() == pytest.approx(math.log(2), rel=1e-4)


def test_jsd_limits_in_beta():
    """jsd -> 0 at both ends; jsd / beta -> forward KL (beta -> 0), jsd / (1 - beta) -> reverse KL (beta -> 1)."""
    student, teacher, labels = _tensors()
    forward = kd_loss(student, teacher, labels, kind="forward_kl").item()
    reverse = kd_loss(student, teacher, labels, kind="reverse_kl").item()
    eps = 1e-3
    assert kd_loss(student, teacher, labels, kind="jsd", beta=eps).item() / eps == pytest.approx(forward, rel=1e-2)
    assert kd_loss(student, teacher, labels, kind="jsd", beta=1 - eps).item() / eps == pytest.approx(reverse, rel=1e-2)
    for beta in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
            kd_loss(student, teacher, labels, kind="jsd", beta=beta)


def test_tv_bounded_per_token():
    student, teacher, _ = _tensors()
    student, teacher = student * 5, teacher * 5  # sharper, so some tokens come close to 1
    for b in range(2):
        for t in range(3):
            one = torch.full((2, 3), -100)
            one[b, t] = 0
            tv = kd_loss(student, teacher, one, kind="tv").item()
            assert 0.0 <= tv <= 1.0
            expected = _divergence_ref("tv", [5 * v for v in STUDENT[b][t]], [5 * v for v in TEACHER[b][t]], 1.0, 0.5)
            assert tv == pytest.approx(expected, rel=1e-4)
    far_s, far_t = torch.tensor([[[50.0, 0.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 50.0, 0.0, 0.0]]])
    assert kd_loss(far_s, far_t, torch.tensor([[0]]), kind="tv").item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_gradients_reach_the_student_only(kind):
    student, teacher, labels = _tensors()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher, labels, kind=kind, temperature=2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert torch.all(student.grad[0, 2] == 0) and torch.all(student.grad[1, 0] == 0)  # masked positions


def test_teacher_minus_inf_logits_are_not_nan():
    """A teacher that never emits some token (logit -inf) gives finite KL and gradients."""
    student, teacher, labels = _tensors()
    teacher[..., 3] = float("-inf")
    student.requires_grad_(True)
    for kind in ("forward_kl", "jsd", "tv"):
        loss = kd_loss(student, teacher, labels, kind=kind)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
        student.grad = None
    expected = _kd_ref("forward_kl", STUDENT, [[row[:3] + [-1e9] for row in seq] for seq in TEACHER], LABELS)
    assert kd_loss(student, teacher, labels).item() == pytest.approx(expected, rel=1e-5)


# -- top-k cache ------------------------------------------------------------------------------


def _topk_cache_ref(teacher, k, temperature):
    """What a cache stores, by hand: per position, the k largest log-probabilities and their ids."""
    values, ids = [], []
    for seq in teacher:
        values.append([]), ids.append([])
        for row in seq:
            p = _probs(row, temperature)
            top = sorted(range(len(p)), key=lambda i: -p[i])[:k]
            values[-1].append([math.log(p[i]) for i in top])
            ids[-1].append(top)
    return values, ids


def _kd_topk_ref(student, values, ids, labels, *, temperature=1.0, shift=False, n=None):
    positions = _targets(labels, shift)
    total = 0.0
    for b, t in positions:
        mass = sum(math.exp(v) for v in values[b][t])
        pt = [math.exp(v) / mass for v in values[b][t]]
        ps = _probs(student[b][t], temperature)
        total += sum(p * (math.log(p) - math.log(ps[i])) for p, i in zip(pt, ids[b][t])) * temperature**2
    return total / max(len(positions) if n is None else n, 1)


def test_topk_logprobs_matches_hand_cache():
    _, teacher, _ = _tensors()
    values, ids = topk_logprobs(teacher.bfloat16(), 2, temperature=2.0)
    assert values.dtype == torch.float32 and ids.shape == (2, 3, 2)
    ref_values, ref_ids = _topk_cache_ref(TEACHER, 2, 2.0)
    assert ids.tolist() == ref_ids
    flat_ref = torch.tensor(ref_values).flatten().tolist()
    assert values.flatten().tolist() == pytest.approx(flat_ref, abs=2e-2)  # bf16 input
    values, _ = topk_logprobs(teacher, 2, temperature=2.0)
    assert values.flatten().tolist() == pytest.approx(flat_ref, rel=1e-5)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_full_vocab_equals_forward_kl(temperature, shift):
    student, teacher, labels = _tensors()
    values, ids = topk_logprobs(teacher, 4, temperature)
    got = kd_loss_topk(student, values, ids, labels, temperature=temperature, shift=shift)
    full = kd_loss(student, teacher, labels, kind="forward_kl", temperature=temperature, shift=shift)
    assert got.item() == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_renormalised_matches_hand_reference(temperature, shift):
    student, _, labels = _tensors()
    ref_values, ref_ids = _topk_cache_ref(TEACHER, 2, temperature)
    got = kd_loss_topk(
        student, torch.tensor(ref_values), torch.tensor(ref_ids), labels, 5, temperature=temperature, shift=shift
    )
    expected = _kd_topk_ref(STUDENT, ref_values, ref_ids, LABELS, temperature=temperature, shift=shift, n=5)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() > 0


def test_topk_gradients_masking_and_bad_ids():
    student, teacher, labels = _tensors()
    values, ids = topk_logprobs(teacher, 2)
    student.requires_grad_(True)
    values.requires_grad_(True)
    kd_loss_topk(student, values, ids, labels).backward()
    assert values.grad is None and student.grad.abs().sum() > 0
    empty = kd_loss_topk(student, values, ids, torch.full((2, 3), -100))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="different tokenizer"):
        kd_loss_topk(student, values, ids + 3, labels)  # ids up to 6 against a 4-token student


# -- vocabularies, dtypes, accumulation -------------------------------------------------------


def test_vocab_mismatch_raises_a_clear_error():
    student, teacher, labels = _tensors()
    padded = torch.cat([teacher, torch.zeros(2, 3, 2)], dim=-1)
    with pytest.raises(ValueError, match=r"different vocabularies \(student logits have 4 entries, teacher 6\)") as err:
        kd_loss(student, padded, labels)
    assert "shared tokenizer" in str(err.value)
    assert "sequence-level distillation" in str(err.value) and "'step-by-step'" in str(err.value)


def test_vocab_size_truncates_padded_logits():
    student, teacher, labels = _tensors()
    padded_student = torch.cat([student, torch.full((2, 3, 3), 9.0)], dim=-1)  # junk beyond the tokenizer
    padded_teacher = torch.cat([teacher, torch.full((2, 3, 1), -5.0)], dim=-1)
    for kind in KD_KINDS:
        got = kd_loss(padded_student, padded_teacher, labels, kind=kind, vocab_size=4)
        assert got.item() == pytest.approx(kd_loss(student, teacher, labels, kind=kind).item(), rel=1e-6)
    values, ids = topk_logprobs(teacher, 3)
    assert kd_loss_topk(padded_student, values, ids, labels, vocab_size=4).item() == pytest.approx(
        kd_loss_topk(student, values, ids, labels).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="vocab_size=6"):
        kd_loss(padded_student, padded_teacher, labels, vocab_size=6)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_bf16_inputs_give_float32_close_to_float32(kind):
    student, teacher, labels = _tensors()
    got = kd_loss(student.bfloat16(), teacher.bfloat16(), labels, kind=kind, temperature=2.0)
    assert got.dtype == torch.float32
    rounded = kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), labels, kind=kind, temperature=2.0)
    assert got.item() == pytest.approx(rounded.item(), rel=1e-6)  # computed in float32 after the cast
    assert got.item() == pytest.approx(kd_loss(student, teacher, labels, kind=kind, temperature=2.0).item(), rel=2e-2)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_micro_batch_sums_equal_full_batch(kind):
    """Each micro-batch divided by the whole batch's target count: the parts add up exactly."""
    student, teacher, labels = _tensors()
    for shift in (False, True):
        n = count_targets(labels, shift=shift)
        parts = sum(
            kd_loss(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1], n, kind=kind, shift=shift)
            for i in range(2)
        )
        full = kd_loss(student, teacher, labels, kind=kind, shift=shift)
        assert parts.item() == pytest.approx(full.item(), rel=1e-6)
    values, ids = topk_logprobs(teacher, 2)
    n = count_targets(labels)
    parts = sum(
        kd_loss_topk(student[i : i + 1], values[i : i + 1], ids[i : i + 1], labels[i : i + 1], n) for i in range(2)
    )
    assert parts.item() == pytest.approx(kd_loss_topk(student, values, ids, labels).item(), rel=1e-6)


def test_bad_kind_and_temperature():
    student, teacher, labels = _tensors()
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, tv"):
        kd_loss(student, teacher, labels, kind="kl")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(student, teacher, labels, temperature=0.0)
    assert soften(torch.zeros(1, 4), 3.0).exp().sum().item() == pytest.approx(1.0)
