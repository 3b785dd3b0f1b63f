"""Tasks: loading from the three sources, prompts, parsing teacher outputs, labels, scoring."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from stepdistill.arith import evaluate_expression
from stepdistill.errors import ConfigError, DataError, StepDistillError
from stepdistill.tasks import TASKS, get_task
from stepdistill.tasks.base import Example
from stepdistill.tasks.common import load_prompt
from stepdistill.tasks.quickstart import QuickstartTask
from stepdistill.teachers.paper import paper_parsing_accuracy

FIXTURES = Path(__file__).parent / "fixtures"
SBS = FIXTURES / "sbs"
USER = FIXTURES / "user"
# the real paper data sits beside the checkout (../shared), locally and in CI
PAPER = Path(__file__).resolve().parents[2] / "shared" / "data" / "sbs"


# --- registry -----------------------------------------------------------------------------


def test_registry_has_every_task():
    assert TASKS.names() == sorted(
        ["svamp", "asdiv", "cqa", "esnli", "anli1", "anli2", "anli3", "generic", "quickstart"]
    )
    for name in ["svamp", "asdiv", "cqa", "esnli", "anli1", "anli2", "anli3", "quickstart"]:
        assert get_task(name).name == name


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(StepDistillError, match="choose one of .*svamp"):
        get_task("svamp2")


def test_generic_needs_a_spec_and_others_take_none():
    with pytest.raises(ConfigError, match="needs a spec"):
        get_task("generic")
    with pytest.raises(ConfigError, match="takes no spec"):
        get_task("svamp", FIXTURES / "generic" / "sentiment.yaml")


# --- loading: the paper's layout ------------------------------------------------------------


@pytest.mark.parametrize("root", [SBS, SBS / "svamp"])
def test_svamp_from_paper_layout_root_or_task_folder(root):
    examples = get_task("svamp").load("train", root)
    assert len(examples) == 10
    e = examples[2]
    assert e.index == 2 and e.id == "train-2"
    assert e.input.startswith("84 points were scored") and "\nHow many" in e.input
    assert e.label == "( 84.0 / 2.0 )"


def test_cqa_from_paper_layout():
    examples = get_task("cqa").load("train", SBS)
    assert len(examples) == 10
    e = examples[9]
    assert e.id == "q9" and e.label == "Paris"
    assert e.input == (
        "Which city is the capital of France?\nAnswer Choices:\n"
        "(a) Berlin\n(b) Paris\n(c) Madrid\n(d) Rome\n(e) Lisbon"
    )


@pytest.mark.parametrize("name, split", [("esnli", "valid"), ("anli1", "valid")])
def test_nli_from_paper_layout(name, split):
    examples = get_task(name).load(split, SBS)
    assert len(examples) == 10
    assert [e.label for e in examples[:3]] == ["entailment", "neutral", "contradiction"]
    assert examples[0].input == "Premise: A man is riding a horse on a beach.\nHypothesis: A person is on an animal."
    assert examples[1].id == ("u1" if name == "anli1" else "valid-1")


def test_missing_split_lists_the_available_ones():
    with pytest.raises(DataError, match=r"no 'valid' split for svamp \(have: train, test\)"):
        get_task("svamp").load("valid", SBS)


def test_unknown_split_name():
    with pytest.raises(DataError, match="unknown split 'dev': choose one of train, valid, test"):
        get_task("svamp").load("dev", SBS)


def test_directory_without_task_files():
    with pytest.raises(DataError, match="no asdiv_<split>.json files"):
        get_task("asdiv").load("train", SBS)


# --- loading: user files ------------------------------------------------------------------


@pytest.mark.parametrize("file", ["cqa.jsonl", "cqa.csv"])
def test_cqa_from_user_file(file):
    examples = get_task("cqa").load("train", USER / file)
    assert len(examples) == 10
    assert examples[0].fields["choices"] == ["scissors", "spoon", "pillow", "cup", "sock"]
    assert examples[0].label == "scissors" and examples[0].id == "train-0"


def test_nli_from_json_list_with_text_labels():
    examples = get_task("anli2").load("test", USER / "nli.json")
    assert [e.label for e in examples[:3]] == ["entailment", "neutral", "contradiction"]


def test_unlabelled_file_gives_examples_without_gold():
    examples = get_task("esnli").load("train", USER / "nli_unlabelled.jsonl")
    assert len(examples) == 10 and all(e.label is None for e in examples)


def test_svamp_from_csv():
    examples = get_task("svamp").load("test", USER / "svamp.csv")
    assert examples[1].label == "( 6.0 * 4.0 )" and "\n" in examples[0].input


def test_missing_file():
    with pytest.raises(DataError, match="no such file"):
        get_task("cqa").load("train", USER / "nope.jsonl")


def test_bad_json_line_is_named():
    with pytest.raises(DataError, match=r"bad_json.jsonl line 2: not valid JSON"):
        get_task("esnli").load("train", USER / "bad_json.jsonl")


def test_missing_field_names_line_and_field():
    with pytest.raises(DataError, match=r"line 3: no field 'hypothesis': each line needs 'premise' and 'hypothesis'"):
        get_task("esnli").load("train", USER / "missing_field.jsonl")


def test_some_labelled_some_not(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"input": "1 + 1?", "label": "(1 + 1)"}\n{"input": "2 + 2?"}\n')
    with pytest.raises(DataError, match="record 2: no field 'label' while other records have one"):
        get_task("svamp").load("train", f)


def test_label_outside_label_space():
    with pytest.raises(DataError, match=r"gold label 'maybe' is outside the label space of esnli"):
        get_task("esnli").load("train", USER / "bad_label.jsonl")


def test_cqa_answer_not_a_choice(tmp_path):
    f = tmp_path / "cqa.jsonl"
    f.write_text(json.dumps({"question": "q?", "choices": ["a1", "b1"], "answer": "c1"}) + "\n")
    with pytest.raises(DataError, match="outside the label space"):
        get_task("cqa").load("train", f)


# --- loading: the hub (datasets.load_dataset mocked) ----------------------------------------


HUB_ROWS = {
    "ChilleD/SVAMP": [{"ID": "chal-1", "Body": "Each pack costs 76 dollars. The discount is 25 dollars.",
                       "Question": "How much does a pack cost now?", "Equation": "( 76.0 - 25.0 )", "Answer": 51.0}],
    "EleutherAI/asdiv": [{"body": "Seven red apples and two green apples are in the basket.",
                          "question": "How many apples are in the basket?", "formula": "7+2=9", "answer": "9 (apples)"},
                         {"body": "b", "question": "q", "formula": "17/5=3 r 2", "answer": "3 r 2"}],
    "tau/commonsense_qa": [{"id": "abc", "question": "Where do fish live?", "question_concept": "fish",
                            "choices": {"label": ["A", "B", "C", "D", "E"],
                                        "text": ["desert", "water", "tree", "cloud", "attic"]},
                            "answerKey": "B"}],
    "esnli": [{"premise": "p", "hypothesis": "h", "label": 2, "explanation_1": "e"}],
    "facebook/anli": [{"uid": "u1", "premise": "p", "hypothesis": "h", "label": 1, "reason": ""}],
}


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return HUB_ROWS[path]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize(
    "name, split, hub_split, label",
    [
        ("svamp", "train", "train", "( 76.0 - 25.0 )"),
        ("asdiv", "train", "validation", "7+2"),
        ("cqa", "valid", "validation", "water"),
        ("esnli", "test", "test", "contradiction"),
        ("anli1", "valid", "dev_r1", "neutral"),
        ("anli3", "train", "train_r3", "neutral"),
    ],
)
def test_hub_loading(fake_hub, name, split, hub_split, label):
    task = get_task(name)
    examples = task.load(split)
    assert fake_hub[0][2] == hub_split
    assert examples[0].label == label and examples[0].input


def test_hub_fields_are_mapped(fake_hub):
    svamp = get_task("svamp").load("train")[0]
    assert svamp.id == "chal-1" and svamp.input.endswith("dollars.\nHow much does a pack cost now?")
    cqa = get_task("cqa").load("train")[0]
    assert cqa.id == "abc" and cqa.fields["choices"][1] == "water" and "(b) water" in cqa.input
    asdiv = get_task("asdiv").load("train")
    assert len(asdiv) == 1  # the remainder formula "17/5=3 r 2" is dropped


def test_hub_split_missing_and_hub_failure(fake_hub, monkeypatch):
    with pytest.raises(DataError, match=r"ChilleD/SVAMP has no 'valid' split \(have: train, test\)"):
        get_task("svamp").load("valid")
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load tau/commonsense_qa .*pass a local data path"):
        get_task("cqa").load("train")


# --- parsing teacher outputs (shapes of the paper's recorded PaLM outputs) ------------------


def test_parse_svamp():
    task = get_task("svamp")
    p = task.parse("Luke scored 84 points in 2 rounds. 84 / 2 = 42. The answer is (84 / 2).\n\nQ: There are 120 ...\nA: ...")
    assert p.ok and p.label == "(84 / 2)" and p.rationale == "Luke scored 84 points in 2 rounds. 84 / 2 = 42."
    # no outer parentheses: the whole expression counts, not just its first group
    assert task.parse("So 272 * 4 = 1088. The answer is (16 * 17) * 4.\n\n").label == "(16 * 17) * 4"


@pytest.mark.parametrize(
    "completion, error",
    [
        ("He has 175 and 5 left. The answer is (175, 5).\n\nQ: ...", "not an arithmetic expression"),
        ("So Jake has 2 * x peaches. The answer is (2 * x).", "not an arithmetic expression"),
        ("The answer is ((491 - 21", "not an arithmetic expression"),
        ("So 11 / 3 = 3.33333333333333333333333333333", "no answer phrase"),
        ("", "no answer phrase"),
        ("The answer is", "empty answer"),
    ],
)
def test_parse_svamp_failures(completion, error):
    p = get_task("svamp").parse(completion)
    assert not p.ok and p.label is None and p.error == error


def test_parse_cqa():
    task = get_task("cqa")
    e = task.load("train", SBS)[9]  # Paris
    p = task.parse("The capital of France is Paris. So the answer is (b) Paris.\n\nQ: What is ...\nAnswer Choices:\n(a) x", e)
    assert p.ok and p.label == "Paris" and p.rationale == "The capital of France is Paris."
    assert task.parse("So the answer is (b) paris.", e).label == "Paris"  # case does not matter
    assert task.parse("So the answer is (b).", e).label == "Paris"  # letter only
    assert task.parse("So the answer is (d) Paris.", e).label == "Paris"  # the text wins, as in the paper
    assert task.parse("So the answer is (b) Paris.").label == "Paris"  # no example: text as written
    assert task.parse("So the answer is either (b) Paris or (d) Rome.", e).error == "more than one choice in the answer"
    assert task.parse("So the answer is (f) London.", e).error == "label out of label space"
    assert task.parse("I am not sure.", e).error == "no answer phrase"


def test_parse_anli():
    task = get_task("anli1")
    p = task.parse("The premise mentions a senator. So the answer is entailment.\n\nPremise: Almost Sunrise ...")
    assert p.ok and p.label == "entailment" and p.rationale == "The premise mentions a senator."
    assert task.parse("He was born in 1995, so the answer is contradiction.\n\nPremise: x").label == "contradiction"
    assert task.parse("So the answer is maybe.").error == "label out of label space"
    assert task.parse("The premise mentions North Lincolnshire. The population").error == "no answer phrase"


def test_parse_esnli():
    task = get_task("esnli")
    p = task.parse("The to go packages are not necessarily from lunch.\nAnswer: neutral\n\nPremise: Two women ...\nHypothesis: ...")
    assert p.ok and p.label == "neutral" and p.rationale == "The to go packages are not necessarily from lunch."
    # cut off right after the label: the label itself is complete
    assert task.parse("A man is a person.\nAnswer: entailment\n\nPre").label == "entailment"
    assert task.parse("A toddler is a child. A child is a person. A word").error == "no answer phrase"
    assert task.parse("x\nAnswer: entail").error == "label out of label space"


@pytest.mark.parametrize("name", ["svamp", "cqa", "esnli", "anli1"])
@pytest.mark.parametrize("junk", ["", "\x00\x00", "Q:" * 1000, "(" * 5000, "The answer is " + "(" * 300, "\n\n\n"])
def test_parse_never_raises(name, junk):
    p = get_task(name).parse(junk)
    assert not p.ok and p.error


# --- prompts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, prompt_name, ending",
    [("svamp", "svamp", "\nA:"), ("cqa", "cqa", "\nA:"), ("esnli", "esnli", "\nReasonings:"), ("anli1", "anli", "\nA:")],
)
def test_teacher_prompt_ends_where_the_completion_begins(name, prompt_name, ending):
    task = get_task(name)
    e = task.load("valid" if name in ("esnli", "anli1") else "train", SBS)[0]
    prompt = task.teacher_prompt(e)
    assert prompt.endswith("\n\n" + task.render(e.fields)) and prompt.endswith(ending)
    assert prompt.count("\n\n") == len(load_prompt(prompt_name)["exemplars"])
    # every exemplar, rendered as a completion, parses back to its own answer with the task's parser
    for shot in load_prompt(prompt_name)["exemplars"]:
        ex = Example(id="x", input="", label=None, fields=shot)
        query = task.render(shot)
        completion = task.render(shot, shot["rationale"], shot["answer"])[len(query) :]
        parsed = task.parse(completion + "\n\n" + task.render(shot), ex)  # runs on into a new example
        assert parsed.ok and parsed.label == task.normalize(shot["answer"], ex), (shot, parsed)
        assert parsed.rationale == shot["rationale"]


@pytest.mark.parametrize(
    "name, prompt_name, split",
    [("svamp", "svamp", "train"), ("cqa", "cqa", "train"), ("esnli", "esnli", "valid"), ("anli1", "anli", "valid")],
)
def test_teacher_prompt_n_shots(name, prompt_name, split):
    task = get_task(name)
    e = task.load(split, SBS)[0]
    query = task.render(e.fields)
    first = load_prompt(prompt_name)["exemplars"][0]
    one = task.teacher_prompt(e, n_shots=1)
    assert one == task.render(first, first["rationale"], first["answer"]) + "\n\n" + query  # one exemplar, then the query
    assert task.teacher_prompt(e, n_shots=0) == query  # zero-shot: just the question
    assert task.teacher_prompt(e, n_shots=100) == task.teacher_prompt(e, n_shots=None) == task.teacher_prompt(e)


def test_generic_teacher_prompt_n_shots():
    task = get_task("generic", FIXTURES / "generic" / "sentiment.yaml")
    e = task.load("train")[0]
    one = task.teacher_prompt(e, n_shots=1)
    assert one.count("\nAnswer:") == 1 and "The waiter forgot" in one and "Fresh bread" not in one
    assert one.endswith("\n\n" + task.render(e.fields))
    zero = task.teacher_prompt(e, n_shots=0)  # the instruction stays: it is the task, not an exemplar
    assert zero.startswith("Decide whether") and "\nAnswer:" not in zero and zero.endswith("\n\n" + task.render(e.fields))
    assert task.teacher_prompt(e, n_shots=5) == task.teacher_prompt(e)


@pytest.mark.parametrize("prompt_name", ["svamp", "cqa", "esnli", "anli"])
def test_every_shipped_prompt_has_a_version(prompt_name):
    assert load_prompt(prompt_name)["version"] is not None


def test_template_version_comes_from_the_prompt_file(monkeypatch):
    from stepdistill.tasks import common

    assert get_task("cqa").template_version == str(load_prompt("cqa")["version"])
    bumped = {**load_prompt("svamp"), "version": 7}
    monkeypatch.setattr(common, "load_prompt", lambda name: bumped)
    assert get_task("svamp").template_version == get_task("quickstart").template_version == "7"


def test_stop_strings_mark_the_next_example():
    for name in ["svamp", "cqa", "esnli", "anli1", "quickstart"]:
        task = get_task(name)
        e = task.load("valid" if name in ("esnli", "anli1", "quickstart") else "train", None if name == "quickstart" else SBS)[0]
        second_example = task.teacher_prompt(e).split("\n\n")[1]
        assert any(("\n\n" + second_example).startswith(s) for s in task.stop), name


# --- labels and scoring ---------------------------------------------------------------------


def test_normalize_and_is_correct():
    svamp, cqa, nli = get_task("svamp"), get_task("cqa"), get_task("esnli")
    e = svamp.load("train", SBS)[2]  # ( 84.0 / 2.0 )
    assert svamp.is_correct("(84 / 2)", e) and svamp.is_correct("42", e) and svamp.is_correct("(84 / 2).", e)
    assert not svamp.is_correct("(84 * 2)", e) and not svamp.is_correct("(175, 5)", e)
    assert not svamp.is_correct(None, e)
    assert svamp.normalize("  (84  /  2) ") == "(84 / 2)" and svamp.normalize("two") is None
    q = cqa.load("train", SBS)[1]  # water
    assert cqa.normalize("Water", q) == "water" and cqa.normalize("(b)", q) == "water" and cqa.normalize("b", q) == "water"
    assert cqa.normalize("lava", q) is None and cqa.is_correct("water", q) and not cqa.is_correct("tree", q)
    assert nli.normalize(" Neutral. ") == "neutral" and nli.normalize(2) == "contradiction" and nli.normalize("yes") is None
    examples = nli.load("valid", SBS)
    assert nli.accuracy([e.label for e in examples], examples) == 1.0
    assert nli.accuracy([None] * len(examples), examples) == 0.0
    # no gold labels: no accuracy (None, valid JSON), not NaN
    unlabelled = nli.load("train", USER / "nli_unlabelled.jsonl")
    assert nli.accuracy([e.label for e in unlabelled], unlabelled) is None


# --- generic task ---------------------------------------------------------------------------


def test_generic_task_from_spec():
    task = get_task("generic", FIXTURES / "generic" / "sentiment.yaml")
    assert task.name == "sentiment" and task.label_kind == "classes" and task.classes == ("positive", "negative")
    train, test = task.load("train"), task.load("test")
    assert len(train) == 10 and len(test) == 4 and train[0].label == "negative"
    assert train[0].input == "The food was cold and the waiter rude."
    prompt = task.teacher_prompt(train[0])
    assert prompt.startswith("Decide whether the restaurant review is positive or negative. The answer is one of")
    assert prompt.endswith("Text: The food was cold and the waiter rude.\nReasoning:")
    p = task.parse(" Cold food is a complaint.\nAnswer: Negative\n\nText: Great!\nReasoning: ...")
    assert p.ok and p.label == "negative" and p.rationale == "Cold food is a complaint."
    assert task.parse("Hmm.\nAnswer: mixed").error == "label out of label space"
    assert task.is_correct("negative", train[0]) and not task.is_correct("positive", train[0])
    assert any(("\n\nText: x").startswith(s) for s in task.stop)
    with pytest.raises(DataError, match="no data file for split 'valid'"):
        task.load("valid")
    assert len(task.load("train", FIXTURES / "generic")) == 10  # a folder: <name>_<split>.*


def test_generic_choice_and_arithmetic(tmp_path):
    spec = tmp_path / "quiz.yaml"
    spec.write_text("name: quiz\ninputs: [question]\nlabel: answer\nlabel_kind: choice\nchoices: options\n")
    data = tmp_path / "quiz.jsonl"
    data.write_text(json.dumps({"question": "2 + 2?", "options": ["3", "4"], "answer": "4"}) + "\n")
    task = get_task("generic", spec)
    e = task.load("train", data)[0]
    assert e.input == "2 + 2?\nAnswer Choices:\n(a) 3\n(b) 4"
    assert task.parse("Two and two make four.\nAnswer: (b) 4", e).label == "4"
    assert task.is_correct("(b)", e)
    spec.write_text("inputs: q\nlabel_kind: arithmetic\n")
    data.write_text(json.dumps({"q": "2 + 2?", "label": "(2 + 2)"}) + "\n")
    task = get_task("generic", spec)
    assert task.is_correct("4", task.load("test", data)[0])


def test_generic_bad_spec_reports_every_mistake():
    with pytest.raises(ConfigError) as info:
        get_task("generic", FIXTURES / "generic" / "bad_spec.yaml")
    msg = str(info.value)
    assert "bad_spec.yaml: invalid task spec" in msg
    assert "colour" in msg  # unknown key
    with pytest.raises(ConfigError, match="no such task spec"):
        get_task("generic", FIXTURES / "generic" / "nope.yaml")


def test_generic_spec_consistency_errors_all_at_once(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("inputs: [question]\nlabel_kind: classes\nclasses: [yes]\nchoices: options\n"
                    "exemplars:\n  - question: q\n")
    with pytest.raises(ConfigError) as info:
        get_task("generic", spec)
    msg = str(info.value)
    assert "at least two classes" in msg and "choices:" in msg and "exemplars[1]" in msg


# --- quickstart -----------------------------------------------------------------------------


def test_quickstart_is_deterministic_and_splits_do_not_overlap():
    task = get_task("quickstart")
    splits = {s: task.load(s) for s in ("train", "valid", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 200, "valid": 40, "test": 60}
    assert [e.input for e in get_task("quickstart").load("test")] == [e.input for e in splits["test"]]
    inputs = [{e.input for e in v} for v in splits.values()]
    assert sum(len(x) for x in inputs) == len(set().union(*inputs)) == 300  # distinct within and across
    # a different train size leaves the other splits untouched
    assert [e.input for e in QuickstartTask(train=500).load("test")] == [e.input for e in splits["test"]]
    assert len(QuickstartTask(train=5, valid=3, test=4).load("valid")) == 3


def test_quickstart_is_varied_and_correct():
    task = get_task("quickstart")
    examples = task.load("train")
    ops = Counter(op for e in examples for op in re.findall(r"[-+*/]", e.label))
    assert set(ops) == {"+", "-", "*", "/"}
    assert any(e.label.startswith("((") for e in examples)  # two-step problems too
    for e in examples:
        value = evaluate_expression(e.label)
        assert value == e.fields["answer"] and value >= 0 and value == int(value), e
        # the reference rationale plus the SVAMP answer phrase is a completion the parser accepts
        p = task.parse(f"{e.fields['rationale']} The answer is {e.label}.\n\nQ: next")
        assert p.ok and task.is_correct(p.label, e)
    with pytest.raises(DataError, match="reads no files"):
        task.load("train", SBS)


# --- the paper's recorded PaLM outputs (real data beside the checkout) ----------------------

needs_paper = pytest.mark.skipif(not PAPER.is_dir(), reason=f"paper data not found at {PAPER}")


def _recorded(task: str, split: str) -> list[str]:
    files = sorted((PAPER / task / "llm").glob(f"{split}_CoT_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return [o for f in files for o in json.loads(f.read_text())]


# (task, split, README figure, our parser's accuracy, our unparsed count)
PAPER_FIGURES = [
    ("svamp", "train", 73.50, 74.25, 34),
    ("svamp", "test", 74.00, 77.50, 7),
    ("cqa", "train", 74.26, 75.39, 287),
    ("esnli", "valid", 73.17, 73.17, 4),
    ("anli1", "valid", 66.80, 67.50, 1),
]


@needs_paper
@pytest.mark.parametrize("name, split, readme, ours, unparsed", PAPER_FIGURES)
def test_recorded_teacher_accuracy(name, split, readme, ours, unparsed):
    task = get_task(name)
    examples, outputs = task.load(split, PAPER), _recorded(name, split)
    assert len(examples) == len(outputs)
    parsed = [task.parse(o, e) for o, e in zip(outputs, examples)]
    acc = 100 * task.accuracy([p.label for p in parsed], examples)
    assert acc == pytest.approx(ours, abs=0.005)
    assert sum(not p.ok for p in parsed) == unparsed
    # Our parser is stricter about structure and looser about form than the paper's: it keeps a
    # whole expression `(16 * 17) * 4` (the paper kept `(16 * 17)`), matches choice text in any
    # case (`French government`), and takes ", so the answer is" (ANLI). It never scores lower.
    assert acc >= readme - 0.5
    # The paper's own parsing (used to print the reference figure beside ours) reproduces the README.
    assert 100 * paper_parsing_accuracy(task, outputs, examples) == pytest.approx(readme, abs=0.5)


# ---------------------------------------------------------------- carved splits

def test_a_carve_keeps_ids_and_positions_and_its_halves_are_disjoint():
    from stepdistill.tasks import load_examples, split_base, stream_examples

    task = get_task("cqa")
    whole = load_examples(task, "train", PAPER)
    train, dev = load_examples(task, "train[:-1221]", PAPER), load_examples(task, "train[-1221:]", PAPER)
    assert len(train) + len(dev) == len(whole) == 9741 and len(dev) == 1221
    assert [e.id for e in train + dev] == [e.id for e in whole] and dev[0].index == 8520
    assert not {e.id for e in train} & {e.id for e in dev}
    assert [e.id for e in load_examples(task, "train[10%:20%]", PAPER)] == [e.id for e in whole[974:1948]]
    assert len(stream_examples(task, "train[100:150]", PAPER)) == 50
    assert split_base("valid[:50%]") == "valid" and split_base("test") == "test"
    for bad in ("train[:]", "train[a:b]", "train[1:2:3]", "train[:150%]"):
        with pytest.raises(DataError, match="carve"):
            load_examples(task, bad, PAPER)


def test_a_carve_takes_the_annotations_of_its_whole_split(tmp_path):
    from stepdistill import api
    from stepdistill.store import read_annotations
    from stepdistill.tasks import load_examples

    api.annotate({"task": {"name": "anli1", "path": str(PAPER)}, "split": "valid", "teacher": {"kind": "paper"}},
                 tmp_path / "ann", echo=lambda _: None)
    task = get_task("anli1")
    part = load_examples(task, "valid[-100:]", PAPER)
    ann = read_annotations(tmp_path / "ann", task, "valid[-100:]", part)
    assert all(e.id in ann for e in part)
    with pytest.raises(DataError, match="for split 'valid', not 'test'"):
        read_annotations(tmp_path / "ann", task, "test", part)


@pytest.mark.parametrize("field, value", [("split", "test"), ("split", "test[:50%]"), ("val_split", "test[:100]")])
def test_training_or_selecting_on_test_is_refused(field, value):
    from stepdistill import api

    cfg = {"task": {"name": "svamp", "path": str(PAPER)}, "method": {"name": "standard"},
           "student": {"model": "none"}, field: value}
    with pytest.raises(StepDistillError, match="test split"):
        api.train(cfg, "never-written")
