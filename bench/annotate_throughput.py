"""Annotation throughput: `stepdistill annotate` with the openai teacher vs a plain load generator.

One local OpenAI-compatible server, in its own process, answers every request after a fixed
service time (`--latency`, default 50 ms: a GPU server's batch slot, so the numbers measure the
client, not a model). At each concurrency (1, 4, 16, 64) the same requests (every SVAMP training
input x 4 self-consistency samples) go out twice:

- `stepdistill`: the full `annotate` call (prompts, store commits, parsing, verification,
  annotations.jsonl), a fresh store each time so every completion is requested;
- `loadgen`: a bare asyncio + aiohttp loop firing the same request bodies, reading only the usage.

Target: at its best concurrency, stepdistill reaches >= 0.9 of the load generator's maximum.

    python bench/annotate_throughput.py                       # writes bench/results/annotate_throughput.{md,json}
    python bench/annotate_throughput.py --url http://127.0.0.1:8080/v1 --model smollm2   # a real server
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results  # bench/common.py (the script's folder is on sys.path)

import aiohttp
import httpx

from stepdistill import api
from stepdistill.tasks import get_task, load_examples
from stepdistill.teachers.openai import OpenAITeacher
from stepdistill.config import TeacherConfig
from stepdistill.teachers import Request

HERE = Path(__file__).parent
# The fake server runs a thread per connection; CPython's default 5 ms GIL switch interval makes
# 64 such threads convoy (the server, not the client, then caps throughput), so it is shortened.
SERVE = ("import sys; sys.setswitchinterval(1e-4); sys.argv[0] = 'openai_server'; "
         "from stepdistill.testing.openai_server import main; main()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "--port", str(port),
                             "--latency", str(latency)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(100):
        try:
            httpx.get(f"{url}/models", timeout=1).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the benchmark server did not start")


def teacher_cfg(url: str, model: str, concurrency: int, max_new_tokens: int) -> dict:
    return {"kind": "openai", "base_url": url, "model": model, "concurrency": concurrency,
            "endpoint": "completions", "sampling": {"max_new_tokens": max_new_tokens, "temperature": 0.7}}


def run_stepdistill(url, model, task_name, data, split, n, k, concurrency, max_new_tokens) -> dict:
    """The whole `annotate` call, timed end to end (loading, store, parsing and files included)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"task": {"name": task_name, "path": data}, "split": split, "limit": n,
               "teacher": teacher_cfg(url, model, concurrency, max_new_tokens),
               "verify": {"samples": k, "against": "majority"}}
        t0 = time.perf_counter()
        s = api.annotate(cfg, Path(tmp) / "run", store_path=Path(tmp) / "store.sqlite", echo=lambda _: None)
        seconds = time.perf_counter() - t0
    assert s["generated"] == n * k, s
    return {"completions_per_s": n * k / seconds, "tokens_per_s": s["usage"]["completion_tokens"] / seconds,
            "seconds": seconds, "requests": n * k}


async def _loadgen(url, bodies, concurrency) -> tuple[int, float]:
    tokens = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        it = iter(bodies)

        async def worker():
            nonlocal tokens
            for body in it:
                async with session.post(f"{url}/completions", json=body) as r:
                    tokens += (await r.json())["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens, time.perf_counter() - t0


def run_loadgen(url, model, task_name, data, split, n, k, concurrency, max_new_tokens) -> dict:
    """The same request bodies the teacher sends, from a bare client: the ceiling to compare with."""
    task = get_task(task_name)
    examples = load_examples(task, split, data, n)
    teacher = OpenAITeacher(TeacherConfig(**teacher_cfg(url, model, concurrency, max_new_tokens)),
                            task=task, split=split, data_path=data)
    bodies = [teacher._body(Request(e, teacher.prompt(task, e), j))[1] for e in examples for j in range(k)]
    tokens, seconds = asyncio.run(_loadgen(url, bodies, concurrency))
    return {"completions_per_s": len(bodies) / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "requests": len(bodies)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an existing OpenAI-compatible server (default: start the local one)")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--latency", type=float, default=0.05, help="service time of the local server, seconds")
    p.add_argument("--task", default="svamp")
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "sbs"))
    p.add_argument("--split", default="train")
    p.add_argument("-n", type=int, default=700, help="examples per measurement (concurrency 1 uses n/8)")
    p.add_argument("-k", type=int, default=4, help="self-consistency samples per example (requests = n * k)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=str(HERE / "results" / "annotate_throughput"))
    args = p.parse_args()
    if "STEPDISTILL_HOME" not in os.environ:  # a home of its own, removed when the benchmark exits
        home = tempfile.TemporaryDirectory(prefix="annotate-bench-home-")
        os.environ["STEPDISTILL_HOME"] = home.name

    server, url = (None, args.url) if args.url else start_server(args.latency)
    rows = []
    try:
        for c in args.concurrency:
            n = max(1, args.n // 8) if c == 1 else args.n
            common = (url, args.model, args.task, args.data, args.split, n, args.k, c, args.max_new_tokens)
            lg = run_loadgen(*common)
            sd = run_stepdistill(*common)
            rows.append({"concurrency": c, "stepdistill": sd, "loadgen": lg})
            print(f"concurrency {c:>3}: stepdistill {sd['completions_per_s']:7.1f}/s  loadgen {lg['completions_per_s']:7.1f}/s",
                  flush=True)
    finally:
        if server:
            server.terminate()
            server.wait()
    best = max(rows, key=lambda r: r["stepdistill"]["completions_per_s"])
    lg_max = max(r["loadgen"]["completions_per_s"] for r in rows)
    ratio = best["stepdistill"]["completions_per_s"] / lg_max
    result = {
        "benchmark": "annotate_throughput", "server": args.url or f"stepdistill.testing.openai_server, latency {args.latency}s",
        "task": f"{args.task}/{args.split}", "examples": args.n, "samples": args.k, "max_new_tokens": args.max_new_tokens, "rows": rows,
        "best_concurrency": best["concurrency"], "ratio_to_loadgen_max": round(ratio, 3), "target": 0.9,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": "python " + " ".join(sys.argv),
    }
    out = Path(args.out)
    lines = [
        f"# Annotation throughput ({result['server']})", "",
        f"Task {result['task']}: {args.n} examples x {args.k} samples ({args.n // 8} at concurrency 1), "
        f"max_new_tokens {args.max_new_tokens}, {result['machine']}.",
        f"Command: `{result['command']}`", "",
        "| concurrency | stepdistill completions/s | stepdistill tokens/s | load generator completions/s | load generator tokens/s | ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sd, lg = r["stepdistill"], r["loadgen"]
        lines.append(f"| {r['concurrency']} | {sd['completions_per_s']:.1f} | {sd['tokens_per_s']:.0f} | "
                     f"{lg['completions_per_s']:.1f} | {lg['tokens_per_s']:.0f} | "
                     f"{sd['completions_per_s'] / lg['completions_per_s']:.2f} |")
    lines += ["", f"Best stepdistill (concurrency {best['concurrency']}) / load generator maximum: "
              f"**{ratio:.2f}** (target >= 0.9)."]
    write_results(result, out, lines)


if __name__ == "__main__":
    main()
