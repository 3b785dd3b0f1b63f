"""`stepdistill serve` under load: small requests' latency while the largest legal requests run,
the fair scheduler against fifo (what one global lock did before), in one run.

For each scheduler (--repeats times, alternated: fifo, fair, fifo, fair) the server is started as
a subprocess on a free 127.0.0.1 port (`stepdistill serve --scheduler ...`, every other setting at
its default). Then:

  large clients   --large-clients threads, each sending the largest request the default limits
                  accept (256 inputs, 32,768 input tokens in all) back to back
  small requests  --small requests of one short input, one every --interval seconds (open loop:
                  each in its own thread, so a slow answer does not delay the next request)

The large clients stop after their current request once --window seconds have passed and every
small request is answered, so both schedulers answer about as many large requests. Reported: the
small requests' p50 / p99 / max latency and the large requests' p50 latency, per run and pooled
per scheduler, the fifo/fair ratios of the pooled figures, and the CPU time other processes took
on the machine during each run (the noise to judge the comparison by). Everything is bounded by
--time-limit; the servers are stopped at the end.

The student: by default a randomly initialised T5 (--d-model, --layers; word-level tokenizer)
saved to a temp folder, which generates as many label tokens as a trained label allows; or a
trained run or model folder with --model.

    python bench/serve_load.py                       # about 2 minutes on 2 CPU cores
    python bench/serve_load.py --model runs/quickstart/student-standard
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import write_results  # bench/common.py (the script's folder is on sys.path)

HERE = Path(__file__).parent
FILLER = ("tom has three red apples and buys four more at the market so how many apples does he have now "
          "if each box holds six eggs and she fills nine boxes what is the total").split()
SMALL = "tom has three apples and buys four more so how many apples does he have"
MAX_INPUTS, MAX_REQUEST_TOKENS = 256, 32_768  # stepdistill.serve's defaults: the largest legal request


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a trained run or model folder (default: a random T5 made here)")
    p.add_argument("--d-model", type=int, default=128, help="the random T5's width")
    p.add_argument("--layers", type=int, default=4, help="the random T5's encoder and decoder layers")
    p.add_argument("--schedulers", default="fifo,fair", help="compared in this order")
    p.add_argument("--small", type=int, default=40, help="small requests per scheduler")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between small requests")
    p.add_argument("--large-clients", type=int, default=2, help="clients sending large requests back to back")
    p.add_argument("--window", type=float, default=12, help="seconds the large clients keep sending, at least")
    p.add_argument("--repeats", type=int, default=2, help="runs of each scheduler, alternated")
    p.add_argument("--time-limit", type=float, default=170, help="seconds for the whole benchmark")
    p.add_argument("--out", default=str(HERE / "results" / "serve_load"))
    args = p.parse_args()
    deadline = time.monotonic() + args.time_limit
    names = args.schedulers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_student(Path(tmp) / "random-t5", args.d_model, args.layers)
        large = large_inputs(model)
        # alternated (fifo, fair, fifo, fair): drift and other processes on the machine hit both alike
        runs = []
        for k in range(args.repeats):
            for name in names:
                if deadline - time.monotonic() < args.window + 20:  # a run would not fit: report what ran
                    print(f"skipped {name} run {k + 1}: --time-limit reached", flush=True)
                    continue
                runs.append({"scheduler": name, "repeat": k, **measure(name, model, large, args, deadline)})
    names = [n for n in names if any(r["scheduler"] == n for r in runs)]
    pooled = {name: summary([x for r in runs if r["scheduler"] == name for x in r["small_ms"]],
                            [x for r in runs if r["scheduler"] == name for x in r["large_ms"]]) for name in names}
    result = {"benchmark": "serve_load", "command": "python " + " ".join(sys.argv),
              "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "model": args.model or f"random T5, d_model {args.d_model}, {args.layers}+{args.layers} layers",
              "small_input": SMALL, "large_request": f"{len(large)} inputs, {MAX_REQUEST_TOKENS} input tokens",
              "small_requests": args.small, "interval_s": args.interval, "large_clients": args.large_clients,
              "window_s": args.window, "pooled": pooled, "runs": runs}
    same = len({json.dumps(r["large_labels"]) for r in runs if r["large_labels"]}) == 1
    lines = [f"# serve under load: {result['model']}", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}  ",
             f"{args.small} small requests (1 input) one every {args.interval} s while {args.large_clients} clients "
             f"send the largest legal request ({result['large_request']}) back to back, for at least "
             f"{args.window:g} s; each scheduler {args.repeats} times, alternated.", "",
             "| scheduler | run | small answered | small p50 ms | small p99 ms | small max ms | large answered "
             "| large p50 ms | others' CPU s / wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['scheduler']} | {r['repeat'] + 1} | {r['small_ok']}/{args.small} | {r['small_p50_ms']} "
                     f"| {r['small_p99_ms']} | {r['small_max_ms']} | {r['large_ok']} | {r['large_p50_ms']} "
                     f"| {r['others_cpu_s']} / {r['wall_s']} |")
    for name, r in pooled.items():
        lines.append(f"| **{name}** | all | {r['small_ok']}/{args.small * args.repeats} | {r['small_p50_ms']} "
                     f"| {r['small_p99_ms']} | {r['small_max_ms']} | {r['large_ok']} | {r['large_p50_ms']} | |")
    if {"fifo", "fair"} <= set(names) and pooled["fair"]["small_p50_ms"] and pooled["fair"]["large_p50_ms"]:
        ratio = {k: round(pooled["fifo"][k] / pooled["fair"][k], 2)
                 for k in ("small_p50_ms", "small_p99_ms", "large_p50_ms")}
        result["fifo_over_fair"] = ratio
        lines += ["", f"fifo / fair, all runs: small p50 {ratio['small_p50_ms']}x, small p99 "
                      f"{ratio['small_p99_ms']}x, large p50 {ratio['large_p50_ms']}x."]
    result["large_labels_identical"] = same
    lines.append(f"The large request's labels are {'identical' if same else 'DIFFERENT'} in every run.")
    for r in runs:
        del r["large_labels"]
    write_results(result, Path(args.out), lines)


def summary(small_ms: list[float], large_ms: list[float]) -> dict:
    return {"small_ok": len(small_ms), "small_p50_ms": pct(small_ms, 50), "small_p99_ms": pct(small_ms, 99),
            "small_max_ms": round(max(small_ms), 1) if small_ms else None, "large_ok": len(large_ms),
            "large_p50_ms": pct(large_ms, 50)}


def random_student(folder: Path, d_model: int, layers: int) -> str:
    """A randomly initialised T5 with a word-level tokenizer over FILLER, saved as a trained model."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = ["<pad>", "</s>", "<unk>", "predict", "explain", ":", *sorted(set(FILLER) | set(SMALL.split()))]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(words), d_model=d_model, d_kv=d_model // 4, d_ff=4 * d_model, num_layers=layers,
                   num_decoder_layers=layers, num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    fmt = {"kind": "seq2seq", "separator": "\n", "max_input_length": 512, "max_target_length": 256,
           "task_marker": "encoder", "version": 1}
    # max_label_tokens 6: the server generates up to 9 tokens, a short label's worth
    (folder / "stepdistill.json").write_text(json.dumps({"method": "standard", "label_prefix": "predict: ",
                                                          "rationale_prefix": "explain: ", "format": fmt,
                                                          "max_label_tokens": 6}))
    return str(folder)


