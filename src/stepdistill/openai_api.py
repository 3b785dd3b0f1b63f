"""The OpenAI API in front of a served student (`stepdistill serve`), for the clients, SDKs and
tools that speak it:

    GET  /v1/models             the student, as `<name>` (its label task) and `<name>:rationale`
    POST /v1/chat/completions   the last user message is the input; `stream: true` answers in SSE
    POST /v1/completions        `prompt` is one input or a list of inputs (one choice each)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    r = client.chat.completions.create(model="svamp-student", messages=[{"role": "user", "content": "..."}])
    r.choices[0].message.content          # the label, e.g. "(3 + 4)"

- **What comes back.** Model `<name>`: the label task's answer, what `/predict` gives. Model
  `<name>:rationale`: the student's explanation (its rationale task) as the content. Every reply
  also carries a `stepdistill` field per choice with both parts: `{"label": ..., "rationale": ...}`
  (the rationale only when asked, by the model name or by `"rationale": true` in the body, e.g.
  `extra_body={"rationale": True}` in the openai client).
- **Decoding is greedy**, as the student was validated: `temperature`, `top_p`, `seed` and the
  other sampling fields are accepted and ignored; `n` above 1 is refused (the n answers would be
  the same), as are tools and logprobs, which a label student does not have.
- **Streaming** (`stream: true`) sends the answer as server-sent events in OpenAI's chunk format,
  ending with `data: [DONE]`. The student writes a label of a few tokens in one micro-batch, so
  the content arrives in one chunk after the role chunk, not token by token.
- **Errors** are OpenAI's shape, `{"error": {"message", "type", "code"}}`, with the status and
  limits of `/predict` (413 over the work cap, 503 with Retry-After when the queue is full, 422
  for a malformed body).
- **Chat turns.** The student reads one input: the last `user` message (its text parts joined).
  Earlier turns and the system message are not read; a student trained through its chat template
  is a separate option (issue 18).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field

# the served student's work: labels, rationales (or None) and the input token counts of `texts`
Answer = Callable[[list[str], bool], Awaitable[tuple[list[str], list[str] | None, list[int]]]]
RATIONALE_SUFFIX = ":rationale"


def openai_error(status: int, message: str, headers: dict[str, str] | None = None):
    """A JSON reply in OpenAI's error shape."""
    from fastapi.responses import JSONResponse

    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
            422: "invalid_request_error", 503: "server_error"}.get(status, "server_error")
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": None, "code": status}})


class _Body(BaseModel):
    # OpenAI clients send many fields (temperature, top_p, seed, user, ...): greedy decoding ignores them
    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    n: int = 1
    rationale: bool = False  # stepdistill's own field: also run the rationale task
    stream_options: dict[str, Any] | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1, max_length=1000)


class CompletionBody(_Body):
    prompt: str | list[str]


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if p.get("type") == "text")


def add_openai_routes(app, name: str, answer: Answer, text_tokens: Callable[[list[str]], list[int]], *,
                      max_inputs: int, max_chars: int) -> None:
    """Add the /v1 routes to the student server `app` (serve.create_app), with /predict's limits
    on inputs per request and characters per input."""
    from fastapi import HTTPException
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    models = (name, name + RATIONALE_SUFFIX)

    def task_of(body: _Body) -> tuple[bool, bool]:
        """(rationale as the content, run the rationale task) for the requested model."""
        if body.model not in models:
            raise _Refused(404, f"model {body.model!r} is not served here: use {name!r} (the label) or "
                                f"{name + RATIONALE_SUFFIX!r} (the rationale); GET /v1/models lists them")
        if body.n != 1:
            raise _Refused(400, f"n={body.n}: this student decodes greedily, so n answers would be the same; use n=1")
        for field in ("tools", "functions", "logprobs", "top_logprobs"):
            if (body.model_extra or {}).get(field):
                raise _Refused(400, f"`{field}` is not supported by a distilled label student: leave it out")
        as_content = body.model == name + RATIONALE_SUFFIX
        return as_content, as_content or body.rationale

    async def run(body: _Body, texts: list[str], kind: str, make: Callable[..., dict[str, Any]], chunk: Callable):
        as_content, rationale = task_of(body)
        if any(len(t) > max_chars for t in texts):
            raise _Refused(422, f"an input is over {max_chars} characters: send shorter inputs")
        labels, why, prompt_lengths = await answer(texts, rationale)
        contents = [why[i] if as_content and why is not None else label for i, label in enumerate(labels)]
        extras = [{"label": label, **({"rationale": why[i]} if why is not None else {})} for i, label in enumerate(labels)]
        completion = sum(await run_in_threadpool(text_tokens, contents))
        usage = {"prompt_tokens": sum(prompt_lengths), "completion_tokens": completion,
                 "total_tokens": sum(prompt_lengths) + completion}
        head = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if not body.stream:
            return make(head, contents, extras, usage)
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def events():
            for event in chunk(head, contents, extras, usage if include_usage else None):
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def guarded(coro):
        try:
            return await coro
        except _Refused as e:
            return openai_error(e.status, e.message)
        except HTTPException as e:  # the worker's refusals (413, 503, 500), in OpenAI's shape
            return openai_error(e.status_code, str(e.detail), headers=dict(e.headers or {}))

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "stepdistill"}
                                           for m in models]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            return openai_error(400, "no user message: the student answers the last `user` message's text")
        return await guarded(run(body, [_text(users[-1].content)], "chatcmpl", _chat_reply, _chat_chunk))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts or len(prompts) > max_inputs:
            return openai_error(400, f"`prompt` holds {len(prompts)} inputs: send 1 to {max_inputs}")
        return await guarded(run(body, prompts, "cmpl", _completion_reply, _completion_chunk))


def _chat_reply(head: dict, contents: list[str], extras: list[dict], usage: dict) -> dict[str, Any]:
    return {**head, "object": "chat.completion", "usage": usage,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop",
                         "logprobs": None, "stepdistill": x} for i, (c, x) in enumerate(zip(contents, extras))]}


def _completion_reply(head: dict, contents: list[str], extras: list[dict], usage: dict) -> dict[str, Any]:
    return {**head, "object": "text_completion", "usage": usage,
            "choices": [{"index": i, "text": c, "finish_reason": "stop", "logprobs": None, "stepdistill": x}
                        for i, (c, x) in enumerate(zip(contents, extras))]}


def _chat_chunk(head: dict, contents: list[str], extras: list[dict], usage: dict | None):
    base = {**head, "object": "chat.completion.chunk"}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {"content": contents[0]}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stepdistill": extras[0]}]}
    if usage is not None:
        yield {**base, "choices": [], "usage": usage}


def _completion_chunk(head: dict, contents: list[str], extras: list[dict], usage: dict | None):
    base = {**head, "object": "text_completion"}
    for i, (c, x) in enumerate(zip(contents, extras)):
        yield {**base, "choices": [{"index": i, "text": c, "finish_reason": None, "logprobs": None}]}
        yield {**base, "choices": [{"index": i, "text": "", "finish_reason": "stop", "logprobs": None, "stepdistill": x}]}
    if usage is not None:
        yield {**base, "choices": [], "usage": usage}

