"""Single-task methods: the student learns input -> label with the label prefix only.

standard: gold labels (classic fine-tuning). distill: the teacher's labels (no gold needed).
"""

from __future__ import annotations

from typing import Mapping

from stepdistill.errors import StepDistillError
from stepdistill.methods.base import METHODS, Method, RecordSet, TrainRecord, dropped_because
from stepdistill.tasks.base import Example, Parsed


@METHODS.register("standard")
class StandardMethod(Method):
    name = "standard"
    needs_annotations = False

    def records(self, examples: list[Example], annotations: Mapping[str, Parsed] | None = None) -> RecordSet:
        missing = [e.id for e in examples if e.label is None]
        if missing:
            raise StepDistillError(
                f"method 'standard' trains on gold labels but {len(missing)} of {len(examples)} examples have "
                f"none (e.g. id {missing[0]!r}): use a split with labels, or method 'distill' (teacher labels)"
            )
        recs = [TrainRecord(e.id, e.input, e.label) for e in examples]  # type: ignore[arg-type]
        return RecordSet(recs, {"examples": len(examples)})


@METHODS.register("distill")
class DistillMethod(Method):
    name = "distill"

    @property
    def teacher_labels(self) -> bool:
        return True

    def records(self, examples: list[Example], annotations: Mapping[str, Parsed] | None) -> RecordSet:
        ann = self._require_annotations(annotations)
        recs, counts = [], {"examples": len(examples)}
        for e in examples:
            p = ann.get(e.id)
            if p is None or not p.ok:  # never train on a completion we could not parse or did not keep
                why = dropped_because(p)
                counts[why] = counts.get(why, 0) + 1
            else:
                recs.append(TrainRecord(e.id, e.input, p.label))  # type: ignore[arg-type]
        return RecordSet(recs, counts)
