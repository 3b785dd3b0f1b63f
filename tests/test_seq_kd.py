"""Sequence-level distillation of unlabelled inputs, end to end through the public API: an
unlabelled file, teacher labels from an OpenAI-compatible server (through the store), a
student trained on them and selected on agreement with the teacher."""

import json

from stepdistill import api
from stepdistill.tasks import get_task
from stepdistill.testing.openai_server import FakeOpenAIServer
from tiny_models import llama_student

QUESTIONS = get_task("quickstart").load("train")[:24]
GOLD = {e.input: e.label for e in QUESTIONS}


def answer(prompt, body):
    q = prompt.rsplit("Q: ", 1)[1].split("\nA:")[0].strip()
    return f"Work it out. The answer is {GOLD[q]}."


def test_distill_trains_on_unlabelled_inputs_with_teacher_labels(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"input": e.input}) + "\n" for e in QUESTIONS))  # no labels
    student_dir = tmp_path / "student"
    s = llama_student(0)
    s.model.save_pretrained(student_dir)
    s.tokenizer.save_pretrained(student_dir)
    with FakeOpenAIServer(answer) as srv:
        summary = api.annotate({"task": {"name": "svamp", "path": str(pool)}, "split": "train",
                                "teacher": {"kind": "openai", "base_url": srv.url, "model": "m"}},
                               tmp_path / "ann", store_path=tmp_path / "s.sqlite", echo=lambda _: None)
    assert summary["teacher_accuracy"] is None and summary["kept"] == 24  # no gold: kept by the (single) majority
    lines = []
    metrics = api.train({"task": {"name": "svamp", "path": str(pool)}, "student": {"model": str(student_dir)},
                         "method": {"name": "distill"}, "annotations": str(tmp_path / "ann"),
                         "training": {"max_steps": 4, "batch_size": 4, "val_fraction": 0.25, "learning_rate": 1e-3}},
                        tmp_path / "run", echo=lines.append)
    assert metrics["n_train"] == 18 and metrics["n_val"] == 6 and metrics["steps"] == 4
    assert metrics["best_val_accuracy"] is not None  # agreement with the teacher's labels
    assert any("scored against the teacher's labels" in line for line in lines)
    assert (tmp_path / "run" / "model" / "stepdistill.json").is_file()
