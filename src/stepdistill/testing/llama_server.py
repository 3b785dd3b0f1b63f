"""llama.cpp's own server (llama-cpp-python's `llama_cpp.server`) on 127.0.0.1 for the length of a
`with` block: what the slow tests and the benchmarks run a GGUF behind.

    with llama_server(gguf, log_file, "--logits_all", "true") as url:   # url: http://127.0.0.1:PORT/v1
        ...
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port(preferred: int | None = None) -> int:
    """`preferred` where it is free (a URL that stays the same across runs), else any free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


@contextmanager
def llama_server(gguf: str | Path, log: str | Path, *args: str, port: int | None = None,
                 timeout: float = 180.0) -> Iterator[str]:
    """Start the server on `gguf` (extra command-line `args`, e.g. "--n_ctx", "2048"), wait until
    /v1/models answers, yield its API root; stop it on leaving. Its output goes to `log`."""
    port = port or free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                                 "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama_cpp.server exited: {Path(log).read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"llama_cpp.server did not answer within {timeout:.0f} s") from None
                    time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
