"""Bad input, fuzzed: teacher-output parsers, the arithmetic evaluator, the data loaders and the
config loader. Every failure must be a clear stepdistill error (or a Parsed with an error), never
another exception, a traceback or a hang.

Hypothesis runs derandomized (the same examples on every run and machine) with a modest number
of examples per property, so the whole file takes well under a minute on 2 cores.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepdistill.arith import MAX_CHARS, ExpressionError, evaluate_expression, values_equal
from stepdistill.config import AnnotateRun, EvalRun, TrainRun, build, load_yaml, parse_overrides, set_dotted, to_yaml
from stepdistill.errors import ConfigError, DataError, StepDistillError
from stepdistill.tasks import get_task
from stepdistill.tasks.base import Example, Parsed
from stepdistill.tasks.common import normalize_choice, normalize_class
from stepdistill.tasks.generic import GenericSpec, GenericTask
from stepdistill.tasks.io import as_list, read_records

FUZZ = settings(
    max_examples=120,
    deadline=timedelta(seconds=1),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=60)  # properties that write files

FAST = 1.0  # seconds: generous; every input below is refused or parsed in milliseconds


def quick(fn, *args, limit: float = FAST):
    """fn(*args), asserting that it returns or raises within `limit` seconds."""
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        assert time.perf_counter() - start < limit, f"{fn.__name__} took {time.perf_counter() - start:.2f}s"


# --- the tasks, each with an example of its own -------------------------------------------

CQA_CHOICES = ["ignore", "enjoy", "entertain", "learn", "math problem"]


def _generic(**spec) -> GenericTask:
    return GenericTask(GenericSpec.model_validate(spec))


def _tasks() -> dict[str, tuple[object, Example | None]]:
    out = {}
    for name, record in [
        ("svamp", {"input": "Sam has 84 apples and 2 bags.", "label": "( 84.0 / 2.0 )"}),
        ("asdiv", {"input": "7 and 5?", "label": "7+5"}),
        ("cqa", {"question": "What is 2 + 2?", "choices": CQA_CHOICES, "answer": "math problem"}),
        ("esnli", {"premise": "A man sleeps.", "hypothesis": "A person sleeps.", "label": 0}),
        ("anli1", {"premise": "A man sleeps.", "hypothesis": "A person sleeps.", "label": "neutral"}),
    ]:
        task = get_task(name)
        out[name] = (task, task.example(record, "train", 0))
    for kind, spec, record in [
        ("classes", {"inputs": ["text"], "label_kind": "classes", "classes": ["positive", "negative", "1", "-1"]},
         {"text": "Great food.", "label": "positive"}),
        ("choice", {"inputs": ["question"], "label": "answer", "label_kind": "choice", "choices": "options"},
         {"question": "Pick one.", "options": ["x", "b", "a", "red wine"], "answer": "x"}),
        ("arithmetic", {"inputs": "q", "label_kind": "arithmetic"}, {"q": "2 + 2?", "label": "(2 + 2)"}),
        ("free", {"inputs": ["question", "context"], "label_kind": "free"},
         {"question": "Who?", "context": "Ann did.", "label": "Ann"}),
    ]:
        task = _generic(name=f"g_{kind}", **spec)
        out[f"generic-{kind}"] = (task, task.example(record, "train", 0))
    return out


TASKS = _tasks()

# adversarial pieces: each task's own phrases, choice letters, operators, odd unicode, huge numbers
PHRASES = [
    "The answer is", "the answer is ", "So the answer is", ", so the answer is", "so", "The answer is (",
    "Q:", "\nQ:", "\n\nQ: ", "A:", "Premise:", "\nPremise:", "Hypothesis:", "Answer:", "\nAnswer:", "\n  Answer: ",
    "Reasoning:", "Text:", "\nText:", "Question:", "Answer Choices:", "(a)", "(b)", "(e)", "(z)", "a", "d", "x", "(",
    ")", "(((", ")))", "+", "-", "*", "/", "**", "//", "=", ".", "..", ",", "\n", "\n\n", " ", "\t", "\r\n", "\r",
    "\u2028", "\x85", "\x00", "\ud800", "é", "ß", "İ", "²", "٣", "𝟙", "🙂", "9" * 400, "1e308", "1e400", "-1", "--1",
    "0", "1", "2", "3", "7", "nan", "inf", "1_000", "0x10", "entailment", "Neutral.", "CONTRADICTION", "positive",
    "negative", "math problem", "red wine", "Ann", "__import__('os')", "lambda: 0", "9**9**9", "(84 / 2)",
    "( 84.0 / 2.0 )", "{", "}", "[", "]", "'", '"', "\\", "f'{1}'",
]
adversarial = st.lists(st.sampled_from(PHRASES) | st.text(max_size=12), max_size=40).map("".join)
any_text = st.text(max_size=300) | adversarial


def check_parsed(task, example, p) -> None:
    assert isinstance(p, Parsed)
    assert (p.label is None) != (p.error is None), p  # exactly one of label or error
    if p.error is not None:
        assert isinstance(p.error, str) and p.error
        return
    assert isinstance(p.label, str) and p.label
    again = task.normalize(p.label, example)  # a parsed label is in the label space
    assert again is not None, p
    if task.label_kind == "classes":
        assert p.label in task.classes and again == p.label
    elif task.label_kind == "choice" and example is not None:
        field = task.spec.choices if isinstance(task, GenericTask) else "choices"
        assert p.label in example.fields[field] and again == p.label
    elif task.label_kind == "arithmetic":
        assert values_equal(again, p.label)
    if example is not None:
        assert task.is_correct(p.label, example) in (True, False)
    task.vote_key(p.label, example)


@pytest.mark.parametrize("name", sorted(TASKS))
@FUZZ
@given(text=any_text, with_example=st.booleans())
def test_parse_never_raises(name, text, with_example):
    task, example = TASKS[name]
    example = example if with_example else None
    check_parsed(task, example, task.parse(text, example))


@pytest.mark.parametrize("name", sorted(TASKS))
@FUZZ
@given(rationale=any_text, answer=st.sampled_from(PHRASES) | st.text(max_size=30))
def test_parse_of_a_well_formed_completion(name, rationale, answer):
    """A completion shaped like the task's own prompt, with arbitrary rationale and answer."""
    task, example = TASKS[name]
    phrase = {"svamp": " The answer is ", "asdiv": " The answer is ", "cqa": " So the answer is ",
              "anli1": " So the answer is "}.get(name, "\nAnswer: ")
    check_parsed(task, example, task.parse(rationale + phrase + answer + ".\n\nQ: next", example))


