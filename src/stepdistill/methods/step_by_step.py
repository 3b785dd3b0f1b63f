"""Distilling step-by-step (Hsieh et al., 2023): label task + rationale task, one student.

    loss = alpha * label loss + (1 - alpha) * rationale loss

Each task's loss is its token cross-entropy divided by its own target count over the whole
accumulated batch, so alpha weighs the two tasks as the paper's two-pass step does. With the
fused speed-up (training.fuse_tasks) both tasks run in fewer passes: the same values.

Records: the label comes from `label_source` (gold or teacher), the rationale from the teacher.
Choice made here: an example whose teacher output did not parse (or gave no rationale) is
*kept for the label task only* when its label is still known (gold source) — the label loss
then sees every labelled example, as in `standard`, and no unparsed teacher text is ever a
target. With label_source=teacher such an example has no label and is dropped. `label_only: drop`
leaves it out under gold labels too: every training item then carries a rationale.
"""

from __future__ import annotations

from typing import Mapping

import torch

from stepdistill.errors import StepDistillError
from stepdistill.methods.base import METHODS, Method, RecordSet, TrainRecord, dropped_because
from stepdistill.methods.batches import RATIONALE, stack_padded
from stepdistill.methods.formatting import Format, encode_example
from stepdistill.methods.fused import WeightGradHandoff
from stepdistill.methods.losses import IGNORE_INDEX, count_targets, multitask_loss, normalise
from stepdistill.tasks.base import Example, Parsed


@METHODS.register("step-by-step")
class StepByStepMethod(Method):
    name = "step-by-step"
    multitask = True

    def records(self, examples: list[Example], annotations: Mapping[str, Parsed] | None) -> RecordSet:
        ann = self._require_annotations(annotations)
        gold = self.cfg.label_source == "gold"
        if gold:
            missing = [e.id for e in examples if e.label is None]
            if missing:
                raise StepDistillError(
                    f"step-by-step with label_source=gold needs gold labels but {len(missing)} of "
                    f"{len(examples)} examples have none (e.g. id {missing[0]!r}): set "
                    "method.label_source=teacher, or use a split with labels"
                )
        recs: list[TrainRecord] = []
        counts = {"examples": len(examples), "label_only": 0}
        more = self.cfg.rationales_per_input - 1  # further rationales per input (several teacher samples)
        if more:
            counts["extra_rationales"] = 0
        for e in examples:
            p = ann.get(e.id)
            usable = p is not None and p.ok
            rationale = p.rationale.strip() if usable and p.rationale and p.rationale.strip() else None
            if gold:
                label = e.label
            elif usable:
                label = p.label
            else:
                why = dropped_because(p)
                counts[why] = counts.get(why, 0) + 1
                continue
            if rationale is None and self.cfg.label_only == "drop":
                counts["no_rationale_left_out"] = counts.get("no_rationale_left_out", 0) + 1
                continue
            if rationale is None:
                counts["label_only"] += 1
            recs.append(TrainRecord(e.id, e.input, label, rationale))  # type: ignore[arg-type]
            if more and rationale is not None:
                # SCoTD: each further rationale is a row of its own, with the same label
                for other in p.others[:more]:  # type: ignore[union-attr]
                    recs.append(TrainRecord(e.id, e.input, label, other))  # type: ignore[arg-type]
                    counts["extra_rationales"] += 1
        if not any(r.rationale for r in recs) and recs:
            raise StepDistillError(
                "step-by-step: none of the teacher annotations has a usable rationale, so there is "
                "nothing to distil beyond the labels: check the annotation run (parse errors?) or use "
                "method 'distill'/'standard'"
            )
        if more and not counts["extra_rationales"] and recs:
            raise StepDistillError(
                f"method.rationales_per_input={more + 1}, but the annotations hold one rationale per input: "
                "annotate with --set verify.samples=K (K > 1) from a teacher that samples, or set rationales_per_input=1"
            )
        return RecordSet(recs, counts)

    @property
    def teacher_labels(self) -> bool:
        return self.cfg.label_source == "teacher"

    def features(self, tokenizer, fmt: Format, records: list[TrainRecord], *,
                 decoder_start: int | None = None) -> list[dict]:
        """The label task's row and, for a record with a rationale, the rationale task's (rat_*)."""
        feats = super().features(tokenizer, fmt, records, decoder_start=decoder_start)
        for f, r in zip(feats, records):
            if r.rationale:
                g = encode_example(tokenizer, fmt, self.cfg.rationale_prefix, r.input, r.rationale,
                                   decoder_start=decoder_start)
                f.update({RATIONALE + k: v for k, v in g.items()})
        return feats

    def compute_loss(self, trainer, model, inputs: dict, counts: dict) -> torch.Tensor:
        rationale_loss = None
        if RATIONALE + "input_ids" in inputs and (trainer.fuse_tasks or trainer.encode_once):
            label_loss, rationale_loss = both_tasks(trainer, model, inputs, counts)
        else:
            label_loss = trainer.task_loss(model, inputs, "", counts.get(""))
        if rationale_loss is None:
            # a micro-batch without rationales still contributes 0, never skips the alpha weight
            rationale_loss = (trainer.task_loss(model, inputs, RATIONALE, counts.get(RATIONALE))
                              if RATIONALE + "input_ids" in inputs else label_loss.new_zeros(()))
        loss = task_weighted(self.cfg, label_loss, rationale_loss, inputs["labels"],
                             inputs.get(RATIONALE + "labels"), counts, RATIONALE, trainer.student.is_seq2seq)
        trainer.note("label_loss", label_loss)
        trainer.note("rationale_loss", rationale_loss)
        return loss


