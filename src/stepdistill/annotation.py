"""Annotation: teacher completions for every example of a split, parsed, voted on and verified.

    from stepdistill.annotation import annotate
    summary = annotate({"task": {"name": "svamp", "path": "../shared/data/sbs"}, "split": "train",
                        "teacher": {"kind": "paper"}}, out="runs/svamp-paper-train")
    summary["kept"], summary["teacher_accuracy"], summary["failure_reasons"]

Completions come from the annotation store (store.py) or the teacher (teachers/), a chunk of
CHUNK_REQUESTS at a time, and annotations.jsonl is written row by row, so memory stays bounded on
datasets of any size. Training reads the run directory this writes (store.read_annotations).

Named `annotation`, like evaluation.py: a submodule named `annotate` would replace the package
attribute `stepdistill.annotate` (the API function) as soon as it was imported.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

from stepdistill.config import AnnotateRun, coerce
from stepdistill.errors import StepDistillError
from stepdistill.runs import create_run, home, write_json, write_jsonl
from stepdistill.store import AnnotationStore, KeyMaker, StoredCompletion
from stepdistill.tasks import ExampleStream, get_task, stream_examples
from stepdistill.tasks.base import Example, Task
from stepdistill.verify import verify

Printer = Callable[[str], None]


def annotate(cfg: AnnotateRun | dict, out: str | Path, *, overwrite: bool = False, resume: bool = False,
             store_path: str | Path | None = None, echo: Printer = print) -> dict[str, Any]:
    """Teacher completions for every example of a split: parsed, voted on and verified.

    Writes `annotations.jsonl` (one row per example: its samples, the kept rationale and label,
    or why it was dropped) and `summary.json` (`n`, `kept`, `dropped_reasons`,
    `teacher_accuracy`, `failed`, `failure_reasons`, `redacted_secrets`, `usage`, ...).
    Completions come from the annotation store when they are there: a rerun costs nothing, and
    an interrupted run resumes where it stopped. A run in which every teacher request failed
    raises StepDistillError (after writing summary.json); one in which at least
    FAILED_WARN_FRACTION failed completes with a warning.
    """
    from stepdistill.teachers import make_teacher

    cfg = coerce(AnnotateRun, cfg)
    task = get_task(cfg.task.name, cfg.task.spec)
    shard = tuple(int(x) for x in cfg.shard.split("/")) if cfg.shard else None
    examples = stream_examples(task, cfg.split, cfg.task.path, cfg.limit, shard)  # read a chunk at a time
    teacher = make_teacher(cfg.teacher, task, cfg.split, cfg.task.path)
    if cfg.verify.samples > 1 and not teacher.samples:
        raise StepDistillError(f"the {teacher.kind} teacher has one fixed output per input: set verify.samples=1")
    with create_run(out, cfg, command="annotate", seed=cfg.teacher.sampling.seed, overwrite=overwrite,
                    resume=resume, inputs=(cfg.task.path, store_path)) as run:
        echo = run.tee(echo)
        t0 = time.perf_counter()
        counts: dict[str, Any] = {}
        samples = _complete(teacher, task, examples, cfg.verify.samples, store_path, cfg.split, echo, counts)
        summary = _summarise(task, teacher, len(examples), samples, run, cfg)
        usage = teacher.usage() or {}
        summary.update(**counts, redacted_secrets=usage.get("redacted_secrets", 0),
                       seconds=round(time.perf_counter() - t0, 2), usage=usage or None)
        write_json(run.path("summary.json"), summary)
        _report(summary, echo)
        echo(f"wrote {run.path('summary.json')}")
        if counts["failed"] and not counts["generated"] and not counts["from_store"]:
            # Raised inside the run, after summary.json: env.json then says "failed", and the
            # failures stay recorded. Exiting 0 with an accuracy of 0% hid a server that was down.
            reason, n = max(counts["failure_reasons"].items(), key=lambda kv: kv[1])
            hint = getattr(teacher, "failure_hint", lambda: f"check the teacher's settings (teacher.kind={teacher.kind})")()
            raise StepDistillError(
                f"every teacher request failed ({counts['failed']} failed, {counts['not_requested']} not sent), most "
                f"often ({n}x): {counts['failure_examples'][reason][:300]}: {hint}; {run.path('summary.json')} "
                "records the failures")
    return summary


# A run with at least this share of its teacher requests failed completes, but warns: its
# annotations cover noticeably fewer inputs than asked, and a rerun would retry the failed ones.
FAILED_WARN_FRACTION = 0.10


def _failure_reason(error: str) -> str:
    """The kind of a teacher error, to count alike ones together: "failed after 3 attempts:
    HTTP 503: overloaded" -> "HTTP 503", "cannot connect to URL (details)" -> "cannot connect to URL"."""
    return re.split(r" \(|: ", re.sub(r"^failed after \d+ attempts: ", "", error), maxsplit=1)[0]


