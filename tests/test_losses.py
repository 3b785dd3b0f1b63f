"""The pure loss functions against hand-computed values."""

import math

import pytest
import torch

from stepdistill.methods.losses import count_targets, multitask_loss, token_cross_entropy


def _ce(row, target):
    """-log softmax(row)[target], by hand."""
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


# batch 2, seq 3, vocab 2; three of the six positions are targets
LOGITS = [[[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]], [[3.0, 1.0], [0.0, 0.0], [2.0, -1.0]]]
LABELS = [[0, 1, -100], [-100, 0, -100]]


def test_token_cross_entropy_matches_hand_value():
    expected = (_ce([1.0, 0.0], 0) + _ce([0.0, 2.0], 1) + _ce([0.0, 0.0], 0)) / 3
    got = token_cross_entropy(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((0.313262 + 0.126928 + 0.693147) / 3, rel=1e-5)  # the numbers, written out


def test_num_items_in_batch_divides_the_sum():
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    total = 3 * token_cross_entropy(logits, labels).item()
    assert token_cross_entropy(logits, labels, num_items_in_batch=10).item() == pytest.approx(total / 10)
    assert token_cross_entropy(logits, labels, torch.tensor(6)).item() == pytest.approx(total / 6)


def test_micro_batch_sums_equal_full_batch_mean():
    """Why num_items_in_batch exists: per-micro-batch sums / the global count add up exactly."""
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    n = count_targets(labels)
    parts = sum(token_cross_entropy(logits[i : i + 1], labels[i : i + 1], n) for i in range(2))
    assert parts.item() == pytest.approx(token_cross_entropy(logits, labels).item())
    naive = sum(token_cross_entropy(logits[i : i + 1], labels[i : i + 1]) for i in range(2)) / 2
    assert naive.item() != pytest.approx(parts.item())  # the bug the count prevents


def test_shift_for_causal_lms():
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    # shift: position t predicts label t+1 -> targets (row0,t0)->1, (row1,t0)->0
    expected = (_ce([1.0, 0.0], 1) + _ce([3.0, 1.0], 0)) / 2
    assert token_cross_entropy(logits, labels, shift=True).item() == pytest.approx(expected, rel=1e-6)
    assert count_targets(labels, shift=True).item() == 2


def test_no_targets_gives_zero_not_nan():
    got = token_cross_entropy(torch.zeros(1, 2, 3), torch.full((1, 2), -100))
    assert got.item() == 0.0


def test_multitask_loss_combination():
    label, rationale = torch.tensor(2.0), torch.tensor(4.0)
    assert multitask_loss(label, rationale, 0.5).item() == pytest.approx(3.0)
    assert multitask_loss(label, rationale, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 4)
    assert multitask_loss(label, rationale, 1.0).item() == pytest.approx(2.0)
    assert multitask_loss(label, None, 0.3).item() == pytest.approx(2.0)  # single task ignores alpha
    with pytest.raises(AssertionError):
        multitask_loss(label, rationale, 1.5)
