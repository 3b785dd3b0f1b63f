"""The loss functions of every training method: pure functions on tensors, unit-tested by hand.

Token losses are *sums* divided by a count, not per-batch means, so that gradient accumulation
is exact: with `num_items_in_batch` = the number of target tokens in the whole accumulated
batch, the micro-batch losses add up to the loss of one big batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of positions that carry no target (prompt, padding)


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    shift: bool = False,
) -> torch.Tensor:
    """Cross-entropy over the target tokens (labels != -100).

    logits: (batch, seq, vocab); labels: (batch, seq).
    shift=False: logits[b, t] predicts labels[b, t] (seq2seq decoders).
    shift=True: logits[b, t] predicts labels[b, t + 1] (causal LMs fed `labels = input_ids` with
    the prompt masked); the shift happens here, so callers pass unshifted labels.

    Returns sum of token losses / num_items_in_batch, or the mean over target tokens when
    num_items_in_batch is None. A batch with no target tokens gives 0 (not NaN), so a
    micro-batch whose rows all lack a rationale adds nothing.

    >>> token_cross_entropy(torch.zeros(1, 2, 3), torch.tensor([[0, -100]]))  # ln 3
    tensor(1.0986)
    """
    logits, labels = _shifted(logits, labels, shift)
    return _normalise(_cross_entropy(logits, labels, "sum"), labels, num_items_in_batch)


def row_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = False) -> torch.Tensor:
    """The summed token cross-entropy of each row, (batch,): token_cross_entropy's terms, kept apart
    by row so that rows stacked from two tasks can be summed per task."""
    logits, labels = _shifted(logits, labels, shift)
    return _cross_entropy(logits, labels, "none").view(labels.shape).sum(dim=1)


def _shifted(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    assert logits.shape[:-1] == labels.shape, f"logits {tuple(logits.shape)} vs labels {tuple(labels.shape)}"
    return (logits[:, :-1, :], labels[:, 1:]) if shift else (logits, labels)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),  # float32: bf16 log-softmax loses too much
        labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def count_targets(labels: torch.Tensor, *, shift: bool = False) -> torch.Tensor:
    """Number of target tokens that `token_cross_entropy(..., shift=shift)` scores."""
    if shift:
        labels = labels[:, 1:]
    return labels.ne(IGNORE_INDEX).sum()


def multitask_loss(label_loss: torch.Tensor, rationale_loss: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Distilling step-by-step: alpha * label loss + (1 - alpha) * rationale loss.

    rationale_loss None (a single-task method) returns label_loss unchanged, whatever alpha.
    """
    assert 0.0 <= alpha <= 1.0, f"alpha must be in [0, 1], got {alpha}"
    if rationale_loss is None:
        return label_loss
    return alpha * label_loss + (1.0 - alpha) * rationale_loss


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

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "tv")


