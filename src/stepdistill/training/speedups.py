"""CPU speed-ups that leave what training computes unchanged (or, for dropout, its distribution):
cheaper dropout masks, torch's fused GELU kernel, and length-grouped batches. Each is a
TrainingConfig switch, measured in bench/ (docs/performance.md)."""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Shuffled, then sorted by length within groups of 50 batches (transformers'
    get_length_grouped_indices), so a batch wastes little padding. Seeded by (seed, epoch): a
    resumed run sees the same order."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


class FastDropout(torch.nn.Dropout):
    """Dropout with a cheaper mask on CPUs. torch draws one random float per element (bernoulli_),
    serially from its Mersenne Twister, and on a CPU that costs about 60x the multiply that
    applies the mask: a tenth of a small T5's training step. Here each element gets a 16-bit
    uniform draw, four to a 64-bit number of numpy's SFC64 generator (seeded by one draw from
    torch's generator, so a seed, and a checkpoint's saved RNG state, still fix the masks). An
    element is dropped when its draw falls below round(p * 65536), so the drop rate is p to
    within 2**-17, and the kept values are scaled by 1 / (1 - that rate). The mask is made in
    numpy as the bit patterns of 0 and that scale in x's dtype, so applying it is one multiply
    (5.8 -> about 1.2 ms for a T5 feed-forward activation of 1.1M bf16 elements). Off the CPU,
    torch's own dropout; an identity in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or x.dtype not in _BITS:
            return torch.nn.functional.dropout(x, self.p, True, self.inplace)
        import numpy as np

        n, drop = x.numel(), round(self.p * 65536)
        seed = int(torch.randint(2**62, (1,)))
        draws = np.random.SFC64(seed).random_raw(-(-n // 4)).view(np.int16)[:n]
        scale = torch.tensor(65536 / (65536 - drop), dtype=x.dtype).view(_BITS[x.dtype]).item()
        width = np.int16 if x.element_size() == 2 else np.int32
        mask = np.multiply(draws >= drop - 32768, width(scale))  # the bits of 0 or the scale
        return x * torch.from_numpy(mask).view(x.dtype).view(x.shape)


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _swap_modules(model: torch.nn.Module, replacement) -> int:
    """Replace every submodule for which `replacement(child)` gives a module; the number replaced."""
    swapped = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(module, name, new)
                swapped += 1
    return swapped


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap every torch Dropout module of `model` for FastDropout (same p); the number swapped.
    Functional dropout calls (some attention implementations) are left as they are."""
    return _swap_modules(model, lambda m: FastDropout(m.p, m.inplace)
                         if type(m) is torch.nn.Dropout and m.p > 0 else None)


def use_fused_gelu(model: torch.nn.Module) -> int:
    """Swap every transformers NewGELU / FastGELU module of `model` (Python code: eight
    elementwise passes forward, autograd's dozen backward) for GELUTanh, torch's fused kernel of
    the same tanh approximation (transformers: "equivalent ... but much faster", not bit-exact);
    the number swapped. 8.0 -> 4.1 ms forward and backward on a T5 feed-forward activation."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    return _swap_modules(model, lambda m: GELUTanh() if type(m) in (NewGELUActivation, FastGELUActivation) else None)
