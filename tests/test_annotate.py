"""Annotation end to end: paper teacher, a fake teacher registered like a real one, store reuse, resume."""

import json

import pytest

from stepdistill import annotation, api
from stepdistill.errors import RunExistsError, StepDistillError
from stepdistill.teachers import TEACHERS, Completion, Teacher

from conftest import SHARED

PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "( 3.0 + 4.0 )"),
    ("A box holds 6 pens. How many pens are in 5 boxes?", "( 6.0 * 5.0 )"),
    ("Mia had 20 stickers and gave away 8. How many are left?", "( 20.0 - 8.0 )"),
    ("Sam shares 12 sweets among 3 friends. How many does each get?", "( 12.0 / 3.0 )"),
]
ANSWERS = {  # what the fake teacher says: two right, one wrong, one unparseable
    0: "3 plus 4 is 7. The answer is (3 + 4).",
    1: "6 times 5 is 30. The answer is (6 * 5).",
    2: "20 minus 8 is 11. The answer is (20 - 9).",
    3: "I am not sure about this one.",
}


class FakeTeacher(Teacher):
    kind = "fake"
    calls: list[int] = []
    fail_after: int | None = None

    def __init__(self, cfg, *, task, split, data_path):
        self.cfg = cfg

    def identity(self):
        return {"kind": "fake", "model": self.cfg.model}

    def generate(self, requests):
        for req in requests:
            if FakeTeacher.fail_after is not None and len(FakeTeacher.calls) >= FakeTeacher.fail_after:
                raise KeyboardInterrupt  # a crash half-way
            FakeTeacher.calls.append(req.example.index)
            yield req, Completion(ANSWERS[req.example.index], 10, 5, 0.01)


if "fake" not in TEACHERS:
    TEACHERS.register("fake")(FakeTeacher)


@pytest.fixture
def svamp_dir(tmp_path):
    d = tmp_path / "data" / "svamp"
    (d / "llm").mkdir(parents=True)
    (d / "svamp_test.json").write_text("".join(json.dumps({"input": q, "label": a}) + "\n" for q, a in PROBLEMS))
    (d / "llm" / "test_CoT_0.json").write_text(json.dumps([ANSWERS[i] + "\n\nQ: next" for i in range(4)]))
    FakeTeacher.calls, FakeTeacher.fail_after = [], None
    return d.parent


def _cfg(data, teacher="fake"):
    return {"task": {"name": "svamp", "path": str(data)}, "split": "test", "teacher": {"kind": teacher, "model": "m"}}


def test_paper_teacher_counts_unparsed_and_scores(svamp_dir, tmp_path):
    s = api.annotate(_cfg(svamp_dir, "paper"), tmp_path / "run", echo=lambda _: None)
    assert (s["n"], s["parsed"], s["unparsed"]) == (4, 3, 1)
    assert s["teacher_accuracy"] == pytest.approx(0.5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "annotations.jsonl").read_text().splitlines()]
    assert rows[3]["label"] is None and rows[3]["error"]
    assert rows[0]["rationale"] and "Q:" not in rows[0]["rationale"]  # cut at the invented next example
    for f in ["config.yaml", "env.json", "log.txt", "summary.json"]:
        assert (tmp_path / "run" / f).is_file()
    assert "teacher_accuracy=50.00%" in (tmp_path / "run" / "log.txt").read_text()
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["command"] == "annotate" and env["versions"]["torch"] and "git_revision" in env


def test_rerun_costs_nothing_and_crash_resumes(svamp_dir, tmp_path):
    FakeTeacher.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        api.annotate(_cfg(svamp_dir), tmp_path / "a", echo=lambda _: None)
    assert FakeTeacher.calls == [0, 1]
    FakeTeacher.fail_after = None
    s = api.annotate(_cfg(svamp_dir), tmp_path / "a", resume=True, echo=lambda _: None)  # same run, continued
    assert FakeTeacher.calls == [0, 1, 2, 3]  # only the two that were not stored
    assert (s["generated"], s["from_store"]) == (2, 2)
    s = api.annotate(_cfg(svamp_dir), tmp_path / "c", echo=lambda _: None)
    assert (s["generated"], s["from_store"]) == (0, 4) and len(FakeTeacher.calls) == 4
    # A different model is a different teacher: nothing reused.
    cfg = _cfg(svamp_dir)
    cfg["teacher"]["model"] = "other"
    assert api.annotate(cfg, tmp_path / "d", echo=lambda _: None)["generated"] == 4


def test_existing_run_is_never_overwritten(svamp_dir, tmp_path):
    api.annotate(_cfg(svamp_dir), tmp_path / "run", echo=lambda _: None)
    with pytest.raises(RunExistsError, match="--overwrite"):
        api.annotate(_cfg(svamp_dir), tmp_path / "run", echo=lambda _: None)
    api.annotate(_cfg(svamp_dir), tmp_path / "run", overwrite=True, echo=lambda _: None)


def test_missing_recorded_split_is_a_clear_error(svamp_dir, tmp_path):
    cfg = _cfg(svamp_dir, "paper")
    cfg["split"] = "train"
    with pytest.raises(StepDistillError):
        api.annotate(cfg, tmp_path / "run", echo=lambda _: None)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/sbs")
