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
the first token; that is the student's logit position i, as the cache stores it. Servers with
OpenAI's `prompt_logprobs` convention (vLLM), where entry i is the distribution that predicted
token i, are not supported yet. Tested against the real llama.cpp server
(tests/test_server_topk.py, slow).

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


def _request(kd, text: str) -> dict:
    body = json.dumps({"model": kd.teacher, "prompt": text, "max_tokens": 1, "echo": True, "logprobs": kd.top_k,
                       "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(kd.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(kd.base_url.rstrip("/") + "/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise StepDistillError(f"the KD server {kd.base_url} answered {e.code} to a logprobs request "
                               f"({e.read()[:300].decode(errors='replace')}): check kd.base_url and kd.teacher") from None
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
    pieces = pieces or piece_ids(tok)
    jobs = [(i, pre, f[pre + "input_ids"]) for i, f in enumerate(feats) for pre in ("", RATIONALE)
            if pre + "input_ids" in f]
    with ThreadPoolExecutor(max_workers=kd.concurrency) as pool:
        replies = list(pool.map(lambda job: _request(kd, tok.decode(job[2])), jobs))
    tensors = {}
    for (i, pre, ids), reply in zip(jobs, replies):
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
        for pos in range(len(ids)):  # entry pos: the distribution after token pos (llama.cpp's convention)
            entry = top[pos] if pos < len(top) else None
            known = sorted(((lp_, pieces[p]) for p, lp_ in (entry or {}).items() if p in pieces), reverse=True)
            for j, (value, token) in enumerate(known[: kd.top_k]):
                vals[pos, j], idx[pos, j] = value / kd.temperature, token
        f_labels = feats[i][pre + "labels"]
        missing = [pos for pos in range(len(ids) - 1) if f_labels[pos + 1] != -100 and vals[pos, 0] == -math.inf]
        if missing:
            raise StepDistillError(f"the KD server returned no log-probs at target position {missing[0]} of a training "
                                   f"sequence ({len(missing)} such positions): does it support echo with logprobs "
                                   "(llama.cpp's server needs --logits_all true)?")
        tensors[f"{pre}{i}.vals"] = vals.to(torch.float16).contiguous()
        tensors[f"{pre}{i}.ids"] = idx.to(torch.int32).contiguous()
    return tensors
