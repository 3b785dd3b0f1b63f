"""An OpenAI-compatible HTTP server for tests, which injects faults on demand.

Client tests (retries, backoff, timeouts, token budget) run against it on 127.0.0.1, and the
throughput benchmark uses it as a teacher with a fixed service time (``latency``). Standard
library only, thread-safe, keep-alive works.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``. Any
other path gets a 404, and an invalid request (body not a JSON object, no prompt, a bad
``max_tokens``/``n``/``stop``) a 400, both with an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``. The chat prompt is the message contents
joined by newlines. ``latency`` delays every completion request, faulted ones included.

Token counts are deterministic: ``prompt_tokens`` is the number of whitespace-separated words of
the prompt (so never more than its UTF-8 byte length), ``completion_tokens`` the number of words
of the reply (times ``n``). A ``stop`` string cuts the reply at its first occurrence
(``finish_reason`` "stop"); a reply longer than ``max_tokens`` (or ``max_completion_tokens``)
words is cut to that many (``finish_reason`` "length").

Faults, queued with ``inject(fault, times=1, match=None, retry_after=None, delay=0.0)``; each is
taken by the next ``times`` requests (whose prompt contains ``match``), in the order injected:

- "429", "500", "502", "503": that status, a JSON error body, ``Retry-After`` if ``retry_after``
- "400", "401", "404": that status with an OpenAI-style JSON error body
- "slow": wait ``delay`` seconds, then answer normally (``delay`` also works with the others)
- "reset": read the request, then close the connection (RST) without a response
- "malformed": 200, ``application/json``, a body that is not valid JSON
- "empty": 200, a completion whose text is "" (``completion_tokens`` 0)
- "truncated": 200, the text cut to half its words, ``finish_reason`` "length"

Records: ``log`` (one dict per request), ``arrived()`` and ``answered()`` (prompt -> count), and
``wait_arrived(n)``/``wait_answered(n)``. A 200 completion is counted as answered as it is
written, so a client that has read its reply always finds it counted; it is not counted if the
client had gone by then (e.g. timed out during "slow") or the write failed. ``hold()`` parks
every new request until ``release()``.

Usage::

    with FakeOpenAIServer(lambda prompt, body: "The answer is 4.") as srv:
        srv.inject("429", times=2, retry_after=0.01)
        client = MyClient(base_url=srv.url)  # any OpenAI client
        assert client.complete("What is 2+2?") == "The answer is 4."  # after two 429s
        assert srv.arrived()["What is 2+2?"] == 3 and srv.answered()["What is 2+2?"] == 1

Command line (serves until Ctrl-C):
``python -m stepdistill.testing.openai_server --port 8011 --latency 0.02``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self

Responder = Callable[[str, dict], str]

CHAT_PATH, COMPLETIONS_PATH, MODELS_PATH = "/v1/chat/completions", "/v1/completions", "/v1/models"
ERROR_FAULTS = frozenset({"400", "401", "404", "429", "500", "502", "503"})
FAULTS = ERROR_FAULTS | {"slow", "reset", "malformed", "empty", "truncated"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error"}  # 5xx: "server_error"
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
MALFORMED_BODY = b'{"choices": ['


def echo_responder(prompt: str, body: dict) -> str:
    """The default reply: deterministic, derived from the prompt."""
    n = len(prompt.split())
    return f"Echo {n} words. The answer is {n}."


def cut_words(text: str, n: int) -> str:
    """The first ``n`` whitespace-separated words of ``text`` (the whitespace between them kept)."""
    if n <= 0:
        return ""
    for i, word in enumerate(re.finditer(r"\S+", text), 1):
        if i == n:
            return text[: word.end()]
    return text


@dataclass
class _Fault:
    name: str
    times: int
    match: str | None
    retry_after: float | str | None
    delay: float


class FakeOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 for tests; see the module docstring."""

    def __init__(self, responder: Responder | None = None, *, latency: float = 0.0,
                 port: int = 0, model: str = "fake-model"):
        self.responder: Responder = responder or echo_responder
        self.latency = latency
        self.model = model
        self.port = port
        self.url = ""  # "http://127.0.0.1:PORT/v1" once started
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified on each arrival and answer
        self._gate = threading.Event()  # cleared while held
        self._gate.set()
        self._faults: list[_Fault] = []
        self._log: list[dict] = []
        self._arrived: collections.Counter[str] = collections.Counter()
        self._answered: collections.Counter[str] = collections.Counter()
        self._n_arrived = self._n_answered = 0
        self._conns: set[socket.socket] = set()
        self._ids = itertools.count(1)
        self._stopping = False
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        if self._httpd is not None:
            return self
        self._stopping = False
        self._gate.set()
        httpd = _HTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.fake = self
        self.port = httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                        name=f"fake-openai-{self.port}", daemon=True)
        self._httpd = httpd
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly: held requests are released and dropped, open connections closed."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping = True
        self._gate.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # wakes handler threads idling on a keep-alive connection
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control -----------------------------------------------------------------------------

    def inject(self, fault: str, times: int = 1, *, match: str | None = None,
               retry_after: float | str | None = None, delay: float = 0.0) -> None:
        """Queue ``fault`` for the next ``times`` requests (whose prompt contains ``match``)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        with self._lock:
            self._faults.append(_Fault(fault, times, match, retry_after, delay))

    def hold(self) -> None:
        """Requests arriving from now on wait (recorded as arrived, not answered) until release()."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def wait_arrived(self, n: int, timeout: float = 30) -> bool:
        """Block until at least ``n`` completion requests have arrived; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._n_arrived >= n, timeout)

    def wait_answered(self, n: int, timeout: float = 30) -> bool:
        """Block until at least ``n`` requests got a 200 completion; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._n_answered >= n, timeout)

    # -- records (copies) --------------------------------------------------------------------

    @property
    def log(self) -> list[dict]:
        """One dict per request (shallow copies), in arrival order: t (time.monotonic()), prompt
        ("" if none), path, status (None: no response, yet or ever), fault, answered, body."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def arrived(self) -> collections.Counter[str]:
        """prompt -> number of completion requests that arrived (with a readable prompt)."""
        with self._lock:
            return collections.Counter(self._arrived)

    def answered(self) -> collections.Counter[str]:
        """prompt -> number of 200 completions fully written (incl. "empty"/"truncated" faults)."""
        with self._lock:
            return collections.Counter(self._answered)

    # -- used by the handler -----------------------------------------------------------------

    def _arrive(self, path: str, prompt: str | None, body: Any, valid: bool) -> tuple[dict, _Fault | None]:
        with self._lock:
            fault = None
            if prompt is not None and valid:
                for queued in self._faults:
                    if queued.match is None or queued.match in prompt:
                        fault = queued
                        queued.times -= 1
                        if queued.times == 0:
                            self._faults.remove(queued)
                        break
            entry = {"t": time.monotonic(), "prompt": prompt or "", "path": path, "status": None,
                     "fault": fault.name if fault else None, "answered": False, "body": body}
            self._log.append(entry)
            if prompt is not None:
                self._arrived[prompt] += 1
                self._n_arrived += 1
                self._changed.notify_all()
        return entry, fault

    def _done(self, entry: dict, status: int | None, answered: bool) -> None:
        """Record the outcome; called just *before* the response is written, so that a client
        which has read its response always finds it counted (``_unsend`` undoes a failed write)."""
        with self._lock:
            entry["status"] = status
            if answered:
                entry["answered"] = True
                self._answered[entry["prompt"]] += 1
                self._n_answered += 1
                self._changed.notify_all()

    def _unsend(self, entry: dict) -> None:
        with self._lock:
            if entry["answered"]:
                entry["answered"] = False
                prompt = entry["prompt"]
                self._answered[prompt] -= 1
                if self._answered[prompt] == 0:
                    del self._answered[prompt]
                self._n_answered -= 1
            entry["status"] = None

    def _track(self, conn: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for handler threads (held, keep-alive)
    request_queue_size = 1024  # listen backlog: benchmarks open many connections at once
    fake: FakeOpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that went away is no error
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # buffered: headers and body leave in one send
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        self.server.fake._track(self.connection, False)
        super().finish()

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        fake = self.server.fake
        path = urlsplit(self.path).path.rstrip("/")
        raw = self._read_body()
        if raw is None:
            entry, _ = fake._arrive(path, None, None, False)
            self.close_connection = True  # the rest of the body is unread
            return self._send_error(entry, 400, "Chunked or invalid Content-Length is not supported")
        if (self.command, path) == ("GET", MODELS_PATH):
            entry, _ = fake._arrive(path, None, None, False)
            models = {"object": "list", "data": [{"id": fake.model, "object": "model", "owned_by": "fake"}]}
            return self._send(entry, 200, _json(models))
        if self.command != "POST" or path not in (CHAT_PATH, COMPLETIONS_PATH):
            entry, _ = fake._arrive(path, None, None, False)
            return self._send_error(entry, 404, f"Unknown endpoint: {self.command} {self.path}")

        body: Any = None
        prompt: str | None = None
        error = None
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise TypeError("the request body must be a JSON object")
            prompt = _prompt_of(path, body)
            _check_params(body)
        except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError included
            error = str(e)
        entry, fault = fake._arrive(path, prompt, body, error is None)
        if error is not None:
            return self._send_error(entry, 400, f"Invalid request: {error}")

        fake._gate.wait()
        pause = fake.latency + (fault.delay if fault else 0.0)
        if pause > 0:
            time.sleep(pause)
        name = fault.name if fault else None
        if name == "reset":
            return self._reset(entry)
        if name in ERROR_FAULTS:
            status = int(name)
            return self._send_error(entry, status, f"Injected fault: {status} {HTTPStatus(status).phrase}",
                                    retry_after=fault.retry_after if fault else None)
        if name == "malformed":
            return self._send(entry, 200, MALFORMED_BODY)

        assert prompt is not None and isinstance(body, dict)
        try:
            text = fake.responder(prompt, body)
            if not isinstance(text, str):
                raise TypeError(f"the responder returned {type(text).__name__}, not str")
        except Exception as e:  # noqa: BLE001  (a broken responder: the client gets a 500)
            return self._send_error(entry, 500, f"Responder failed: {e!r}")
        text, finish_reason = _shape(text, body)
        if name == "empty":
            text, finish_reason = "", "stop"
        elif name == "truncated":
            text, finish_reason = cut_words(text, len(text.split()) // 2), "length"
        reply = _completion(path, body.get("model") or fake.model, text, finish_reason,
                            prompt, body.get("n") or 1, next(fake._ids))
        self._send(entry, 200, _json(reply), completion=True)

    def _read_body(self) -> bytes | None:
        """Exactly Content-Length bytes (keep-alive depends on it); None if that is not possible."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send_error(self, entry: dict, status: int, message: str,
                    retry_after: float | str | None = None) -> None:
        error = {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                 "param": None, "code": ERROR_CODES.get(status)}
        self._send(entry, status, _json({"error": error}), retry_after=retry_after)

    def _send(self, entry: dict, status: int, payload: bytes, *,
              retry_after: float | str | None = None, completion: bool = False) -> None:
        fake = self.server.fake
        if fake._stopping or self._client_gone():
            self.close_connection = True
            return fake._done(entry, None, False)
        fake._done(entry, status, completion and status == 200)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if retry_after is not None:
                self.send_header("Retry-After", _retry_after(retry_after))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            fake._unsend(entry)

    def _client_gone(self) -> bool:
        """True if the client closed its end (e.g. it timed out while we were slow)."""
        flags = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
        if flags == socket.MSG_PEEK:  # no non-blocking peek on this platform: assume present
            return False
        try:
            return self.connection.recv(1, flags) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _reset(self, entry: dict) -> None:
        """Close without a response; SO_LINGER 0 makes the close an RST."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.connection.close()  # the real close happens once rfile/wfile are closed in finish()
        self.server.fake._done(entry, None, False)


def _prompt_of(path: str, body: dict) -> str:
    if path == COMPLETIONS_PATH:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string (or a list of one string)")
        return prompt
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a non-empty list of objects")
    return "\n".join(_content_text(m.get("content")) for m in messages)


def _content_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "\n".join(p.get("text") or "" for p in content if isinstance(p, dict))
    raise ValueError("message 'content' must be a string or a list of parts")


def _check_params(body: dict) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (type(value) is not int or value < 0):
            raise ValueError(f"'{key}' must be a non-negative integer")
    n = body.get("n")
    if n is not None and (type(n) is not int or n < 1):
        raise ValueError("'n' must be a positive integer")
    stop = body.get("stop")
    if not (stop is None or isinstance(stop, str)
            or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ValueError("'stop' must be a string or a list of strings")


def _shape(text: str, body: dict) -> tuple[str, str]:
    """Apply ``stop`` then ``max_tokens``; return (text, finish_reason)."""
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if cuts:
        text = text[: min(cuts)]
    limit = body.get("max_tokens")
    if limit is None:
        limit = body.get("max_completion_tokens")
    if limit is not None and len(text.split()) > limit:
        return cut_words(text, limit), "length"
    return text, "stop"


def _completion(path: str, model: str, text: str, finish_reason: str, prompt: str,
                n: int, number: int) -> dict:
    chat = path == CHAT_PATH
    choices = []
    for i in range(n):
        choice: dict[str, Any] = ({"index": i, "message": {"role": "assistant", "content": text}} if chat
                                  else {"index": i, "text": text, "logprobs": None})
        choice["finish_reason"] = finish_reason
        choices.append(choice)
    prompt_tokens, completion_tokens = len(prompt.split()), n * len(text.split())
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{number}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def _retry_after(value: float | str) -> str:
    if isinstance(value, str):  # e.g. an HTTP-date
        return value
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stepdistill.testing.openai_server",
                                     description="Serve a fake OpenAI-compatible API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8011, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each request takes")
    parser.add_argument("--model", default="fake-model")
    args = parser.parse_args(argv)
    server = FakeOpenAIServer(latency=args.latency, port=args.port, model=args.model).start()
    print(f"Serving {server.url} (latency {args.latency}s); Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
