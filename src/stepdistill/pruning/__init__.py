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

    layers.py      which models are supported (decoder_layers); choosing and keeping decoder
                   layers, and cut_layers (load, cut, save)
    structured.py  removing KV head groups and FFN neurons by magnitude or taylor importance
    magnitude.py   zeroing the smallest weights, and measuring the zero fraction
    measuring.py   parameters, size on disk, latency and accuracy; the before/after table
    command.py     prune(): all of the above in order, measured before and after, saved
"""

from stepdistill.pruning.command import prune
from stepdistill.pruning.layers import SUPPORTED, Strategy, cut_layers, decoder_layers, keep_layers, select_layers
from stepdistill.pruning.magnitude import MAGNITUDE_NOTE, prune_magnitude, sparsity_report
from stepdistill.pruning.measuring import DEFAULT_PROMPTS, folder_bytes, latency, measure, table
from stepdistill.pruning.structured import Importance, plan_structured, prune_structured, taylor_batches

__all__ = [
    "DEFAULT_PROMPTS", "MAGNITUDE_NOTE", "SUPPORTED", "Importance", "Strategy", "cut_layers", "decoder_layers",
    "folder_bytes", "keep_layers", "latency", "measure", "plan_structured", "prune", "prune_magnitude",
    "prune_structured", "select_layers", "sparsity_report", "table", "taylor_batches",
]
