"""Structured pruning: remove whole key/value head groups and feed-forward neurons, so the model
really is smaller and faster, and still loads with the stock Hugging Face class.

    prune_structured(model, heads=1, ffn=0.25)             # 1 KV group + 25% of FFN neurons per layer
    prune_structured(model, ffn=0.25, importance="taylor", batches=taylor_batches(student, train, prefix=""))
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from stepdistill.errors import StepDistillError
from stepdistill.pruning.layers import decoder_layers

Importance = Literal["magnitude", "taylor"]


# --- structured pruning ---------------------------------------------------------------------

def plan_structured(model, heads: int, ffn: float) -> dict[str, int]:
    """Sizes after removing `heads` KV groups and the fraction `ffn` of FFN neurons per layer;
    refuses, before anything changes, what would leave nothing or a config that does not load."""
    c = model.config
    n_heads, n_kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    inter = c.intermediate_size
    if not 0 <= heads < n_kv:
        raise StepDistillError(
            f"--heads {heads}: each layer has {n_kv} key/value head groups; remove 0..{n_kv - 1} "
            "(at least one group must stay)"
        )
    if not 0 <= ffn < 1:
        raise StepDistillError(f"--ffn {ffn}: the fraction of feed-forward neurons to remove must be in [0, 1)")
    n_ffn = int(round(ffn * inter))
    if n_ffn >= inter:
        raise StepDistillError(f"--ffn {ffn} would remove all {inter} feed-forward neurons: choose a smaller fraction")
    rep = n_heads // n_kv
    plan = {"heads": heads, "rep": rep, "head_dim": head_dim, "ffn": n_ffn,
            "num_attention_heads": n_heads - heads * rep, "num_key_value_heads": n_kv - heads,
            "intermediate_size": inter - n_ffn}
    # The stock config class must accept the new head count, or the saved folder will not load
    # (LlamaConfig in transformers 5 insists that hidden_size divide by num_attention_heads).
    if heads:
        err = _config_error(c, plan)
        if err:
            ok = [h for h in range(1, n_kv) if not _config_error(c, {**plan, "num_attention_heads": n_heads - h * rep,
                                                                      "num_key_value_heads": n_kv - h})]
            raise StepDistillError(
                f"--heads {heads} leaves {plan['num_attention_heads']} attention heads, which "
                f"{type(c).__name__} refuses ({err}): choose --heads from {ok or 'none (this model cannot lose heads)'}"
            )
    return plan


def _config_error(config, plan: dict[str, int]) -> str | None:
    trial = copy.deepcopy(config)
    trial.head_dim = plan["head_dim"]
    trial.num_attention_heads = plan["num_attention_heads"]
    trial.num_key_value_heads = plan["num_key_value_heads"]
    try:
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception as e:  # huggingface_hub's StrictDataclassClassValidationError wraps the ValueError
        return str(e).strip().splitlines()[-1].strip()
    return None


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the kept output rows / input columns of `lin` (and its bias)."""
    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if rows is None else lin.bias.detach()[rows])
    new.weight.requires_grad_(lin.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(lin.bias.requires_grad)
    return new


def _row_score(lin: nn.Linear, taylor: bool, group: int) -> torch.Tensor:
    """Per-unit score of the output rows of `lin`, `group` consecutive rows per unit."""
    def s(p: torch.Tensor) -> torch.Tensor:
        if taylor:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            return (p.detach() * g).abs().float()
        return p.detach().float() ** 2

    w = s(lin.weight).sum(dim=1)
    if lin.bias is not None:
        w = w + s(lin.bias)
    return w.view(-1, group).sum(dim=1)


def _col_score(lin: nn.Linear, taylor: bool, group: int) -> torch.Tensor:
    p = lin.weight
    if taylor:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        v = (p.detach() * g).abs().float()
    else:
        v = p.detach().float() ** 2
    return v.sum(dim=0).view(-1, group).sum(dim=1)


def _importance(layer, taylor: bool, head_dim: int, rep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per KV group, per FFN neuron) importance of one decoder layer.

    magnitude: the L2 norm of every weight (and bias) that belongs to the unit, i.e. the q/k/v
    rows and o_proj columns of a KV group with its query heads, or the gate/up rows and the
    down_proj column of a neuron. taylor: sum of |w * dL/dw| over the same weights.
    """
    a, m = layer.self_attn, layer.mlp
    groups = (_row_score(a.q_proj, taylor, head_dim * rep) + _row_score(a.k_proj, taylor, head_dim)
              + _row_score(a.v_proj, taylor, head_dim) + _col_score(a.o_proj, taylor, head_dim * rep))
    neurons = _row_score(m.gate_proj, taylor, 1) + _row_score(m.up_proj, taylor, 1) + _col_score(m.down_proj, taylor, 1)
    if not taylor:  # squared sums -> L2 norms (same order; reported values read as norms)
        groups, neurons = groups.sqrt(), neurons.sqrt()
    return groups, neurons


def _accumulate_gradients(model, batches: list[dict[str, torch.Tensor]]) -> list[nn.Parameter]:
    """Sum the loss gradients of `batches` into .grad of the decoder layers' Linear weights."""
    wanted = {id(p) for mod in decoder_layers(model).modules() if isinstance(mod, nn.Linear) for p in mod.parameters()}
    params = [p for p in model.parameters() if id(p) in wanted]
    everything = list(model.parameters())
    flags = [p.requires_grad for p in everything]
    was_training = model.training
    model.eval()  # no dropout: the importance of the model as it will run
    try:
        for p in everything:  # only the scored weights get (and keep, until pruned) gradients
            p.requires_grad_(id(p) in wanted)
            if id(p) in wanted:
                p.grad = None
        device = next(model.parameters()).device
        for batch in batches:
            if "labels" not in batch:
                raise StepDistillError("taylor importance: every batch needs input_ids, attention_mask and labels")
            out = model(**{k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
            out.loss.backward()
    finally:
        for p, f in zip(everything, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return params


def prune_structured(model, *, heads: int = 0, ffn: float = 0.0, importance: Importance = "magnitude",
                     batches: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Remove `heads` key/value head groups and the fraction `ffn` of feed-forward neurons from every
    decoder layer, in place; the least important units of each layer go.

    A KV group is one key/value head with the num_attention_heads / num_key_value_heads query
    heads that read it, so grouped-query attention stays valid. The same number goes from every
    layer because the config holds one head count and one intermediate_size: the result saves and
    loads back with the stock class. `importance="taylor"` needs `batches` (dicts of input_ids,
    attention_mask, labels) to take gradients from.

    >>> prune_structured(model, heads=1, ffn=0.25)["num_key_value_heads"]   # 3 -> 2 for SmolLM2
    [3, 2]
    """
    layers = decoder_layers(model)
    if importance not in ("magnitude", "taylor"):
        raise StepDistillError(f"importance {importance!r} is unknown: choose magnitude or taylor")
    plan = plan_structured(model, heads, ffn)
    c = model.config
    report: dict[str, Any] = {
        "importance": importance, "heads_removed_per_layer": heads, "neurons_removed_per_layer": plan["ffn"],
        "num_attention_heads": [c.num_attention_heads, plan["num_attention_heads"]],
        "num_key_value_heads": [c.num_key_value_heads, plan["num_key_value_heads"]],
        "intermediate_size": [c.intermediate_size, plan["intermediate_size"]],
        "removed_kv_groups": [], "removed_neurons": [],
    }
    if heads == 0 and plan["ffn"] == 0:
        return report
    taylor = importance == "taylor"
    params: list[nn.Parameter] = []
    if taylor:
        if not batches:
            raise StepDistillError(
                "taylor importance needs gradients: pass batches=[{input_ids, attention_mask, labels}, ...] "
                "(from the CLI: --task, whose training examples are used), or use importance='magnitude'"
            )
        params = _accumulate_gradients(model, batches)
    hd, rep = plan["head_dim"], plan["rep"]
    try:
        for layer in layers:
            group_score, neuron_score = _importance(layer, taylor, hd, rep)
            group_score, neuron_score = group_score.cpu(), neuron_score.cpu()  # index plans on CPU, wherever the model is
            a, m = layer.self_attn, layer.mlp
            if heads:
                # the lowest scores go; a stable sort makes ties go to the earlier unit, reproducibly
                drop = torch.argsort(group_score, stable=True)[:heads].sort().values
                mask = torch.ones(len(group_score), dtype=torch.bool)
                mask[drop] = False
                keep = mask.nonzero().squeeze(1)
                kv_rows = (keep[:, None] * hd + torch.arange(hd)).flatten()
                q_rows = (keep[:, None] * (hd * rep) + torch.arange(hd * rep)).flatten()
                a.q_proj, a.o_proj = _slice_linear(a.q_proj, rows=q_rows), _slice_linear(a.o_proj, cols=q_rows)
                a.k_proj, a.v_proj = _slice_linear(a.k_proj, rows=kv_rows), _slice_linear(a.v_proj, rows=kv_rows)
                report["removed_kv_groups"].append(drop.tolist())
            if plan["ffn"]:
                drop = torch.argsort(neuron_score, stable=True)[: plan["ffn"]].sort().values
                mask = torch.ones(len(neuron_score), dtype=torch.bool)
                mask[drop] = False
                keep = mask.nonzero().squeeze(1)
                m.gate_proj, m.up_proj = _slice_linear(m.gate_proj, rows=keep), _slice_linear(m.up_proj, rows=keep)
                m.down_proj = _slice_linear(m.down_proj, cols=keep)
                if hasattr(m, "intermediate_size"):
                    m.intermediate_size = plan["intermediate_size"]
                report["removed_neurons"].append(drop.tolist())
    finally:
        for p in params:
            p.grad = None
    # head_dim first: with fewer heads, hidden_size / num_attention_heads no longer gives it
    c.head_dim = hd
    c.num_attention_heads = plan["num_attention_heads"]
    c.num_key_value_heads = plan["num_key_value_heads"]
    c.intermediate_size = plan["intermediate_size"]
    return report


# --- taylor importance: gradients from labelled examples ------------------------------------

def taylor_batches(student, examples, *, prefix: str, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Training batches for taylor importance: `examples` with gold labels, formatted as the
    student's label task (prefix + input -> label), exactly as training formats them."""
    from stepdistill.methods.formatting import Format, encode_example
    from stepdistill.methods.batches import Collator

    fmt = student.fmt or Format(kind="causal")
    feats = [encode_example(student.tokenizer, fmt, prefix, e.input, e.label) for e in examples if e.label is not None]
    if not feats:
        raise StepDistillError("taylor importance needs training examples with gold labels: the split has none")
    collate = Collator(student.tokenizer.pad_token_id)
    return [collate(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)]
