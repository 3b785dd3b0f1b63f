"""Where a batch's target tokens are, and the output layer run at those positions only.

A small student's step is mostly its vocabulary projection (a 256-wide T5 with a 49k
vocabulary spends more on it than on all its layers); padding, and a causal student's prompt,
need none of it. Training losses and choice ranking both score targets only.

Where a model's logits are exactly its output layer's output (`fused_head`), training goes one
step further: the output layer's input at the targets is taken (`output_layer_inputs`) and
the layer and the cross-entropy run fused (losses.linear_cross_entropy).
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


# Model types whose logits are their output layer's output, with nothing after it (BART adds a
# final bias, Gemma 2 soft-caps, Cohere and Granite scale): the layer can be fused with the loss.
PLAIN_HEAD_MODELS = frozenset({"t5", "mt5", "umt5", "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox",
                               "phi3", "olmo2", "smollm3"})


def fused_head(model) -> bool:
    """Can the output layer of `model` run fused with the loss (see PLAIN_HEAD_MODELS)?"""
    return (getattr(model.config, "model_type", None) in PLAIN_HEAD_MODELS
            and isinstance(_output_layer(model), torch.nn.Linear))


@contextlib.contextmanager
def output_layer_inputs(model, keep: torch.Tensor, then=None):
    """Inside, the output layer of `model` computes nothing: a forward pass's logits are an
    empty (0, d) tensor, and the yielded list receives the layer's input at the `keep`
    positions, (keep.sum(), d), for losses.linear_cross_entropy with the layer's weight and bias.
    With `then`, the layer's output is `then` of that input instead (the fused layer and loss, run
    inside the forward), and the forward's logits are it: a DDP wrapper that searches the forward's
    outputs for the parameters it used then finds the layer's weight (and marks it unused, to be
    marked again by its gradient, if not)."""
    caught: list[torch.Tensor] = []
    head = _head(model)

    def catch(hidden: torch.Tensor) -> torch.Tensor:
        at = hidden[_check(model, hidden, keep)]
        if then is not None:
            return then(at)
        caught.append(at)
        return hidden[:0, 0]

    head.forward = catch  # the instance's forward, for this pass: not even autocast's weight cast runs
    try:
        yield caught
    finally:
        del head.forward


@contextlib.contextmanager
def logits_at(model, keep: torch.Tensor):
    """Inside, `model(...).logits` is (keep.sum(), vocab): the output layer is applied at the
    `keep` positions only. A small student's vocabulary projection is most of its step, and
    padding (and a causal prompt) needs none of it."""
    handle = _head(model).register_forward_pre_hook(lambda module, args: (args[0][_check(model, args[0], keep)], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _output_layer(model) -> torch.nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _head(model) -> torch.nn.Module:
    head = _output_layer(model)
    if head is None:
        raise StepDistillError(f"{type(model).__name__} has no output embeddings to restrict to the target "
                               "tokens: set training.target_logits_only=false")
    return head


def _check(model, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    if hidden.shape[:2] != keep.shape:
        raise StepDistillError(f"{type(model).__name__} feeds its output layer {tuple(hidden.shape[:2])} "
                               f"positions, not the batch's {tuple(keep.shape)}: set training.target_logits_only=false")
    return keep