def large_inputs(model: str) -> list[str]:
    """256 inputs of FILLER words, each as long as keeps the request within the default token cap."""
    from stepdistill.evaluation import load_trained
    from stepdistill.methods.formatting import encode_source

    student, info = load_trained(model)
    per_input = MAX_REQUEST_TOKENS // MAX_INPUTS

    def text(n_words: int, start: int = 0) -> str:
        return " ".join(FILLER[(start + i) % len(FILLER)] for i in range(n_words))

    n_words = 1
    while len(encode_source(student.tokenizer, student.fmt, info["label_prefix"], text(n_words + 1))) <= per_input:
        n_words += 1  # a word at a time while the input stays within its share of the cap
        assert n_words < 10 * per_input, "the tokenizer makes no tokens of FILLER"
    return [text(n_words, k) for k in range(MAX_INPUTS)]


def measure(scheduler: str, model: str, large: list[str], args, deadline: float) -> dict:
    """One run: a fresh server with `scheduler`, the large clients and the small requests."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "import sys; from stepdistill.cli import main; main(sys.argv[1:])", "serve",
           "--model", model, "--port", str(port), "--scheduler", scheduler, "--dtype", "float32"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            assert server.poll() is None, f"the server exited: {server.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not start within --time-limit"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        small_ms, large_ms, labels = [], [], []
        small_done = threading.Event()
        cpu0, wall0 = machine_and_own_cpu(server.pid), time.monotonic()
        window_end = wall0 + args.window

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        def large_client() -> None:
            while (not small_done.is_set() or time.monotonic() < window_end) and time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = httpx.post(f"{base}/predict", json={"inputs": large}, timeout=left())
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    large_ms.append(1000 * (time.perf_counter() - t0))
                    labels[:] = labels or [p["label"] for p in r.json()["predictions"]]

        def small_request() -> None:
            t0 = time.perf_counter()
            try:
                r = httpx.post(f"{base}/predict", json={"input": SMALL}, timeout=left())
            except httpx.TransportError:
                return
            if r.status_code == 200:
                small_ms.append(1000 * (time.perf_counter() - t0))

        bigs = [threading.Thread(target=large_client, daemon=True) for _ in range(args.large_clients)]
        for t in bigs:
            t.start()
        time.sleep(1.0)  # the large requests are in flight before the first small one
        smalls = []
        for _ in range(args.small):
            smalls.append(threading.Thread(target=small_request, daemon=True))
            smalls[-1].start()
            time.sleep(args.interval)
        for t in smalls:
            t.join(left())
        small_done.set()
        for t in bigs:
            t.join(left())
        cpu1, wall = machine_and_own_cpu(server.pid), round(time.monotonic() - wall0, 1)
        others = round((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]), 1) if cpu0 and cpu1 else None
        print(f"{scheduler}: {len(small_ms)} small, {len(large_ms)} large answered in {wall} s", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return {**summary(small_ms, large_ms), "wall_s": wall, "others_cpu_s": others,
            "small_ms": [round(x, 1) for x in small_ms], "large_ms": [round(x, 1) for x in large_ms],
            "large_labels": labels}


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (p99 of 40 samples is the largest)."""
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, -(-len(s) * q // 100) - 1))], 1)


def machine_and_own_cpu(server_pid: int) -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and the server):
    their difference over a run is what other processes took. Linux only (None elsewhere)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        server = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = int(server[11]) + int(server[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()
    return busy / tick, own / tick + t.user + t.system


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