def _report(summary: dict[str, Any], echo: Printer) -> None:
    acc = "n/a (no gold labels)" if summary["teacher_accuracy"] is None else f"{summary['teacher_accuracy']:.2%}"
    line = (f"n={summary['n']} parsed={summary['parsed']} unparsed={summary['unparsed']} "
            f"kept={summary['kept']} teacher_accuracy={acc}")
    if "teacher_accuracy_paper_parsing" in summary:
        line += f" (with the paper's own parsing: {summary['teacher_accuracy_paper_parsing']:.2%})"
    echo(line)
    if summary["dropped_reasons"]:
        echo(f"dropped {summary['dropped']} (verify.against={summary['verify']['against']}): "
             + ", ".join(f"{r}: {c}" for r, c in summary["dropped_reasons"].items()))
    if summary["unparsed_reasons"]:
        echo("unparsed outputs: " + ", ".join(f"{r}: {c}" for r, c in summary["unparsed_reasons"].items()))
    if summary.get("redacted_secrets"):
        echo(f"redacted {summary['redacted_secrets']} API keys or key-shaped strings from teacher completions "
             "before storing them (the server echoed a key, or the model wrote one)")
    failed, attempted = summary.get("failed", 0), summary.get("failed", 0) + summary.get("generated", 0)
    if failed:
        reasons = ", ".join(f"{r}: {c}" for r, c in summary["failure_reasons"].items())
        share = failed / attempted
        if share >= FAILED_WARN_FRACTION:
            echo(f"WARNING: {failed} of {attempted} teacher requests failed ({share:.0%}): {reasons}; these inputs "
                 "have no annotation: check the teacher server, then rerun to retry only them")
        else:
            echo(f"{failed} of {attempted} teacher requests failed: {reasons} (a rerun retries them)")
    usage = summary.get("usage") or {}
    if usage.get("stopped"):
        echo(f"stopped early: {usage['stopped']}")
    if usage.get("cost_usd") is not None:
        echo(f"spent ${usage['cost_usd']:.4f} ({usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens)")


Sample = StoredCompletion | str  # a stored completion, or why the teacher gave none


CHUNK_REQUESTS = 8192  # requests prepared at a time: memory stays bounded on datasets of any size


