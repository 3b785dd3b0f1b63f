"""What the benchmarks share: writing results, the CPU and its matmul peak, peak memory, and whether llama.cpp is installed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu() -> dict:
    """The CPU a figure was measured on: its model name, cores, and the flags that decide which
    kernels run fast (bf16 is emulated without avx512_bf16 or AMX)."""
    import os
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": name, "cores": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS},
            "python": platform.python_version()}


def matmul_rate(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 10, a_transposed: bool = False) -> float:
    """FLOP/s of the best of `repeats` (m x k) @ (k x n) matmuls in `dtype` (torch's own kernels);
    `a_transposed`: the left operand is a transposed view, as a backward pass's often is."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(k, m, dtype=dt).t() if a_transposed else torch.randn(m, k, dtype=dt)
    b = torch.randn(k, n, dtype=dt)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """The machine's matmul peak in `dtype`: an n x n x n product's FLOP/s."""
    return matmul_rate(n, n, n, dtype, repeats)


class MatmulPeaks:
    """The machine's matmul peak in float32 and bfloat16, probed several times in a run (its speed
    drifts with other tenants, by up to 2x): `probe()` between rows, `best` the highest seen."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {"float32": [], "bfloat16": []}

    def probe(self) -> None:
        for dtype, seen in self.seen.items():
            seen.append(matmul_peak(dtype))
        print("matmul peak: " + ", ".join(f"{k} {v[-1] / 1e9:.0f} GFLOP/s" for k, v in self.seen.items()), flush=True)

    @property
    def best(self) -> dict[str, float]:
        return {k: max(v) for k, v in self.seen.items()}

    def as_json(self) -> dict:
        return {"matmul_peak_gflop_per_s": {k: round(v / 1e9, 1) for k, v in self.best.items()},
                "matmul_probes_gflop_per_s": {k: [round(x / 1e9, 1) for x in v] for k, v in self.seen.items()}}


def selected_rows(parser, asked: list[str] | None, rows) -> list[str]:
    """The rows `--rows` names, in the table's order (all where it names none); an unknown name is a
    usage error, so that a renamed row cannot silently drop out of a rerun."""
    unknown = sorted(set(asked or ()) - set(rows))
    if unknown:
        parser.error(f"unknown --rows {unknown}; the rows are {list(rows)}")
    return [r for r in rows if not asked or r in asked]


def write_results(result: dict, out: Path, lines: list[str]) -> None:
    """out.json (every figure, with the CPU it was measured on) and out.md (the table, `lines`, and
    the CPU), and the table printed."""
    result.setdefault("cpu", cpu())
    c = result["cpu"]
    lines = [*lines, "", f"CPU: {c['model']}, {c['cores']} cores; "
             + ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in c["flags"].items()) + "."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.mb = round((self.peak - self.base) / 1e6, 1)


def has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
