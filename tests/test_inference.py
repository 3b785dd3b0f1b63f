"""Fast label prediction: ranking a closed answer set instead of generating, and task-aware
generation limits. Tiny models built in the test."""

import json

import pytest
import torch

from stepdistill import api
from stepdistill.config import MethodConfig, TrainingConfig
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import label_token_limit, predict, rank
from stepdistill.methods.formatting import Format, encode_example
from stepdistill.methods.batches import decoder_inputs
from stepdistill.training import fit
from tiny_models import FakeTask, examples, llama_student, t5_student

CANDIDATES = ["entailment", "neutral", "contradiction"]


def _loglik(student, prefix, text, answer):
    """log p(answer + eos | prefix + text), from the full logits: the slow, obvious way."""
    start = student.model.config.decoder_start_token_id if student.is_seq2seq else None
    f = encode_example(student.tokenizer, student.fmt, prefix, text, answer, decoder_start=start)
    ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
    with torch.no_grad():
        if student.is_seq2seq:
            dec = torch.tensor([f["decoder_input_ids"]]) if "decoder_input_ids" in f else decoder_inputs(
                labels, student.model.config)
            logits, lab = student.model(input_ids=ids, decoder_input_ids=dec).logits[0], labels[0]
        else:
            logits, lab = student.model(input_ids=ids).logits[0, :-1], labels[0, 1:]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(float(logp[t, y]) for t, y in enumerate(lab.tolist()) if y != -100)


@pytest.mark.parametrize("kind, marker", [("t5", "encoder"), ("t5", "decoder"), ("llama", "encoder")])
def test_rank_picks_the_likeliest_candidate(kind, marker):
    student = (t5_student if kind == "t5" else llama_student)(seed=3)
    student.fmt = Format(kind=student.kind, task_marker=marker)
    inputs = [f"premise {i} / hypothesis {i * 7}" for i in range(6)]
    cands = [CANDIDATES, CANDIDATES[:2], ["yes", "no", "maybe", "a longer answer here"], CANDIDATES, ["x", "y"],
             CANDIDATES]
    expected = [max(c, key=lambda a: _loglik(student, "predict: ", x, a)) for x, c in zip(inputs, cands)]
    assert rank(student, inputs, cands, prefix="predict: ", batch_size=4) == expected
    assert len(set(expected)) > 1  # the test can tell a constant answer apart


def test_label_token_limit():
    assert label_token_limit({"max_label_tokens": 8}) == 12
    assert label_token_limit({}) == 64  # a model saved before the limit was recorded


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    exs = examples(16)
    from stepdistill.methods import get_method

    records = get_method(MethodConfig(name="standard")).records(exs, None).records
    fit(t5_student(), MethodConfig(name="standard"), TrainingConfig(max_steps=20, learning_rate=1e-2, batch_size=8,
                                                                      bf16=False),
        records, exs[:4], FakeTask(), out, progress=False)
    return out


def test_training_records_the_longest_label_and_eval_uses_it(trained, tmp_path, monkeypatch):
    info = json.loads((trained / "model" / "stepdistill.json").read_text())
    from tiny_models import tokenizer

    tok = tokenizer()
    assert info["max_label_tokens"] == max(len(tok(e.label, add_special_tokens=False)["input_ids"]) + 1
                                           for e in examples(16))
    seen = {}
    import stepdistill.evaluation as ev

    real = ev.predict

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(ev, "predict", spy)
    _register_fake_task(monkeypatch)
    m = api.evaluate({"task": {"name": "fake"}, "model": str(trained), "split": "test"}, tmp_path / "eval",
                     echo=lambda _: None)
    assert m["label_decoding"] == "generate" and seen["max_new_tokens"] == label_token_limit(info) == m["max_new_tokens"]


