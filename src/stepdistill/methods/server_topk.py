"""A KD teacher behind an OpenAI-compatible server: its top-k log-probs at every position of the
training sequences, written once into the top-k cache (`kd.cache`), so the teacher never has to
fit in the training process.

    kd: {teacher: smollm2, base_url: http://127.0.0.1:8000/v1, cache: runs/kd-cache, top_k: 20}

Each training sequence (prompt and target, as the student sees them) is decoded to text and sent
to `/completions` with `echo: true, logprobs: k, max_tokens: 1`. The server must tokenise that
text into the student's own tokens (the same tokenizer: a llama.cpp server of the student's
teacher family, for example); a position where its tokens differ from the student's is an error,
not a silent misalignment. Each returned token string maps back to the student's id through the
student's vocabulary (the id whose decoded text it is; servers send special tokens as empty
text, which maps to the student's eos, the one special token its targets hold).

**Which position a server's entry belongs to.** llama.cpp's server (llama-cpp-python) returns,
at entry i, the distribution that follows token i (what predicts token i + 1), with no entry for
the first token; that is the student's logit position i, as the cache stores it
(`kd.server_logprobs: echo`, tested against the real llama.cpp server in
tests/test_server_topk.py, slow). vLLM's `prompt_logprobs` (`kd.server_logprobs:
prompt_logprobs`) is the other convention: the prompt goes as the student's token ids (nothing is
re-tokenised), entry i is the distribution that predicted token i (None for the first), keyed by
token id and always holding the prompt's own token besides the top k; the student's position i is
entry i + 1. Tested against a server that answers as vLLM documents it, not a real vLLM (none runs
on a CPU here).

The key, if the server needs one, is read from the environment variable `kd.api_key_env` and is
never written anywhere.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from stepdistill.errors import StepDistillError
from stepdistill.methods.batches import RATIONALE


def _request(kd, prompt: str | list[int]) -> dict:
    body = {"model": kd.teacher, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    if kd.server_logprobs == "prompt_logprobs":
        body["prompt_logprobs"] = kd.top_k
    else:
        body.update(echo=True, logprobs=kd.top_k)
    body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(kd.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(kd.base_url.rstrip("/") + "/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        said = " ".join(e.read()[:300].decode(errors="replace").split())  # the server's words, on the error's one line
        hint = ""
        if "logprobs" in said.lower():
            hint = "; a server caps the log-probs it gives (vLLM: --max-logprobs, 20 by default): lower kd.top_k or raise its cap"
        elif kd.server_logprobs == "prompt_logprobs" and "prompt" in said.lower():
            hint = ("; kd.server_logprobs=prompt_logprobs sends token ids, as vLLM takes them: llama.cpp's server "
                    "needs kd.server_logprobs=echo")
        raise StepDistillError(f"the KD server {kd.base_url} answered {e.code} to a logprobs request ({said}): check "
                               f"kd.base_url and kd.teacher{hint}") from None
    except OSError as e:
        raise StepDistillError(f"the KD server {kd.base_url} cannot be reached ({e}): start it, or fix kd.base_url") from None


def piece_ids(tokenizer) -> dict[str, int]:
    """Each token's decoded text -> its id (the lowest id where two decode alike). Servers send
    special tokens as empty text: the empty piece is the student's eos, the one special token its
    targets hold."""
    out: dict[str, int] = {}
    for i in range(len(tokenizer)):
        out.setdefault(tokenizer.decode([i], skip_special_tokens=True), i)
    out[""] = tokenizer.eos_token_id
    return out


def server_topk(kd, student, feats: list[dict], pieces: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Per feature and task, as `kd._compute_topk` writes them: (positions, k) log-probs at
    temperature T (renormalised over the k by the loss) and the student's token ids."""
    tok = student.tokenizer
    by_id = kd.server_logprobs == "prompt_logprobs"
    pieces = pieces or (None if by_id else piece_ids(tok))  # tokens by text: echo only
    jobs = [(i, pre, f[pre + "input_ids"]) for i, f in enumerate(feats) for pre in ("", RATIONALE)
            if pre + "input_ids" in f]
    with ThreadPoolExecutor(max_workers=kd.concurrency) as pool:
        replies = list(pool.map(lambda job: _request(kd, list(job[2]) if by_id else tok.decode(job[2])), jobs))
    tensors = {}
    for (i, pre, ids), reply in zip(jobs, replies):
        vals, idx = _by_id(kd, reply, ids, len(tok)) if by_id else _by_text(kd, reply, ids, tok, pieces)
        _check_complete(kd, feats[i][pre + "labels"], vals)
        tensors[f"{pre}{i}.vals"] = vals.to(torch.float16).contiguous()
        tensors[f"{pre}{i}.ids"] = idx.to(torch.int32).contiguous()
    return tensors


