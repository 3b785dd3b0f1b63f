"""The Trainer every method shares.

What it adds to Hugging Face's Trainer, and only that:
  * get_batch_samples: counts each task's target tokens *separately* over all micro-batches of an
    optimizer step, so gradient accumulation is exact for every task;
  * the forward helpers behind the speed-ups: the output layer at target tokens only, fused with
    the cross-entropy (methods/fused.py), one embedding lookup for a whole step;
  * evaluate: validation accuracy by generating the label task and scoring it with the task (model
    selection and early stopping use it; the test split is never seen here);
  * log: each loss term a method notes (`note`) becomes its own curve.

What the student learns and its loss belong to the method: `compute_loss` asks
`self.method.compute_loss(self, model, inputs, counts)`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from stepdistill.evaluation import predict
from stepdistill.memory import available_memory
from stepdistill.methods.base import Method
from stepdistill.methods.batches import LABEL_KEYS, decoder_inputs
from stepdistill.methods.fused import WeightGradHandoff, linear_cross_entropy, tied_embedding
from stepdistill.methods.kd import soft_label_loss, vocab_size
from stepdistill.methods.losses import IGNORE_INDEX, count_targets, normalise, row_cross_entropy
from stepdistill.methods.on_policy import on_policy_loss, on_policy_now
from stepdistill.methods.targets import fused_head, logits_at, output_layer_inputs, target_positions
from stepdistill.students import Student
from stepdistill.tasks.base import Example, Task
from stepdistill.training.checkpoints import save_folder, save_model
from stepdistill.training.placement import place_teacher
from stepdistill.training.speedups import LengthGroupedSampler


class StepDistillTrainer(Trainer):
    """Trainer + a method's loss with exact accumulation + generation-based validation accuracy."""

    # compute_loss divides by the token counts of the whole accumulated batch, so Trainer must
    # not divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, method: Method, student: Student, task: Task | None, val_max_new_tokens: int,
                 teacher: Student | None = None, lengths: list[int] | None = None, fuse_tasks: bool = False,
                 target_logits_only: bool = False, fused_loss: bool = False, max_label_tokens: int | None = None,
                 label_vocab: list[int] | None = None, val_as_test: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.student = student
        self.kd = method.cfg.kd
        self.label_prefix = method.cfg.label_prefix
        # the speed-ups (TrainingConfig): length-grouped batches, both tasks in one pass (the
        # encoder once, with the task marker on the decoder), the output layer at targets only
        self.lengths = lengths
        self.fuse_tasks = fuse_tasks and self.kd is None
        self.encode_once = student.is_seq2seq and bool(student.fmt and student.fmt.task_marker == "decoder")
        self.target_logits_only = target_logits_only
        self.fused_loss = fused_loss
        self.max_label_tokens = max_label_tokens  # the longest label target: saved for evaluation's limit
        self.label_vocab = label_vocab  # the tokens of the label targets: saved for label_decoding=vocab
        # soft-label KD: a teacher run on the fly (or cached top-k in the batch); a method that
        # trains the teacher too (co-distillation) has it in its optimizer
        self.teacher = teacher
        self.kd_vocab = vocab_size(teacher, student) if teacher is not None else None
        if teacher is not None:
            teacher.model = place_teacher(self.accelerator, teacher.model, trainable=method.trains_teacher)
        self.task = task
        self.val_max_new_tokens = val_max_new_tokens
        self.val_as_test = val_as_test
        # per-term losses since the last log line, so a log shows which task is being learned
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_steps = 0

    def _get_train_sampler(self, train_dataset=None):
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        # grouped by the global batch: a 2-process run and a 1-process run with twice the
        # accumulation see the same batches
        return LengthGroupedSampler(self.lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps
                                    * self.args.world_size, self.args.seed)

    # -- exact gradient accumulation --------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        self._part_steps += 1
        shift = not self.student.is_seq2seq
        counts = {
            pre: sum((count_targets(b[pre + "labels"], shift=shift) for b in batches if pre + "labels" in b),
                     torch.tensor(0))
            for pre in LABEL_KEYS
        }
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = {k: self.accelerator.gather(v.to(device).reshape(1)).sum() for k, v in counts.items()}
        return batches, {k: v.to(device) for k, v in counts.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The method's loss. Each token loss in it is a sum divided by that task's target count over
        the whole accumulated batch (`counts`; a per-micro-batch mean when the counts are not given,
        e.g. when called outside the training loop)."""
        counts = num_items_in_batch if isinstance(num_items_in_batch, dict) else {}
        loss = self.method.compute_loss(self, model, inputs, counts)
        if counts and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; counts are global
        return (loss, None) if return_outputs else loss

    # -- the forward helpers methods build their losses from --------------------------------
    def model_inputs(self, inputs: dict, pre: str) -> dict[str, torch.Tensor]:
        """The forward() arguments of one task's sub-batch (seq2seq: decoder inputs from the labels
        by teacher forcing, unless the batch carries them with a task marker)."""
        kw = {"input_ids": inputs[pre + "input_ids"], "attention_mask": inputs[pre + "attention_mask"]}
        if self.student.is_seq2seq:
            kw["decoder_input_ids"] = inputs.get(pre + "decoder_input_ids")
            if kw["decoder_input_ids"] is None:
                kw["decoder_input_ids"] = decoder_inputs(inputs[pre + "labels"], self.student.model.config)
        return kw

    def task_loss(self, model, inputs: dict, pre: str, n_items) -> torch.Tensor:
        """One task's loss (`pre`: "" the label task, RATIONALE the rationale task): its token
        cross-entropy normalised by `n_items`, mixed with the KD divergence when the method has `kd`."""
        if self.kd is not None:
            generator = on_policy_now(self, pre)
            if generator is not None:  # this micro-batch learns on the student's own samples
                return on_policy_loss(self, model, inputs, pre, n_items, generator)
        labels = inputs[pre + "labels"]
        kw = self.model_inputs(inputs, pre)
        if self.kd is None:
            (total,) = self.target_losses(model, [(kw, labels)])
            return normalise(total, labels, n_items)
        return soft_label_loss(self, model(**kw).logits, kw, inputs, pre, n_items)

    def target_losses(self, model, passes: list[tuple[dict, torch.Tensor]], splits: list[int] | None = None,
                      handoff: WeightGradHandoff | None = None) -> list[torch.Tensor]:
        """Summed token cross-entropies of forward passes [(forward() arguments, labels), ...], one
        per group of rows (`splits`: row counts over the passes' rows in order; None: one group per
        pass). With `target_logits_only` the output layer runs at target tokens only, and with
        `fused_loss` too, once for every pass, fused with the cross-entropy where the model allows it
        (handing its weight gradient to the step's tied lookup, if `handoff`)."""
        shift = not self.student.is_seq2seq
        splits = splits or [labels.shape[0] for _, labels in passes]
        if not self.target_logits_only:
            per_row = [row_cross_entropy(model(**kw).logits, labels, shift=shift) for kw, labels in passes]
            return [part.sum() for part in torch.cat(per_row).split(splits)]
        scored = [(kw, *target_positions(labels, shift=shift)) for kw, labels in passes]
        rows, offset = [], 0
        for (_, keep, _), (_, labels) in zip(scored, passes):
            rows.append(keep.nonzero()[:, 0] + offset)  # the row of each scored token, over all passes
            offset += labels.shape[0]
        losses = self._token_losses(model, scored, handoff)
        per_row = losses.new_zeros(offset).index_add(0, torch.cat(rows), losses)
        return [part.sum() for part in per_row.split(splits)]

    def segment_losses(self, model, kw: dict, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Summed token cross-entropies of one forward pass over disjoint sets of its target tokens
        (`parts`: labels tensors of the pass's shape, -100 off their own set): a label and its
        rationale in one sequence, each summed on its own, for one pass."""
        labels, group = parts[0], torch.zeros_like(parts[0])
        for i, part in enumerate(parts[1:], start=1):
            labels = torch.where(part.ne(IGNORE_INDEX), part, labels)
            group = torch.where(part.ne(IGNORE_INDEX), torch.full_like(group, i), group)
        shift = not self.student.is_seq2seq
        keep, t = target_positions(labels, shift=shift)
        which = group[:, 1:][keep[:, :-1]] if shift else group[keep]  # the part of each scored token
        if not self.target_logits_only:
            logits = model(**kw).logits
            losses = torch.nn.functional.cross_entropy(logits[keep].float(), t, reduction="none")
        else:
            losses = self._token_losses(model, [(kw, keep, t)])
        return [losses[which == i].sum() for i in range(len(parts))]

    def _token_losses(self, model, scored: list[tuple[dict, torch.Tensor, torch.Tensor]],
                      handoff: WeightGradHandoff | None = None) -> torch.Tensor:
        """The cross-entropy of every scored token of forward passes [(arguments, keep, targets)],
        pass after pass, with the output layer run at the `keep` positions only (fused with the loss
        where the model allows it: see target_losses)."""
        inner = self.accelerator.unwrap_model(model)
        # One process: the fused layer runs once for all passes, after them. Under DDP it runs in
        # each pass's forward, in place of the output layer, its losses the forward's logits: DDP
        # (find_unused_parameters, transformers' default without gradient checkpointing) marks a
        # weight its forward's outputs do not reach unused, then its gradient marks it ready twice.
        # Not under FSDP or DeepSpeed (untested there: the unfused target-only path runs).
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        fused = self.fused_loss and fused_head(inner) and (model is inner or ddp)
        head = inner.get_output_embeddings() if fused else None

        def layer_and_loss(hidden: torch.Tensor, targets: torch.Tensor, give=None) -> torch.Tensor:
            with self.autocast():  # in the forward's precision (after the forward, it is outside its autocast)
                return linear_cross_entropy(hidden, head.weight, head.bias, targets, handoff=give)

        hidden, losses = [], []
        for kw, keep, t in scored:
            if fused and ddp:
                with output_layer_inputs(inner, keep, lambda h, t=t: layer_and_loss(h, t)):
                    losses.append(model(**kw).logits)
            elif fused:
                with output_layer_inputs(inner, keep) as caught:
                    model(**kw)
                hidden += caught
            else:
                with logits_at(inner, keep):
                    logits = model(**kw).logits
                losses.append(torch.nn.functional.cross_entropy(logits.float(), t, reduction="none"))
        if not fused or ddp:
            return torch.cat(losses)
        return layer_and_loss(torch.cat(hidden), torch.cat([t for _, _, t in scored]), handoff)

    def embed(self, model, ids: list[torch.Tensor], handoff: WeightGradHandoff | None = None
              ) -> list[dict[str, torch.Tensor]]:
        """Encoder-decoder inputs for each id tensor: one lookup for all of them (inputs_embeds)
        where encoder and decoder share the input embedding, as T5's do (each lookup's backward
        fills a vocabulary-sized gradient: one instead of three per step), else the ids. Not under
        a DDP/FSDP wrapper. Where the fused output layer shares the weight too, the lookup's
        gradient is added into the layer's (`handoff`), not zero-filled and summed."""
        inner = self.accelerator.unwrap_model(model)
        if model is not inner:  # DDP/FSDP: every parameter use stays inside the wrapper's forward
            return [{"input_ids": x} for x in ids]
        emb = inner.get_input_embeddings()
        stacks = [getattr(stack, "embed_tokens", None) for stack in (inner.get_encoder(), inner.get_decoder())]
        if not all(type(e) is torch.nn.Embedding and e.weight is emb.weight for e in [emb, *stacks]):
            return [{"input_ids": x} for x in ids]
        flat = torch.cat([x.reshape(-1) for x in ids])
        plain = emb.padding_idx is None and emb.max_norm is None and not emb.scale_grad_by_freq and not emb.sparse
        vectors = tied_embedding(flat, emb.weight, handoff) if handoff is not None and plain else emb(flat)
        return [{"inputs_embeds": v.view(*x.shape, -1)} for v, x in zip(vectors.split([x.numel() for x in ids]), ids)]

    def autocast(self):
        """bf16 autocast where training runs in bf16, for what runs outside the student's forward
        (accelerate puts autocast around the forward only): the KD teacher, the fused output layer."""
        if not self.args.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.args.device.type, dtype=torch.bfloat16)

    def note(self, name: str, value: torch.Tensor) -> None:
        """Add a loss term to what the next log line averages (no .item(): no GPU sync per step)."""
        if self.model.training:
            self._part_sums[name] = self._part_sums.get(name, 0.0) + value.detach()

    def create_optimizer(self, model=None):
        """The student's optimizer, plus whatever else the method trains (co-distillation's teacher)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        self.method.extend_optimizer(self, optimizer)
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._part_steps:
            logs = {**logs, **{k: float(v) / self._part_steps for k, v in self._part_sums.items()}}
            self._part_sums, self._part_steps = {}, 0
        super().log(logs, start_time)

    def save_trained(self, dest: Path, model: Student, info: dict[str, Any]) -> None:
        """A trained model's folder (weights, tokenizer, stepdistill.json), appearing by a rename."""
        save_folder(dest, lambda d: save_model(model.model, model.tokenizer, info, d))

    # -- validation: generate the label task, score with the task ---------------------------
    def accuracy(self, student: Student, examples: list[Example]) -> float | None:
        """The task's accuracy of `student`'s label task (greedy, as at test time) on `examples`."""
        preds = predict(student, [e.input for e in examples], prefix=self.label_prefix,
                        batch_size=self.args.per_device_eval_batch_size, max_new_tokens=self.val_max_new_tokens)
        return self.task.accuracy(preds, examples)

    def validation_model(self) -> torch.nn.Module:
        """The model validation scores. With `val_as_test`, what the saved model will be and the test
        evaluation loads: a copy with LoRA merged, in bfloat16 where training runs in bf16 (float32
        otherwise). The copy is made in float32 and merged before the cast, as the saved model is;
        where that copy would not fit in free memory (or parameters are sharded), the training
        weights themselves."""
        model = self.model
        if not self.val_as_test or self.is_fsdp_enabled:
            return model
        need = sum(p.numel() * p.element_size() for p in model.parameters())
        free = available_memory(next(model.parameters()).device)
        if free is not None and 2 * need > free:
            return model
        dtype = torch.bfloat16 if self.args.bf16 else torch.float32
        with torch.no_grad():
            twin = copy.deepcopy(model)
            if hasattr(twin, "merge_and_unload"):  # peft: LoRA merged, as fitting saves it
                twin = twin.merge_and_unload()
            # accelerate binds its autocast wrapper to the instance: the copy runs its class's forward
            for name in ("forward", "_original_forward"):
                twin.__dict__.pop(name, None)
            return twin.to(dtype).eval()

    def validation_accuracy(self, examples: list[Example]) -> float | None:
        """The accuracy model selection sees: `accuracy` of `validation_model()`."""
        model = self.validation_model()
        return self.accuracy(Student(model, self.student.tokenizer, self.student.is_seq2seq, self.student.fmt),
                             examples)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        examples: list[Example] = list(eval_dataset if eval_dataset is not None else self.eval_dataset)
        start = time.time()
        acc = self.validation_accuracy(examples)
        metrics = {f"{metric_key_prefix}_accuracy": acc, f"{metric_key_prefix}_runtime": round(time.time() - start, 3)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
