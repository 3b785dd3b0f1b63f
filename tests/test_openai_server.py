"""The fake OpenAI server (stepdistill.testing.openai_server) against a real httpx client."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from stepdistill.testing.openai_server import FakeOpenAIServer


@pytest.fixture
def srv() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def client(srv: FakeOpenAIServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=5) as c:
        yield c


def chat(client: httpx.Client, prompt: str, **params: object) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": prompt}], **params}
    return client.post("/chat/completions", json=body)


def text_of(response: httpx.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


# -- normal replies ------------------------------------------------------------------------------


def test_chat_completion_shape_and_usage(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    r = chat(client, "What is two plus two?", temperature=0.0, seed=1)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "fake-model"
    assert data["id"] and isinstance(data["created"], int)
    [choice] = data["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Echo 5 words. The answer is 5."},
                      "finish_reason": "stop"}
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def test_text_completion_and_models(client: httpx.Client) -> None:
    r = client.post("/completions", json={"model": "m", "prompt": "one two three", "max_tokens": 50})
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == "m"
    assert data["choices"][0]["text"] == "Echo 3 words. The answer is 3."
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    assert client.get("/models").json() == {
        "object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}


def test_custom_responder_messages_and_n() -> None:
    seen = []

    def responder(prompt: str, body: dict) -> str:
        seen.append((prompt, body["temperature"]))
        return "héllo wörld"

    with FakeOpenAIServer(responder, model="teacher") as srv, httpx.Client(base_url=srv.url) as client:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ünïcode"}]
        r = client.post("/chat/completions", json={"messages": messages, "temperature": 0.7, "n": 2})
        data = r.json()
    assert seen == [("Be brief.\nHi ünïcode", 0.7)]
    assert data["model"] == "teacher"
    assert [c["message"]["content"] for c in data["choices"]] == ["héllo wörld"] * 2
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    assert srv.arrived() == {"Be brief.\nHi ünïcode": 1}


def test_prompt_tokens_never_exceed_utf8_bytes(client: httpx.Client) -> None:
    for prompt in ["", "a", "ü ü ü", "日本語 の テキスト", "  spaced \n\t out  "]:
        usage = chat(client, prompt).json()["usage"]
        assert usage["prompt_tokens"] == len(prompt.split()) <= len(prompt.encode())


def test_max_tokens_cuts_with_finish_reason_length(client: httpx.Client) -> None:
    r = chat(client, "a b c", max_tokens=3)  # reply: "Echo 3 words. The answer is 3."
    assert text_of(r) == "Echo 3 words."
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3
    r = chat(client, "a b c", max_completion_tokens=1)
    assert text_of(r) == "Echo" and r.json()["choices"][0]["finish_reason"] == "length"
    r = chat(client, "a b c", max_tokens=7)  # exactly fits
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_stop_strings(client: httpx.Client) -> None:
    r = chat(client, "a b", stop=". The")
    assert text_of(r) == "Echo 2 words" and r.json()["choices"][0]["finish_reason"] == "stop"
    r = chat(client, "a b", stop=["answer", "words", "nowhere"])  # the earliest occurrence wins
    assert text_of(r) == "Echo 2 "
    assert r.json()["usage"]["completion_tokens"] == 2
    r = chat(client, "a b", stop=["zzz"])
    assert text_of(r) == "Echo 2 words. The answer is 2."


def test_unknown_path_and_invalid_requests(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    r = client.post("/embeddings", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get("/chat/completions")
    assert r.status_code == 404
    r = client.post("/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/chat/completions", json=[1, 2]).status_code == 400
    assert client.post("/chat/completions", json={"messages": []}).status_code == 400
    assert client.post("/completions", json={"prompt": 3}).status_code == 400
    assert chat(client, "x", max_tokens=-1).status_code == 400
    assert chat(client, "x", stop=5).status_code == 400
    assert chat(client, "fine").status_code == 200  # the connection survived all that
    assert srv.arrived() == {"x": 2, "fine": 1}  # requests with a readable prompt only
    assert srv.answered() == {"fine": 1}
    assert [e["status"] for e in srv.log] == [404, 404, 400, 400, 400, 400, 400, 400, 200]


def test_keep_alive_reuses_one_connection(srv: FakeOpenAIServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    sockets = []
    for path in ["/v1/chat/completions", "/v1/nope", "/v1/chat/completions"]:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        sockets.append(conn.sock)
    conn.close()
    assert sockets[0] is not None and all(s is sockets[0] for s in sockets)


# -- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after, header", [(2, "2"), (0.05, "0.05"), ("Wed, 21 Oct 2015 07:28:00 GMT",) * 2])
def test_429_with_retry_after(srv: FakeOpenAIServer, client: httpx.Client, retry_after: float | str, header: str) -> None:
    srv.inject("429", retry_after=retry_after)
    r = chat(client, "q")
    assert r.status_code == 429
    assert r.headers["retry-after"] == header
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert chat(client, "q").status_code == 200  # times=1: only the next request


@pytest.mark.parametrize("status", ["500", "502", "503"])
def test_server_errors(srv: FakeOpenAIServer, client: httpx.Client, status: str) -> None:
    srv.inject(status, times=2)
    srv.inject(status, retry_after=1)
    responses = [chat(client, "q") for _ in range(4)]
    assert [r.status_code for r in responses] == [int(status)] * 3 + [200]
    assert ["retry-after" in r.headers for r in responses[:3]] == [False, False, True]
    assert responses[0].json()["error"]["type"] == "server_error"
    assert [e["fault"] for e in srv.log] == [status] * 3 + [None]
    assert srv.arrived() == {"q": 4} and srv.answered() == {"q": 1}


@pytest.mark.parametrize("status, error_type", [("400", "invalid_request_error"), ("401", "authentication_error"),
                                                ("404", "not_found_error")])
def test_client_errors(srv: FakeOpenAIServer, client: httpx.Client, status: str, error_type: str) -> None:
    srv.inject(status)
    r = chat(client, "q")
    assert r.status_code == int(status)
    error = r.json()["error"]
    assert error["type"] == error_type and isinstance(error["message"], str) and error["message"]


def test_reset_is_a_transport_error(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    srv.inject("reset")
    with pytest.raises(httpx.TransportError):
        chat(client, "q")
    assert chat(client, "q").status_code == 200  # a fresh connection works
    assert [(e["status"], e["fault"], e["answered"]) for e in srv.log] == [(None, "reset", False), (200, None, True)]


def test_malformed_is_not_json(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    srv.inject("malformed")
    r = chat(client, "q")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        r.json()
    assert srv.answered() == {}


def test_empty_and_truncated(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    srv.inject("empty")
    srv.inject("truncated")
    r = chat(client, "a b c d")  # normal reply: "Echo 4 words. The answer is 4." (7 words)
    assert text_of(r) == "" and r.json()["usage"]["completion_tokens"] == 0
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    r = chat(client, "a b c d")
    assert text_of(r) == "Echo 4 words." and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3
    assert srv.answered() == {"a b c d": 2}


def test_slow_times_out_and_is_not_counted_as_answered(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    srv.inject("slow", delay=0.3)
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.post("/chat/completions", json={"messages": [{"role": "user", "content": "slow one"}]}, timeout=0.1)
    assert time.monotonic() - t0 < 0.25
    assert chat(client, "fast one").status_code == 200
    time.sleep(max(0.0, t0 + 0.45 - time.monotonic()))  # the server wakes at 0.3 s, finds the client gone
    assert srv.arrived() == {"slow one": 1, "fast one": 1}
    assert srv.answered() == {"fast one": 1}
    assert srv.log[0]["status"] is None and srv.log[0]["fault"] == "slow"


def test_slow_answers_after_delay(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    srv.inject("slow", delay=0.1)
    t0 = time.monotonic()
    assert chat(client, "q").status_code == 200
    assert time.monotonic() - t0 >= 0.1


def test_match_targets_only_matching_prompts(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    srv.inject("500", times=2, match="bad")
    assert chat(client, "good 1").status_code == 200
    assert chat(client, "a bad one").status_code == 500
    assert chat(client, "good 2").status_code == 200
    assert chat(client, "bad again").status_code == 500
    assert chat(client, "bad, but no faults left").status_code == 200


def test_faults_are_fifo_across_inject_calls(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    srv.inject("429")
    srv.inject("503", times=2)
    srv.inject("401")
    assert [chat(client, "q").status_code for _ in range(5)] == [429, 503, 503, 401, 200]


def test_inject_rejects_unknown_faults(srv: FakeOpenAIServer) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        srv.inject("418")
    with pytest.raises(ValueError):
        srv.inject("500", times=0)


def test_completions_endpoint_takes_faults_too(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    srv.inject("truncated", match="xy")
    r = client.post("/completions", json={"prompt": ["xy z"]})
    assert r.json()["choices"][0]["text"] == "Echo 2 words." and r.json()["choices"][0]["finish_reason"] == "length"


# -- hold/release, records, concurrency, stop ----------------------------------------------------


def test_hold_release_and_wait_answered(srv: FakeOpenAIServer) -> None:
    srv.hold()
    results: list[int] = []

    def ask(i: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            results.append(chat(c, f"held {i}").status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert srv.wait_arrived(3, timeout=2)
    assert not srv.wait_answered(1, timeout=0.05)
    assert sum(srv.arrived().values()) == 3 and not srv.answered()
    assert all(not e["answered"] and e["status"] is None for e in srv.log)
    srv.release()
    assert srv.wait_answered(3, timeout=2)
    for t in threads:
        t.join(2)
    assert results == [200] * 3
    assert srv.answered() == {f"held {i}": 1 for i in range(3)}


def test_log_records_arrival_order_and_returns_copies(srv: FakeOpenAIServer, client: httpx.Client) -> None:
    srv.inject("429", match="b")
    for prompt in ["a", "b", "b", "c"]:
        chat(client, prompt, max_tokens=9)
    log = srv.log
    assert [e["prompt"] for e in log] == ["a", "b", "b", "c"]
    assert [e["status"] for e in log] == [200, 429, 200, 200]
    assert [e["answered"] for e in log] == [True, False, True, True]
    assert all(e["path"] == "/v1/chat/completions" and e["body"]["max_tokens"] == 9 for e in log)
    assert [e["t"] for e in log] == sorted(e["t"] for e in log)
    assert srv.arrived() == {"a": 1, "b": 2, "c": 1}
    assert srv.answered() == {"a": 1, "b": 1, "c": 1}
    log[0]["status"] = 999
    srv.answered()["a"] += 5
    assert srv.log[0]["status"] == 200 and srv.answered()["a"] == 1


def test_16_concurrent_threads_all_answered() -> None:
    with FakeOpenAIServer(latency=0.02) as srv, httpx.Client(
            base_url=srv.url, timeout=5, limits=httpx.Limits(max_connections=16)) as client:
        prompts = [f"prompt number {i}" for i in range(64)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda p: chat(client, p), prompts))
        elapsed = time.monotonic() - t0
        assert srv.wait_answered(64, timeout=1)
    assert all(r.status_code == 200 for r in responses)
    assert [text_of(r) for r in responses] == ["Echo 3 words. The answer is 3."] * 64
    assert srv.answered() == {p: 1 for p in prompts}
    assert elapsed < 64 * 0.02 / 2  # served concurrently, not one by one


def test_stop_while_held_is_prompt() -> None:
    srv = FakeOpenAIServer().start()
    srv.hold()
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            with httpx.Client(base_url=srv.url, timeout=5) as c:
                chat(c, "never answered")
        except httpx.TransportError as e:
            errors.append(e)

    thread = threading.Thread(target=ask)
    thread.start()
    assert srv.wait_arrived(1, timeout=2)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 0.5
    thread.join(2)
    assert not thread.is_alive() and len(errors) == 1
    assert srv.answered() == {} and srv.log[0]["status"] is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/models", timeout=1)  # the listening socket is closed
    srv.stop()  # idempotent


def test_stop_with_idle_keep_alive_connection() -> None:
    srv = FakeOpenAIServer().start()
    with httpx.Client(base_url=srv.url, timeout=5) as client:
        assert chat(client, "q").status_code == 200  # leaves a pooled, idle connection open
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 0.5


def test_command_line_serves_until_interrupted() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "stepdistill.testing.openai_server", "--port", "0", "--latency", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split()[1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert httpx.get(f"{url}/models", timeout=5).json()["data"][0]["id"] == "fake-model"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
