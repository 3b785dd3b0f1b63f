"""A small built-in arithmetic task for the offline demo: no files, no network.

One- and two-step word problems generated from templates, e.g.
    "Sam has 7 apples. He buys 5 more. How many apples does he have now?"  ->  (7 + 5)
in SVAMP's format, so the SVAMP prompt and parser apply unchanged. Each record also carries a
reference rationale (fields["rationale"]), which a fake teacher can return offline.

Splits never overlap: a problem's split is fixed by a hash of its text, and each split draws
from its own seeded stream until it has `size` problems. The same split and size always give
the same examples; a different train size leaves valid and test untouched.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any, Callable, Iterator

from stepdistill.arith import evaluate_expression
from stepdistill.errors import DataError
from stepdistill.tasks import TASKS
from stepdistill.tasks.base import Example
from stepdistill.tasks.io import check_split
from stepdistill.tasks.svamp import ArithmeticTask

NAMES = [("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"),
         ("Omar", "he"), ("Lily", "she"), ("Ben", "he"), ("Emma", "she")]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "cards", "coins", "balloons"]
SHARE = {"train": 0.7, "valid": 0.1, "test": 0.2}  # of the problem space; far more than any split needs

# (template, label, reference rationale); a,b,c are drawn per template by `draw`
Template = tuple[str, str, str, Callable[[random.Random], dict[str, int]]]


def _small(r: random.Random) -> dict[str, int]:
    return {"a": r.randint(2, 20), "b": r.randint(2, 20), "c": r.randint(2, 9)}


def _sub(r: random.Random) -> dict[str, int]:
    b = r.randint(2, 15)
    return {"a": b + r.randint(1, 20), "b": b, "c": 0}


def _div(r: random.Random) -> dict[str, int]:
    b, q = r.randint(2, 9), r.randint(2, 12)
    return {"a": b * q, "b": b, "c": 0}


def _two_step_sub(r: random.Random) -> dict[str, int]:
    a, b = r.randint(2, 20), r.randint(2, 20)
    return {"a": a, "b": b, "c": r.randint(1, a + b - 1)}


TEMPLATES: list[Template] = [
    ("{N} has {a} {item}. {P} buys {b} more. How many {item} does {p} have now?",
     "({a} + {b})", "{N} starts with {a} {item} and buys {b} more, so {a} + {b} = {ans}.", _small),
    ("{N} had {a} {item}. {P} gave {b} of them to a friend. How many {item} does {p} have left?",
     "({a} - {b})", "{N} had {a} {item} and gave away {b}, so {a} - {b} = {ans}.", _sub),
    ("{N} has {a} boxes. Each box holds {b} {item}. How many {item} does {p} have in all?",
     "({a} * {b})", "There are {a} boxes with {b} {item} each, so {a} * {b} = {ans}.", _small),
    ("{N} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
     "({a} / {b})", "{a} {item} split into {b} equal parts is {a} / {b} = {ans}.", _div),
    ("{N} found {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {p} find in total?",
     "({a} + {b})", "{N} found {a} and then {b} more, so {a} + {b} = {ans}.", _small),
    ("{N} has {a} {item}. {P} buys {b} more and then loses {c}. How many {item} does {p} have now?",
     "(({a} + {b}) - {c})", "{N} has {a} + {b} = {ab} {item} after buying, then loses {c}, so {ab} - {c} = {ans}.",
     _two_step_sub),
    ("{N} buys {a} bags with {b} {item} in each bag. {P} already had {c} {item}. How many {item} does {p} have now?",
     "(({a} * {b}) + {c})", "The bags hold {a} * {b} = {ab} {item}; with the {c} {p} had, {ab} + {c} = {ans}.", _small),
]


def _render(t: Template, r: random.Random) -> dict[str, Any]:
    question, label, rationale, draw = t
    n, p = r.choice(NAMES)
    v = {**draw(r), "item": r.choice(ITEMS), "N": n, "P": p.capitalize(), "p": p}
    lab = label.format(**v)
    v["ab"] = _number(evaluate_expression(re.search(r"\([^()]*\)", lab).group(0)))  # the first step
    v["ans"] = _number(evaluate_expression(lab))
    return {"input": question.format(**v), "label": lab, "rationale": rationale.format(**v), "answer": v["ans"]}


def _number(x: float) -> int | float:
    return int(x) if x == int(x) else x


def _bucket(text: str) -> str:
    x = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    return "train" if x < SHARE["train"] else "valid" if x < SHARE["train"] + SHARE["valid"] else "test"


def generate(split: str, size: int, seed: int = 0) -> list[dict[str, Any]]:
    """`size` distinct problems belonging to `split`; deterministic in (split, size, seed)."""
    r = random.Random(f"quickstart/{seed}/{split}")
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for _ in range(200 * size + 1000):  # bounded: the problem space is far larger than any split
        if len(out) == size:
            break
        rec = _render(TEMPLATES[r.randrange(len(TEMPLATES))], r)
        if rec["input"] in seen or _bucket(f"{seed}/{rec['input']}") != split:
            continue
        seen.add(rec["input"])
        out.append(rec)
    assert len(out) == size, f"could only generate {len(out)} distinct {split} problems, asked for {size}"
    return out


@TASKS.register("quickstart")
class QuickstartTask(ArithmeticTask):
    name = "quickstart"
    hub_splits = {}

    def __init__(self, train: int = 200, valid: int = 40, test: int = 60, seed: int = 0):
        self.sizes = {"train": train, "valid": valid, "test": test}
        self.seed = seed

    def iter_load(self, split: str, path: Any = None) -> Iterator[Example]:
        check_split(split)
        if path is not None:
            raise DataError("task quickstart is generated, it reads no files: remove the data path")
        records = generate(split, self.sizes[split], self.seed)
        return (self.example(rec, split, i) for i, rec in enumerate(records))
