"""Evaluation: label-only prediction with a trained student, metrics and predictions files.

    student, info = load_trained("runs/svamp-t5")          # a run dir (with model/) or a model dir
    preds = predict(student, inputs, prefix=info["label_prefix"])
    rationales = predict(student, inputs, prefix=info["rationale_prefix"], max_new_tokens=128)

Formatting comes from methods/formatting.py with the `Format` saved at training time
(model/stepdistill.json), so prediction reads exactly the tokens training taught.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from transformers import StoppingCriteriaList

from stepdistill.config import EvalRun, coerce
from stepdistill.errors import StepDistillError
from stepdistill.memory import resolve_bf16
from stepdistill.runs import create_run, write_json, write_jsonl
from stepdistill.store import read_annotations
from stepdistill.tasks import get_task, load_examples
from stepdistill.methods.formatting import Format, LabelWritten, decoder_marker, encode_source, extract_answer
from stepdistill.students import MODEL_INFO, Student, count_parameters, load_pretrained, model_folder

def load_trained(path: str | Path, *, trust_remote_code: bool = False, dtype: str = "float32",
                 engine: str = "transformers", quant: str | None = None) -> tuple[Student, dict[str, Any]]:
    """Load a model trained by `training.fit` and its stepdistill.json (method, prefixes, format).

    `path` is the model folder or a run folder holding `model/`. The returned student carries
    the saved Format in `student.fmt`. A run folder may come from anyone: its weights are read
    as safetensors (or tensor-only pickles) and code saved with the model runs only with
    `trust_remote_code=True`, which is never read from the folder itself.

    `engine="llamacpp"`: the folder's GGUF (of `quant`, where it holds several; `path` may name
    the .gguf itself) on llama.cpp, with the folder's tokenizer (gguf_student.py).
    """
    p = Path(path).expanduser()
    if engine not in ("transformers", "llamacpp"):
        raise StepDistillError(f"unknown engine {engine!r}: choose transformers or llamacpp")
    gguf = p if p.suffix == ".gguf" else None
    model_dir = p.parent if gguf else model_folder(p)
    info_file = model_dir / MODEL_INFO
    if not info_file.is_file():
        raise StepDistillError(
            f"{p} holds no trained stepdistill model (no {MODEL_INFO} in it or in its model/ folder): "
            "pass a training run directory or its model/ folder"
        )
    try:
        info = json.loads(info_file.read_text())
        fmt = Format.from_dict(info["format"])
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        raise StepDistillError(f"{info_file} cannot be used as a {MODEL_INFO} ({type(e).__name__}: {str(e)[:120]}): "
                               "the model folder is damaged; retrain, or restore it from the training run") from None
    if engine == "llamacpp" or gguf:
        return _on_llamacpp(model_dir, gguf, quant, fmt), info
    student = load_pretrained(str(model_dir), kind=fmt.kind, trust_remote_code=trust_remote_code)
    student.fmt = fmt
    if inference_dtype(dtype) is torch.bfloat16:
        student.model.to(torch.bfloat16)
    return student, info


def _on_llamacpp(model_dir: Path, gguf: Path | None, quant: str | None, fmt: Format) -> Student:
    from transformers import AutoTokenizer

    from stepdistill.gguf_student import LlamaCppModel, gguf_file

    if fmt.kind != "causal":
        raise StepDistillError(f"{model_dir} is a {fmt.kind} student: the llama.cpp engine runs causal students; "
                               "use --engine transformers")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaCppModel(gguf or gguf_file(model_dir, quant), n_ctx=fmt.max_input_length + 1024)
    return Student(model, tokenizer, False, fmt)


def inference_dtype(dtype: str) -> torch.dtype:
    """float32, bfloat16, or auto: bfloat16 where the hardware has fast bf16 (half the bytes to
    read per generated token: a small student's decoding is bound by reading its weights)."""
    if dtype == "auto":
        return torch.bfloat16 if resolve_bf16(None) else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise StepDistillError(f"unknown dtype {dtype!r}: choose float32, bfloat16 or auto")
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode inside (its device yielded), back in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _device(student: Student) -> torch.device:
    return next(student.model.parameters()).device


def by_length(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (little padding), shortest first."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def predict(
    student: Student,
    inputs: list[str],
    *,
    prefix: str,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    vocab: list[int] | None = None,
    extract: bool = True,
) -> list[str]:
    """Greedy generation for each input, in order: the decoded new tokens, stripped, and with
    `extract` the label within them where the student writes more than the label (a rationale
    after or before it: Format.answer_end / answer_after).

    `prefix` picks the task: the label prefix for answers, the rationale prefix for
    explanations. Causal students are left-padded so every row's answer starts at the same
    column; inputs are batched by length to waste little padding. `vocab` (token ids, eos among
    them) restricts decoding to those tokens: the output layer computes only their rows.

    >>> predict(student, ["2 + 3 = ?"], prefix="predict: ")
    ['5']
    """
    if not inputs:
        return []
    tok, model = student.tokenizer, student.model
    fmt = student.fmt or Format(kind=student.kind)
    assert (fmt.kind == "seq2seq") == student.is_seq2seq, f"format {fmt.kind} does not fit a {student.kind} student"
    marker = decoder_marker(tok, prefix) if student.is_seq2seq and fmt.task_marker == "decoder" else None
    encoded = [encode_source(tok, fmt, "" if marker is not None else prefix, text) for text in inputs]
    out: list[str] = [""] * len(inputs)
    with _eval_mode(model) as device:
        for idx in by_length([len(x) for x in encoded], batch_size):
            ids, mask = _pad([encoded[i] for i in idx], tok.pad_token_id, left=not student.is_seq2seq)
            forced = {}
            if marker is not None:  # the task marker starts the decoder; it is not part of the answer
                start = [model.config.decoder_start_token_id, *marker]
                forced["decoder_input_ids"] = torch.tensor([start] * len(idx), device=device)
            # the generation's first new column: after the forced marker, the decoder's start (a special
            # token, dropped when decoded) or the prompt
            new_from = len(forced["decoder_input_ids"][0]) if forced else 0 if student.is_seq2seq else ids.shape[1]
            if vocab is not None:
                new = _greedy_in_vocab(student, ids.to(device), mask.to(device), vocab, max_new_tokens,
                                       forced.get("decoder_input_ids"))
            else:
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    **forced,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    # a batch ends when its labels are written, not at the token limit (see LabelWritten)
                    stopping_criteria=StoppingCriteriaList([LabelWritten(tok, fmt, new_from)] if extract and fmt.answer_end else []),
                )
                new = gen[:, new_from:]
            for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                out[i] = extract_answer(fmt, text) if extract else text.strip()
    return out


