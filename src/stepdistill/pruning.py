"""Pruning: make a Llama-family causal LM smaller, and measure what that really bought.

    keep_layers(model, select_layers(30, 8, "spread"))     # 30 -> 8 decoder layers
    prune_structured(model, heads=1, ffn=0.25)             # 1 KV group + 25% of FFN neurons per layer
    prune_magnitude(model, 0.5)                            # zero the smallest half of the weights
    measure(model, tokenizer, prompts=DEFAULT_PROMPTS)     # parameters, MB on disk, ms/prediction
    prune("smollm2-135m-instruct", "models/smol-8l", layers=8, heads=1, ffn=0.25)   # all of it, saved

Layer and structured pruning really shrink the model: modules are replaced by smaller ones and
the config is updated, so the folder loads back with the stock Hugging Face class and runs
faster. Magnitude pruning only writes zeros into dense matrices: the file is no smaller and
dense kernels are no faster (`measure` shows it); it is the first step towards sparse
formats, or towards a fine-tune that recovers what pruning lost.

Supported: LlamaForCausalLM (what the SmolLM2 GGUF loads as), MistralForCausalLM and
Qwen2ForCausalLM, which share the layout self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from stepdistill.errors import StepDistillError
from stepdistill.runs import MARKER, new_marker, protected_path

Strategy = Literal["spread", "first", "every"]
Importance = Literal["magnitude", "taylor"]
SUPPORTED = ("llama", "mistral", "qwen2")  # config.model_type of the supported families
DEFAULT_PROMPTS = [
    "What is 12 + 7?",
    "Name a colour of the sky.",
    "Sam has 3 apples and buys 4 more. How many apples does he have?",
    "Translate 'cat' to French.",
    "Is a rose a plant or an animal?",
    "Complete: one, two, three,",
    "What is the capital of France?",
    "Write a word that rhymes with 'sun'.",
]
MAGNITUDE_NOTE = (
    "magnitude pruning writes zeros into dense matrices: the file on disk is no smaller (zeros are "
    "stored) and dense kernels are no faster; size and speed gains need a sparse format or kernel"
)


# --- which models ---------------------------------------------------------------------------

def _layers(model) -> nn.ModuleList:
    """The decoder layers of a supported model, or a StepDistillError naming what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if model_type not in SUPPORTED or not isinstance(layers, nn.ModuleList):
        raise StepDistillError(
            f"pruning supports Llama-family causal LMs ({', '.join(SUPPORTED)}: LlamaForCausalLM, "
            f"MistralForCausalLM, Qwen2ForCausalLM), not {type(model).__name__} (model_type {model_type!r}): "
            "use a model of one of those families"
        )
    return layers


# --- layers ---------------------------------------------------------------------------------

def select_layers(n_total: int, keep: int, strategy: Strategy = "spread") -> list[int]:
    """Indices of the decoder layers to keep, ascending.

    "spread": `keep` layers evenly spaced, the first and the last included;
    "first":  the first `keep` layers;
    "every":  every keep-th layer from the first (DistilBERT's one-in-two is keep=2).

    >>> select_layers(30, 8)
    [0, 4, 8, 12, 17, 21, 25, 29]
    >>> select_layers(12, 2, "every")
    [0, 2, 4, 6, 8, 10]
    """
    if strategy not in ("spread", "first", "every"):
        raise StepDistillError(f"layer strategy {strategy!r} is unknown: choose spread, first or every")
    if not 1 <= keep <= n_total:
        what = "step" if strategy == "every" else "layers to keep"
        raise StepDistillError(f"--layers {keep}: the model has {n_total} layers; the {what} must be 1..{n_total}")
    if strategy == "first":
        return list(range(keep))
    if strategy == "every":
        return list(range(0, n_total, keep))
    if keep == 1:
        return [0]
    step = (n_total - 1) / (keep - 1)  # >= 1, so rounding half up keeps the indices distinct
    return [int(i * step + 0.5) for i in range(keep)]


