"""The loss functions of every training method: pure functions on tensors, unit-tested by hand.

Token losses are *sums* divided by a count, not per-batch means, so that gradient accumulation
is exact: with `num_items_in_batch` = the number of target tokens in the whole accumulated
batch, the micro-batch losses add up to the loss of one big batch.
"""

from __future__ import annotations

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
    assert logits.shape[:-1] == labels.shape, f"logits {tuple(logits.shape)} vs labels {tuple(labels.shape)}"
    if shift:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),  # float32: bf16 log-softmax loses too much
        labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if num_items_in_batch is None:
        num_items_in_batch = labels.ne(IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch.clamp(min=1)
    return total / max(num_items_in_batch, 1)


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
