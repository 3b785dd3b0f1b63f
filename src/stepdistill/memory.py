"""Will the model fit? A cheap estimate before loading, so a model too big for this machine
fails at once with a clear message instead of swapping for minutes or being OOM-killed.

    check_load(config, AutoModelForCausalLM, dtype=None, what="student 'x'")   # before from_pretrained
    check_training(student.model, device="cuda")                               # before the optimizer exists

Estimates (rough on purpose; activations and the KV cache are not counted):
- loading / inference: parameters x bytes per parameter x 1.2;
- training with Adam: weights, plus for each trainable parameter a gradient (its dtype) and two
  fp32 moments; x 1.2. Full fp32 fine-tuning is so 4x the weights (16 bytes per parameter);
  LoRA adds almost nothing.

Available memory: psutil's `available` (else MemAvailable from /proc/meminfo), lowered to what a
cgroup memory limit leaves (containers); on a CUDA device, the device's free memory. When it
cannot be read the check is skipped. `STEPDISTILL_SKIP_MEMORY_CHECK=1` skips it too (the
estimate is rough: swap, for one, is not counted).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any

from stepdistill.errors import StepDistillError

log = logging.getLogger(__name__)


def resolve_bf16(bf16: bool | None) -> bool:
    """training.bf16, or (None) whether this machine has fast bf16: a GPU that supports it, or a
    CPU with AVX512-BF16 / AMX (elsewhere CPU bf16 is emulated, and slower than float32). bf16
    asked for on a CPU without them is kept, with a warning: it reproduces a bf16 run, slowly."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported() if bf16 is None else bf16
    fast = _cpu_has_fast_bf16()
    if bf16 and fast is False:
        log.warning("training.bf16 is true, but this CPU has no AVX512-BF16 or AMX: bf16 is emulated here and "
                    "slower than float32 (the benchmark's T5 trained at 0.42x, bench/results/train_throughput_fp32cpu.md); "
                    "set training.bf16: auto for speed, keep true only to reproduce a bf16 run")
    return bool(fast) if bf16 is None else bf16


def _cpu_has_fast_bf16() -> bool | None:
    """Whether /proc/cpuinfo lists AVX512-BF16 or AMX-BF16; None where it cannot be read (not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


GiB = 1024**3
INFERENCE_FACTOR = 1.2  # weights + buffers, allocator slack, the transient copies of loading
ADAM_MOMENT_BYTES = 8  # two fp32 moments per trainable parameter
SKIP_ENV = "STEPDISTILL_SKIP_MEMORY_CHECK"
_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                      "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


class InsufficientMemoryError(StepDistillError):
    """The model (or its training state) clearly does not fit in the memory left."""


# ---------------------------------------------------------------- what is available


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes a cgroup memory limit still leaves: limit - (usage - inactive file cache), or None."""
    limit = _read_int(root / "memory.max")  # v2
    if limit is not None:
        used = (_read_int(root / "memory.current") or 0) - _cgroup_stat(root / "memory.stat", "inactive_file")
        return max(0, limit - max(0, used))
    limit = _read_int(root / "memory" / "memory.limit_in_bytes")  # v1
    if limit is not None and limit < 1 << 60:  # v1 writes a huge number for no limit
        used = (_read_int(root / "memory" / "memory.usage_in_bytes") or 0) - _cgroup_stat(
            root / "memory" / "memory.stat", "total_inactive_file")
        return max(0, limit - max(0, used))
    return None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: Any = None) -> int | None:
    """Bytes this process can still allocate on `device` (None/"cpu": RAM), or None if unknown."""
    if device is not None and str(device).startswith("cuda"):
        try:
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        except Exception:  # noqa: BLE001  (no driver, bad index: no check rather than a crash)
            return None
    try:
        import psutil

        ram: int | None = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001  (not installed, or an unreadable /proc)
        ram = _meminfo_available()
    cgroup = _cgroup_available()
    known = [x for x in (ram, cgroup) if x is not None]
    return min(known) if known else None


# ---------------------------------------------------------------- what is needed


def dtype_bytes(dtype: Any) -> int:
    """Bytes per parameter of a torch dtype (or its name); None = float32, transformers' default."""
    import torch

    if dtype is None or dtype == "auto":
        return 4
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), torch.float32)
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4


def parameters_from_config(config: Any, auto: Any, *, trust_remote_code: bool = False) -> int | None:
    """Parameter count of the model `auto.from_config(config)` would build, built on the meta
    device (no memory, well under a second); None if the architecture cannot be built so."""
    import torch

    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except Exception as e:  # noqa: BLE001  (an estimate only: never the reason a load fails)
        log.debug("could not count the parameters from the config (%s)", e)
        return None