def test_eval_ranks_a_closed_answer_set(trained, tmp_path, monkeypatch):
    _register_fake_task(monkeypatch, classes=True)
    m = api.evaluate({"task": {"name": "fake"}, "model": str(trained), "split": "test"}, tmp_path / "eval",
                     echo=lambda _: None)
    assert m["label_decoding"] == "rank"
    preds = [json.loads(x)["prediction"] for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert set(preds) <= set(FakeTask.classes)
    assert m["accuracy"] >= 0.5  # ranking the trained labels finds them


def test_rank_refused_for_open_answers(trained, tmp_path, monkeypatch):
    _register_fake_task(monkeypatch)
    with pytest.raises(StepDistillError, match="label_decoding=rank needs a closed answer set"):
        api.evaluate({"task": {"name": "fake"}, "model": str(trained), "split": "test", "label_decoding": "rank"},
                     tmp_path / "eval", echo=lambda _: None)


@pytest.mark.parametrize("kind, marker", [("t5", "encoder"), ("t5", "decoder"), ("llama", "encoder")])
def test_greedy_within_a_vocabulary_matches_generate(kind, marker):
    """label_decoding=vocab's own loop (KV cache, output layer cut to the allowed rows): over the
    whole vocabulary it writes exactly what `generate` writes, left padding and eos included; over
    a few tokens, it writes only those."""
    student = (t5_student if kind == "t5" else llama_student)(seed=0)
    student.fmt = Format(kind=student.kind, task_marker=marker)
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: answers that depend on the input (a tiny model's do not)
        for p in student.model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    inputs = [f"question {i}: {'a long one ' * (i % 3)}{i * 13}" for i in range(5)]
    full = list(range(student.model.get_output_embeddings().weight.shape[0]))
    expected = predict(student, inputs, prefix="predict: ", batch_size=4, max_new_tokens=6)
    assert predict(student, inputs, prefix="predict: ", batch_size=4, max_new_tokens=6, vocab=full) == expected
    assert len(set(expected)) > 1
    tok = student.tokenizer
    few = tok("1 2 3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    out = predict(student, inputs, prefix="predict: ", batch_size=4, max_new_tokens=6, vocab=few)
    assert all(set(tok(o, add_special_tokens=False)["input_ids"]) <= set(few) for o in out)
    assert student.model.get_output_embeddings().weight.shape[0] == len(full)  # the head is put back


def test_training_records_the_label_tokens_and_eval_decodes_within_them(trained, tmp_path, monkeypatch):
    info = json.loads((trained / "model" / "stepdistill.json").read_text())
    from tiny_models import tokenizer

    tok = tokenizer()
    want = {t for e in examples(16) for t in tok(e.label, add_special_tokens=False)["input_ids"]} | {tok.eos_token_id}
    assert set(info["label_vocab"]) == want
    _register_fake_task(monkeypatch)
    m = api.evaluate({"task": {"name": "fake"}, "model": str(trained), "split": "test", "label_decoding": "vocab"},
                     tmp_path / "eval", echo=lambda _: None)
    g = api.evaluate({"task": {"name": "fake"}, "model": str(trained), "split": "test"}, tmp_path / "eval-g",
                     echo=lambda _: None)
    assert m["label_decoding"] == "vocab" and m["accuracy"] == g["accuracy"]
    # a model saved before the label tokens were: a clear error, not a silent full decode
    del info["label_vocab"]
    (trained / "model" / "stepdistill.json").write_text(json.dumps(info))
    try:
        with pytest.raises(StepDistillError, match="label_decoding=vocab needs the label tokens"):
            api.evaluate({"task": {"name": "fake"}, "model": str(trained), "split": "test", "label_decoding": "vocab"},
                         tmp_path / "eval2", echo=lambda _: None)
    finally:
        info["label_vocab"] = sorted(want)
        (trained / "model" / "stepdistill.json").write_text(json.dumps(info))


class _OpenTask(FakeTask):
    """The fake task with open answers: nothing to rank, labels are generated."""

    def label_candidates(self, example):
        return None


def _register_fake_task(monkeypatch, classes=False):
    from stepdistill import tasks

    class Loaded(FakeTask if classes else _OpenTask):
        def load(self, split, path=None):
            return examples(16)[:8]

    monkeypatch.setitem(tasks.TASKS._items, "fake", Loaded)