def _by_text(kd, reply: dict, ids: list[int], tok, pieces: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's echo: tokens named by text, checked against the student's; entry i follows
    token i, the student's position i."""
    lp = (reply.get("choices") or [{}])[0].get("logprobs") or {}
    tokens, top = lp.get("tokens") or [], lp.get("top_logprobs") or []
    mine = [tok.decode([t], skip_special_tokens=True) for t in ids]  # servers send special tokens as ''
    if tokens[: len(ids)] != mine:
        at = next((j for j, (a, b) in enumerate(zip(tokens, mine)) if a != b), min(len(tokens), len(mine)))
        raise StepDistillError(
            f"the KD server tokenised a training sequence differently from the student (first at token {at}: "
            f"{tokens[at:at + 1]} vs {mine[at:at + 1]}): serve a teacher with the student's tokenizer, or use "
            "kd.cross_tokenizer with a local teacher")
    vals = torch.full((len(ids), kd.top_k), -math.inf)
    idx = torch.zeros((len(ids), kd.top_k), dtype=torch.long)
    for pos in range(len(ids)):
        entry = top[pos] if pos < len(top) else None
        known = sorted(((lp_, pieces[p]) for p, lp_ in (entry or {}).items() if p in pieces), reverse=True)
        for j, (value, token) in enumerate(known[: kd.top_k]):
            vals[pos, j], idx[pos, j] = value / kd.temperature, token
    return vals, idx


def _by_id(kd, reply: dict, ids: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's prompt_logprobs: entry j (keyed by token id) predicted token j, so the student's
    position j - 1 is entry j."""
    entries = (reply.get("choices") or [{}])[0].get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(ids):
        raise StepDistillError(f"the KD server {kd.base_url} returned no prompt_logprobs for the {len(ids)} tokens sent "
                               "(kd.server_logprobs=prompt_logprobs is vLLM's; llama.cpp's server needs "
                               "kd.server_logprobs=echo)")
    vals = torch.full((len(ids), kd.top_k), -math.inf)
    idx = torch.zeros((len(ids), kd.top_k), dtype=torch.long)
    for pos in range(len(ids) - 1):
        entry = entries[pos + 1] or {}
        scored = sorted(((v["logprob"] if isinstance(v, dict) else v, int(t)) for t, v in entry.items()), reverse=True)
        if entry and str(ids[pos + 1]) not in entry:  # vLLM always adds the prompt's own token
            raise StepDistillError(f"the KD server's entry {pos + 1} does not hold the token sent there (id "
                                   f"{ids[pos + 1]}): it does not follow vLLM's prompt_logprobs; try kd.server_logprobs=echo")
        if any(t >= vocab for _, t in scored):
            raise StepDistillError(f"the KD server named token id {max(t for _, t in scored)}, beyond the student's "
                                   f"vocabulary of {vocab}: serve a teacher with the student's tokenizer")
        for j, (value, token) in enumerate(scored[: kd.top_k]):
            vals[pos, j], idx[pos, j] = value / kd.temperature, token
    return vals, idx


def _check_complete(kd, labels: list[int], vals: torch.Tensor) -> None:
    """Every position that predicts a target token has the teacher's log-probs."""
    missing = [pos for pos in range(len(labels) - 1) if labels[pos + 1] != -100 and vals[pos, 0] == -math.inf]
    if missing:
        ask = ("does it support prompt_logprobs (vLLM)?" if kd.server_logprobs == "prompt_logprobs" else
               "does it support echo with logprobs (llama.cpp's server needs --logits_all true)?")
        raise StepDistillError(f"the KD server returned no log-probs at target position {missing[0]} of a training "
                               f"sequence ({len(missing)} such positions): {ask}")