HUGE = [
    "\n" * 100_000, " " * 100_000, "\t\n " * 30_000, ", " * 50_000, ",\n" * 50_000, "so " * 30_000, "Q:" * 50_000,
    "\n Q:" * 30_000, "Premise:" * 20_000, "\nAnswer:" * 20_000, "The answer is " * 10_000, "(" * 100_000,
    "9" * 100_000, "So the answer is (a) (b) " * 5_000, "\x00" * 100_000,
]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_parse_is_linear_on_huge_completions(name):
    """Runs of newlines or spaces made the answer-phrase regexes quadratic (10 s for 20k spaces)."""
    task, example = TASKS[name]
    for text in HUGE:
        check_parsed(task, example, quick(task.parse, text, example))


@pytest.mark.parametrize("name", sorted(TASKS))
@FUZZ
@given(label=st.one_of(any_text, st.integers(), st.floats(), st.booleans(), st.none(),
                       st.lists(st.text(max_size=5), max_size=3)))
def test_normalize_never_raises(name, label):
    task, example = TASKS[name]
    n = task.normalize(label, example)
    assert n is None or isinstance(n, str)
    if n is not None and task.label_kind in ("classes", "choice"):
        assert task.normalize(n, example) == n  # idempotent


@FUZZ
@given(st.lists(st.text(st.characters(codec="ascii", categories=["L", "N", "Zs", "P"]), min_size=1, max_size=12)
                .map(str.strip).filter(lambda c: c and not c.startswith("(")), min_size=2, max_size=26,
                unique_by=lambda c: " ".join(c.casefold().split()).strip("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ")))
