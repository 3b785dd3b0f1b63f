"""Which models pruning supports, and layer pruning: choose decoder layers, keep only those.

    keep_layers(model, select_layers(30, 8, "spread"))     # 30 -> 8 decoder layers, in place
    cut_layers("smollm2-135m-instruct", 8, "models/smol-8l", strategy="spread")   # loaded, cut, saved
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch import nn

from stepdistill.errors import StepDistillError

Strategy = Literal["spread", "first", "every"]
SUPPORTED = ("llama", "mistral", "qwen2")  # config.model_type of the supported families


# --- which models ---------------------------------------------------------------------------

def decoder_layers(model) -> nn.ModuleList:
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
    layers = decoder_layers(model)
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
    """A pretrained causal LM with `keep` of its decoder layers (chosen by select_layers with
    `strategy`), its embeddings and tokenizer, saved to `out`.

    >>> cut_layers("smollm2-135m-instruct", 8, "models/smol-8l", strategy="spread")
    """
    from stepdistill.students import load_pretrained, refuse_existing, save_atomic

    refuse_existing(Path(out))  # before the (slow) load
    student = load_pretrained(source, gguf_file, kind="causal")
    keep_layers(student.model, select_layers(len(decoder_layers(student.model)), keep, strategy))
    return save_atomic(student.model, student.tokenizer, Path(out))