def soften(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) over the last dim, in float32 (bf16 log-softmax loses too much).

    >>> soften(torch.zeros(2), 2.0).exp()
    tensor([0.5000, 0.5000])
    """
    _check_temperature(temperature)
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    shift: bool = False,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Divergence between the teacher's and the student's next-token distributions.

    student_logits, teacher_logits: (batch, seq, vocab); labels: (batch, seq), used only as the
    mask of target positions (labels != -100). Per-token divergences are summed over the target
    positions and divided by num_items_in_batch (or the target count when None), exactly like
    `token_cross_entropy`, so gradient accumulation stays exact; a batch with no target gives 0.
    shift=True (causal LMs): logits[b, t] predicts labels[b, t + 1]; the last logit position and
    the first label are dropped, as in `token_cross_entropy`.

    With p = softmax(logits / T) (float32, log-space throughout):
      forward_kl: KL(p_teacher || p_student) * T**2 — mass-covering; the T**2 keeps gradient
                  scale comparable across temperatures (Hinton et al. 2015).
      reverse_kl: KL(p_student || p_teacher) * T**2 — mode-seeking.
      jsd:        generalised Jensen-Shannon (GKD, Agarwal et al. 2024), times T**2:
                  m = beta * p_teacher + (1 - beta) * p_student,
                  beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m).
                  beta must lie in (0, 1). It is bounded by the binary entropy of beta (ln 2 at
                  beta = 0.5, where it is symmetric) and tends to 0 at both ends:
                  jsd / beta -> forward_kl as beta -> 0 and jsd / (1 - beta) -> reverse_kl as
                  beta -> 1. For those limits, use kind="forward_kl" / "reverse_kl" directly.
      tv:         total variation 0.5 * sum |p_teacher - p_student|, in [0, 1] per token. No T**2
                  factor: it is a bounded distance, not a log-ratio, so the Hinton rescaling does
                  not apply; scale it yourself if you mix it with the others.

    The teacher carries no gradient (detached here). Student logits must be finite; teacher
    logits may hold -inf (tokens the teacher never emits). Different vocabulary sizes raise a
    ValueError, unless `vocab_size` is given: both logits are then cut to their first vocab_size
    entries (for models whose embedding matrix is padded beyond the tokenizer).

    >>> kd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.tensor([[0, -100]]))
    tensor(0.)
    """
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; valid kinds: {', '.join(KD_KINDS)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd beta must be in (0, 1), got {beta}: the divergence vanishes at both ends. "
            "Use kind='forward_kl' (the beta -> 0 direction) or kind='reverse_kl' (beta -> 1) instead."
        )
    _check_temperature(temperature)
    student_logits, teacher_logits = _shared_vocab(student_logits, teacher_logits, vocab_size)
    assert student_logits.shape[:-1] == labels.shape, (
        f"student logits {tuple(student_logits.shape)} vs labels {tuple(labels.shape)}"
    )
    assert teacher_logits.shape == student_logits.shape, (
        f"teacher logits {tuple(teacher_logits.shape)} vs student logits {tuple(student_logits.shape)}"
    )
    if shift:
        student_logits, teacher_logits, labels = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    # Only target positions are scored, so compute on those rows alone: cheaper, and garbage in
    # padding positions (inf, NaN) cannot leak into the sum or its gradient.
    mask = labels.ne(IGNORE_INDEX).to(student_logits.device)
    log_s = soften(student_logits[mask], temperature)  # (n_targets, vocab)
    log_t = soften(teacher_logits.detach()[mask.to(teacher_logits.device)], temperature).to(log_s.device)

    if kind == "forward_kl":
        per_token = _kl(log_t, log_s) * temperature**2
    elif kind == "reverse_kl":
        # a token the teacher rules out (-inf) would make the student's mass there infinitely
        # costly: a large finite floor keeps the loss and its gradient finite
        per_token = _kl(log_s, log_t.clamp(min=torch.finfo(log_t.dtype).min / 2)) * temperature**2
    elif kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
        per_token = (beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)) * temperature**2
    else:  # tv
        per_token = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    return _normalise(per_token.sum(), labels, num_items_in_batch)


