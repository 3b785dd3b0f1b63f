"""`stepdistill serve`: a trained student behind a small HTTP endpoint (FastAPI + uvicorn).

    stepdistill serve --model exported/svamp-student --port 8000
    curl -s localhost:8000/predict -H 'content-type: application/json' \\
         -d '{"inputs": ["Tom has 3 apples and buys 4 more. How many?"], "rationale": true}'
    {"predictions": [{"label": "(3 + 4)", "rationale": "3 plus 4 is 7."}], "model": "svamp-student", "ms": 41.2}

POST /predict takes `input` (one string) or `inputs` (a list of at most 256); `rationale: true`
also runs the rationale task. GET /health says which model is loaded. The OpenAI API (/v1/models,
/v1/chat/completions, /v1/completions, streaming too) is openai_api.py's, on the same worker and
limits. Replies name the model by its folder's name (or --model-name), never by its path. Needs
the `serve` extra: pip install "stepdistill[serve]".

Limits (each refusal is one line saying what to change; the server goes on serving):
- body over --max-body-bytes (default 1 MiB) -> 413, read no further. 256 inputs at a student's
  usual 512-token input limit are 0.5-0.8 MB of JSON; past that the bytes are text the tokenizer
  would cut away anyway. Content-Length is checked before any byte is read; a chunked body is
  counted as it arrives.
- a malformed body, an unknown field, an input over 100,000 characters or too many inputs -> 422
  with the reason. The rejected value is never echoed back (FastAPI's default handler does).
- more than --max-request-tokens (default 32,768) input tokens after truncation, counted twice
  with `rationale: true` (the model reads each input once per task) -> 413. That is 256 inputs of
  up to 128 tokens, or 64 at the usual 512-token limit: a few seconds of a small student's time.
  Bigger jobs belong to `stepdistill predict`, which labels a file.
- more than --max-queue inputs (default 1024: four full requests) waiting or running, all
  requests together -> 503 with Retry-After (an estimate from the recent time per input).

Worker model: one thread runs every forward pass (torch already uses every core for one batch).
Each request is cut into micro-batches of --batch-size inputs: its inputs sorted by token length
and chunked, exactly the batches `evaluation.predict(inputs, batch_size=...)` forms, so a label is
the one `stepdistill predict` gives with that batch size. The worker takes one micro-batch at a
time from the request at the head of the queue, then sends that request to the back (round
robin): a 1-input request that arrives behind a 256-input one waits for at most one micro-batch
of it (per request ahead of it), not for all of it. `--scheduler fifo` runs each request whole,
in arrival order (what a single lock did before): kept to measure the difference
(bench/serve_load.py). With `rationale: true` the rationale task runs on the same micro-batches;
they are sorted by the label task's token lengths, which can group inputs differently from
`predict --rationales` when the two prefixes tokenize to different lengths.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from stepdistill.errors import StepDistillError

log = logging.getLogger(__name__)

MAX_INPUTS = 256  # per request: a bigger batch is the batch command's job (stepdistill predict)
# characters per input: far beyond any model's context (inputs are cut to max_input_length tokens
# anyway), small enough that a hostile request cannot make the tokenizer chew megabytes
MAX_INPUT_CHARS = 100_000
MAX_BODY_BYTES = 1 << 20
MAX_REQUEST_TOKENS = 32_768
MAX_QUEUE = 4 * MAX_INPUTS
SCHEDULERS = ("fair", "fifo")
Text = Annotated[str, StringConstraints(max_length=MAX_INPUT_CHARS)]


class Query(BaseModel):
    """The body of POST /predict."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    input: Text | None = None
    inputs: list[Text] | None = Field(None, max_length=MAX_INPUTS)
    rationale: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> "Query":
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give either `input` (a string) or `inputs` (a list of strings)")
        return self


# --- the model worker ---------------------------------------------------------------------------

class QueueFull(Exception):
    """The scheduler holds its maximum of inputs: the caller should answer 503."""


