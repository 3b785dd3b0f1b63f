"""The fused output layer + cross-entropy: a custom autograd kernel with buffers lent from step
to step, kept apart from the pure loss functions (losses.py) it computes the same values as.

    losses = linear_cross_entropy(hidden, head.weight, head.bias, targets)   # per token, float32

`linear_cross_entropy` never makes the (tokens, vocabulary) float32 logits: a block of vocabulary
rows at a time, a running log-sum-exp, then the logits' gradient made in place. `tied_embedding`
and `WeightGradHandoff` let a tied input lookup add its gradient into the output layer's instead of
autograd zero-filling a vocabulary-sized one. Equal to the unfused way (tests/test_losses.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, *, block: int | None = None,
                         handoff: "WeightGradHandoff | None" = None) -> torch.Tensor:
    """Per-token cross-entropy of `F.linear(hidden, weight, bias)` against `targets` (no ignore
    index), without vocabulary-wide float32 logits: `hidden` (n, d), `weight` (vocab, d).

    The output layer runs a block of vocabulary rows at a time, for all n tokens at once, in the
    compute dtype (the autocast dtype where autocast is on, else the weight's): each block of
    logits is written once, in that dtype, into a (vocab, n) buffer, while a running log-sum-exp
    is kept in float32. A second pass turns the buffer, a block at a time, into the gradient with
    respect to the logits (softmax minus one-hot, computed in float32), which the backward pass
    multiplies out. So the weight is read once, each block's float32 work stays in cache, and no
    (n, vocab) float32 array is ever made: the unfused way writes and rereads several (the cast,
    the log-softmax, its gradient, the cast back), which for a small student with a large
    vocabulary cost more than its layers. Same values and gradients (`tests/test_losses.py`).

    `handoff`: the weight's gradient is not returned to autograd but handed to `tied_embedding`
    of the same weight, which adds its own into it (see WeightGradHandoff).

    >>> linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), None, torch.tensor([0, 2]))  # ln 3
    tensor([1.0986, 1.0986])
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    # about 1.3M logits a block: its float32 copy (5 MB) stays in cache; measured best on 2 cores
    block = block or max(256, min(8192, (1_300_000 // max(hidden.shape[0], 1)) // 64 * 64))
    if handoff is not None and handoff.weight is not weight:  # no lookup of this weight takes it over
        handoff = None
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, dtype, block, grad, handoff)


class WeightGradHandoff:
    """One weight used twice in a step, as a tied input embedding and output layer: the fused
    output layer's backward (which always runs first: the layer's input depends on the lookup)
    leaves its weight gradient here, and the lookup's backward adds its rows into it in place
    and returns the sum as the weight's one gradient. Autograd's own way zero-fills a
    vocabulary-sized gradient for the lookup and then adds the two (50 MB each in float32 for
    SmolLM2's vocabulary at width 256)."""

    def __init__(self) -> None:
        self.weight: torch.Tensor | None = None  # set by tied_embedding: only that weight's gradient is handed over
        self.grad: torch.Tensor | None = None


def tied_embedding(ids: torch.Tensor, weight: torch.Tensor, handoff: WeightGradHandoff) -> torch.Tensor:
    """`F.embedding(ids, weight)` (no padding_idx, max_norm or scale_grad_by_freq), whose weight
    gradient is added into the one `handoff` holds, if any."""
    handoff.weight = weight
    return _TiedEmbedding.apply(ids, weight, handoff)


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, handoff):
        ctx.save_for_backward(ids)
        ctx.handoff, ctx.shape = handoff, weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        grad, ctx.handoff.grad = ctx.handoff.grad, None
        if grad is None:  # no fused output layer ran in this graph: autograd's own way
            grad = grad_out.new_zeros(ctx.shape)
        return None, grad.index_add_(0, ids.reshape(-1), grad_out.reshape(-1, ctx.shape[1]).to(grad.dtype)), None


# Buffers lent from one step to the next (CPU only): the logits' buffer of the last finished
# backward pass, and the float32 block the softmax works in. Allocating them afresh costs more
# than the arithmetic that fills them: glibc maps a buffer this large anew each time, and the
# kernel faults in and zeroes every page (tens of thousands per step; a 5 MB block cast with
# `.float()` took 1.7 ms against 0.23 ms copied into a kept one). A buffer still saved for a
# backward pass is never lent; if a retained graph's buffer were reused anyway, autograd's
# version check would raise, not compute wrong.
_SCRATCH: dict[tuple, torch.Tensor] = {}


def _borrow(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buf = _SCRATCH.pop((name, dtype), None) if device.type == "cpu" else None
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _give_back(name: str, view: torch.Tensor) -> None:
    if view.device.type == "cpu":
        base = view._base if view._base is not None else view
        key = (name, base.dtype)
        if key not in _SCRATCH or _SCRATCH[key].numel() < base.numel():
            _SCRATCH[key] = base


def _exp_shifted_(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """exp(x - shift) in place, with x - shift >= -80 (float32) or -700 (float64).

    Below that, exp's results are subnormal numbers, which x86 computes about 50x slower (17 ms
    against 0.33 ms for a 1.3M-logit block), and a trained model's logits span that range. What
    the floor adds is below exp(-80) = 2e-35 a logit: invisible next to the largest logit's
    term, 1.
    """
    return x.sub_(shift).clamp_(min=_EXP_FLOOR[x.dtype]).exp_()


_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, block, grad, handoff):
        with torch.autocast(hidden.device.type, enabled=False):
            h, b = hidden.to(dtype), bias.to(dtype) if bias is not None else None
            lent = weight.dtype != dtype  # the weight's cast (vocabulary-sized) into a lent buffer
            w = _borrow("weight", weight.numel(), dtype, weight.device).view_as(weight).copy_(weight) if lent else weight
            n, vocab = h.shape[0], w.shape[0]
            exact = torch.promote_types(dtype, torch.float32)  # the softmax in float32 at least
            logits = _borrow("logits", vocab * n, dtype, h.device).view(vocab, n)  # transposed: a block is contiguous rows
            work = _borrow("work", min(block, vocab) * n, exact, h.device)  # one block, in float32
            top = torch.full((n,), -math.inf, dtype=exact, device=h.device)
            total = torch.zeros(n, dtype=exact, device=h.device)
            target_logit = torch.empty(n, dtype=exact, device=h.device)
            blocks = []
            for v in range(0, vocab, block):
                rows = logits[v:v + block]
                if b is None:
                    torch.mm(w[v:v + block], h.t(), out=rows)
                else:
                    torch.addmm(b[v:v + block, None], w[v:v + block], h.t(), out=rows)
                x = work[:rows.numel()].view_as(rows).copy_(rows)
                new_top = torch.maximum(top, x.amax(dim=0))
                total.mul_((top - new_top).exp_()).add_(_exp_shifted_(x, new_top).sum(dim=0))
                top = new_top
                here = ((targets >= v) & (targets < v + block)).nonzero().squeeze(1)  # tokens whose target is here
                target_logit[here] = rows[targets[here] - v, here].to(exact)
                blocks.append((v, here))
            lse = top + total.log()
            losses = lse - target_logit
            if grad:
                for v, here in blocks:  # the logits' gradient in place: softmax - one-hot
                    rows = logits[v:v + block]
                    x = _exp_shifted_(work[:rows.numel()].view_as(rows).copy_(rows), lse)
                    x[targets[here] - v, here] -= 1
                    rows.copy_(x)
            _give_back("work", work)
            if not grad:
                _give_back("logits", logits)
                if lent:
                    _give_back("weight", w)
        ctx.save_for_backward(h, w, logits if grad else None)
        ctx.has_bias, ctx.dtypes, ctx.lent, ctx.handoff = bias is not None, (hidden.dtype, weight.dtype), lent, handoff
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        h, w, grad_logits_t = ctx.saved_tensors  # (vocab, n)
        exact = torch.promote_types(h.dtype, torch.float32)
        g = grad_losses.to(exact)[:, None]  # one weight per token: scale the small operands, not the logits
        with torch.autocast(h.device.type, enabled=False):
            grad_hidden = (grad_logits_t.t() @ w).to(exact).mul_(g) if ctx.needs_input_grad[0] else None
            grad_weight = None
            if ctx.needs_input_grad[1]:  # in the compute dtype into a lent buffer; cast to the weight's below
                out = _borrow("grad_weight", w.numel(), w.dtype, w.device).view_as(w) if ctx.lent else None
                grad_weight = torch.mm(grad_logits_t, (h.to(exact) * g).to(h.dtype), out=out)
            grad_bias = grad_logits_t.to(exact) @ g.squeeze(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_weight = None if grad_weight is None else grad_weight.to(weight_dtype)
        _give_back("logits", grad_logits_t)
        if ctx.lent:
            _give_back("weight", w)
            if ctx.needs_input_grad[1]:
                _give_back("grad_weight", out)
        if ctx.handoff is not None and grad_weight is not None:
            ctx.handoff.grad, grad_weight = grad_weight, None
        return (None if grad_hidden is None else grad_hidden.to(hidden_dtype), grad_weight,
                None if grad_bias is None else grad_bias.to(weight_dtype), None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Soft-label knowledge distillation: the student matches the teacher's whole next-token
# distribution at every target position, not just its sampled text. Needs a shared vocabulary.