def kd_loss_topk(
    student_logits: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    shift: bool = False,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Forward KL against a cached sparse teacher (its top-k tokens per position), times T**2.

    student_logits: (batch, seq, vocab); topk_logprobs, topk_ids: (batch, seq, k), the teacher's
    k most likely token ids and their log-probabilities at temperature T, as `topk_logprobs`
    writes them; positions align with student_logits (the same shift rule as `kd_loss`).
    The teacher's k probabilities are renormalised to sum to 1; the student's log-probabilities
    are its full-vocabulary log_softmax(logits / T) gathered at the ids:
        loss = sum_k p_t * (log p_t - log p_s) * T**2, masked and normalised as in `kd_loss`.
    Approximation: the teacher's mass outside its top-k is treated as zero (its k probabilities
    are scaled up to sum to 1), so the student is pulled towards a truncated, slightly sharper
    teacher and learns nothing about the tail beyond "put no mass there". The value is still
    >= 0, and with k = vocab it equals kd_loss forward_kl. Cached entries with log-probability
    -inf (padding) contribute nothing.
    vocab_size cuts the student's logits to their first vocab_size entries (padded embeddings).
    """
    _check_temperature(temperature)
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    assert student_logits.shape[:-1] == labels.shape, (
        f"student logits {tuple(student_logits.shape)} vs labels {tuple(labels.shape)}"
    )
    assert topk_logprobs.shape == topk_ids.shape and topk_ids.shape[:-1] == labels.shape, (
        f"top-k logprobs {tuple(topk_logprobs.shape)}, ids {tuple(topk_ids.shape)} vs labels {tuple(labels.shape)}"
    )
    if shift:
        student_logits, labels = student_logits[:, :-1], labels[:, 1:]
        topk_logprobs, topk_ids = topk_logprobs[:, :-1], topk_ids[:, :-1]
    device = student_logits.device
    mask = labels.ne(IGNORE_INDEX).to(device)
    ids = topk_ids.to(device)[mask].long()  # (n_targets, k)
    if ids.numel() and (int(ids.max()) >= student_logits.size(-1) or int(ids.min()) < 0):
        raise ValueError(
            f"cached teacher token ids span [{int(ids.min())}, {int(ids.max())}] but the student has "
            f"{student_logits.size(-1)} vocabulary entries: the cache was written with a different "
            "tokenizer; soft-label KD needs a shared tokenizer (or use sequence-level distillation, "
            "method 'distill' / 'step-by-step', on the teacher's generated text)."
        )
    log_t = topk_logprobs.to(device)[mask].float().detach()
    log_t = log_t - torch.logsumexp(log_t, dim=-1, keepdim=True)  # renormalise over the k tokens
    log_s = soften(student_logits[mask], temperature).gather(-1, ids)
    per_token = _kl(log_t, log_s) * temperature**2
    return _normalise(per_token.sum(), labels, num_items_in_batch)


@torch.no_grad()
def topk_logprobs(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids), each (..., k): the k most likely tokens under log_softmax(teacher_logits / T),
    values in float32 and sorted descending — what a top-k teacher cache stores for `kd_loss_topk`.

    >>> topk_logprobs(torch.tensor([[0.0, 2.0, 1.0]]), 2)[1]
    tensor([[1, 2]])
    """
    assert 0 < k <= teacher_logits.size(-1), f"k must be in [1, {teacher_logits.size(-1)}], got {k}"
    return soften(teacher_logits, temperature).topk(k, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; terms with p = 0 count 0 (not 0 * inf = NaN)."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p.isneginf(), torch.zeros_like(terms), terms).sum(-1)


def _normalise(total: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None):
    """total / num_items_in_batch (the target count when None), 0 for an empty batch: every token
    loss here (cross-entropy and KD) is normalised this way, so gradient accumulation is exact."""
    if num_items_in_batch is None:
        num_items_in_batch = labels.ne(IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        return total / num_items_in_batch.to(total.device).clamp(min=1)
    return total / max(num_items_in_batch, 1)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _shared_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits over the same vocabulary, or a ValueError that says why and what to do instead."""
    n_student, n_teacher = student_logits.size(-1), teacher_logits.size(-1)
    if vocab_size is not None:
        if not 0 < vocab_size <= min(n_student, n_teacher):
            raise ValueError(
                f"vocab_size={vocab_size} must be in [1, {min(n_student, n_teacher)}] "
                f"(student logits have {n_student} entries, teacher {n_teacher})"
            )
        return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    if n_student != n_teacher:
        raise ValueError(
            f"student and teacher have different vocabularies (student logits have {n_student} entries, "
            f"teacher {n_teacher}): soft-label KD compares next-token distributions entry by entry and "
            "needs a shared tokenizer. If one model only pads its embedding matrix beyond the tokenizer, "
            "pass vocab_size=<the tokenizer's size>; otherwise use sequence-level distillation instead "
            "(method 'distill' or 'step-by-step', which train on the teacher's generated text)."
        )
    return student_logits, teacher_logits
