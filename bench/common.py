"""What the benchmarks share: writing results, and whether llama.cpp is installed."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(result: dict, out: Path, lines: list[str]) -> None:
    """out.json (every figure) and out.md (the table, `lines`), and the table printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
