"""The label and the rationale in one sequence, after one task prefix: one forward pass a step.

    label-rationale   target = label + " because " + rationale + eos. At inference the student's
                      label ends at "because": the label costs what a standard student's does.
                      For small students this order beat rationale-first (Wadhwa et al. 2024,
                      arXiv 2406.14511; Chen et al. 2024, arXiv 2404.09170).
    rationale-label   target = rationale + " So the answer is " + label + eos: a chain-of-thought
                      student. At inference it writes its rationale first, so a prediction costs
                      the rationale's tokens too (the report's ms/prediction shows it).

The loss keeps the tasks apart although they share a sequence: `labels` holds the label's tokens
and `seg_labels` the rationale's, so `method.weighting: task_mean` gives
alpha * (label tokens' mean) + (1 - alpha) * (rationale tokens' mean), each mean over the whole
accumulated batch, and `token` gives every token the same weight (plain cross-entropy over the
sequence). A record without a rationale (a teacher output that did not parse, with gold labels)
trains its label alone. Records are step-by-step's: labels from `label_source`, rationales from
the teacher, `rationales: correct` to keep only those whose teacher label was right.
"""

from __future__ import annotations

import dataclasses

import torch

from stepdistill.errors import ConfigError
from stepdistill.methods.base import METHODS, TrainRecord
from stepdistill.methods.batches import SEGMENT, decoder_inputs
from stepdistill.methods.formatting import Format, encode_source, token_ids
from stepdistill.methods.losses import IGNORE_INDEX, normalise
from stepdistill.methods.step_by_step import StepByStepMethod, task_weighted

# label-rationale: the label ends here and the rationale follows. A word, not a newline: T5's
# tokenizer turns newlines into spaces, so a newline could not end the label for every student
LABEL_END = " because"
ANSWER_PHRASE = " So the answer is "  # rationale-label: the label follows this (the paper's prompts' phrase)


class _OneSequence(StepByStepMethod):
    """Shared by both orders: one row per record whose target is the two parts, marked apart."""

    label_first: bool = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.kd is not None:
            raise ConfigError(f"method {self.name} does not combine with kd yet: use step-by-step for soft-label KD")
        if cfg.task_marker != "encoder":
            raise ConfigError(f"method {self.name} has one task, so no task marker to move: use task_marker=encoder")

    def parts(self, r: TrainRecord) -> tuple[str, str]:
        """(the text before the split, the text after it) of a record's target."""
        raise NotImplementedError

    def features(self, tokenizer, fmt: Format, records: list[TrainRecord], *,
                 decoder_start: int | None = None) -> list[dict]:
        eos = tokenizer.eos_token_id
        assert eos is not None, "the student's tokenizer needs an eos token"
        rows = []
        for r in records:
            source = encode_source(tokenizer, fmt, self.cfg.label_prefix, r.input)
            first, second = self.parts(r)
            # each part tokenised on its own (a tokenizer could merge across the split), eos last
            head, tail = token_ids(tokenizer, first, False), token_ids(tokenizer, second, False) + [eos]
            target = (head + tail)[: fmt.max_target_length]
            cut = min(len(head), len(target))
            before = target[:cut] + [IGNORE_INDEX] * (len(target) - cut)  # the part before the split, marked alone
            after = [IGNORE_INDEX] * cut + target[cut:]
            labels, rationale = (before, after) if self.label_first else (after, before)
            if not r.rationale:  # no rationale: every target token is the label's
                labels, rationale = target, [IGNORE_INDEX] * len(target)
            if fmt.kind == "seq2seq":
                rows.append({"input_ids": source, "labels": labels, SEGMENT + "labels": rationale})
            else:
                pad = [IGNORE_INDEX] * len(source)
                rows.append({"input_ids": source + target, "labels": pad + labels, SEGMENT + "labels": pad + rationale})
        return rows

    def answer_ids(self, feature: dict) -> list[int]:
        """What the label task writes before its label is complete: label-first, the label and the
        word that ends it; rationale-first, the whole target."""
        if self.label_first:
            return super().answer_ids(feature)
        return [t for t in feature["labels"] if t != IGNORE_INDEX] + [
            t for t in feature[SEGMENT + "labels"] if t != IGNORE_INDEX]

    def compute_loss(self, trainer, model, inputs: dict, counts: dict) -> torch.Tensor:
        labels, rationale = inputs["labels"], inputs[SEGMENT + "labels"]
        kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if trainer.student.is_seq2seq:  # teacher forcing on the whole target, both parts
            whole = torch.where(rationale.ne(IGNORE_INDEX), rationale, labels)
            kw["decoder_input_ids"] = decoder_inputs(whole, trainer.student.model.config)
        label_sum, rationale_sum = trainer.segment_losses(model, kw, [labels, rationale])
        label_loss = normalise(label_sum, labels, counts.get(""))
        rationale_loss = normalise(rationale_sum, rationale, counts.get(SEGMENT))
        trainer.note("label_loss", label_loss)
        trainer.note("rationale_loss", rationale_loss)
        return task_weighted(self.cfg, label_loss, rationale_loss, labels, rationale, counts, SEGMENT,
                             trainer.student.is_seq2seq)


@METHODS.register("label-rationale")
class LabelThenRationale(_OneSequence):
    name = "label-rationale"
    label_first = True

    def parts(self, r: TrainRecord) -> tuple[str, str]:
        return (r.label + LABEL_END, " " + r.rationale) if r.rationale else (r.label, "")

    def shape_format(self, fmt: Format) -> Format:
        return dataclasses.replace(fmt, answer_end=LABEL_END.strip())


@METHODS.register("rationale-label")
class RationaleThenLabel(_OneSequence):
    name = "rationale-label"
    label_first = False

    def parts(self, r: TrainRecord) -> tuple[str, str]:
        return (r.rationale + ANSWER_PHRASE, r.label) if r.rationale else (ANSWER_PHRASE.lstrip(), r.label)

    def shape_format(self, fmt: Format) -> Format:
        return dataclasses.replace(fmt, answer_after=ANSWER_PHRASE.strip())