class _RowsOf(torch.nn.Module):
    """An output layer cut to some of its rows: logits for `rows` only, in that order."""

    def __init__(self, head: torch.nn.Module, rows: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(head.weight[rows].detach(), requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else torch.nn.Parameter(bias[rows].detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


@contextlib.contextmanager
def _output_rows(model, rows: torch.Tensor) -> Iterator[None]:
    head = model.get_output_embeddings()
    model.set_output_embeddings(_RowsOf(head, rows))
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def _cache_kwarg(model) -> str:
    """The KV-cache argument's name: transformers 5.x renamed past_key_values to cache."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _greedy_in_vocab(student: Student, ids: torch.Tensor, mask: torch.Tensor, vocab: list[int], max_new_tokens: int,
                     decoder_start: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding over `vocab` only, with a KV cache: the new tokens, [batch, <= max_new_tokens],
    pad after eos. The same tokens as `generate` wherever its argmax lies in `vocab`."""
    model, tok = student.model, student.tokenizer
    device = ids.device
    allowed = torch.tensor(sorted(set(vocab)), device=device)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    cache_kw = _cache_kwarg(model)
    done = torch.zeros(len(ids), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    with _output_rows(model, allowed):
        if student.is_seq2seq:
            encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask)
            start = decoder_start if decoder_start is not None else torch.full(
                (len(ids), 1), model.config.decoder_start_token_id, device=device)
            step = dict(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=start)
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            step = dict(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        cache = None
        for _ in range(max_new_tokens):
            out = model(**step, use_cache=True, **({cache_kw: cache} if cache is not None else {}))
            cache = getattr(out, cache_kw, None)
            cache = out.past_key_values if cache is None else cache
            nxt = allowed[out.logits[:, -1].argmax(-1)]
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            if student.is_seq2seq:
                step["decoder_input_ids"] = nxt[:, None]
            else:
                step["attention_mask"] = mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step["position_ids"] = step["position_ids"][:, -1:] + 1
                step["input_ids"] = nxt[:, None]
    return torch.stack(new, dim=1)


def label_vocab(labels: Iterable[list[int]], eos_token_id: int) -> list[int]:
    """Every token of the trained label targets, and eos: label_decoding=vocab decodes within it."""
    return sorted({t for row in labels for t in row if t >= 0} | {eos_token_id})


def decoding_vocab(info: dict[str, Any], decoding: str, model: str | Path) -> list[int] | None:
    """The tokens label_decoding=vocab decodes within (None for other decodings)."""
    if decoding != "vocab":
        return None
    if not info.get("label_vocab"):
        raise StepDistillError(f"label_decoding=vocab needs the label tokens saved at training, and {model} was "
                               "trained before stepdistill saved them: retrain it, or use label_decoding=generate")
    return info["label_vocab"]


def explain(student: Student, info: dict[str, Any], inputs: list[str], *, limit: int, batch_size: int = 16
            ) -> list[str]:
    """The rationale task's explanation of each input: the label limit, but at least 128 tokens
    (a rationale runs to dozens of tokens where a label needs a few). A student that writes its
    rationale in the label task's sequence explains with that sequence, its label cut off."""
    fmt = student.fmt
    if fmt is None or not (fmt.answer_end or fmt.answer_after):
        return predict(student, inputs, prefix=info["rationale_prefix"], batch_size=batch_size,
                       max_new_tokens=max(limit, 128))
    raw = predict(student, inputs, prefix=info["label_prefix"], batch_size=batch_size,
                  max_new_tokens=max(limit, 128) + limit, extract=False)
    if fmt.answer_end:
        return [t.split(fmt.answer_end, 1)[1].strip() if fmt.answer_end in t else "" for t in raw]
    return [t.rsplit(fmt.answer_after, 1)[0].strip() for t in raw]


def label_token_limit(info: dict[str, Any], default: int = 64) -> int:
    """Task-aware generation limit: the longest label the student was trained on (tokens, eos
    included) with a quarter more and two tokens to spare; `default` for older models."""
    n = info.get("max_label_tokens")
    return default if not n else int(n * 1.25) + 2


@torch.no_grad()
def rank(student: Student, inputs: list[str], candidates: list[list[str]], *, prefix: str,
         batch_size: int = 32) -> list[str]:
    """For each input, the candidate answer the student finds likeliest: the sum of the
    log-probabilities of its tokens and eos, with `prefix` picking the task. One forward pass per
    (input, candidate) pair and no generation, so a label costs no decoding loop.

    >>> rank(student, ["A man sleeps. / A man is awake."], [["entailment", "neutral", "contradiction"]],
    ...      prefix="predict: ")
    ['contradiction']
    """
    from stepdistill.methods.batches import decoder_inputs
    from stepdistill.methods.formatting import encode_example
    from stepdistill.methods.losses import IGNORE_INDEX
    from stepdistill.methods.targets import logits_at, target_positions

    tok, model = student.tokenizer, student.model
    fmt = student.fmt or Format(kind=student.kind)
    start = model.config.decoder_start_token_id if student.is_seq2seq else None
    pairs = [(i, c) for i, cands in enumerate(candidates) for c in cands]
    feats = [encode_example(tok, fmt, prefix, inputs[i], c, decoder_start=start) for i, c in pairs]
    scores = torch.empty(len(pairs))
    with _eval_mode(model) as device:
        for idx in by_length([len(f["input_ids"]) for f in feats], batch_size):
            ids, mask = _pad([feats[j]["input_ids"] for j in idx], tok.pad_token_id, left=False)
            labels, _ = _pad([feats[j]["labels"] for j in idx], IGNORE_INDEX, left=False)
            kw = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if student.is_seq2seq:
                kw["decoder_input_ids"] = (_pad([feats[j]["decoder_input_ids"] for j in idx], tok.pad_token_id,
                                                left=False)[0] if "decoder_input_ids" in feats[idx[0]]
                                           else decoder_inputs(labels, model.config)).to(device)
            keep, targets = target_positions(labels.to(device), shift=not student.is_seq2seq)
            with logits_at(model, keep):
                logits = model(**kw).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
            scores[idx] = torch.stack([part.sum() for part in logp.split(keep.sum(dim=1).tolist())]).cpu()
    out, j = [], 0
    for cands in candidates:
        out.append(cands[int(scores[j : j + len(cands)].argmax())])
        j += len(cands)
    return out


def _pct(x: float | None) -> str:
    return "n/a (no gold labels)" if x is None else f"{x:.2%}"


def evaluate(cfg: EvalRun | dict, out: str | Path | None = None, *, overwrite: bool = False,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Score a trained student on a split: `predictions.jsonl` + `metrics.json` (accuracy, n, ms/example).

    Only the label task runs; `rationales=True` also generates the rationale task's explanations.
    """
    cfg = coerce(EvalRun, cfg)
    task = get_task(cfg.task.name, cfg.task.spec)
    examples = load_examples(task, cfg.split, cfg.task.path, cfg.limit)
    # Read before the run directory exists: a bad --annotations must not leave a half run behind.
    ann = read_annotations(cfg.annotations, task, cfg.split, examples) if cfg.annotations else None
    if out is None and not Path(cfg.model).is_dir():
        raise StepDistillError(f"--model {cfg.model} is not a trained run or model folder: train one with `stepdistill train`")
    out = Path(out) if out else Path(cfg.model) / f"eval-{task.name}-{cfg.split}"
    student, info = load_trained(cfg.model, dtype=cfg.dtype)
    candidates = [task.label_candidates(e) for e in examples]
    decoding = cfg.label_decoding
    # a student that writes its rationale in the label's own sequence is scored on what it writes
    free_form = bool(student.fmt and (student.fmt.answer_end or student.fmt.answer_after))
    if decoding == "auto":
        decoding = "rank" if all(candidates) and not free_form else "generate"
    elif decoding == "rank" and free_form:
        raise StepDistillError("label_decoding=rank scores a label alone, but this student writes its rationale in "
                               "the label's sequence: use label_decoding=generate")
    elif decoding == "rank" and not all(candidates):
        raise StepDistillError(f"label_decoding=rank needs a closed answer set, but task {task.name} has open "
                               f"answers ({task.label_kind}): use label_decoding=generate")
    vocab = decoding_vocab(info, decoding, cfg.model)
    with create_run(out, cfg, command="eval", overwrite=overwrite,
                    inputs=(cfg.model, cfg.annotations, cfg.task.path)) as run:
        echo = run.tee(echo)
        inputs = [e.input for e in examples]
        limit = cfg.max_new_tokens or label_token_limit(info)
        t0 = time.perf_counter()
        if decoding == "rank":
            preds = rank(student, inputs, candidates, prefix=info["label_prefix"], batch_size=cfg.batch_size)
        else:
            preds = predict(student, inputs, prefix=info["label_prefix"], batch_size=cfg.batch_size,
                            max_new_tokens=limit, vocab=vocab)
        seconds = time.perf_counter() - t0
        rationales = explain(student, info, inputs, limit=limit, batch_size=cfg.batch_size) if cfg.rationales else None
        rows = []
        for i, (ex, pred) in enumerate(zip(examples, preds)):
            row = {"id": ex.id, "input": ex.input, "gold": ex.label, "prediction": pred,
                   "correct": task.is_correct(pred, ex) if ex.label is not None else None}
            if rationales is not None:
                row["rationale"] = rationales[i]
            rows.append(row)
        write_jsonl(run.path("predictions.jsonl"), rows)
        metrics: dict[str, Any] = {
            "task": task.name, "split": cfg.split, "model": str(cfg.model),
            "accuracy": task.accuracy(preds, examples), "n": len(examples),
            "parameters": count_parameters(student.model)[1],
            "ms_per_example": round(1000 * seconds / len(examples), 2),
            # on a CPU, CPU-seconds = wall seconds x threads (the report's cost); none on a GPU
            "threads": torch.get_num_threads() if _device(student).type == "cpu" else None,
            "method": info.get("method"),
            "label_decoding": decoding,
        }
        if decoding in ("generate", "vocab"):
            metrics["max_new_tokens"] = limit
        if ann is not None:
            metrics["teacher_accuracy"] = task.accuracy([ann[e.id].label if e.id in ann else None for e in examples],
                                                        examples)
            missing = sum(e.id not in ann for e in examples)
            if missing:
                metrics["teacher_missing"] = missing
        write_json(run.path("metrics.json"), metrics)
        line = f"accuracy={_pct(metrics['accuracy'])} n={metrics['n']} ms/example={metrics['ms_per_example']}"
        if "teacher_accuracy" in metrics:
            line += f" teacher_accuracy={_pct(metrics['teacher_accuracy'])}"
        echo(line)
        echo(f"wrote {run.path('metrics.json')} and predictions.jsonl")
    return metrics
