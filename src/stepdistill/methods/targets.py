"""Where a batch's target tokens are, and the output layer run at those positions only.

A small student's step is mostly its vocabulary projection (a 256-wide T5 with a 49k
vocabulary spends more on it than on all its layers); padding, and a causal student's prompt,
need none of it. Training losses and choice ranking both score targets only.
"""

from __future__ import annotations

import contextlib

import torch

from stepdistill.errors import StepDistillError
from stepdistill.methods.losses import IGNORE_INDEX


def target_positions(labels: torch.Tensor, *, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): the positions whose logits are scored, and the token each must predict
    (shift: a causal LM's position t predicts token t + 1), in the same row-major order."""
    if not shift:
        keep = labels.ne(IGNORE_INDEX)
        return keep, labels[keep]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:].ne(IGNORE_INDEX)
    return keep, labels[:, 1:][keep[:, :-1]]


@contextlib.contextmanager
def logits_at(model, keep: torch.Tensor):
    """Inside, `model(...).logits` is (keep.sum(), vocab): the output layer is applied at the
    `keep` positions only. A small student's vocabulary projection is most of its step, and
    padding (and a causal prompt) needs none of it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise StepDistillError(f"{type(model).__name__} has no output embeddings to restrict to the target "
                               "tokens: set training.target_logits_only=false")

    def gather(module, args):
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:
            raise StepDistillError(f"{type(model).__name__} feeds its output layer {tuple(hidden.shape[:2])} "
                                   f"positions, not the batch's {tuple(keep.shape)}: set training.target_logits_only=false")
        return (hidden[keep], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