def test_every_choice_text_names_itself(choices):
    """A choice's own text picks that choice, even when it looks like a letter ("x", "a")."""
    for c in choices:
        assert normalize_choice(c, choices) == c
    for i, c in enumerate(choices):
        assert normalize_choice(f"({chr(ord('a') + i)}) {c}", choices) == c


def test_class_labels_written_as_text():
    classes = ("entailment", "neutral", "contradiction")
    assert normalize_class("1", classes) == normalize_class(1, classes) == "neutral"
    for bad in ["-1", "²", "٣", "1" * 5000, "99", "1.5", "--1"]:  # "-1" was neutral, "²" and 5000 digits raised
        assert quick(normalize_class, bad, classes) is None
    ratings = ("1", "2", "3")  # named like numbers: the name wins over the index
    assert normalize_class("1", ratings) == "1" and normalize_class("3.", ratings) == "3"
    assert normalize_class("-1", ("-1", "1")) == "-1"


# --- the arithmetic evaluator ------------------------------------------------------------


def check_value(text) -> float | None:
    """evaluate_expression(text): a finite float or ExpressionError, within FAST seconds."""
    try:
        value = quick(evaluate_expression, text)
    except ExpressionError as e:
        assert str(e)
        return None
    assert type(value) is float and math.isfinite(value)
    return value


@FUZZ
@given(any_text | st.text(st.sampled_from("0123456789.+-*/()eE_ jx%<~"), max_size=250))
def test_evaluate_arbitrary_text(text):
    check_value(text)


# expression trees: (text, value) with value None where the tree divides by zero or overflows
leaves = st.one_of(
    st.integers(0, 10**6).map(lambda n: (str(n), float(n))),
    st.floats(0, 1e300, allow_nan=False, allow_infinity=False).map(lambda x: (repr(x), x)),
    st.sampled_from(["1e308", "1e-320", "0", "0.0", "00", "1_000"]).map(lambda s: (s, float(s.replace("_", "")))),
)
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: None if b == 0 else a / b}


def _binop(children):
    return st.tuples(children, st.sampled_from(sorted(OPS)), children).map(
        lambda t: (f"({t[0][0]} {t[1]} {t[2][0]})",
                   None if t[0][1] is None or t[2][1] is None else OPS[t[1]](t[0][1], t[2][1])))


def _neg(children):
    return children.map(lambda c: (f"-{c[0]}", None if c[1] is None else -c[1]))


trees = st.recursive(leaves, lambda ch: _binop(ch) | _neg(ch), max_leaves=12)


@FUZZ
@given(trees)
def test_evaluate_matches_float_arithmetic(tree):
    text, expected = tree
    try:
        value = quick(evaluate_expression, text)
    except ExpressionError as e:
        if len(text) <= MAX_CHARS and expected is not None and math.isfinite(expected):
            # refused only for its size: too many syntax nodes, or nested too deep
            nodes = sum(1 for _ in ast.walk(ast.parse(text, mode="eval")))
            assert nodes > 100 or "nested deeper" in str(e), f"{text!r} = {expected} was refused: {e}"
    else:
        assert type(value) is float and value == expected


# forbidden operators and nodes, spliced into valid trees
@FUZZ
@given(trees, st.sampled_from(["**", "//", "%", "@", "<<", ">>", "&", "|", "^", "<", "==", "and", "if 1 else"]), trees)
def test_evaluate_refuses_other_operators(a, op, b):
    with pytest.raises(ExpressionError):
        quick(evaluate_expression, f"{a[0]} {op} {b[0]}")