def test_paper_svamp_test_accuracy_reproduces_the_reference(tmp_path):
    cfg = {"task": {"name": "svamp", "path": str(SHARED)}, "split": "test", "teacher": {"kind": "paper"}}
    s = api.annotate(cfg, tmp_path / "run", echo=lambda _: None)
    assert s["n"] == 200 and s["unparsed"] == 7
    assert abs(s["teacher_accuracy_paper_parsing"] - 0.74) <= 0.005  # the README's reference figure
    assert s["teacher_accuracy"] == pytest.approx(0.775)  # ours: whole expressions, never eval()


def test_keep_correct_drops_rationales_that_reached_a_wrong_answer():
    from stepdistill.data import keep_correct
    from stepdistill.tasks import get_task
    from stepdistill.tasks.base import Example

    task = get_task("svamp")
    exs = [Example(str(i), q, a, index=i) for i, (q, a) in enumerate(PROBLEMS)]
    ann = {e.id: task.parse(ANSWERS[e.index], e) for e in exs}
    kept = keep_correct(ann, exs, task, echo=lambda _: None)
    assert sorted(kept) == ["0", "1"]  # 2 is wrong, 3 did not parse
    with pytest.raises(StepDistillError, match="gold labels"):
        keep_correct(ann, [Example("x", "q", None)], task, echo=lambda _: None)


def test_annotations_of_other_data_are_refused(svamp_dir, tmp_path):
    from stepdistill.errors import DataError
    from stepdistill.store import read_annotations
    from stepdistill.tasks import get_task
    from stepdistill.tasks.base import Example

    api.annotate(_cfg(svamp_dir), tmp_path / "ann", echo=lambda _: None)
    task = get_task("svamp")
    same = task.load("test", svamp_dir)
    assert len(read_annotations(tmp_path / "ann", task, "test", same)) == 4
    other = [Example(same[0].id, "a different problem", same[0].label)]
    with pytest.raises(DataError, match="do not belong to this data"):
        read_annotations(tmp_path / "ann", task, "test", other)
    with pytest.raises(DataError, match="for split 'test', not 'train'"):
        read_annotations(tmp_path / "ann", task, "train")


# --- large inputs are streamed, not loaded whole ----------------------------------------------


class CountingTeacher(Teacher):
    """Answers every problem (1 + 1) and notes, at each call, how far the loader has read."""

    kind = "counting"
    seen: list[tuple[int, int]] = []  # (examples in this call, highest example index so far)

    def __init__(self, cfg, *, task, split, data_path):
        self.cfg = cfg

    def identity(self):
        return {"kind": "counting", "model": self.cfg.model}

    def generate(self, requests):
        CountingTeacher.seen.append((len(requests), max(r.example.index for r in requests)))
        for req in requests:
            yield req, Completion("1 plus 1 is 2. The answer is (1 + 1).", 10, 5, 0.0)


if "counting" not in TEACHERS:
    TEACHERS.register("counting")(CountingTeacher)


def _big_jsonl(path, n, width):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"input": f"Problem {i}: " + "x" * width + " How much is 1 + 1?", "label": "(1 + 1)"}) + "\n")
    return path


def test_annotate_streams_a_large_file_in_bounded_memory(tmp_path, monkeypatch):
    import tracemalloc

    from stepdistill.tasks import get_task, load_examples

    data = _big_jsonl(tmp_path / "big.jsonl", n=2000, width=6000)  # 12 MB of inputs
    size = data.stat().st_size
    monkeypatch.setattr(annotation, "CHUNK_REQUESTS", 50)
    CountingTeacher.seen = []
    cfg = {"task": {"name": "svamp", "path": str(data)}, "split": "train", "teacher": {"kind": "counting", "model": "m"}}

    tracemalloc.start()
    try:
        summary = api.annotate(cfg, tmp_path / "run", store_path=tmp_path / "store.sqlite", echo=lambda _: None)
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        whole = load_examples(get_task("svamp"), "train", data)  # the list a whole-file loader would hold
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(whole) == summary["n"] == summary["kept"] == 2000
    assert whole_peak > 0.9 * size  # the measurement can tell the two apart
    assert streamed_peak < 0.25 * size, f"annotate peaked at {streamed_peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
    # the teacher saw the file a chunk at a time, in order
    assert [n for n, _ in CountingTeacher.seen] == [50] * 40
    assert [hi for _, hi in CountingTeacher.seen] == [50 * (c + 1) - 1 for c in range(40)]
    rows = (tmp_path / "run" / "annotations.jsonl").read_text().splitlines()
    assert len(rows) == 2000 and json.loads(rows[-1])["index"] == 1999


def test_a_bad_line_late_in_a_file_stops_annotate_before_any_teacher_call(tmp_path):
    data = _big_jsonl(tmp_path / "big.jsonl", n=300, width=10)
    with open(data, "a") as f:
        f.write('{"input": "unfinished\n')
    CountingTeacher.seen = []
    cfg = {"task": {"name": "svamp", "path": str(data)}, "split": "train", "teacher": {"kind": "counting", "model": "m"}}
    with pytest.raises(StepDistillError, match=r"big.jsonl line 301: not valid JSON"):
        api.annotate(cfg, tmp_path / "run", store_path=tmp_path / "store.sqlite", echo=lambda _: None)
    assert CountingTeacher.seen == []
