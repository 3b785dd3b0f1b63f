"""Distilling step-by-step (Hsieh et al., 2023): label task + rationale task, one student.

Records: the label comes from `label_source` (gold or teacher), the rationale from the teacher.
Choice made here: an example whose teacher output did not parse (or gave no rationale) is
*kept for the label task only* when its label is still known (gold source) — the label loss
then sees every labelled example, as in `standard`, and no unparsed teacher text is ever a
target. With label_source=teacher such an example has no label and is dropped.
"""

from __future__ import annotations

from typing import Mapping

from stepdistill.errors import StepDistillError
from stepdistill.methods.base import METHODS, Method, RecordSet, TrainRecord
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
        counts = {"examples": len(examples), "dropped_unparsed": 0, "dropped_not_annotated": 0, "label_only": 0}
        for e in examples:
            p = ann.get(e.id)
            usable = p is not None and p.ok
            rationale = p.rationale.strip() if usable and p.rationale and p.rationale.strip() else None
            if gold:
                label = e.label
            elif usable:
                label = p.label
            else:
                counts["dropped_unparsed" if p is not None else "dropped_not_annotated"] += 1
                continue
            if rationale is None:
                counts["label_only"] += 1
            recs.append(TrainRecord(e.id, e.input, label, rationale))  # type: ignore[arg-type]
        if not any(r.rationale for r in recs) and recs:
            raise StepDistillError(
                "step-by-step: none of the teacher annotations has a usable rationale, so there is "
                "nothing to distil beyond the labels: check the annotation run (parse errors?) or use "
                "method 'distill'/'standard'"
            )
        return RecordSet(recs, counts)
