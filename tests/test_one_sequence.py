"""The formulations beyond the paper's two prefixes (issue 17): label then rationale, rationale then
label (a chain-of-thought student), and token-weighted against task-mean losses. Losses against a
hand computation from the model's full logits; training, prediction and explanation end to end on
tiny models."""

import pytest
import torch
import torch.nn.functional as F

from stepdistill.config import MethodConfig, TrainingConfig
from stepdistill.evaluation import explain, load_trained, predict
from stepdistill.methods import get_method
from stepdistill.methods.base import TrainRecord
from stepdistill.methods.batches import RATIONALE, SEGMENT, Collator
from stepdistill.methods.formatting import Format, extract_answer
from stepdistill.methods.losses import IGNORE_INDEX
from stepdistill.training import build_trainer, fit, make_format
from tiny_models import FakeTask, annotations, examples, llama_student, t5_student

STUDENTS = {"t5": t5_student, "llama": llama_student}
TRAINING = TrainingConfig(max_steps=1, batch_size=4, bf16=False, group_by_length=False)


def _records(n=4, without=()):
    exs = examples(n)
    ann = annotations(exs)
    return [TrainRecord(e.id, e.input, e.label, None if e.id in without else ann[e.id].rationale) for e in exs]


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("name", ["label-rationale", "rationale-label"])
def test_one_row_per_record_with_the_two_parts_marked_apart(kind, name):
    student = STUDENTS[kind]()
    method = get_method(MethodConfig(name=name))
    fmt = method.shape_format(make_format(student, TRAINING))
    records = _records(without={"ex3"})
    feats = method.features(student.tokenizer, fmt, records)
    tok = student.tokenizer
    for f, r in zip(feats, records):
        labels, rationale = f["labels"], f[SEGMENT + "labels"]
        assert len(labels) == len(rationale) and not any(k.startswith(RATIONALE) for k in f)
        assert all(a == IGNORE_INDEX or b == IGNORE_INDEX for a, b in zip(labels, rationale))  # disjoint
        label_text = tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True)
        rationale_text = tok.decode([t for t in rationale if t != IGNORE_INDEX], skip_special_tokens=True)
        # the label part (and its end marker) only; rationale-first without a rationale: the phrase, then it
        words = label_text.split()
        if name == "label-rationale" and r.rationale is not None:
            assert words == r.label.split() + ["because"]  # the label, then the word that ends it
        elif name == "rationale-label" and r.rationale is None:
            assert words[-1] == r.label  # the answer phrase, then the label
        else:
            assert words == r.label.split()
        if r.rationale is None:
            assert rationale_text == ""
        else:
            assert r.rationale.split() == [w for w in rationale_text.split() if w not in ("So", "the", "answer", "is")
                                           ] or rationale_text.startswith(r.rationale.split()[0])
        target = [t for t in labels if t != IGNORE_INDEX] + [t for t in rationale if t != IGNORE_INDEX]
        assert tok.eos_token_id in target
    assert len(method.answer_ids(feats[0])) == (
        sum(t != IGNORE_INDEX for t in feats[0]["labels"]) if name == "label-rationale"
        else sum(t != IGNORE_INDEX for t in feats[0]["labels"] + feats[0][SEGMENT + "labels"]))