@dataclass
class Job:
    """One request's work: `batches` are lists of indices into `texts`, run one at a time."""

    texts: list[str]
    batches: deque[list[int]]
    rationale: bool = False
    on_done: Callable[[], None] = lambda: None  # called once, from the worker thread
    labels: list[str] = field(init=False)
    rationales: list[str] | None = field(init=False)
    error: BaseException | None = None
    cancelled: bool = False  # the client is gone: skip what is left

    def __post_init__(self) -> None:
        self.labels = [""] * len(self.texts)
        self.rationales = [""] * len(self.texts) if self.rationale else None


class Scheduler:
    """One worker thread running micro-batches from a bounded queue of jobs.

    `run(texts, rationale) -> (labels, rationales or None)` does the model's work for one
    micro-batch. fair: after each micro-batch the job goes to the back of the queue (round robin);
    fifo: it stays at the front until it is done.

    >>> s = Scheduler(lambda texts, rationale: ([t.upper() for t in texts], None), max_pending=8)
    >>> ran = threading.Event()
    >>> s.submit(Job(["a", "b"], deque([[0], [1]]), on_done=ran.set))  # two micro-batches of one input
    >>> ran.wait(5)  # job.labels == ["A", "B"]
    True
    """

    def __init__(self, run: Callable[[list[str], bool], tuple[list[str], list[str] | None]], *,
                 max_pending: int = MAX_QUEUE, scheduler: str = "fair"):
        if scheduler not in SCHEDULERS:
            raise StepDistillError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        self.run = run  # an attribute, so a test can wrap it
        self.max_pending = max_pending
        self.fair = scheduler == "fair"
        self.pending = 0  # inputs queued or running, all jobs together
        self._seconds_per_input = 0.0  # recent average, for Retry-After
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="stepdistill-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        n = sum(len(b) for b in job.batches)
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self.pending + n > self.max_pending:
                raise QueueFull(f"{self.pending} inputs are queued, this request adds {n}, "
                                f"the cap is {self.max_pending}")
            self.pending += n
            self._jobs.append(job)
            self._cond.notify()

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: pending inputs at the recent pace, 1-60."""
        return max(1, min(60, math.ceil(self.pending * self._seconds_per_input)))

    def close(self) -> None:
        """Stop the worker after its current micro-batch; jobs still queued end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        for job in list(self._jobs):
            job.error = QueueFull("the server shut down before this request ran")
            job.on_done()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._jobs.popleft()
                if job.cancelled:
                    self.pending -= sum(len(b) for b in job.batches)
                    job.on_done()
                    continue
                idx = job.batches.popleft()
            t0 = time.perf_counter()
            try:
                labels, why = self.run([job.texts[i] for i in idx], job.rationale)
                for k, i in enumerate(idx):
                    job.labels[i] = labels[k]
                    if job.rationales is not None and why is not None:
                        job.rationales[i] = why[k]
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the worker
                log.exception("prediction failed for a request of %d inputs", len(job.texts))
                job.error = e
            took, was = (time.perf_counter() - t0) / len(idx), self._seconds_per_input
            self._seconds_per_input = 0.8 * was + 0.2 * took if was else took
            with self._cond:
                self.pending -= len(idx)
                if job.error is not None or not job.batches:
                    self.pending -= sum(len(b) for b in job.batches)
                    job.batches.clear()
                    job.on_done()
                elif self.fair:
                    self._jobs.append(job)  # back of the queue: every other request gets a turn first
                else:
                    self._jobs.appendleft(job)


# --- limits on what comes in and goes out -------------------------------------------------------

def _json_reply(status: int, detail: str) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps({"detail": detail}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         # the rest of the body is never read, so the connection cannot carry another request
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 and never held whole.

    A Content-Length over the cap is refused before a byte is read; otherwise the body is read
    chunk by chunk (chunked uploads have no Content-Length) and refused as soon as the count
    passes the cap. A body within it is handed on to the app unchanged."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client left, nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        start, body = _json_reply(413, f"request body over {self.max_bytes} bytes (--max-body-bytes): send fewer "
                                       "or shorter inputs per request, or label a file with `stepdistill predict`")
        await send(start)
        await send(body)


