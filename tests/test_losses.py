"""The pure loss functions against hand-computed values."""

import math

import pytest
import torch

from stepdistill.methods.fused import linear_cross_entropy
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


def test_linear_cross_entropy_matches_hand_value():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])  # logits: [1, 0, .5] and [0, 2, .5]
    got = linear_cross_entropy(hidden, weight, None, torch.tensor([0, 2]))
    assert got.tolist() == pytest.approx([_ce([1.0, 0.0, 0.5], 0), _ce([0.0, 2.0, 0.5], 2)], rel=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_has_the_unfused_values_and_gradients(bias):
    """Fused output layer + cross-entropy, in vocabulary blocks (7 rows: the last one short), against F.linear then
    F.cross_entropy: per-token losses and the gradients of hidden, weight and bias, under
    per-token upstream weights (as alpha / token counts give)."""
    torch.manual_seed(0)
    n, d, vocab = 37, 8, 50
    args = [torch.randn(n, d, dtype=torch.float64), torch.randn(vocab, d, dtype=torch.float64),
            torch.randn(vocab, dtype=torch.float64) if bias else None]
    targets, upstream = torch.randint(0, vocab, (n,)), torch.rand(n, dtype=torch.float64)
    results = []
    for fused in (False, True):
        leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
        if fused:
            losses = linear_cross_entropy(*leaves, targets, block=7)
        else:
            losses = torch.nn.functional.cross_entropy(torch.nn.functional.linear(*leaves), targets, reduction="none")
        (losses * upstream).sum().backward()
        results.append([losses.detach()] + [a.grad for a in leaves if a is not None])
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # no gradient asked: the losses alone, nothing kept for a backward pass
        torch.testing.assert_close(linear_cross_entropy(*args, targets, block=7), results[0][0])


def test_linear_cross_entropy_under_bf16_autocast_is_the_autocast_computation():
    """Under autocast the layer runs in bfloat16 as autocast would run it, the log-softmax in
    float32: the losses match the unfused way's to float32 precision, the gradients to bf16's."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 16), torch.randn(300, 16) * 0.3
    targets = torch.randint(0, 300, (40,))
    out = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = (linear_cross_entropy(h, w, None, targets, block=64) if fused else
                      torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), targets,
                                                        reduction="none"))
        losses.sum().backward()
        assert losses.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
        out.append((losses.detach(), h.grad, w.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    for ref, got in zip(out[0][1:], out[1][1:]):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_linear_cross_entropy_with_logits_spanning_hundreds_matches_the_unfused_way():
    """Logits far below the largest (here by up to ~600) make exp's results subnormal, which x86
    computes about 50x slower; the fused loss floors the exponent there. The losses and the
    gradients still equal float64's unfused way to float32 precision."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(24, 16) * 10, torch.randn(500, 16) * 3
    targets = torch.randint(0, 500, (24,))
    logits = hidden.double() @ weight.double().t()
    assert (logits.max(1).values - logits.min(1).values).min() > 200
    out = []
    for fused in (False, True):
        h, w = (hidden.double() if not fused else hidden).clone().requires_grad_(), \
            (weight.double() if not fused else weight).clone().requires_grad_()
        losses = (linear_cross_entropy(h, w, None, targets, block=64) if fused else
                  torch.nn.functional.cross_entropy(h @ w.t(), targets, reduction="none"))
        losses.sum().backward()
        out.append((losses.detach().double(), h.grad.double(), w.grad.double()))
    for ref, got in zip(*out):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


def test_a_tied_lookup_adds_its_gradient_into_the_fused_layers_and_the_sum_is_autograds():
    """The weight gradient handed from the fused output layer to the lookup of the same weight:
    the weight's one gradient is the sum autograd gives, and nothing is lost where the layer's
    weight is another one (the handoff is then not taken)."""
    from stepdistill.methods.fused import WeightGradHandoff, tied_embedding

    torch.manual_seed(0)
    vocab, d = 40, 8
    ids, targets = torch.randint(0, vocab, (3, 5)), torch.randint(0, vocab, (15,))
    proj = torch.randn(d, d, dtype=torch.float64)
    for tied in (True, False):
        grads = []
        for handoff in (None, WeightGradHandoff()):
            emb = torch.randn(vocab, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
            other = torch.randn(vocab, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            head = emb if tied else other.requires_grad_()
            x = tied_embedding(ids, emb, handoff) if handoff else torch.nn.functional.embedding(ids, emb)
            hidden = torch.tanh(x.reshape(-1, d) @ proj)
            losses = (linear_cross_entropy(hidden, head, None, targets, block=16, handoff=handoff) if handoff else
                      torch.nn.functional.cross_entropy(hidden @ head.t(), targets, reduction="none"))
            losses.sum().backward()
            grads.append((emb.grad, head.grad))
            if handoff:
                assert handoff.grad is None  # taken over by the lookup
        for ref, got in zip(*grads):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