def _complete(teacher, task: Task, examples: ExampleStream, k: int, store_path, split: str, echo: Printer,
              counts: dict[str, Any]) -> Iterator[tuple[Example, list[Sample]]]:
    """Yield, per example in order, the example and its k samples (a StoredCompletion, or why
    the teacher gave none): from the store, or generated and committed as they arrive.

    Examples are read and handled a chunk at a time (prompts, keys, store look-ups, teacher
    calls), so a dataset of any size needs memory for one chunk only. `counts` receives the completions
    generated now, found in the store, failed and not requested, and the failures by reason
    (`failure_reasons`, most common first; `failure_examples`: one full error per reason).
    """
    from stepdistill.teachers import Request

    store = AnnotationStore(store_path or home() / "annotations.sqlite")
    identity = teacher.identity()
    key = KeyMaker(identity, task.template_version)
    per_chunk = max(1, CHUNK_REQUESTS // k)
    n_chunks = -(-len(examples) // per_chunk)
    source = iter(examples)
    counts.update(generated=0, from_store=0, failed=0, not_requested=0)
    failures: Counter = Counter()
    examples_of: dict[str, str] = {}
    skip_reason = None
    t0, tokens = time.perf_counter(), 0
    echo(f"annotate {task.name}/{split} with {teacher.kind} teacher: {len(examples)} examples x {k} "
         f"sample{'s' if k > 1 else ''}")
    try:
        with tqdm(total=len(examples) * k, desc="teacher", unit="ex") as bar:
            for c in range(n_chunks):
                chunk = list(islice(source, per_chunk))
                requests, keys = [], []
                for ex in chunk:
                    prompt = teacher.prompt(task, ex)
                    for j in range(k):
                        requests.append(Request(ex, prompt, j))
                        keys.append(key(prompt, j))
                have = store.get_many(keys)
                todo = {kk: r for kk, r in zip(keys, requests) if kk not in have}  # a repeated prompt generates once
                counts["from_store"] += len(keys) - len(todo)
                bar.update(len(keys) - len(todo))
                if c == 0 or todo:
                    where = f" (chunk {c + 1} of {n_chunks})" if n_chunks > 1 else ""
                    echo(f"{len(keys) - len(todo)} already in the store, {len(todo)} to generate{where}")
                key_of = {id(r): kk for kk, r in todo.items()}
                failed: dict[str, str] = {}
                for ready in teacher.generate_ready(list(todo.values())) if todo else ():
                    records = []
                    for req, comp in ready:
                        kk = key_of[id(req)]
                        if comp.error is None:
                            records.append((kk, identity, req.prompt, comp.text, comp.prompt_tokens,
                                            comp.completion_tokens, comp.seconds, req.sample, comp.finish_reason))
                            tokens += comp.completion_tokens or 0
                            continue
                        failed[kk] = comp.error
                        if comp.error.startswith("not requested"):
                            counts["not_requested"] += 1
                            skip_reason = comp.error
                        else:
                            counts["failed"] += 1
                            failures[reason := _failure_reason(comp.error)] += 1
                            examples_of.setdefault(reason, comp.error)
                            store.put_failure(kk, identity, req.prompt, comp.error, sample=req.sample)
                    store.put_many(records)  # what arrived together, committed together, before more is read
                    counts["generated"] += len(records)
                    bar.set_postfix_str(_progress(teacher.usage(), tokens, time.perf_counter() - t0), refresh=False)
                    bar.update(len(ready))
                have.update(store.get_many(list(todo)))
                flat = [have.get(kk) or failed.get(kk, "not requested") for kk in keys]
                for i, ex in enumerate(chunk):
                    yield ex, flat[i * k : (i + 1) * k]
    finally:
        store.close()
        counts["failure_reasons"] = dict(failures.most_common())
        counts["failure_examples"] = {r: examples_of[r] for r in counts["failure_reasons"]}
    if skip_reason:
        echo(f"{counts['not_requested']} completions not requested: {skip_reason.removeprefix('not requested: ')}")


def _progress(usage: dict[str, Any], tokens: int, seconds: float) -> str:
    """The progress bar's live figures: tokens/s, and spend and retries where the teacher counts them."""
    parts = [f"{tokens / seconds:.0f} tok/s" if seconds > 0 else ""]
    if usage.get("cost_usd") is not None:
        parts.append(f"${usage['cost_usd']:.4f}")
    if usage.get("retries"):
        parts.append(f"{usage['retries']} retries")
    if usage.get("failed"):
        parts.append(f"{usage['failed']} failed")
    return " ".join(p for p in parts if p)


def _sample_row(rec: Sample, parsed) -> dict[str, Any]:
    if isinstance(rec, str):
        return {"completion": None, "error": rec}
    return {"completion": rec.completion, "key": rec.key, "label": parsed.label, "rationale": parsed.rationale,
            "parse_error": parsed.error}


def _summarise(task: Task, teacher, n_examples: int, samples: Iterable[tuple[Example, list[Sample]]], run,
               cfg: AnnotateRun) -> dict[str, Any]:
    """Parse and verify every example's samples, write annotations.jsonl row by row as they
    come (nothing is held for the whole dataset), and count the outcome."""
    n = Counter()  # parsed, kept, correct, gold, tokens, truncated, kept_gold, kept_correct
    unparsed_reasons, dropped = Counter(), Counter()
    secs, agreements = [], []
    # the first sample's text, for the teacher's own scoring (the paper's recorded outputs only:
    # a list as long as the dataset, which those finite files bound)
    firsts: list[str | None] = []
    scored: list[Example] = []

    def rows() -> Iterator[dict[str, Any]]:
        for ex, recs in samples:  # runs `samples` to its end, so its clean-up and report run too
            if teacher.own_scoring:
                firsts.append(None if isinstance(recs[0], str) else recs[0].completion)
                scored.append(ex)
            parsed = [rec if isinstance(rec, str) else task.parse(rec.completion, ex) for rec in recs]
            for rec in recs:
                if not isinstance(rec, str):
                    n["tokens"] += rec.completion_tokens or 0
                    n["truncated"] += rec.finish_reason == "length"
                    if rec.seconds is not None:
                        secs.append(rec.seconds)
            v = verify(task, ex, parsed, cfg.verify)
            ok = v.majority is not None
            n["parsed"] += ok
            if not ok and not isinstance(parsed[0], str):
                unparsed_reasons[parsed[0].error or "no label"] += 1
            n["kept"] += v.kept
            if not v.kept:
                dropped[v.drop_reason] += 1
            if v.agreement is not None and len(recs) > 1:
                agreements.append(v.agreement)
            is_correct = None
            if ex.label is not None:
                n["gold"] += 1
                is_correct = bool(ok and task.is_correct(v.majority, ex))
                n["correct"] += is_correct
                if v.kept:
                    n["kept_gold"] += 1
                    n["kept_correct"] += task.is_correct(v.label, ex)
            yield _row(ex, recs, parsed, v, is_correct)

    write_jsonl(run.path("annotations.jsonl"), rows())
    summary = {
        "task": task.name, "split": cfg.split, "teacher": teacher.identity(), "verify": cfg.verify.model_dump(),
        "n": n_examples, "parsed": n["parsed"], "unparsed": n_examples - n["parsed"],
        "unparsed_reasons": dict(unparsed_reasons.most_common()),
        "kept": n["kept"], "dropped": n_examples - n["kept"], "dropped_reasons": dict(dropped.most_common()),
        # the teacher's answer is the majority vote of its samples (the only sample when k = 1)
        "teacher_accuracy": n["correct"] / n["gold"] if n["gold"] else None,
        # how trustworthy what training will see is: the kept labels against gold
        "kept_accuracy": n["kept_correct"] / n["kept_gold"] if n["kept_gold"] else None,
        "mean_agreement": round(sum(agreements) / len(agreements), 4) if agreements else None,
        "completion_tokens": n["tokens"], "truncated": n["truncated"],
        # the teacher's latency per prediction (its CoT generation), as measured when generated
        "ms_per_example": round(1000 * sum(secs) / len(secs), 1) if secs else None,
        # a local teacher's CPU threads: its CPU-seconds are its wall time x these
        "threads": getattr(teacher, "threads", None) if secs else None,
    }
    ref = teacher.reference_accuracy(firsts, scored) if scored and n["gold"] and None not in firsts else None
    if ref is not None:
        summary["teacher_accuracy_paper_parsing"] = ref
    return summary


def _row(ex: Example, recs: list[Sample], parsed: list, v, is_correct: bool | None) -> dict[str, Any]:
    """One line of annotations.jsonl: the verdict, and the completion(s) it came from."""
    row = {"id": ex.id, "index": ex.index, "input": ex.input, "gold": ex.label,
           "rationale": v.rationale, "label": v.label if v.kept else v.majority,
           "kept": v.kept, "drop_reason": v.drop_reason, "detail": v.detail,
           "error": None if v.kept else v.as_parsed().error, "correct": is_correct}
    if len(recs) == 1:  # the single completion inline, as the paper's files have it
        rec = recs[0]
        row.update(completion=None if isinstance(rec, str) else rec.completion,
                   key=None if isinstance(rec, str) else rec.key)
    else:
        row.update(majority=v.majority, agreement=v.agreement, votes=v.votes, chosen=v.chosen,
                   samples=[_sample_row(rec, p) for rec, p in zip(recs, parsed)])
    return row