def short_errors(errors: list[dict[str, Any]], limit: int = 10) -> list[dict[str, Any]]:
    """A 422's errors as loc/msg/type only, each part cut short, at most `limit` of them.

    FastAPI's default handler returns each rejected value in full (`input`): a 150 MB field came
    back as a 150 MB reply. A loc may hold a client's own key (an unknown field), so it is cut too."""
    out = [{"loc": [x if isinstance(x, int) else str(x)[:64] for x in list(e.get("loc", ()))[:8]],
            "msg": str(e.get("msg", ""))[:200], "type": str(e.get("type", ""))[:64]} for e in errors[:limit]]
    if len(errors) > limit:
        out.append({"loc": [], "msg": f"and {len(errors) - limit} more errors", "type": "truncated"})
    return out


def served_name(model: str | Path) -> str:
    """The name replies give the model: its folder's name (a run's, for a run's model/ folder)."""
    from stepdistill.evaluation import model_folder

    folder = model_folder(model).resolve()
    return folder.parent.name if folder.name == "model" else folder.name


# --- the app ------------------------------------------------------------------------------------

def create_app(model: str | Path, *, max_new_tokens: int | None = None, batch_size: int = 32, dtype: str = "float32",
               label_decoding: str = "generate", model_name: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_request_tokens: int = MAX_REQUEST_TOKENS,
               max_queue: int = MAX_QUEUE, scheduler: str = "fair", engine: str = "transformers",
               quant: str | None = None):
    """The FastAPI app serving one trained student (loaded once, here), on transformers or
    (a GGUF export) llama.cpp. `app.state.scheduler` is its model worker."""
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool
    except ImportError as e:
        raise StepDistillError('stepdistill serve needs FastAPI: pip install "stepdistill[serve]"') from e

    # by_length is how predict() groups inputs into batches: micro-batches made with it are those batches
    from stepdistill.evaluation import by_length, decoding_vocab, explain, label_token_limit, load_trained, predict
    from stepdistill.methods.formatting import Format, encode_source
    from stepdistill.gguf_student import check_engine
    from stepdistill.openai_api import add_openai_routes, openai_error

    problems = [f"{flag} must be at least {low}, not {value}" for flag, value, low in (
        ("--batch-size", batch_size, 1), ("--max-body-bytes", max_body_bytes, 1024),
        ("--max-request-tokens", max_request_tokens, 1), ("--max-queue", max_queue, MAX_INPUTS))
        if value < low]
    if scheduler not in SCHEDULERS:
        problems.append(f"unknown --scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if problems:  # --max-queue: a smaller queue could never take a full request
        raise StepDistillError("; ".join(problems))
    check_engine(engine, label_decoding)
    student, info = load_trained(model, dtype=dtype, engine=engine, quant=quant)
    limit = max_new_tokens or label_token_limit(info)
    vocab = decoding_vocab(info, label_decoding, model)
    name = model_name or served_name(model)

    def run(texts: list[str], rationale: bool) -> tuple[list[str], list[str] | None]:
        # batch_size=len(texts): the micro-batch is one of the batches predict() would have formed
        labels = predict(student, texts, prefix=info["label_prefix"], batch_size=len(texts), max_new_tokens=limit,
                         vocab=vocab)
        why = explain(student, info, texts, limit=limit, batch_size=len(texts)) if rationale else None
        return labels, why

    # Token counts for the work cap, the way predict() encodes. A copy of the tokenizer: requests are
    # counted in the threadpool while the worker may be tokenizing, and a fast tokenizer is not safe
    # to share between threads; the lock covers requests counted at the same time.
    tok, tok_lock = copy.deepcopy(student.tokenizer), threading.Lock()
    fmt = student.fmt or Format(kind=student.kind)
    decoder_task = student.is_seq2seq and fmt.task_marker == "decoder"
    prefix = "" if decoder_task else info["label_prefix"]  # a decoder-side task marker is no input token

    def token_counts(texts: list[str]) -> list[int]:
        with tok_lock:
            return [len(encode_source(tok, fmt, prefix, t)) for t in texts]

    sched = Scheduler(run, max_pending=max_queue, scheduler=scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        sched.close()

    app = FastAPI(title="stepdistill student", description=f"{info.get('method')} student {name}", lifespan=lifespan)
    app.state.scheduler = sched
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):  # OpenAI clients read {"error": {"message": ...}}
            return openai_error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                               for e in short_errors(list(exc.errors()))))
        return JSONResponse(status_code=422, content={"detail": short_errors(list(exc.errors()))})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "method": info.get("method"), "queued_inputs": sched.pending}

    async def answer(texts: list[str], rationale: bool) -> tuple[list[str], list[str] | None, list[int]]:
        """Labels (and rationales) of `texts` through the worker, and their input token counts;
        an HTTPException where the request is refused or fails."""
        if not texts:
            raise HTTPException(status_code=422, detail="`inputs` is empty: send at least one input")
        lengths = await run_in_threadpool(token_counts, texts)
        work = sum(lengths) * (2 if rationale else 1)
        if work > max_request_tokens:
            raise HTTPException(status_code=413, detail=(
                f"this request is {work} input tokens after truncation{' (x2: rationale)' if rationale else ''}, "
                f"over this server's {max_request_tokens} (--max-request-tokens): split it into smaller requests, "
                "or label a file with `stepdistill predict`"))
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle() -> None:  # the worker thread's signal, handed to this request's event loop
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        job = Job(texts, deque(by_length(lengths, batch_size)), rationale, on_done=settle)
        try:
            sched.submit(job)
        except QueueFull as e:
            raise HTTPException(status_code=503, headers={"Retry-After": str(sched.retry_after())},
                                detail=f"the server is busy ({e}): retry after the Retry-After seconds") from None
        try:
            await done
        except asyncio.CancelledError:
            job.cancelled = True  # the client is gone: the worker skips what is left of this request
            raise
        if job.error is not None:
            # the type only: an exception's text can carry file paths
            raise HTTPException(status_code=500, detail=f"prediction failed ({type(job.error).__name__}): "
                                                        "see the server's log")
        return job.labels, job.rationales, lengths

    @app.post("/predict")
    async def predict_route(q: Query) -> dict[str, Any]:
        t0 = time.perf_counter()
        labels, why, _ = await answer([q.input] if q.input is not None else list(q.inputs or []), q.rationale)
        preds = [{"label": label, **({"rationale": why[i]} if why is not None else {})}
                 for i, label in enumerate(labels)]
        return {"predictions": preds, "model": name, "ms": round(1000 * (time.perf_counter() - t0), 1)}

    def text_tokens(texts: list[str]) -> list[int]:
        with tok_lock:
            return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]

    add_openai_routes(app, name, answer, text_tokens, max_inputs=MAX_INPUTS, max_chars=MAX_INPUT_CHARS)
    return app


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_new_tokens: int | None = None,
          dtype: str = "auto", label_decoding: str = "generate", batch_size: int = 32, model_name: str | None = None,
          max_body_bytes: int = MAX_BODY_BYTES, max_request_tokens: int = MAX_REQUEST_TOKENS,
          max_queue: int = MAX_QUEUE, scheduler: str = "fair", engine: str = "transformers",
          quant: str | None = None) -> None:
    """Run the server until interrupted; the limits are create_app's (see the module docstring)."""
    try:
        import uvicorn
    except ImportError as e:
        raise StepDistillError('stepdistill serve needs uvicorn: pip install "stepdistill[serve]"') from e
    app = create_app(model, max_new_tokens=max_new_tokens, dtype=dtype, label_decoding=label_decoding,
                     batch_size=batch_size, model_name=model_name, max_body_bytes=max_body_bytes,
                     max_request_tokens=max_request_tokens, max_queue=max_queue, scheduler=scheduler,
                     engine=engine, quant=quant)
    uvicorn.run(app, host=host, port=port, log_level="info")