REFUSED = [
    "9**9**9", "10**1000", "2**10000", "9 ** 9 ** 9 ** 9", "(" * 10_000, "(" * 150 + "1" + ")" * 150, "-" * 199 + "1",
    "9" * 5000, "1" + "0" * 400, "1e308*10", "1e308 + 1e308", "-1e308 - 1e308", "1e400", "1e400 - 1e400", "1/0",
    "1 / (2 - 2)", "0/0", "1e-320 / 0", "__import__('os')", "__import__('os').system('echo hi')", "().__class__",
    "(1).real", "x.y", "x", "(lambda: 1)()", "lambda: 1", "f'{1}'", "f'{9**9**9}'", "'a' * 3", "b'1'", "[1]", "{1: 2}",
    "{1}", "(1, 2)", "(175, 5)", "1 if 1 else 2", "True + 1", "None", "...", "1j", "1 // 2", "1 % 2", "1 @ 2",
    "1 << 100", "~1", "not 1", "1 < 2", "(a := 1)", "await x", "(yield)", "[x for x in ()]", "sum([1, 2])",
    "abs(-1)", "1; 2", "import os", "1\n+ 2", "\x00", "1\x00", "\ud800", "", "   ", "#", "\\", "1 +", "()",
]


@pytest.mark.parametrize("text", REFUSED, ids=lambda t: repr(t[:24]))
def test_evaluate_refuses_quickly(text):
    with pytest.raises(ExpressionError):
        quick(evaluate_expression, text)


@pytest.mark.parametrize("text, value", [
    ("(" * 99 + "1" + ")" * 99, 1.0), ("9" * 199, float("9" * 199)), ("1e308", 1e308), ("0x10 + 1_000", 1016.0),
    ("-(-(-1))", -1.0), ("( 84.0 / 2.0 )", 42.0), ("1e-400", 0.0), (" 7 ", 7.0),
])
def test_evaluate_accepts_edge_cases(text, value):
    assert quick(evaluate_expression, text) == value


@pytest.mark.parametrize("value", [None, 1, 1.5, b"1", ["1"], {"a": 1}])
def test_evaluate_refuses_non_strings(value):
    with pytest.raises(ExpressionError):
        evaluate_expression(value)


# --- the data loaders --------------------------------------------------------------------

FIELDS = ["input", "label", "question", "choices", "answer", "premise", "hypothesis", "text", "options", "q",
          "context", "id"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["", "[", "[[[", "a|b|c", '["x", "y"]', "(84 / 2)", "neutral", "2", "-1", "math problem", "x"]),
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=5), ch, max_size=3),
    max_leaves=10,
)
records = st.lists(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_values, max_size=7), max_size=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


_n = iter(range(10**9))


def write(folder: Path, suffix: str, data: bytes) -> Path:
    path = folder / f"f{next(_n)}{suffix}"
    path.write_bytes(data)
    return path


def check_load(task, path: Path) -> None:
    """task.load: examples (all gold-labelled or none, labels in the space) or a DataError naming the file."""
    try:
        examples = quick(task.load, "train", path)
    except DataError as e:
        assert str(path) in str(e), str(e)
        assert "\n" not in str(e), str(e)
        return
    labelled = {e.label is not None for e in examples}
    assert len(labelled) <= 1
    for e in examples:
        assert isinstance(e.input, str) and isinstance(e.id, str)
        if e.label is not None:
            assert task.normalize(e.label, e) is not None


def _encodings(draw_records, fmt):
    if fmt == "jsonl":
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in draw_records).encode("utf-8", "surrogatepass")
    if fmt == "json":
        return json.dumps(draw_records, ensure_ascii=False, indent=1).encode("utf-8", "surrogatepass")
    buf = io.StringIO()
    names = sorted({k for r in draw_records for k in r})
    w = csv.writer(buf)
    w.writerow(names)
    for r in draw_records:
        w.writerow([r.get(k, "") if isinstance(r.get(k), str) else json.dumps(r.get(k)) for k in names])
    return buf.getvalue().encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("name", sorted(TASKS))
