"""Any OpenAI-compatible server as the teacher: a hosted API, or your own vLLM, TGI,
llama.cpp or Ollama server.

    teacher:
      kind: openai
      base_url: http://127.0.0.1:8000/v1     # default: https://api.openai.com/v1
      model: Qwen/Qwen2.5-7B-Instruct
      api_key_env: OPENAI_API_KEY            # the key is read from this variable, never from a file
      concurrency: 16                        # per replica
      replicas: [http://10.0.0.2:8000/v1]    # optional: more servers of the same model
      price: {prompt: 0.15, completion: 0.60}  # USD per 1M tokens
      budget: {usd: 5.00}

How a run behaves:
- at most `concurrency` requests are in flight (asyncio + one pooled aiohttp session);
- a request that meets a 408/409/425/429/5xx, a timeout (`timeout`, end to end), a dropped
  connection, a malformed or an empty reply is retried up to `max_retries` times, after
  `Retry-After` when the server sends one (a 429's also pauses every other request), else
  after an exponential backoff with jitter;
- a connection that cannot be made (refused, a name that does not resolve, no route) is retried
  only twice per replica, after at most 2 s: a server that is not there now will not be there in
  a minute. When no server has answered anything yet and a request gives up this way, the
  server is plainly down: no more requests are sent, and `annotate` fails with the reason;
- 401, 403 and 404 stop the run at once with the server's message (a wrong key, model or URL
  fails every request alike); other 4xx fail that input only;
- the budget is never exceeded: before each attempt the worst case (prompt bytes, which
  bound its tokens, plus max_new_tokens) is reserved against it; when the next request cannot
  fit, no more are sent and the run ends cleanly with the rest marked as not requested;
- with `replicas`, each attempt goes to the healthy replica with the fewest requests in
  flight; one that fails 3 times in a row (timeouts, dropped connections, 5xx) is taken out for
  `replica_cooldown` seconds, and the requests it dropped are retried on the others;
- every input ends with a completion or an error saying why, in the order they finish;
- the API key, and anything shaped like an API key or bearer token (`SECRET_PATTERN`), is
  replaced by `[redacted]` in completions and error messages before they are stored, and
  counted (`redacted_secrets`): a server that echoes the key must not put it in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import logging
import os
import queue
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from stepdistill.config import TeacherConfig
from stepdistill.errors import StepDistillError
from stepdistill.tasks.base import Task
from stepdistill.redaction import REDACTED, SECRET_PATTERN, redact_secrets  # noqa: F401  (re-exported)
from stepdistill.teachers.base import TEACHERS, Completion, Request, Teacher, cut_at_stop

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
REPLICA_FAILURES = 3  # failures in a row that take a replica out (teacher.replicas)
RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx
FATAL_STATUS = {401: "the API key was refused", 403: "access denied", 404: "no such endpoint or model"}
CHAT_OVERHEAD_TOKENS = 64  # chat templates add role markers and sometimes a default system prompt
MAX_RETRY_AFTER = 600.0
CONNECT_RETRIES = 2  # per replica, for a connection that cannot be made (refused, DNS, no route)
CONNECT_BACKOFF_MAX = 2.0  # seconds: retrying a refused connection is for a server that restarts

class _Retry(Exception):
    """A transient failure: try again after `delay` (the server's Retry-After) or a backoff."""

    def __init__(self, reason: str, delay: float | None = None, pause_all: bool = False, usage: dict | None = None,
                 connect: bool = False):
        # usage: what the failed attempt is charged ({} = its reserved worst case, None = nothing);
        # connect: no connection could be made (retried CONNECT_RETRIES times per replica only)
        super().__init__(reason)
        self.delay, self.pause_all, self.usage, self.connect = delay, pause_all, usage, connect


class _Fail(Exception):
    """This input cannot be annotated (e.g. a 400 for a prompt longer than the context)."""


@dataclass
class Spend:
    """Tokens and money spent by this run, and what in-flight attempts may still spend."""

    price: Any = None  # PriceConfig or None
    max_tokens: int | None = None
    max_usd: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reserved_tokens: int = 0
    reserved_usd: float = 0.0
    in_flight: int = 0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        if self.price is None:
            return 0.0
        return (prompt_tokens * self.price.prompt + completion_tokens * self.price.completion) / 1e6

    @property
    def usd(self) -> float:
        return self.cost(self.prompt_tokens, self.completion_tokens)

    def fits(self, prompt_tokens: int, completion_tokens: int) -> bool:
        tokens = self.prompt_tokens + self.completion_tokens + self.reserved_tokens + prompt_tokens + completion_tokens
        if self.max_tokens is not None and tokens > self.max_tokens:
            return False
        usd = self.usd + self.reserved_usd + self.cost(prompt_tokens, completion_tokens)
        return self.max_usd is None or usd <= self.max_usd + 1e-12

    def limit(self) -> str:
        parts = [f"{self.max_tokens} tokens"] if self.max_tokens is not None else []
        parts += [f"${self.max_usd:g}"] if self.max_usd is not None else []
        return " / ".join(parts)


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, when.timestamp() - time.time()))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: in [d/2, d] for d = min(cap, base * 2**attempt)."""
    d = min(cap, base * 2**attempt)
    return d / 2 + rng.uniform(0, d / 2)


@TEACHERS.register("openai")
class OpenAITeacher(Teacher):
    kind = "openai"

    def __init__(self, cfg: TeacherConfig, *, task: Task, split: str, data_path: str | Path | None):
        self.require_model(cfg, "the served model's name")
        self.cfg, self.task = cfg, task
        self.base_url = (cfg.base_url or DEFAULT_BASE_URL).rstrip("/")
        self.urls = [self.base_url] + [u.rstrip("/") for u in cfg.replicas]
        # per replica: requests in flight, failures in a row, out of service until (monotonic)
        self.replicas = {u: {"in_flight": 0, "fails": 0, "down_until": 0.0, "answered": 0} for u in self.urls}
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.api_key_env) or SECRET_PATTERN.search(cfg.api_key_env):
            # checked before the run directory exists: config.yaml would keep a key put here
            raise StepDistillError("teacher.api_key_env names the environment variable that holds the key, not "
                                   "the key: export OPENAI_API_KEY=... and set api_key_env to OPENAI_API_KEY")
        self.api_key = os.environ.get(cfg.api_key_env) or None
        if self.api_key is None and self.base_url == DEFAULT_BASE_URL:  # other servers may need none; a 401 says so
            raise StepDistillError(f"the openai teacher at {self.base_url} needs an API key: "
                                   f"export {cfg.api_key_env}=... (or set teacher.api_key_env to the variable that holds it)")
        self.spend = Spend(cfg.price, cfg.budget.tokens, cfg.budget.usd)
        self.counts = {"requests": 0, "retries": 0, "failed": 0, "not_requested": 0, "truncated": 0,
                       "replicas_taken_out": 0, "redacted_secrets": 0}
        self.stopped: str | None = None  # why the run stopped early (the budget, no server reachable)
        self.reached = False  # some server has answered (anything) in this run: it is not plainly down
        self._rng = random.Random(cfg.sampling.seed)

    def identity(self) -> dict[str, Any]:
        # Not the URL: replicas or a moved server serving the same model share the store.
        chat = {"chat_format": self.cfg.chat_format} if self.cfg.endpoint == "chat" and self.cfg.chat_format != "one-message" else {}
        return self.generation_identity(model=self.cfg.model, endpoint=self.cfg.endpoint, **chat)

    def failure_hint(self) -> str:
        """What to check when every request failed."""
        return (f"check teacher.base_url ({', '.join(self.urls)}), that the server there is running and reachable "
                f"from here, and the API key in ${self.cfg.api_key_env}")

    def usage(self) -> dict[str, Any]:
        s = self.spend
        return {**self.counts, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                "cost_usd": round(s.usd, 6) if s.price is not None else None,
                "budget": s.limit() or None, "stopped": self.stopped}

    # ------------------------------------------------------------ the sync face

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        for ready in self.generate_ready(requests):
            yield from ready

    def generate_ready(self, requests: list[Request]) -> Iterator[list[tuple[Request, Completion]]]:
        """Yield the completions finished so far, as they finish; the event loop runs in a worker
        thread, so the caller commits one batch while the next requests are in flight."""
        if not requests:
            return
        results: queue.Queue = queue.Queue()
        done = object()
        state: dict[str, Any] = {}

        def run() -> None:
            try:
                asyncio.run(self._run(requests, results.put, state))
            except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
                results.put(e)
            finally:
                results.put(done)

        thread = threading.Thread(target=run, name="openai-teacher", daemon=True)
        thread.start()
        try:
            finished = False
            while not finished:
                ready = [results.get()]
                while not results.empty():
                    ready.append(results.get_nowait())
                if (finished := ready[-1] is done):
                    ready.pop()
                errors = [item for item in ready if isinstance(item, BaseException)]
                ready = [item for item in ready if not isinstance(item, BaseException)]
                if ready:  # completions that arrived beside an error are paid for: store them first
                    yield ready
                if errors:
                    raise errors[0]
        finally:  # the caller stopped early (Ctrl-C, an error): cancel what is in flight
            loop, task = state.get("loop"), state.get("task")
            if thread.is_alive() and loop is not None and task is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to cancel
                    loop.call_soon_threadsafe(task.cancel)
            thread.join(timeout=10)

    # ------------------------------------------------------------ the async core

    async def _run(self, requests: list[Request], emit: Callable, state: dict[str, Any]) -> None:
        import aiohttp  # not httpx: its connection pool collapses past ~16 concurrent requests

        state["loop"], state["task"] = asyncio.get_running_loop(), asyncio.current_task()
        self._cond = asyncio.Condition()
        self._paused_until = 0.0
        pending = iter(requests)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        n = min(self.cfg.concurrency * len(self.urls), len(requests))
        connector = aiohttp.TCPConnector(limit=n)
        async with aiohttp.ClientSession(headers=headers, connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            workers = [asyncio.create_task(self._worker(session, pending, emit)) for _ in range(n)]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()

    async def _worker(self, session, pending: Iterator[Request], emit: Callable) -> None:
        for req in pending:  # one shared iterator: each request goes to exactly one worker
            if self.stopped:
                self.counts["not_requested"] += 1
                emit((req, Completion("", error=f"not requested: {self.stopped}")))
                continue
            emit((req, await self._complete(session, req)))

    async def _complete(self, session, req: Request) -> Completion:
        """One input: attempts until a completion, a permanent failure or the budget says stop."""
        s = self.cfg.sampling
        path, body = self._body(req)
        est_prompt = len(req.prompt.encode()) + (CHAT_OVERHEAD_TOKENS if self.cfg.endpoint == "chat" else 8)
        reason = ""
        connect_fails, give_up = 0, False
        for attempt in range(self.cfg.max_retries + 1):
            if not await self._reserve(est_prompt, s.max_new_tokens):
                self.counts["not_requested"] += 1
                return Completion("", error=f"not requested: {self.stopped}")
            # What the attempt is charged: {} = the reserved worst case, for any attempt whose
            # request may have reached the server without us learning its usage (a timeout, a
            # reply lost or malformed, a cancelled run); None = nothing, when no completion can
            # have been generated (no connection, an error status).
            usage: dict | None = {}
            try:
                await self._wait_pause()
                url = await self._pick()
                self.counts["requests"] += 1
                t0 = time.perf_counter()  # the teacher's latency: this attempt, not backoff or budget waits
                try:
                    comp, usage = await self._attempt(session, url, path, body)
                except _Retry as e:
                    if not e.pause_all:  # a rate limit is not a sick replica
                        self._replica_failed(url)
                    raise
                finally:
                    self.replicas[url]["in_flight"] -= 1
                self.replicas[url]["fails"] = 0
                self.replicas[url]["answered"] += 1
                comp = dataclasses.replace(comp, seconds=time.perf_counter() - t0)
                if comp.finish_reason == "length":
                    self.counts["truncated"] += 1
                return comp
            except _Retry as e:
                reason, delay, usage = str(e), e.delay, e.usage
                if e.connect:
                    connect_fails += 1
                    give_up = connect_fails >= (CONNECT_RETRIES + 1) * len(self.urls) or self.stopped is not None
                    delay = backoff_delay(connect_fails - 1, self.cfg.backoff,
                                          min(self.cfg.backoff_max, CONNECT_BACKOFF_MAX), self._rng)
                elif delay is None:
                    delay = backoff_delay(attempt, self.cfg.backoff, self.cfg.backoff_max, self._rng)
                if e.pause_all:
                    self._paused_until = max(self._paused_until, time.monotonic() + delay)
            except _Fail as e:
                usage = None
                self.counts["failed"] += 1
                return Completion("", error=str(e))
            except StepDistillError:
                usage = None
                raise
            finally:
                await self._settle(est_prompt, s.max_new_tokens, usage)
            if give_up:
                if not self.reached and not self.stopped:  # nothing has answered at all: do not send the rest
                    self.stopped = f"no teacher server could be reached ({reason})"
                break
            if attempt < self.cfg.max_retries:
                self.counts["retries"] += 1
                await asyncio.sleep(delay)
        self.counts["failed"] += 1
        return Completion("", error=f"failed after {attempt + 1} attempts: {reason}")

    def _body(self, req: Request) -> tuple[str, dict[str, Any]]:
        s = self.cfg.sampling
        body: dict[str, Any] = {"model": self.cfg.model, "max_tokens": s.max_new_tokens,
                                "temperature": s.temperature, "top_p": s.top_p, "n": 1}
        if s.temperature > 0:  # servers that honour `seed` then give a resumed run the same samples
            body["seed"] = s.seed + req.sample
        if self.task.stop:
            body["stop"] = list(self.task.stop)[:4]  # the API takes at most 4; the rest are cut here
        if self.cfg.endpoint == "chat":
            messages = (self.task.teacher_messages(req.example, self.cfg.n_shots) if self.cfg.chat_format == "turns"
                        else [{"role": "user", "content": req.prompt}])
            return "/chat/completions", {**body, "messages": messages}
        return "/completions", {**body, "prompt": req.prompt}

    async def _pick(self) -> str:
        """The healthy replica with the fewest requests in flight (below `concurrency`), counted
        in flight from here; waits while every replica is full or out."""
        while True:
            now = time.monotonic()
            up = [u for u, r in self.replicas.items() if r["down_until"] <= now and r["in_flight"] < self.cfg.concurrency]
            if up:
                url = min(up, key=lambda u: self.replicas[u]["in_flight"])
                self.replicas[url]["in_flight"] += 1
                return url
            await asyncio.sleep(0.01)

    def _replica_failed(self, url: str) -> None:
        """Three failures in a row take a replica out for replica_cooldown seconds (never the
        last one standing: with one server, retries and backoff decide)."""
        r = self.replicas[url]
        r["fails"] += 1
        now = time.monotonic()
        others_up = any(o["down_until"] <= now for u, o in self.replicas.items() if u != url)
        if r["fails"] >= REPLICA_FAILURES and others_up and r["down_until"] <= now:
            r["down_until"] = now + self.cfg.replica_cooldown
            r["fails"] = 0
            self.counts["replicas_taken_out"] += 1
            log.warning("teacher replica %s failed %d times in a row: out for %gs, its requests go to the others",
                        url, REPLICA_FAILURES, self.cfg.replica_cooldown)

    async def _attempt(self, session, url: str, path: str, body: dict[str, Any]) -> tuple[Completion, dict | None]:
        import aiohttp

        async def post() -> tuple[int, Any, bytes]:
            async with session.post(url + path, json=body) as r:
                return r.status, r.headers, await r.read()

        try:
            status, headers, raw = await asyncio.wait_for(post(), self.cfg.timeout)
        except asyncio.TimeoutError:  # the server may still generate (and bill) it: charged in full
            raise _Retry(f"no reply within {self.cfg.timeout:g}s (teacher.timeout)", usage={}) from None
        except aiohttp.ClientConnectorError as e:  # never connected (refused, DNS, no route): nothing was sent
            os_error = getattr(e, "os_error", None)
            why = ("connection refused" if isinstance(os_error, ConnectionRefusedError)
                   else getattr(os_error, "strerror", None) or str(e)[:80])  # e.g. "Name or service not known"
            raise _Retry(self._redact(f"cannot connect to {url} ({why})"), connect=True) from None
        except aiohttp.ClientError as e:  # sent, then the reply was lost: charged in full
            self.reached = True  # something listens there
            raise _Retry(self._redact(f"connection error ({type(e).__name__}: {str(e)[:80] or 'dropped'})"), usage={}) from None
        self.reached = True
        if status != 200:
            self._raise_for_status(status, headers, raw)
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.cfg.endpoint == "chat" else choice["text"]
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as e:  # a 200 without usable usage: charged in full
            raise _Retry(f"malformed reply ({type(e).__name__}: {str(e)[:80]})", usage={}) from None
        text, n_secrets = redact_secrets(cut_at_stop(text or "", self.task.stop), self.api_key)
        self.counts["redacted_secrets"] += n_secrets
        p_tok, c_tok = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not text.strip():
            raise _Retry("empty completion", usage=usage)  # an empty reply may still be billed
        return Completion(text, p_tok, c_tok, None, choice.get("finish_reason")), usage

    def _redact(self, text: str) -> str:
        """Server text goes into errors, annotations and the store: never with the key in it
        (some servers echo it, or part of it, in a 401)."""
        if self.api_key:  # any length here: an error message can lose a few letters, a rationale cannot
            text = text.replace(self.api_key, REDACTED)
            if len(self.api_key) > 12:  # "Incorrect API key provided: sk-abc...wxyz"
                text = text.replace(self.api_key[-4:], REDACTED).replace(self.api_key[:8], REDACTED)
        return redact_secrets(text)[0]

    def _raise_for_status(self, code: int, headers: Any, raw: bytes) -> None:
        try:
            detail = json.loads(raw).get("error", {})
            message = detail.get("message") if isinstance(detail, dict) else str(detail)
        except (ValueError, AttributeError):
            message = raw[:200].decode(errors="replace")
        message = self._redact(f"HTTP {code}" + (f": {message}" if message else ""))
        if code in FATAL_STATUS:
            hint = {401: f"check ${self.cfg.api_key_env}", 403: f"check ${self.cfg.api_key_env} and its permissions",
                    404: f"check teacher.base_url ({self.base_url}), teacher.model ({self.cfg.model}) and teacher.endpoint ({self.cfg.endpoint})"}[code]
            raise StepDistillError(f"the openai teacher stopped: {FATAL_STATUS[code]} ({message}): {hint}")
        if code in RETRY_STATUS or code >= 500:  # an error reply: no completion was generated
            raise _Retry(message, retry_after(headers.get("Retry-After")), pause_all=code == 429, usage=None)
        raise _Fail(message)

    # ------------------------------------------------------------ budget and rate limits

    async def _reserve(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Hold the attempt's worst case against the budget; False when it can never fit."""
        if self.spend.max_tokens is None and self.spend.max_usd is None:
            self.spend.in_flight += 1
            return True
        async with self._cond:
            while not self.stopped:
                if self.spend.fits(prompt_tokens, completion_tokens):
                    self.spend.reserved_tokens += prompt_tokens + completion_tokens
                    self.spend.reserved_usd += self.spend.cost(prompt_tokens, completion_tokens)
                    self.spend.in_flight += 1
                    return True
                if self.spend.in_flight == 0:  # nothing in flight will give budget back
                    self.stopped = (f"the budget ({self.spend.limit()}) would be exceeded by the next request; "
                                    "raise teacher.budget and rerun to continue")
                    break
                await self._cond.wait()
            return False

    async def _settle(self, prompt_tokens: int, completion_tokens: int, usage: dict | None) -> None:
        """Release the reservation and count what the attempt used: its reported usage, the
        reserved worst case for what the server may have billed without saying ({} or missing
        fields), or nothing (None)."""
        used_p = used_c = 0  # usage None: no completion came back, nothing billed
        if usage is not None:  # a reply that does not state its usage is charged its worst case
            used_p = usage.get("prompt_tokens", prompt_tokens) or 0
            used_c = usage.get("completion_tokens", completion_tokens) or 0
        self.spend.prompt_tokens += used_p
        self.spend.completion_tokens += used_c
        self.spend.in_flight -= 1
        if self.spend.max_tokens is None and self.spend.max_usd is None:
            return
        async with self._cond:
            self.spend.reserved_tokens -= prompt_tokens + completion_tokens
            self.spend.reserved_usd -= self.spend.cost(prompt_tokens, completion_tokens)
            self._cond.notify_all()

    async def _wait_pause(self) -> None:
        """After a 429 with Retry-After every worker waits: hammering a rate limit prolongs it."""
        while (wait := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)