def keep_layers(model, indices: list[int]) -> dict[str, Any]:
    """Keep only the decoder layers at `indices` (ascending), in place, and fix what refers to them:
    config.num_hidden_layers, each layer's self_attn.layer_idx (the KV cache slot) and per-layer
    config lists such as config.layer_types.

    >>> keep_layers(model, [0, 2, 3])
    {'kept': [0, 2, 3], 'num_hidden_layers': [4, 3]}
    """
    layers = _layers(model)
    n = len(layers)
    if not indices or list(indices) != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= n:
        raise StepDistillError(f"layer indices {indices} must be distinct, ascending and within 0..{n - 1}")
    config = model.config
    model.model.layers = nn.ModuleList(layers[i] for i in indices)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    # Per-layer config lists (layer_types, no_rope_layers, ...) must shrink with the layers,
    # or the config fails validation and the cache is built for the wrong layers.
    for key, value in list(config.to_dict().items()):
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, key, [value[i] for i in indices])
    config.num_hidden_layers = len(indices)
    return {"kept": list(indices), "num_hidden_layers": [n, len(indices)]}


def cut_layers(source: str, keep: int, out: str | Path, *, strategy: Strategy = "first",
               gguf_file: str | None = None) -> Path:
    """students.cut_layers with a choice of layers: a pretrained causal LM with `keep` of its
    decoder layers (see select_layers), its embeddings and tokenizer, saved to `out`.

    >>> cut_layers("smollm2-135m-instruct", 8, "models/smol-8l", strategy="spread")
    """
    from stepdistill.students import _refuse_existing, _save_atomic, load_pretrained

    _refuse_existing(Path(out))  # before the (slow) load
    student = load_pretrained(source, gguf_file, kind="causal")
    keep_layers(student.model, select_layers(len(_layers(student.model)), keep, strategy))
    return _save_atomic(student.model, student.tokenizer, Path(out))


# --- structured pruning ---------------------------------------------------------------------

def _plan(model, heads: int, ffn: float) -> dict[str, int]:
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
    wanted = {id(p) for mod in _layers(model).modules() if isinstance(mod, nn.Linear) for p in mod.parameters()}
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
    layers = _layers(model)
    if importance not in ("magnitude", "taylor"):
        raise StepDistillError(f"importance {importance!r} is unknown: choose magnitude or taylor")
    plan = _plan(model, heads, ffn)
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


# --- unstructured magnitude pruning ---------------------------------------------------------

def _decoder_linears(model) -> dict[str, nn.Linear]:
    """The Linear modules inside the decoder layers (not embeddings, not lm_head), by name."""
    layers = _layers(model)
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


# --- measuring ------------------------------------------------------------------------------