@FEW
@given(data=st.binary(max_size=300) | adversarial.map(lambda s: s.encode("utf-8", "surrogatepass")),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_load_arbitrary_bytes(folder, name, data, suffix):
    check_load(TASKS[name][0], write(folder, suffix, data))


@pytest.mark.parametrize("name", sorted(TASKS))
@FEW
@given(rows=records, fmt=st.sampled_from(["jsonl", "json", "csv"]))
def test_load_records_of_any_shape(folder, name, rows, fmt):
    """Wrong types (a list for the question, a number for the label), missing fields, mixes."""
    check_load(TASKS[name][0], write(folder, f".{fmt}", _encodings(rows, fmt)))


@FEW
@given(rows=st.lists(st.fixed_dictionaries({"question": st.text(min_size=1), "answer": st.text()}), min_size=1,
                     max_size=4).filter(lambda rs: all(r["question"] for r in rs)),
       fmt=st.sampled_from(["jsonl", "json", "csv"]), bom=st.booleans())
def test_valid_records_round_trip(folder, rows, fmt, bom):
    """Any text survives: U+2028 inside a JSONL string, "\\r" in a quoted CSV field, a BOM."""
    data = (b"\xef\xbb\xbf" if bom else b"") + _encodings(rows, fmt)
    assert read_records(write(folder, f".{fmt}", data), ("question",)) == rows


BAD_FILES = [
    ("empty.jsonl", b"", "holds no records"),
    ("blank.json", b"\n \n\t\n", "holds no records"),
    ("empty.csv", b"", "holds no records"),
    ("header.csv", b"input,label\n", "holds no records"),
    ("latin1.jsonl", '{"input": "café"}'.encode("latin-1"), "UTF-8"),
    ("latin1.csv", "input\ncafé\n".encode("latin-1"), "UTF-8"),
    ("nonobjects.json", b"[1, 2, 3]", "not a JSON object"),
    ("nonobject.jsonl", b'"just a string"\n', "not a JSON object"),
    ("emptylist.json", b"[]", "holds no records"),
    ("deep.json", b"[" * 100_000, "nested too deeply"),
    ("deep.jsonl", b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("bigint.jsonl", b'{"input": "x", "label": ' + b"1" * 5000 + b"}", "unreadable JSON value"),
    ("bigfield.csv", b"input\n" + b"x" * 200_000 + b"\n", "not valid CSV"),
    ("extra.csv", b"input,label\nSam has 3,000 apples,(3000 + 5)\n", "quote fields that contain commas"),
    ("missing.jsonl", b'{"label": "(1 + 1)"}\n', "no field 'input'"),
    ("mixed.jsonl", b'{"input": "a", "label": "(1 + 1)"}\n{"input": "b"}\n', "label every record, or none"),
    ("listlabel.jsonl", b'{"input": "a", "label": ["(1 + 1)", 3]}\n', "outside the label space"),
    ("truncated.json", b'[{"input": "a"},', "not valid JSON"),
    ("object.json", b'{\n"input": "a"\n}\n', "not valid JSON"),
]


@pytest.mark.parametrize("fname, data, message", BAD_FILES, ids=[f for f, _, _ in BAD_FILES])
def test_bad_files_are_clear_errors(folder, fname, data, message):
    path = folder / fname
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as info:
        quick(get_task("svamp").load, "train", path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("choices, message", [
    (5, "expected a list"), ({"a": 1}, "expected a list"), ("[" * 5000, "not a valid JSON list"),
    ("[" + "1" * 5000 + "]", "not a valid JSON list"), (["only one"], "1 choices"), ([], "0 choices"),
])
def test_cqa_bad_choices(folder, choices, message):
    path = write(folder, ".jsonl", json.dumps({"question": "q", "choices": choices, "answer": "x"}).encode())
    with pytest.raises(DataError, match=message) as info:
        get_task("cqa").load("train", path)
    assert str(path) in str(info.value)


@FUZZ
@given(json_values)
def test_as_list_is_a_list_or_a_data_error(value):
    try:
        out = as_list(value, "choices")
    except DataError as e:
        assert "choices" in str(e)
    else:
        assert isinstance(out, list) and all(isinstance(v, str) for v in out)


def test_rows_that_are_not_objects_in_a_good_file(folder):
    path = write(folder, ".jsonl", b'{"input": "a", "label": "(1 + 1)"}\n[1]\n')
    with pytest.raises(DataError, match="line 2: not a JSON object"):
        read_records(path, ("input",))


# --- the config loader -------------------------------------------------------------------

YAML_PIECES = [
    "task:", "\n", "\n  ", "  name: svamp", "name: ", "svamp", "generic", "student:", "model: x", "teacher:",
    "engine_args:", "kind: hf", "training:", "epochs: ", "method:", "alpha: 1.5", "- ", "[", "]", "{", "}", ",", ":",
    ": ", "? ", "&a ", "*a", "&b [*a, *a]", "<<: *a", "!!binary aGk=", "!!binary /w==", "!!python/object:os.system",
    "!!python/name:os.system", "!!set {a, b}", "!!float x", "!!int x", "!!timestamp x", "2001-13-45", "2001-02-30",
    "1e5", "1" * 5000, "~", "null", "yes", "no", ".nan", ".inf", "|", ">", "'", '"', "\t", "%YAML 1.1\n", "---\n",
    "...\n", "#", "\x00", "\ud800", "é", "\ufeff", "0x1G", "0o9", "1:2:3",
]
yaml_text = st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=8), max_size=30).map("".join)


def check_config_error(e: ConfigError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg, msg


def check_build(model, data, source="config") -> None:
    try:
        cfg = quick(build, model, data, source)
    except ConfigError as e:
        check_config_error(e)
        assert str(e).startswith(source)
        return
    text = to_yaml(cfg)  # a run writes its config back out; it must load and validate again
    assert build(model, yaml.safe_load(text)) is not None


@FEW
@given(text=yaml_text | st.text(max_size=200), model=st.sampled_from([AnnotateRun, TrainRun]))
def test_load_yaml_arbitrary_text(folder, text, model):
    path = write(folder, ".yaml", text.encode("utf-8", "surrogatepass"))
    try:
        data = quick(load_yaml, path)
    except ConfigError as e:
        check_config_error(e)
        assert str(path) in str(e)
        return
    assert isinstance(data, dict)
    check_build(model, data, str(path))


@FEW
@given(st.binary(max_size=200))
def test_load_yaml_arbitrary_bytes(folder, data):
    path = write(folder, ".yaml", data)
    try:
        assert isinstance(quick(load_yaml, path), dict)
    except ConfigError as e:
        check_config_error(e)


SECTIONS = {
    "task": ["name", "path", "spec"],
    "teacher": ["kind", "model", "batch_size", "n_shots", "sampling", "engine_args", "price", "budget", "endpoint",
                "base_url"],
    "verify": ["samples", "against", "min_agreement"],
    "student": ["model", "kind", "lora", "tokenizer"],
    "method": ["name", "alpha", "kd", "label_source", "rationales"],
    "training": ["epochs", "learning_rate", "batch_size", "val_fraction", "bf16", "max_steps"],
}
# by name: hypothesis cannot repr an int over 4300 digits in a strategy
ODD = {"big": 10**5000, "-big": -(10**5000), "2**64": 2**64, "bytes": b"\xff", "ok-bytes": b"ok", "set": {1, 2},
       "tuple": (1, 2), "nan": float("nan")}


def _odd(name):
    return ODD[name]


scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
           | st.sampled_from(["svamp", "generic", "cqa", "hf", "openai", "paper", "x", "step-by-step", "co-distill",
                              "distill", "forward_kl", "jsd", "gold", "1e-4", "0.7", "spec.yaml", "http://[",
                              "http://u:p@h/v1", "http://h:99999/v1?k=1", "http://127.0.0.1:8000/v1"])
           | st.sampled_from(sorted(ODD)).map(_odd))
values = st.recursive(scalars, lambda ch: st.lists(ch, max_size=3)
                      | st.dictionaries(st.sampled_from(sum(SECTIONS.values(), [])) | st.text(max_size=6), ch,
                                        max_size=4), max_leaves=8)
sections = st.fixed_dictionaries({}, optional={
    s: st.fixed_dictionaries({}, optional={f: values for f in fs}) | values for s, fs in SECTIONS.items()
})
configs = st.one_of(
    sections,
    sections.map(lambda d: {**d, "task": {"name": "svamp"}, "student": {"model": "x"}}),
    st.dictionaries(st.text(max_size=8) | st.integers() | st.sampled_from(["a\nb", "\x00"]), values, max_size=4),
    values,
)


@FUZZ
@given(data=configs, model=st.sampled_from([AnnotateRun, TrainRun, EvalRun]))
def test_build_arbitrary_nested_dicts(data, model):
    check_build(model, data)


@FUZZ
@given(st.lists(st.text(max_size=30) | st.sampled_from(["training.epochs=2", "a=[", "a=2001-13-45", "a.b=1",
                                                         "task=svamp", "task.name.x=1", "x=" + "1" * 5000,
                                                         "teacher.engine_args=&a [*a]", "=", "a=!!binary /w=="]),
                max_size=5))
def test_overrides_arbitrary(pairs):
    data = {"task": {"name": "svamp"}, "student": {"model": "x"}}
    try:
        for key, value in quick(parse_overrides, pairs):
            set_dotted(data, key, value)
    except ConfigError as e:
        check_config_error(e)
        return
    check_build(TrainRun, data, "--set")


def _laughs(levels: int) -> str:
    lines = ["l0: &l0 [lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}]" for i in range(1, levels)]
    return "\n".join(lines)


BAD_CONFIGS = [
    (b"task: {name: svamp}\nstudent: {model: \xff}\n", "cannot be read"),
    (b"task: {name: svamp, path: 2001-13-45}\n", "not valid YAML"),
    (b"[" * 1000, "not valid YAML"),
    (b"task: {name: svamp}\nlimit: " + b"1" * 5000 + b"\n", "not valid YAML"),
    (b"task: !!python/object:os.system {}\n", "not valid YAML"),
    (b"task: &a {name: svamp, x: *a}\n", "refers|alias"),
    (b"task: {name: svamp}\nteacher:\n  engine_args: &a {x: *a}\n", "alias"),
    (_laughs(12).encode() + b"\ntask: {name: svamp}\nteacher: {engine_args: {x: *l11}}\n", "alias"),
    (b"task: {name: svamp}\nteacher: {engine_args: {x: !!binary /w==}}\n", "cannot be written back"),
    (b"task: {name: svamp}\n\"a\\nb\": 1\n", r"'a\\nb': unknown field"),
    (b"- a\n- b\n", "top level must be a mapping"),
]


@pytest.mark.parametrize("data, message", BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_bad_configs_are_one_line_errors(folder, data, message):
    path = write(folder, ".yaml", data)
    with pytest.raises(ConfigError, match=message) as info:
        quick(lambda: build(AnnotateRun, load_yaml(path), str(path)))
    check_config_error(info.value)
    assert str(path) in str(info.value)


def test_deep_yaml_is_refused_in_bounded_time(folder):
    """PyYAML's scanner is quadratic in the nesting depth until the recursion limit stops the
    parser (about 1.5 s, whatever the length): slow-ish, but bounded."""
    path = write(folder, ".yaml", b"[" * 100_000)
    with pytest.raises(ConfigError, match="not valid YAML"):
        quick(load_yaml, path, limit=10)


def test_huge_numbers_in_a_config_dict():
    for section, field in [("training", "epochs"), ("training", "batch_size"), ("training", "seed")]:
        data = {"task": {"name": "svamp"}, "student": {"model": "x"}, section: {field: 10**5000}}
        with pytest.raises(ConfigError) as info:
            build(TrainRun, data)
        check_config_error(info.value)
        assert len(str(info.value)) < 300


@FEW
@given(yaml_text | st.sampled_from([
    "inputs: [q]\nlabel_kind: classes\nclasses: [yes, no]\n", "inputs: q\nlabel_kind: free\n",
    "inputs: []\nlabel_kind: choice\n", "inputs: [q]\nlabel_kind: arithmetic\ndata: {train: 2001-13-45}\n",
]))
def test_generic_spec_arbitrary_text(folder, text):
    path = write(folder, ".yaml", text.encode("utf-8", "surrogatepass"))
    try:
        task = quick(GenericTask.from_yaml, path)
    except ConfigError as e:
        assert str(path) in str(e)
        return
    check_parsed(task, None, task.parse("x\nAnswer: yes"))


def test_every_error_is_a_stepdistill_error():
    assert issubclass(DataError, StepDistillError) and issubclass(ConfigError, StepDistillError)
    assert not issubclass(ExpressionError, StepDistillError)  # internal: parse() turns it into Parsed.error
