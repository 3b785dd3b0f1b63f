"""The loss functions of every training method: pure functions on tensors, unit-tested by hand
(the fused output-layer kernel, with its buffers, is in fused.py).

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
    return normalise(_cross_entropy(logits, labels, "sum"), labels, num_items_in_batch)


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
    return normalise(per_token.sum(), labels, num_items_in_batch)


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
    return normalise(per_token.sum(), labels, num_items_in_batch)


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


def normalise(total: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None):
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
