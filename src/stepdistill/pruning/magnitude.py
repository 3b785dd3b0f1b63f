"""Unstructured magnitude pruning: zero the smallest weights, and measure how many are zero.

    prune_magnitude(model, 0.5)                            # zero the smallest half of the weights
    sparsity_report(model)["overall"]                      # the zero fraction, measured

Only zeros are written into dense matrices: the file is no smaller and dense kernels are no
faster (`measure` shows it, and MAGNITUDE_NOTE says so wherever the result is reported).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from stepdistill.errors import StepDistillError
from stepdistill.pruning.layers import decoder_layers

MAGNITUDE_NOTE = (
    "magnitude pruning writes zeros into dense matrices: the file on disk is no smaller (zeros are "
    "stored) and dense kernels are no faster; size and speed gains need a sparse format or kernel"
)


# --- unstructured magnitude pruning ---------------------------------------------------------

def _decoder_linears(model) -> dict[str, nn.Linear]:
    """The Linear modules inside the decoder layers (not embeddings, not lm_head), by name."""
    layers = decoder_layers(model)
    return {f"model.layers.{i}.{name}": mod for i, layer in enumerate(layers)
            for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def _smallest_masks(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Masks marking exactly the k smallest entries over all `scores` (ties broken by position)."""
    if k <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    flat = torch.cat([s.flatten() for s in scores])
    t = flat.kthvalue(k).values
    masks = [s < t for s in scores]
    need = k - int(sum(int(m.sum()) for m in masks))
    for s, m in zip(scores, masks):
        if need <= 0:
            break
        ties = (s == t).flatten().nonzero().squeeze(1)[:need]
        m.view(-1)[ties] = True
        need -= len(ties)
    return masks


@torch.no_grad()
def prune_magnitude(model, sparsity: float, scope: Literal["global", "layer"] = "global") -> dict[str, Any]:
    """Zero the smallest-|w| weights of the Linear layers inside the decoder layers, in place.

    scope="global": one threshold over all of them (layers that matter less lose more);
    scope="layer": the same share zeroed in every Linear module. Embeddings and lm_head are
    left alone. Exactly round(sparsity * n) weights end up zero (ties broken by position).

    Honest about what this buys: the zeros are stored like any other value, so the file on disk
    is no smaller, and dense matmul kernels are no faster. `measure` shows both; sparse storage
    or sparse kernels are needed to cash the zeros in.

    >>> prune_magnitude(model, 0.5)["overall"]
    0.5
    """
    if scope not in ("global", "layer"):
        raise StepDistillError(f"sparsity scope {scope!r} is unknown: choose global or layer")
    if not 0 <= sparsity < 1:
        raise StepDistillError(f"--sparsity {sparsity}: the share of weights to zero must be in [0, 1)")
    linears = list(_decoder_linears(model).values())
    scores = [lin.weight.abs().float() for lin in linears]
    if scope == "global":
        masks = _smallest_masks(scores, int(round(sparsity * sum(s.numel() for s in scores))))
    else:
        masks = [_smallest_masks([s], int(round(sparsity * s.numel())))[0] for s in scores]
    for lin, mask in zip(linears, masks):
        lin.weight.masked_fill_(mask, 0.0)
    return {"sparsity": sparsity, "scope": scope, **sparsity_report(model), "note": MAGNITUDE_NOTE}


@torch.no_grad()
def sparsity_report(model) -> dict[str, Any]:
    """Measured zero fractions: `overall` over the decoder layers' Linear weights, `modules` per
    Linear, `all_parameters` over every parameter (embeddings included).

    >>> sparsity_report(model)["overall"]
    0.0
    """
    linears = _decoder_linears(model)
    modules = {name: int((lin.weight == 0).sum()) / lin.weight.numel() for name, lin in linears.items()}
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears.values())
    total = sum(lin.weight.numel() for lin in linears.values())
    params = list(model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in params)
    return {"overall": zeros / total if total else 0.0, "zeros": zeros, "total": total,
            "all_parameters": all_zeros / max(1, sum(p.numel() for p in params)), "modules": modules}