def _hand_losses(student, batch):
    """Per-part token cross-entropies from the model's full logits (no speed-ups)."""
    with torch.no_grad():
        if student.is_seq2seq:
            from stepdistill.methods.batches import decoder_inputs

            whole = torch.where(batch[SEGMENT + "labels"].ne(IGNORE_INDEX), batch[SEGMENT + "labels"], batch["labels"])
            logits = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   decoder_input_ids=decoder_inputs(whole, student.model.config)).logits
            shifted = {k: batch[k] for k in ("labels", SEGMENT + "labels")}
        else:
            logits = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            shifted = {k: batch[k][:, 1:] for k in ("labels", SEGMENT + "labels")}
        out = {}
        for k, lab in shifted.items():
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab.reshape(-1), reduction="none",
                                 ignore_index=IGNORE_INDEX)
            out[k] = (ce.sum(), lab.ne(IGNORE_INDEX).sum())
        return out


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("name", ["label-rationale", "rationale-label"])
@pytest.mark.parametrize("weighting", ["task_mean", "token"])
def test_the_loss_is_the_hand_computed_weighted_cross_entropy(kind, name, weighting, tmp_path):
    cfg = MethodConfig(name=name, alpha=0.3, weighting=weighting)
    student = STUDENTS[kind]()
    trainer = build_trainer(student, cfg, TRAINING, _records(without={"ex2"}), [], None, tmp_path, progress=False)
    batch = Collator(student.tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(4)])
    hand = _hand_losses(student, batch)
    (sl, nl), (sr, nr) = hand["labels"], hand[SEGMENT + "labels"]
    want = 0.3 * sl / nl + 0.7 * sr / nr if weighting == "task_mean" else (sl + sr) / (nl + nr)
    student.model.eval()  # no dropout: the same numbers as the hand computation
    with torch.no_grad():
        got = trainer.compute_loss(student.model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_step_by_step_token_weighting_weighs_every_token_alike(tmp_path):
    student = t5_student()
    records = _records()
    trainer = build_trainer(student, MethodConfig(name="step-by-step", weighting="token"), TRAINING, records, [],
                            None, tmp_path, progress=False)
    batch = Collator(student.tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(4)])
    student.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(student.model, batch)
        sums, counts = [], []
        for pre in ("", RATIONALE):
            kw = trainer.model_inputs(batch, pre)
            logits = student.model(**kw).logits
            lab = batch[pre + "labels"]
            sums.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), reduction="sum",
                                        ignore_index=IGNORE_INDEX))
            counts.append(lab.ne(IGNORE_INDEX).sum())
    torch.testing.assert_close(got, sum(sums) / sum(counts), rtol=1e-5, atol=1e-6)


def test_extract_answer():
    assert extract_answer(Format("causal", answer_end="because"), "plant because a rose grows") == "plant"
    assert extract_answer(Format("causal", answer_end="because"), " plant") == "plant"
    fmt = Format("causal", answer_after="So the answer is")
    assert extract_answer(fmt, "a rose grows So the answer is plant.") == "plant"
    assert extract_answer(fmt, "it is so. So the answer is x. So the answer is animal") == "animal"
    assert extract_answer(Format("causal"), "  plant \n") == "plant"


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("name", ["label-rationale", "rationale-label"])
def test_trains_predicts_the_label_and_explains(kind, name, tmp_path, monkeypatch):
    import stepdistill.methods.one_sequence as one_sequence

    monkeypatch.setattr(one_sequence, "ANSWER_PHRASE", " so this is ")  # words the tiny vocabulary has
    exs = examples(16)
    method = MethodConfig(name=name, alpha=0.5)
    records = get_method(method).records(exs, annotations(exs)).records
    training = TrainingConfig(max_steps=40, learning_rate=1e-2, batch_size=8, bf16=False, eval_steps=20,
                              max_target_length=48)
    metrics = fit(STUDENTS[kind](), method, training, records, exs[:8], FakeTask(), tmp_path / "run", progress=False)
    assert metrics["train_loss"][-1][1] < metrics["train_loss"][0][1]
    student, info = load_trained(tmp_path / "run")
    assert (student.fmt.answer_end == "because") == (name == "label-rationale")
    assert (student.fmt.answer_after is not None) == (name == "rationale-label")
    lengths = []
    generate = student.model.generate
    monkeypatch.setattr(student.model, "generate", lambda **kw: (lengths.append((out := generate(**kw)).shape[1]), out)[1])
    preds = predict(student, [e.input for e in exs[:8]], prefix=info["label_prefix"], max_new_tokens=48)
    assert all("because" not in p and "this is" not in p for p in preds)
    written = predict(student, [e.input for e in exs[:8]], prefix=info["label_prefix"], max_new_tokens=48, extract=False)
    assert preds == [extract_answer(student.fmt, w) for w in written]  # stopping at "because" changes no label
    if name == "label-rationale":  # ... and stops the batch once every label is written
        assert lengths[0] < lengths[1] and all("because" in w for w in written), (lengths, written)
    assert metrics["best_val_accuracy"] >= 0.75, (preds, metrics["val_accuracy"])
    why = explain(student, info, [e.input for e in exs[:4]], limit=8)
    assert any(w for w in why) and not any(w.strip() in ("animal", "plant") for w in why)
