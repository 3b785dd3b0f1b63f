"""Self-consistency and verification: from k teacher samples per input to one trusted annotation.

Between the teacher and the student: `annotate` parses every sample, votes, and decides which
rationale (if any) the student may learn from. A rationale is kept only if its label agrees with
the reference: the gold label where the input has one (`against: gold`/`auto`), else the
majority vote of the k samples (`majority`/`auto`), which must also be a clear one
(share above `min_agreement`). `none` keeps every parsed rationale, as the paper did.

Nothing is thrown away: every sample stays in `annotations.jsonl`; a dropped input carries its
`drop_reason`, and training reads it as unusable.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from stepdistill.config import VerifyConfig
from stepdistill.tasks.base import Example, Parsed, Task

# drop reasons, as counted in summary.json
FAILED = "teacher failed"
UNPARSED = "unparsed"
WRONG = "disagrees with gold"
NO_MAJORITY = "no clear majority"


@dataclass
class Verdict:
    label: str | None  # label of the kept rationale (or the majority label when nothing is kept)
    rationale: str | None
    majority: str | None  # the self-consistency answer: most common label among parsed samples
    agreement: float | None  # share of the k samples that gave the majority answer
    votes: dict[str, int] = field(default_factory=dict)
    kept: bool = False
    drop_reason: str | None = None
    detail: str | None = None  # the parse error / teacher failure behind UNPARSED / FAILED
    chosen: int | None = None  # index of the sample whose rationale is kept

    def as_parsed(self) -> Parsed:
        """What training sees: a usable (rationale, label), or the reason it is not usable."""
        if self.kept:
            return Parsed(self.rationale, self.label)
        return Parsed(None, None, self.drop_reason + (f": {self.detail}" if self.detail else ""))


def verify(task: Task, example: Example, samples: list[Parsed | str], cfg: VerifyConfig) -> Verdict:
    """Vote over one input's samples and decide whether a rationale is kept.

    `samples` holds a Parsed per sample, or the failure message (str) of a sample the teacher
    never produced.
    """
    parsed = [(i, p) for i, p in enumerate(samples) if isinstance(p, Parsed) and p.ok]
    if not parsed:
        failures = [s for s in samples if isinstance(s, str)]
        if len(failures) == len(samples):
            return Verdict(None, None, None, None, drop_reason=FAILED, detail=failures[0])
        first = next(p for p in samples if isinstance(p, Parsed))
        return Verdict(None, None, None, 0.0 if len(samples) > 1 else None, drop_reason=UNPARSED,
                       detail=first.error or "no label")

    keys = [(i, p, task.vote_key(p.label, example)) for i, p in parsed]
    counts = Counter(k for _, _, k in keys)
    top_key, top_n = max(counts.items(), key=lambda kv: (kv[1], -_first_index(keys, kv[0])))
    majority = next(p.label for _, p, k in keys if k == top_key)
    agreement = top_n / len(samples)  # failed and unparsed samples count against agreement
    votes = {next(p.label for _, p, kk in keys if kk == k): n for k, n in counts.most_common()}
    v = Verdict(majority, None, majority, agreement if len(samples) > 1 else 1.0, votes)

    against = cfg.against
    if against == "auto":
        against = "gold" if example.label is not None else "majority"
    if against == "gold" and example.label is None:
        return _drop(v, WRONG, "no gold label to verify against (use verify.against=majority or auto)")
    if against == "gold":
        agree = [(i, p) for i, p in parsed if task.is_correct(p.label, example)]
        if not agree:
            return _drop(v, WRONG, f"teacher said {majority!r}, gold is {example.label!r}")
    elif against == "majority":
        if len(samples) > 1 and agreement <= cfg.min_agreement:
            return _drop(v, NO_MAJORITY, f"{top_n} of {len(samples)} samples agree")
        agree = [(i, p) for i, p, k in keys if k == top_key]
    else:  # none: the majority answer's first rationale, as recorded
        agree = [(i, p) for i, p, k in keys if k == top_key]
    i, p = agree[0]
    v.kept, v.chosen, v.label, v.rationale = True, i, p.label, p.rationale
    return v


def _first_index(keys: list[tuple[int, Parsed, Any]], key: Any) -> int:
    return next(i for i, _, k in keys if k == key)  # ties go to the answer sampled first


def _drop(v: Verdict, reason: str, detail: str) -> Verdict:
    v.drop_reason, v.detail = reason, detail
    return v