def task_weighted(cfg, label_loss: torch.Tensor, rationale_loss: torch.Tensor, labels: torch.Tensor,
                  rationale_labels: torch.Tensor | None, counts: dict, key: str, seq2seq: bool) -> torch.Tensor:
    """The two tasks' mean losses combined as `cfg.weighting` says: alpha-weighted task means (the
    paper), or every token alike: (label tokens' sum + rationale tokens' sum) / all their tokens,
    counted over the whole accumulated batch like the means themselves."""
    if cfg.weighting == "task_mean":
        return multitask_loss(label_loss, rationale_loss, cfg.alpha)
    shift = not seq2seq
    n_label = counts.get("") if counts.get("") is not None else count_targets(labels, shift=shift)
    n_rationale = counts.get(key) if counts.get(key) is not None else (
        count_targets(rationale_labels, shift=shift) if rationale_labels is not None else 0)
    total = n_label + n_rationale
    total = total.clamp(min=1) if torch.is_tensor(total) else max(total, 1)
    return (label_loss * n_label + rationale_loss * n_rationale) / total


def both_tasks(trainer, model, inputs: dict, counts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tasks' losses with fewer passes, equal to one pass per task. Causal: the label and
    rationale rows padded to one width and stacked, one forward pass. Seq2seq: one embedding
    lookup for every token of the step, one encoder pass for both tasks' sources (stacked; with the
    task marker on the decoder side, each input once), then a decoder pass per task, each padded
    to its own targets (a label is a few tokens, a rationale dozens), and one fused output layer
    and loss for both."""
    a, b = trainer.model_inputs(inputs, ""), trainer.model_inputs(inputs, RATIONALE)
    la, lb = inputs["labels"], inputs[RATIONALE + "labels"]
    pad_id = trainer.student.tokenizer.pad_token_id
    if not trainer.student.is_seq2seq:
        kw = {"input_ids": stack_padded(a["input_ids"], b["input_ids"], pad_id),
              "attention_mask": stack_padded(a["attention_mask"], b["attention_mask"], 0)}
        label_sum, rationale_sum = trainer.target_losses(model, [(kw, stack_padded(la, lb, IGNORE_INDEX))],
                                                         [la.shape[0], lb.shape[0]])
    else:
        if trainer.encode_once:  # the same source for both tasks: encode it once
            ids, mask = a["input_ids"], a["attention_mask"]
        else:
            ids = stack_padded(a["input_ids"], b["input_ids"], pad_id)
            mask = stack_padded(a["attention_mask"], b["attention_mask"], 0)
        handoff = WeightGradHandoff()
        source, label_dec, rationale_dec = trainer.embed(model, [ids, a["decoder_input_ids"], b["decoder_input_ids"]],
                                                         handoff)
        encoder = trainer.accelerator.unwrap_model(model).get_encoder()
        hidden = encoder(attention_mask=mask, **source).last_hidden_state
        if trainer.encode_once:
            rows = inputs[RATIONALE + "index"]
            enc = [(hidden, mask), (hidden[rows], mask[rows])]
        else:
            k = la.shape[0]
            enc = [(hidden[:k], mask[:k]), (hidden[k:], mask[k:])]
        passes = [({"encoder_outputs": (h,), "attention_mask": m, **{"decoder_" + k: v for k, v in dec.items()}},
                   labels) for (h, m), dec, labels in zip(enc, (label_dec, rationale_dec), (la, lb))]
        label_sum, rationale_sum = trainer.target_losses(model, passes, handoff=handoff)
    return normalise(label_sum, la, counts.get("")), normalise(rationale_sum, lb, counts.get(RATIONALE))
