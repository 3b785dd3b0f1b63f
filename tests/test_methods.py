"""Methods turn examples + teacher annotations into records; formatting turns records into ids."""

import pytest

from stepdistill.config import MethodConfig
from stepdistill.errors import StepDistillError
from stepdistill.methods import METHODS, get_method
from stepdistill.methods.formatting import Format, encode_example, encode_source
from stepdistill.tasks.base import Example, Parsed
from tiny_models import annotations, examples, tokenizer


def test_registry_lists_methods_and_rejects_unknown():
    assert METHODS.names() == ["co-distill", "distill", "label-rationale", "on-policy", "rationale-label", "standard", "step-by-step"]
    with pytest.raises(StepDistillError, match="choose one of co-distill, distill, label-rationale, on-policy, rationale-label, standard, step-by-step"):
        METHODS.get("kd")


def test_standard_uses_gold_and_needs_it():
    exs = examples(4)
    rs = get_method(MethodConfig(name="standard")).records(exs, None)
    assert [r.label for r in rs.records] == [e.label for e in exs] and all(r.rationale is None for r in rs.records)
    with pytest.raises(StepDistillError, match="gold labels"):
        get_method(MethodConfig(name="standard")).records([Example("u", "the cat", None)], None)


def test_distill_uses_teacher_labels_and_drops_unparsed():
    exs = examples(4)
    ann = annotations(exs, bad={"ex1"})
    ann["ex0"] = Parsed("r", "plant")  # the teacher is wrong: distill still trusts it
    del ann["ex2"]
    rs = get_method(MethodConfig(name="distill")).records(exs, ann)
    assert [(r.id, r.label) for r in rs.records] == [("ex0", "plant"), ("ex3", "plant")]
    assert rs.counts["dropped_unparsed"] == 1 and rs.counts["dropped_not_annotated"] == 1
    assert "2 of 4 examples kept" in rs.summary()
    with pytest.raises(StepDistillError, match="no annotations"):
        get_method(MethodConfig(name="distill")).records(exs, None)


def test_answers_the_teachers_verification_dropped_are_counted_apart_from_unparsed_ones():
    exs = examples(4)
    ann = annotations(exs, bad={"ex1"})
    ann["ex2"] = Parsed(None, None, "disagrees with gold: teacher said 'plant', gold is 'animal'")
    ann["ex3"] = Parsed(None, None, "teacher failed: timeout")
    for name in ("distill", "label-rationale"):
        rs = get_method(MethodConfig(name=name, label_source="teacher")).records(exs, ann)
        assert [r.id for r in rs.records] == ["ex0"]
        assert (rs.counts["dropped_unparsed"], rs.counts["dropped_unverified"], rs.counts["dropped_teacher_failed"]) == (1, 1, 1)
        assert "1 dropped unverified" in rs.summary()


def test_step_by_step_gold_keeps_unparsed_for_label_task_only():
    exs = examples(4)
    ann = annotations(exs, bad={"ex1"})
    ann["ex0"] = Parsed("a cat lives", "plant")
    rs = get_method(MethodConfig(name="step-by-step", label_source="gold")).records(exs, ann)
    by_id = {r.id: r for r in rs.records}
    assert by_id["ex0"].label == "animal" and by_id["ex0"].rationale == "a cat lives"  # gold label, teacher rationale
    assert by_id["ex1"].rationale is None and rs.counts["label_only"] == 1  # unparsed: never a target
    assert len(rs.records) == 4


def test_label_only_drop_leaves_out_the_items_without_a_rationale_under_gold_labels():
    """With verified teacher labels equal to gold, gold labels + label_only: drop train exactly
    the teacher-label records: every item carries a rationale that agrees with its label."""
    exs = examples(4)
    ann = annotations(exs, bad={"ex1"})
    ann["ex2"] = Parsed(None, None, "disagrees with gold: teacher said 'plant', gold is 'animal'")
    for name in ("step-by-step", "label-rationale", "rationale-label"):
        rs = get_method(MethodConfig(name=name, label_source="gold", label_only="drop")).records(exs, ann)
        assert [r.id for r in rs.records] == ["ex0", "ex3"] and all(r.rationale for r in rs.records)
        assert rs.counts["no_rationale_left_out"] == 2 and rs.counts["label_only"] == 0
        assert "2 no rationale left out" in rs.summary()
        teacher = get_method(MethodConfig(name=name, label_source="teacher")).records(exs, ann)
        assert [(r.id, r.label, r.rationale) for r in rs.records] == [(r.id, r.label, r.rationale) for r in teacher.records]
    keep = get_method(MethodConfig(name="label-rationale", label_source="gold")).records(exs, ann)
    assert len(keep.records) == 4 and keep.counts["label_only"] == 2  # the default: the paper's


def test_step_by_step_teacher_labels_drop_unparsed():
    exs = examples(4)
    rs = get_method(MethodConfig(name="step-by-step", label_source="teacher")).records(exs, annotations(exs, bad={"ex1"}))
    assert [r.id for r in rs.records] == ["ex0", "ex2", "ex3"] and rs.counts["dropped_unparsed"] == 1
    with pytest.raises(StepDistillError, match="no annotations"):
        get_method(MethodConfig(name="step-by-step")).records(exs, None)


def test_causal_format_masks_prompt_and_ends_with_eos():
    tok = tokenizer()
    fmt = Format(kind="causal")
    f = encode_example(tok, fmt, "predict: ", "the cat", "animal")
    prompt = encode_source(tok, fmt, "predict: ", "the cat")
    assert f["input_ids"][: len(prompt)] == prompt
    assert f["labels"][: len(prompt)] == [-100] * len(prompt)
    assert f["labels"][len(prompt) :] == [tok.convert_tokens_to_ids("animal"), tok.eos_token_id]


def test_seq2seq_format_and_left_truncation_keeps_prefix_and_end():
    tok = tokenizer()
    fmt = Format(kind="seq2seq", max_input_length=5, max_target_length=2)
    f = encode_example(tok, fmt, "predict: ", "the big red old cat", "a cat lives")
    assert tok.convert_ids_to_tokens(f["input_ids"]) == ["predict", ":", "red", "old", "cat"]
    assert f["labels"] == tok.convert_tokens_to_ids(["a", "cat"])  # cut answer: no eos
