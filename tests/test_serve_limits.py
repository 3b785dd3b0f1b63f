"""`stepdistill serve` against a hostile or greedy client (issue 15, finding 6): body-size cap,
422s that echo nothing, a per-request work cap, a bounded queue, no paths in replies, and a
fair worker under which a small request never waits for all of a large one. A real uvicorn on
127.0.0.1 and a tiny model trained in the test; the fairness tests gate the model worker with
events, so they depend on no timing."""

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

from stepdistill import cli
from stepdistill.config import MethodConfig
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import label_token_limit, load_trained, predict
from tiny_models import examples, trained_run

SBS = MethodConfig(name="step-by-step", alpha=0.5)
WAIT = 20  # seconds any single event may take before the test fails (never reached when passing)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("train") / "svamp-tiny", max_steps=10)


@contextlib.contextmanager
def served(app):
    """`app` on a free loopback port for the block: yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + WAIT
        while not server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT)


def app_for(run, **kw):
    from stepdistill.serve import create_app

    return create_app(run, **kw)


def in_thread(fn):
    """Start fn() in a thread; the returned dict gets its result under "r" (or "error")."""
    box: dict = {}

    def go():
        try:
            box["r"] = fn()
        except Exception as e:  # noqa: BLE001 - reported by the test's asserts
            box["error"] = e

    box["thread"] = threading.Thread(target=go, daemon=True)
    box["thread"].start()
    return box


def test_a_body_over_the_cap_is_413_with_a_short_reply_that_echoes_nothing(run):
    with served(app_for(run, max_body_bytes=4096)) as base:
        big = json.dumps({"input": "the cat " + "q" * 8000})
        r = httpx.post(f"{base}/predict", content=big, headers={"content-type": "application/json"}, timeout=WAIT)
        assert r.status_code == 413 and len(r.content) < 300 and "qqqq" not in r.text
        assert "--max-body-bytes" in r.text and "stepdistill predict" in r.text
        # a chunked upload (no Content-Length) is counted as it arrives
        chunks = (b'{"input": "' + b"q" * 1000 for _ in range(8))
        r = httpx.post(f"{base}/predict", content=chunks, headers={"content-type": "application/json"}, timeout=WAIT)
        assert r.status_code == 413 and "qqqq" not in r.text
        # within the cap, served as before
        ok = httpx.post(f"{base}/predict", json={"input": "the cat"}, timeout=WAIT)
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1


def test_the_body_limit_stops_reading_at_the_cap():
    """At the ASGI level: a declared Content-Length over the cap is refused before any byte is read,
    and an endless chunked body is read no further than the cap (plus the chunk that passes it)."""
    from stepdistill.serve import BodyLimit

    async def app(scope, receive, send):  # never reached by an oversized body
        raise AssertionError("the app saw an oversized body")

    sent, reads = [], []

    async def send(message):
        sent.append(message)

    async def no_receive():
        raise AssertionError("read a body whose Content-Length was already over the cap")

    async def endless():
        reads.append(1)
        assert len(reads) < 1000, "the body limit kept reading"
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    limit = BodyLimit(app, max_bytes=10_000)
    asyncio.run(limit({"type": "http", "headers": [(b"content-length", b"150000000")]}, no_receive, send))
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert len(sent[1]["body"]) < 300
    sent.clear()
    asyncio.run(limit({"type": "http", "headers": [(b"transfer-encoding", b"chunked")]}, endless, send))
    assert sent[0]["status"] == 413 and len(reads) == 11  # 11 chunks of 1000 bytes pass 10,000


def test_a_422_never_echoes_the_rejected_value(run):
    with served(app_for(run)) as base:
        from stepdistill.serve import MAX_INPUT_CHARS

        for body, reason in (({"input": "y" * (MAX_INPUT_CHARS + 1)}, "at most 100000 characters"),
                             ({"input": "the cat", "z" * 5000: 1}, "Extra inputs are not permitted"),
                             ({"inputs": ["yyyyyyyyyy" * 100] * 200 + [1] * 56}, "valid string"),
                             ({"inputs": [{"yyyyyyyyyy": 1}] * 256}, "valid string")):
            r = httpx.post(f"{base}/predict", json=body, timeout=WAIT)
            assert r.status_code == 422 and reason in r.text, r.text[:300]
            assert "yyyyyyyyyy" not in r.text and "z" * 65 not in r.text and len(r.content) < 4000, len(r.content)
            assert all(set(e) == {"loc", "msg", "type"} for e in r.json()["detail"])  # no `input`, no `ctx`


def test_replies_name_the_model_and_never_its_path(run):
    parts = {str(run), str(run.resolve()), str(run.parent)}
    with served(app_for(run)) as base:
        replies = [httpx.get(f"{base}/health").text, httpx.get(f"{base}/openapi.json").text,
                   httpx.post(f"{base}/predict", json={"input": "the cat"}, timeout=WAIT).text]
        assert httpx.get(f"{base}/health").json()["model"] == "svamp-tiny"  # the run folder's name
        assert json.loads(replies[2])["model"] == "svamp-tiny"
        assert not any(p in text for p in parts for text in replies), replies
    with served(app_for(run / "model", model_name="svamp-v2")) as base:  # the run's model/ folder, renamed
        assert httpx.get(f"{base}/health").json()["model"] == "svamp-v2"


def test_a_request_over_the_work_cap_is_413_with_the_fix(run):
    with served(app_for(run, max_request_tokens=40)) as base:
        words = " ".join(["the small cat"] * 3)  # 9 words
        r = httpx.post(f"{base}/predict", json={"inputs": [words] * 5}, timeout=WAIT)
        assert r.status_code == 413 and "--max-request-tokens" in r.text and "split it" in r.text
        assert "stepdistill predict" in r.text and len(r.content) < 400
        assert httpx.post(f"{base}/predict", json={"inputs": [words] * 2}, timeout=WAIT).status_code == 200
        # the rationale task reads every input a second time
        r = httpx.post(f"{base}/predict", json={"inputs": [words] * 2, "rationale": True}, timeout=WAIT)
        assert r.status_code == 413 and "rationale" in r.text


def gate(sched, big_word="big"):
    """Wrap the worker's model call: the large request's first micro-batch waits for `first`, its
    later ones for `rest`. Returns (calls, running_big, first, rest)."""
    calls, running_big, first, rest = [], threading.Event(), threading.Event(), threading.Event()
    real = sched.run

    def gated(texts, rationale):
        is_big = big_word in texts[0]
        calls.append("big" if is_big else "small")
        if is_big:
            running_big.set()
            assert (first if calls.count("big") == 1 else rest).wait(WAIT), "the test never opened the gate"
        return real(texts, rationale)

    sched.run = gated
    return calls, running_big, first, rest


def wait_until(cond, what):
    deadline = time.time() + WAIT
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_small_request_is_answered_while_a_large_one_is_in_flight(run):
    app = app_for(run, batch_size=2)
    sched = app.state.scheduler
    calls, running_big, first, rest = gate(sched)
    big_inputs = [e.input.replace("the", "the big") for e in examples(6)]  # 3 micro-batches of 2
    with served(app) as base:
        big = in_thread(lambda: httpx.post(f"{base}/predict", json={"inputs": big_inputs}, timeout=WAIT))
        assert running_big.wait(WAIT)
        small = in_thread(lambda: httpx.post(f"{base}/predict", json={"input": "the cat"}, timeout=WAIT))
        wait_until(lambda: sched.pending == 7, "the small request to be queued")
        first.set()  # the large request's first micro-batch ends; its second waits for `rest`
        small["thread"].join(WAIT)
        assert "r" in small and small["r"].status_code == 200, small
        wait_until(lambda: len(calls) == 3, "the large request's second micro-batch")
        assert big["thread"].is_alive() and calls == ["big", "small", "big"]  # the large one is still running
        rest.set()
        big["thread"].join(WAIT)
    assert big["r"].status_code == 200 and calls == ["big", "small", "big", "big"]
    # micro-batches are the batches predict() forms: the same labels as predicting in-process
    student, info = load_trained(run)
    want = predict(student, big_inputs, prefix=info["label_prefix"], batch_size=2,
                   max_new_tokens=label_token_limit(info))
    assert [p["label"] for p in big["r"].json()["predictions"]] == want


def test_fifo_runs_each_request_whole(run):
    """The comparison bench/serve_load.py makes: under fifo the small request waits for all of the large."""
    app = app_for(run, batch_size=2, scheduler="fifo")
    sched = app.state.scheduler
    calls, running_big, first, rest = gate(sched)
    with served(app) as base:
        big = in_thread(lambda: httpx.post(f"{base}/predict", json={"inputs": ["the big cat"] * 6}, timeout=WAIT))
        assert running_big.wait(WAIT)
        small = in_thread(lambda: httpx.post(f"{base}/predict", json={"input": "the cat"}, timeout=WAIT))
        wait_until(lambda: sched.pending == 7, "the small request to be queued")
        first.set()
        rest.set()
        big["thread"].join(WAIT)
        small["thread"].join(WAIT)
    assert calls == ["big", "big", "big", "small"] and big["r"].status_code == small["r"].status_code == 200


def test_a_full_queue_is_503_with_retry_after(run):
    from stepdistill.serve import MAX_INPUTS

    app = app_for(run, max_queue=MAX_INPUTS)
    calls, running_big, first, rest = gate(app.state.scheduler)
    with served(app) as base:
        big = in_thread(lambda: httpx.post(f"{base}/predict", json={"inputs": ["the big cat"] * MAX_INPUTS},
                                           timeout=WAIT))
        assert running_big.wait(WAIT)  # 256 inputs queued or running: the queue is full
        r = httpx.post(f"{base}/predict", json={"input": "the cat"}, timeout=WAIT)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "busy" in r.text
        assert httpx.get(f"{base}/health").json()["queued_inputs"] == MAX_INPUTS  # the server still answers
        first.set()
        rest.set()
        big["thread"].join(WAIT)
        assert big["r"].status_code == 200
        assert httpx.post(f"{base}/predict", json={"input": "the cat"}, timeout=WAIT).status_code == 200


def test_serve_limits_from_the_cli_and_bad_values_all_at_once(run, monkeypatch):
    import stepdistill.serve

    got = {}
    monkeypatch.setattr(stepdistill.serve, "serve", lambda model, **kw: got.update(kw))
    cli.run(["serve", "--model", str(run), "--max-body-bytes", "5000", "--max-request-tokens", "99",
             "--max-queue", "300", "--scheduler", "fifo", "--batch-size", "4", "--model-name", "m"])
    assert {k: got[k] for k in ("max_body_bytes", "max_request_tokens", "max_queue", "scheduler", "batch_size",
                                "model_name")} == {"max_body_bytes": 5000, "max_request_tokens": 99, "max_queue": 300,
                                                   "scheduler": "fifo", "batch_size": 4, "model_name": "m"}
    with pytest.raises(StepDistillError, match="--batch-size must be at least 1, not 0; .*--max-queue must be at "
                                               "least 256, not 10"):
        app_for(run, batch_size=0, max_queue=10)