def parameters_on_disk(folder: str | Path) -> int | None:
    """Parameter count from the headers of a folder's *.safetensors files (reads a few KB), or None."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    try:
        for f in files:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for name, t in header.items():
                if name != "__metadata__":
                    count = 1
                    for d in t["shape"]:
                        count *= d
                    n += count
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return n


def parameters_in_gguf(path: str | Path) -> int | None:
    """Parameter count of a GGUF file from its tensor table (needs the `gguf` package), or None."""
    try:
        from gguf import GGUFReader

        total = 0
        for t in GGUFReader(str(path)).tensors:
            count = 1
            for d in t.shape:
                count *= int(d)
            total += count
        return total
    except Exception as e:  # noqa: BLE001
        log.debug("could not count the parameters of %s (%s)", path, e)
        return None


def load_bytes(n_params: int, dtype: Any = None) -> int:
    """Memory to load (and run) a model of `n_params` parameters in `dtype`."""
    return int(n_params * dtype_bytes(dtype) * INFERENCE_FACTOR)


def training_bytes(n_params: int, n_trainable: int | None = None, dtype: Any = None) -> int:
    """Memory to fine-tune with Adam: weights + a gradient and two fp32 moments per trainable
    parameter, x 1.2 (activations not counted). `n_trainable` None = full fine-tuning."""
    b = dtype_bytes(dtype)
    n_trainable = n_params if n_trainable is None else n_trainable
    return int((n_params * b + n_trainable * (b + ADAM_MOMENT_BYTES)) * INFERENCE_FACTOR)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def require(need: int, what: str, *, hint: str, device: Any = None, available: int | None = None) -> None:
    """Raise InsufficientMemoryError when `need` bytes clearly exceed what `device` has left;
    log a warning when it is close (over 80%). Unknown available memory: no check."""
    if os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    if available is None:
        available = available_memory(device)
    if available is None:
        log.debug("available memory unknown: the memory check of %s is skipped", what)
        return
    where = f" on {device}" if device is not None and str(device) != "cpu" else ""
    if need > available:
        raise InsufficientMemoryError(
            f"{what} needs about {_gib(need)} of memory{where}, and {_gib(available)} is available: {hint} "
            f"(if the estimate is wrong, e.g. with swap, set {SKIP_ENV}=1)"
        )
    if need > 0.8 * available:
        log.warning("%s needs about %s of the %s available%s: it may swap or be killed", what, _gib(need),
                    _gib(available), where)


LOAD_HINT = ("use a smaller model, load it in bfloat16 (load_pretrained(..., dtype=torch.bfloat16)), "
             "or a machine with more memory")
TRAIN_HINT = ("use LoRA (student.lora), bfloat16 weights, a smaller model, or a machine with more memory")


def check_load(config: Any, auto: Any, *, dtype: Any = None, what: str, source: str | Path | None = None,
               trust_remote_code: bool = False, available: int | None = None) -> int | None:
    """Before `auto.from_pretrained(source, dtype=dtype)`: raise if the model clearly cannot be
    loaded in the memory left. Returns the estimated parameter count (None if unknown).

    Pre-quantised checkpoints (a `quantization_config`: GPTQ, AWQ, bitsandbytes) are not
    estimated: their size per parameter depends on the method, and a guess could refuse a model
    that fits."""
    if getattr(config, "quantization_config", None):
        return None
    n = parameters_from_config(config, auto, trust_remote_code=trust_remote_code)
    if n is None and source is not None and Path(source).is_dir():
        n = parameters_on_disk(source)
    if n is None:
        return None
    label = str(dtype).removeprefix("torch.") if dtype not in (None, "auto") else "float32"
    require(load_bytes(n, dtype), f"{what} ({n / 1e6:,.1f}M parameters in {label})", hint=LOAD_HINT,
            available=available)
    return n


def check_training(model: Any, *, device: Any = None, what: str = "training", available: int | None = None) -> int:
    """Before training `model` (already loaded) with Adam on `device`: raise if weights, gradients
    and optimizer moments clearly do not fit. On the CPU the weights already sit in memory, so
    only the gradients and moments must still fit; on a GPU, everything. Returns the estimate."""
    params = list({id(p): p for p in model.parameters()}.values())
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(p.numel() * (p.element_size() + ADAM_MOMENT_BYTES) for p in params if p.requires_grad)
    on_gpu = device is not None and str(device).startswith("cuda")
    need = int(((weights if on_gpu else 0) + state) * INFERENCE_FACTOR)
    n = sum(p.numel() for p in params)
    require(need, f"{what} ({n / 1e6:,.1f}M parameters, "
                  f"{sum(p.numel() for p in params if p.requires_grad) / 1e6:,.1f}M trainable, with Adam)",
            hint=TRAIN_HINT, device=device, available=available)
    return need