def folder_bytes(folder: str | Path) -> int:
    """Size on disk of a saved model: the bytes of every file under `folder`."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def measure(model, tokenizer, *, prompts: list[str] | None = None, max_new_tokens: int = 8, repeats: int = 3,
            task: Any = None, split: str = "test", data: str | Path | None = None, limit: int | None = None,
            prefix: str = "", fmt: Any = None, batch_size: int = 16, timed: bool = True) -> dict[str, Any]:
    """Parameters, size on disk and latency of a causal LM, measured; accuracy when a task is given.

    size: the files save_pretrained writes (safetensors + config), in bytes and MB.
    latency (unless timed=False): see `latency`, in ms per prompt.
    accuracy: `task` (a name or a Task) on `split` with evaluation.predict, reading the task
    with `prefix` and `fmt` (a trained model's label prefix and Format from stepdistill.json).

    >>> measure(model, tok, prompts=["What is 2 + 3?"])
    {'parameters': 134515008, 'size_bytes': ..., 'size_mb': 538.1, 'ms_per_prediction': 41.2, ...}
    """
    from stepdistill.students import count_parameters

    out: dict[str, Any] = {"parameters": count_parameters(model)[1]}
    with tempfile.TemporaryDirectory(prefix="stepdistill-measure-") as d, _quiet_progress():
        model.save_pretrained(d)
        size = folder_bytes(d)
    out.update(size_bytes=size, size_mb=round(size / 1e6, 2))
    if timed:
        out.update(latency([model], tokenizer, prompts=prompts, max_new_tokens=max_new_tokens, repeats=repeats)[0])
    if task is not None:
        out.update(_accuracy(model, tokenizer, task, split, data, limit, prefix, fmt, batch_size))
    return out


def latency(models: list, tokenizer, *, prompts: list[str] | None = None, max_new_tokens: int = 8,
            repeats: int = 3) -> list[dict[str, Any]]:
    """ms per prediction of each model: greedy generation of exactly `max_new_tokens` tokens for
    the batch `prompts` (left-padded) under torch.inference_mode, the median of `repeats` timed
    runs after one warm-up. Exactly that many tokens, so a model that stops early does not look
    faster. With several models the runs alternate, round by round, so a machine that gets busier
    halfway slows them all alike and their ratio stays fair.

    >>> before, after = latency([original, pruned], tok)
    >>> after["ms_per_prediction"] / before["ms_per_prediction"]
    0.19
    """
    prompts = prompts or DEFAULT_PROMPTS
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                  pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    modes = [m.training for m in models]
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode():
            for m in models:
                m.eval()
                device = next(m.parameters()).device
                m.generate(**{k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")},
                           **kwargs)  # warm-up: first-call allocations and lazy inits
            for _ in range(max(1, repeats)):
                for m, t in zip(models, times):
                    device = next(m.parameters()).device
                    inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                    t0 = time.perf_counter()
                    m.generate(**inputs, **kwargs)
                    t.append(time.perf_counter() - t0)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return [{"ms_per_prediction": round(1000 * statistics.median(t) / len(prompts), 2),
             "latency_runs_ms": [round(1000 * x, 1) for x in t], "prompts": len(prompts), "new_tokens": max_new_tokens}
            for t in times]


@contextlib.contextmanager
def _quiet_progress():
    """No "Writing model shards" bars in the middle of the CLI's output."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _accuracy(model, tokenizer, task, split, data, limit, prefix, fmt, batch_size) -> dict[str, Any]:
    from stepdistill.evaluation import predict
    from stepdistill.students import Student
    from stepdistill.tasks import get_task, load_examples

    task = get_task(task) if isinstance(task, str) else task
    examples = load_examples(task, split, data, limit)
    preds = predict(Student(model, tokenizer, is_seq2seq=False, fmt=fmt), [e.input for e in examples],
                    prefix=prefix, batch_size=batch_size)
    return {"task": task.name, "split": split, "n": len(examples), "accuracy": task.accuracy(preds, examples)}


# --- the whole pipeline, as the CLI runs it -------------------------------------------------

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


def _load(model: str):
    """(student, stepdistill.json info or None, the folder holding stepdistill.json or None)."""
    from stepdistill.evaluation import load_trained
    from stepdistill.students import MODEL_INFO, model_folder
    from stepdistill.students import load_pretrained

    d = model_folder(model)
    if (d / MODEL_INFO).is_file():
        student, info = load_trained(d)
        if student.is_seq2seq:
            _layers(student.model)  # the clear error
        return student, info, d
    student = load_pretrained(model)
    _layers(student.model)  # a seq2seq or other unsupported model: the clear error, before any work
    return student, None, None


def _fmt_row(name: str, before: Any, after: Any, fmt: Callable[[Any], str], ratio: bool = True) -> str:
    b, a = fmt(before), fmt(after)
    r = f"{after / before:.2f}x" if ratio and isinstance(before, (int, float)) and before else ""
    return f"{name:<16}{b:>14}{a:>14}{r:>14}"


def table(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The before/after table the CLI prints, one string per line."""
    lines = [f"{'':<16}{'before':>14}{'after':>14}{'after/before':>14}",
             _fmt_row("parameters", before["parameters"], after["parameters"], lambda x: f"{x / 1e6:.2f}M"),
             _fmt_row("size on disk", before["size_mb"], after["size_mb"], lambda x: f"{x:.1f} MB"),
             _fmt_row("ms/prediction", before["ms_per_prediction"], after["ms_per_prediction"], lambda x: f"{x:.1f}")]
    if "accuracy" in before:
        def pct(x):
            return "n/a" if x is None else f"{x:.1%}"
        lines.append(_fmt_row(f"accuracy (n={after['n']})", before["accuracy"], after["accuracy"], pct, ratio=False))
    lines.append(_fmt_row("zero weights", before["zero_fraction"], after["zero_fraction"], lambda x: f"{x:.1%}",
                          ratio=False))
    return lines


def prune(model: str, out: str | Path, *, layers: int | None = None, strategy: Strategy = "spread",
          heads: int = 0, ffn: float = 0.0, importance: Importance = "magnitude", sparsity: float = 0.0,
          scope: Literal["global", "layer"] = "global", task: str | None = None, data: str | None = None,
          split: str | None = None, limit: int | None = None, taylor_examples: int = 32,
          latency_repeats: int = 5, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Load `model`, prune it (layers -> structured -> magnitude), save it to `out` with its
    tokenizer, stepdistill.json (when it has one) and prune_report.json, and print a before/after
    table. Returns the report.

    `model`: hub id, folder, .gguf, `smollm2-135m-instruct`, or a training run / its model folder
    (then accuracy uses its label prefix and format). `layers`: how many to keep (the step, for
    strategy "every"). `task`/`split`/`data`/`limit`: measure accuracy before and after; taylor
    importance draws its gradients from the first `taylor_examples` of the task's train split.
    Latency: the original (a copy kept in memory) and the pruned model, timed alternately.

    >>> prune("smollm2-135m-instruct", "models/smol-8l", layers=8, heads=1, ffn=0.25)["after"]["parameters"]
    """
    from stepdistill.students import MODEL_INFO
    from stepdistill.students import _save_atomic

    out = Path(out)
    if out.exists():
        raise StepDistillError(f"{out} exists: choose a new --out (prune never overwrites)")
    if (hit := protected_path(out, (model,))) is not None:
        raise StepDistillError(f"--out {out} holds {hit}: choose another --out")
    if importance == "taylor" and task is None:
        raise StepDistillError("taylor importance needs --task: its gradients come from the task's training examples")
    if not (layers or heads or ffn or sparsity):
        raise StepDistillError("nothing to prune: give --layers, --heads, --ffn or --sparsity")
    student, info, info_dir = _load(model)
    net = student.model
    n_layers = len(_layers(net))
    # Check every option before the slow measurements, so a typo costs seconds, not minutes.
    indices = select_layers(n_layers, layers, strategy) if layers else None
    _plan(net, heads, ffn)
    if not 0 <= sparsity < 1:
        raise StepDistillError(f"--sparsity {sparsity}: the share of weights to zero must be in [0, 1)")
    prefix = info["label_prefix"] if info else ""
    split = split or "test"
    measure_kw: dict[str, Any] = {}
    if task is not None:
        measure_kw = dict(task=task, split=split, data=data, limit=limit, prefix=prefix, fmt=student.fmt)
        if info is None:
            echo(f"note: {model} is not a trained stepdistill model: accuracy reads the raw input (no label prefix)")

    def snapshot() -> dict[str, Any]:
        return {**measure(net, student.tokenizer, timed=False, **measure_kw),
                "zero_fraction": sparsity_report(net)["overall"]}

    echo(f"measuring {model} ({n_layers} layers) ...")
    before = snapshot()
    # The original is timed beside the pruned model at the end, run for run: timing them minutes
    # apart on a shared machine measured the same model at 100 and 290 ms/prediction.
    original = copy.deepcopy(net)
    steps: dict[str, Any] = {}
    if indices is not None:
        steps["layers"] = {"strategy": strategy, **keep_layers(net, indices)}
    if heads or ffn:
        batches = None
        if importance == "taylor":
            from stepdistill.tasks import get_task, load_examples

            train = load_examples(get_task(task), "train", data, taylor_examples)
            batches = taylor_batches(student, train, prefix=prefix)
        steps["structured"] = prune_structured(net, heads=heads, ffn=ffn, importance=importance, batches=batches)
    if sparsity:
        rep = prune_magnitude(net, sparsity, scope)
        steps["magnitude"] = {k: v for k, v in rep.items() if k != "modules"}
    echo("measuring the pruned model ...")
    after = snapshot()
    t_before, t_after = latency([original, net], student.tokenizer, repeats=latency_repeats)
    before.update(t_before)
    after.update(t_after)
    del original
    report = {"source": str(model), "out": str(out), "steps": steps, "before": before, "after": after,
              "options": {"layers": layers, "strategy": strategy, "heads": heads, "ffn": ffn,
                          "importance": importance, "sparsity": sparsity, "scope": scope,
                          "task": task, "split": split if task else None, "limit": limit}}
    if sparsity:
        report["note"] = MAGNITUDE_NOTE
    files = {"prune_report.json": json.dumps(report, indent=2) + "\n",
             MARKER: json.dumps(new_marker("prune"), indent=2) + "\n"}
    if info_dir is not None:
        files[MODEL_INFO] = (info_dir / MODEL_INFO).read_text()
    _save_atomic(net, student.tokenizer, out, source=Path(str(model)), extra_files=files)
    for line in table(before, after):
        echo(line)
    if sparsity:
        echo(f"note: {MAGNITUDE_NOTE} (compare the size and ms rows above)")
    echo(f"wrote {out} and {out / 'prune_report.json'}")
    return report
