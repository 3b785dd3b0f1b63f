"""Student training: records -> token features -> Hugging Face Trainer -> best model on disk.

    metrics = fit(student, method_cfg, training_cfg, records, val_examples, task, Path("runs/x"))

What this adds to Trainer, and only that:
  * compute_loss: the label task and (step-by-step) the rationale task in one step,
    loss = alpha * label CE + (1 - alpha) * rationale CE (methods/losses.py);
  * get_batch_samples: counts label and rationale target tokens *separately* over all
    micro-batches of an optimizer step, so gradient accumulation is exact for both tasks;
  * evaluate: validation accuracy by generating the label task and scoring with the task
    (model selection and early stopping use it; the test split is never seen here).

out_dir layout after fit: checkpoints/ (Trainer checkpoints, for resume), train_log.jsonl
(every Trainer log line), model/ (best model + tokenizer + stepdistill.json).

Crash safety: Trainer writes checkpoint-N in place, so a kill mid-save leaves a half-written
folder that `get_last_checkpoint` would pick. A checkpoint therefore counts only once it is
sealed: every file fsynced, then checkpoint-N/stepdistill-checkpoint.json (the files and their
sizes) written atomically. Resume takes the last sealed checkpoint and removes unsealed ones;
old checkpoints are rotated only after the new one is sealed; model/ appears by a rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from stepdistill.config import KDConfig, MethodConfig, TrainingConfig
from stepdistill.errors import StepDistillError
from stepdistill.evaluation import MODEL_INFO, label_token_limit, label_vocab, predict
from stepdistill.methods import get_method
from stepdistill.methods.base import TrainRecord
from stepdistill.methods.formatting import Format, encode_example
from stepdistill.methods.targets import fused_head, logits_at, output_layer_inputs, target_positions
from stepdistill.memory import check_training, resolve_bf16
from stepdistill.methods.kd import (
    attach_topk_cache, decoder_inputs, load_kd_teacher, pad_topk, teacher_logits, vocab_size,
)
from stepdistill.methods.losses import (
    IGNORE_INDEX, WeightGradHandoff, _normalise, count_targets, kd_loss, kd_loss_topk, linear_cross_entropy,
    multitask_loss, row_cross_entropy, tied_embedding, token_cross_entropy,
)
from stepdistill.runs import fsync_dir, fsync_tree, is_main_process, write_error, write_json, write_text
from stepdistill.students import Student, count_parameters
from stepdistill.tasks.base import Example, Task

log = logging.getLogger(__name__)

TEACHER_DIR = "teacher"  # co-distillation: the trained teacher, in checkpoints and as out_dir/teacher_model
RATIONALE = "rat_"  # batch keys of the rationale task: rat_input_ids, rat_attention_mask, rat_labels
SEAL = "stepdistill-checkpoint.json"  # in checkpoint-N once every file of it is on disk
SEALS = "stepdistill-seals.json"  # in checkpoints/: {"sealed_after": S}, checkpoints past step S need a seal
KEEP_CHECKPOINTS = 2  # sealed checkpoints kept (the best one always, besides)


def make_format(student: Student, training: TrainingConfig, task_marker: str = "encoder") -> Format:
    if task_marker == "decoder" and not student.is_seq2seq:
        raise StepDistillError("method.task_marker=decoder needs an encoder-decoder student (T5, BART): "
                               "use task_marker=encoder with a causal LM")
    return Format(
        kind=student.kind,
        max_input_length=training.max_input_length,
        max_target_length=training.max_target_length,
        task_marker=task_marker,
    )


def build_features(student: Student, method_cfg: MethodConfig, fmt: Format, records: list[TrainRecord]) -> list[dict]:
    """Tokenise records: {'input_ids', 'labels'} for the label task and, for multi-task
    methods and records with a rationale, {'rat_input_ids', 'rat_labels'} for the rationale task."""
    multitask = get_method(method_cfg).multitask
    start = getattr(student.model.config, "decoder_start_token_id", None) if student.is_seq2seq else None
    feats = []
    for r in records:
        f = encode_example(student.tokenizer, fmt, method_cfg.label_prefix, r.input, r.label, decoder_start=start)
        if multitask and r.rationale:
            g = encode_example(student.tokenizer, fmt, method_cfg.rationale_prefix, r.input, r.rationale,
                               decoder_start=start)
            f.update({RATIONALE + k: v for k, v in g.items()})
        feats.append(f)
    return feats


class Collator:
    """Right-pads each task's ids (pad id) and labels (-100). Rows without a rationale join the
    label sub-batch only; a micro-batch with no rationale at all has no rat_* keys."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for pre in ("", RATIONALE):
            rows = [f for f in feats if pre + "input_ids" in f]
            if not rows:
                continue
            if pre:  # which label rows the rationale rows belong to (to share one encoder pass)
                batch[pre + "index"] = torch.tensor([i for i, f in enumerate(feats) if pre + "input_ids" in f])
            ids = [f[pre + "input_ids"] for f in rows]
            batch[pre + "input_ids"] = self._pad(ids, self.pad_id)
            batch[pre + "attention_mask"] = self._pad([[1] * len(x) for x in ids], 0)
            batch[pre + "labels"] = self._pad([f[pre + "labels"] for f in rows], IGNORE_INDEX)
            if pre + "decoder_input_ids" in rows[0]:  # the task marker forced at the decoder's start
                batch[pre + "decoder_input_ids"] = self._pad([f[pre + "decoder_input_ids"] for f in rows], self.pad_id)
            if pre + "kd_vals" in rows[0]:  # the teacher's cached top-k, one row per logits position
                width = max(f[pre + "kd_vals"].shape[0] for f in rows)
                batch[pre + "kd_vals"] = pad_topk([f[pre + "kd_vals"] for f in rows], width, 0.0).float()
                batch[pre + "kd_ids"] = pad_topk([f[pre + "kd_ids"] for f in rows], width, 0).long()
        return batch


class _JsonlLog(TrainerCallback):
    """Appends every Trainer log line (loss, lr, eval accuracy) to train_log.jsonl as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class _TeacherSteps(TrainerCallback):
    """Co-distillation: Trainer syncs, clips and zeroes only the student's gradients, so the
    teacher's are averaged over processes, clipped (same max_grad_norm) before each optimizer
    step and cleared after it."""

    def __init__(self, teacher: Student):
        self.teacher = teacher

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if args.world_size > 1:  # the teacher is not DDP-wrapped: average its gradients as DDP does the student's
            for p in self.teacher.model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= args.world_size
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.teacher.model.parameters(), args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.teacher.model.zero_grad(set_to_none=True)


class _TeacherCheckpoint(TrainerCallback):
    """Co-distillation: the trained teacher is saved inside every checkpoint (checkpoint-N/teacher),
    so resume and best-model selection restore both models from the same step."""

    def __init__(self, teacher: Student):
        self.teacher = teacher

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / TEACHER_DIR
            self.teacher.model.save_pretrained(folder)
            self.teacher.tokenizer.save_pretrained(folder)


class _SealCheckpoint(TrainerCallback):
    """Runs after every other on_save (the co-distillation teacher included): fsync the new
    checkpoint, seal it, and only then delete old ones, so a sealed checkpoint always remains."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        files = fsync_tree(folder)
        write_json(folder / SEAL, {"step": state.global_step, "files": files})
        fsync_dir(folder.parent)
        rotate_checkpoints(args.output_dir, save_total_limit=KEEP_CHECKPOINTS,
                           best_model_checkpoint=state.best_model_checkpoint)


def _step(folder: Path) -> int | None:
    prefix = PREFIX_CHECKPOINT_DIR + "-"
    tail = folder.name[len(prefix):] if folder.name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def _sealed(folder: Path) -> bool:
    """Is checkpoint-N complete: sealed, and every file the seal lists there with its size?"""
    try:
        files = json.loads((folder / SEAL).read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _legacy_complete(folder: Path) -> bool:
    """A checkpoint from before sealing: Trainer writes trainer_state.json last, so a parseable one
    with this step means Trainer finished the folder (short of a power loss)."""
    try:
        return json.loads((folder / "trainer_state.json").read_text()).get("global_step") == _step(folder)
    except (OSError, ValueError, AttributeError):
        return False


def find_checkpoints(root: Path) -> tuple[Path | None, list[Path]]:
    """(the last complete checkpoint or None, the incomplete ones) under `root`.

    >>> find_checkpoints(Path("runs/x/checkpoints"))  # (Path(".../checkpoint-6"), [Path(".../checkpoint-9")])
    """
    if not root.is_dir():
        return None, []
    found = sorted((p for p in root.iterdir() if p.is_dir() and _step(p) is not None), key=_step)
    sealed_after = None  # no SEALS file: a run from before sealing, whose checkpoints have none
    if (root / SEALS).exists():
        try:
            sealed_after = int(json.loads((root / SEALS).read_text())["sealed_after"])
        except (OSError, ValueError, KeyError, TypeError):
            sealed_after = 0
    done = [p for p in found if _sealed(p) or (
        (sealed_after is None or _step(p) <= sealed_after) and _legacy_complete(p))]
    return (done[-1] if done else None), [p for p in found if p not in done]


def _trim_log(path: Path, step: int) -> None:
    """On resume, keep the log lines up to the checkpoint's step: later ones are about to be
    logged again, and a line a kill cut short is not JSON."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(keep))


def _save_folder(dest: Path, save) -> None:
    """`save(folder)` into a temp folder beside `dest`, fsync, then rename it to `dest` (replacing an
    older one): a reader sees the old folder or the complete new one, never a half-written one."""
    tmp, old = dest.with_name(f".{dest.name}.tmp"), dest.with_name(f".{dest.name}.old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
        save(tmp)
        fsync_tree(tmp)
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        fsync_dir(dest.parent)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # free what it took: the disk may be full
        if old.exists() and not dest.exists():
            old.rename(dest)
        raise write_error(dest, _os_error(e) or e) from e
    shutil.rmtree(old, ignore_errors=True)


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind an exception (torch and safetensors wrap the one from a failed write)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def stack_padded(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    """Rows of `a` then rows of `b`, the narrower right-padded with `value` to the wider's width."""
    width = max(a.shape[1], b.shape[1])
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in (a, b)])


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Shuffled, then sorted by length within groups of 50 batches (transformers'
    get_length_grouped_indices), so a batch wastes little padding. Seeded by (seed, epoch): a
    resumed run sees the same order."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


def max_label_tokens(feats: list[dict]) -> int:
    """The longest label-task target of the training features, in tokens (eos included)."""
    return max(sum(t != IGNORE_INDEX for t in f["labels"]) for f in feats)


def feature_length(f: dict) -> int:
    """What a training example costs: the tokens of every sequence of both tasks."""
    return sum(len(v) for k, v in f.items() if k.endswith(("input_ids", "labels")))


class FastDropout(torch.nn.Dropout):
    """Dropout with a cheaper mask on CPUs. torch draws one random float per element (bernoulli_),
    serially from its Mersenne Twister, and on a CPU that costs about 60x the multiply that
    applies the mask: a tenth of a small T5's training step. Here each element gets a 16-bit
    uniform draw, four to a 64-bit number of numpy's SFC64 generator (seeded by one draw from
    torch's generator, so a seed, and a checkpoint's saved RNG state, still fix the masks). An
    element is dropped when its draw falls below round(p * 65536), so the drop rate is p to
    within 2**-17, and the kept values are scaled by 1 / (1 - that rate). The mask is made in
    numpy as the bit patterns of 0 and that scale in x's dtype, so applying it is one multiply
    (5.8 -> about 1.2 ms for a T5 feed-forward activation of 1.1M bf16 elements). Off the CPU,
    torch's own dropout; an identity in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or x.dtype not in _BITS:
            return torch.nn.functional.dropout(x, self.p, True, self.inplace)
        import numpy as np

        n, drop = x.numel(), round(self.p * 65536)
        seed = int(torch.randint(2**62, (1,)))
        draws = np.random.SFC64(seed).random_raw(-(-n // 4)).view(np.int16)[:n]
        scale = torch.tensor(65536 / (65536 - drop), dtype=x.dtype).view(_BITS[x.dtype]).item()
        width = np.int16 if x.element_size() == 2 else np.int32
        mask = np.multiply(draws >= drop - 32768, width(scale))  # the bits of 0 or the scale
        return x * torch.from_numpy(mask).view(x.dtype).view(x.shape)


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _swap_modules(model: torch.nn.Module, replacement) -> int:
    """Replace every submodule for which `replacement(child)` gives a module; the number replaced."""
    swapped = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(module, name, new)
                swapped += 1
    return swapped


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap every torch Dropout module of `model` for FastDropout (same p); the number swapped.
    Functional dropout calls (some attention implementations) are left as they are."""
    return _swap_modules(model, lambda m: FastDropout(m.p, m.inplace)
                         if type(m) is torch.nn.Dropout and m.p > 0 else None)


def use_fused_gelu(model: torch.nn.Module) -> int:
    """Swap every transformers NewGELU / FastGELU module of `model` (Python code: eight
    elementwise passes forward, autograd's dozen backward) for GELUTanh, torch's fused kernel of
    the same tanh approximation (transformers: "equivalent ... but much faster", not bit-exact);
    the number swapped. 8.0 -> 4.1 ms forward and backward on a T5 feed-forward activation."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    return _swap_modules(model, lambda m: GELUTanh() if type(m) in (NewGELUActivation, FastGELUActivation) else None)


def place_teacher(accelerator, model: torch.nn.Module, *, trainable: bool = False) -> torch.nn.Module:
    """The soft-label KD teacher, placed for the student's distributed set-up (a known failure of
    other toolkits is a teacher left whole on the wrong device, or unsharded beside a sharded student):

    * one process, DDP, DeepSpeed ZeRO-1/2: moved to this process's device. It is frozen, so no
      wrapper is needed (a co-distilled teacher has its gradients averaged by _TeacherSteps).
    * FSDP2 (`fsdp_version: 2`): sharded as the student is, with accelerate's own preparation
      (the plugin's wrap policy, mixed precision, offload): each process holds 1/N of it, and its
      forward gathers a block at a time.
    * FSDP1, DeepSpeed ZeRO-3, and co-distillation under FSDP/DeepSpeed: refused with the way out,
      rather than run unsharded or with a teacher the sharded optimizer cannot update.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    sharded = kind == DistributedType.FSDP or (
        kind == DistributedType.DEEPSPEED and _zero_stage(accelerator) == 3)
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) and trainable:
        raise StepDistillError(f"co-distillation trains the teacher inside the student's optimizer, which {kind.value} "
                               "shards: run it under DDP (configs/accelerate/ddp_8gpu.yaml), or use method.kd with a "
                               "fixed teacher")
    if not sharded:
        return model.to(accelerator.device)
    if kind == DistributedType.FSDP and getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model.to(accelerator.device)).eval()
    raise StepDistillError(f"the soft-label KD teacher can be sharded under FSDP2 only, not {kind.value}"
                           f"{' ZeRO-3' if kind == DistributedType.DEEPSPEED else ' (fsdp_version 1)'}: set "
                           "fsdp_version: 2 (configs/accelerate/fsdp_8gpu.yaml), or write the teacher's top-k once "
                           "with kd.cache and train without it")


def _zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", None) if plugin is not None else None


class StepDistillTrainer(Trainer):
    """Trainer + multi-task loss with exact accumulation + generation-based validation accuracy."""

    # compute_loss divides by the token counts of the whole accumulated batch, so Trainer must
    # not divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, student: Student, alpha: float, multitask: bool, task: Task | None,
                 label_prefix: str, val_max_new_tokens: int, kd: KDConfig | None = None,
                 teacher: Student | None = None, co_distill: bool = False, lengths: list[int] | None = None,
                 fuse_tasks: bool = False, target_logits_only: bool = False, fused_loss: bool = False,
                 max_label_tokens: int | None = None,
                 label_vocab: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.student = student
        # the speed-ups (TrainingConfig): length-grouped batches, both tasks in one pass (the
        # encoder once, with the task marker on the decoder), the output layer at targets only
        self.lengths = lengths
        self.fuse_tasks = fuse_tasks and kd is None
        self.encode_once = student.is_seq2seq and bool(student.fmt and student.fmt.task_marker == "decoder")
        self.target_logits_only = target_logits_only
        self.fused_loss = fused_loss
        self.max_label_tokens = max_label_tokens  # the longest label target: saved for evaluation's limit
        self.label_vocab = label_vocab  # the tokens of the label targets: saved for label_decoding=vocab
        # soft-label KD: a frozen teacher run on the fly (or cached top-k in the batch);
        # co-distillation: the teacher is trained too, learning from the student in turn
        self.kd, self.teacher, self.co_distill = kd, teacher, co_distill
        self._vocab = vocab_size(teacher, student) if teacher is not None else None
        if teacher is not None:
            teacher.model = place_teacher(self.accelerator, teacher.model, trainable=co_distill)
        self.alpha = alpha if multitask else 1.0
        self.multitask = multitask
        self.task = task
        self.label_prefix = label_prefix
        self.val_max_new_tokens = val_max_new_tokens
        # per-task losses since the last log line, so a log shows which task is being learned
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
            for pre in ("", RATIONALE)
        }
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = {k: self.accelerator.gather(v.to(device).reshape(1)).sum() for k, v in counts.items()}
        return batches, {k: v.to(device) for k, v in counts.items()}

    def _model_inputs(self, inputs: dict, pre: str) -> dict[str, torch.Tensor]:
        """The forward() arguments of one task's sub-batch (seq2seq: decoder inputs from the labels
        by teacher forcing, unless the batch carries them with a task marker)."""
        kw = {"input_ids": inputs[pre + "input_ids"], "attention_mask": inputs[pre + "attention_mask"]}
        if self.student.is_seq2seq:
            kw["decoder_input_ids"] = inputs.get(pre + "decoder_input_ids")
            if kw["decoder_input_ids"] is None:
                kw["decoder_input_ids"] = decoder_inputs(inputs[pre + "labels"], self.student.model.config)
        return kw

    def _target_losses(self, model, passes: list[tuple[dict, torch.Tensor]], splits: list[int] | None = None,
                       handoff: WeightGradHandoff | None = None) -> list[torch.Tensor]:
        """Summed token cross-entropies of forward passes [(forward() arguments, labels), ...], one
        per group of rows (`splits`: row counts over the passes' rows in order; None: one group per
        pass). With `target_logits_only` the output layer runs at target tokens only, and with
        `fused_loss` too, once for every pass, fused with the cross-entropy where the model allows it
        (handing its weight gradient to the step's tied lookup, if `handoff`)."""
        shift = not self.student.is_seq2seq
        splits = splits or [labels.shape[0] for _, labels in passes]
        inner = self.accelerator.unwrap_model(model)
        if not self.target_logits_only:
            per_row = [row_cross_entropy(model(**kw).logits, labels, shift=shift) for kw, labels in passes]
            return [part.sum() for part in torch.cat(per_row).split(splits)]
        # fused only outside DDP/FSDP wrappers: there the layer's weight would be used outside the
        # wrapper's forward, which breaks its gradient hooks (DDP marks the tied weight ready twice)
        fused = self.fused_loss and fused_head(inner) and model is inner
        hidden, targets, losses, rows, offset = [], [], [], [], 0
        for kw, labels in passes:
            keep, t = target_positions(labels, shift=shift)
            rows.append(keep.nonzero()[:, 0] + offset)  # the row of each scored token, over all passes
            offset += labels.shape[0]
            if fused:
                with output_layer_inputs(inner, keep) as caught:
                    model(**kw)
                hidden += caught
                targets.append(t)
            else:
                with logits_at(inner, keep):
                    logits = model(**kw).logits
                losses.append(torch.nn.functional.cross_entropy(logits.float(), t, reduction="none"))
        if fused:
            head = inner.get_output_embeddings()
            with self._autocast():  # in the forward's precision: the layer runs outside it
                losses = [linear_cross_entropy(torch.cat(hidden), head.weight, head.bias, torch.cat(targets),
                                               handoff=handoff)]
        losses = torch.cat(losses)
        per_row = losses.new_zeros(offset).index_add(0, torch.cat(rows), losses)
        return [part.sum() for part in per_row.split(splits)]

    def _fused_losses(self, model, inputs: dict, n: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tasks with fewer passes. Causal: the label and rationale rows padded to one width
        and stacked, one forward pass. Seq2seq: one embedding lookup for every token of the step,
        one encoder pass for both tasks' sources (stacked; with the task marker on the decoder
        side, each input once), then a decoder pass per task, each padded to its own targets (a
        label is a few tokens, a rationale dozens), and one fused output layer and loss for both."""
        a, b = self._model_inputs(inputs, ""), self._model_inputs(inputs, RATIONALE)
        la, lb = inputs["labels"], inputs[RATIONALE + "labels"]
        pad_id = self.student.tokenizer.pad_token_id
        if not self.student.is_seq2seq:
            kw = {"input_ids": stack_padded(a["input_ids"], b["input_ids"], pad_id),
                  "attention_mask": stack_padded(a["attention_mask"], b["attention_mask"], 0)}
            label_sum, rationale_sum = self._target_losses(model, [(kw, stack_padded(la, lb, IGNORE_INDEX))],
                                                           [la.shape[0], lb.shape[0]])
        else:
            if self.encode_once:  # the same source for both tasks: encode it once
                ids, mask = a["input_ids"], a["attention_mask"]
            else:
                ids = stack_padded(a["input_ids"], b["input_ids"], pad_id)
                mask = stack_padded(a["attention_mask"], b["attention_mask"], 0)
            handoff = WeightGradHandoff()
            source, label_dec, rationale_dec = self._embed(model, [ids, a["decoder_input_ids"], b["decoder_input_ids"]],
                                                           handoff)
            encoder = self.accelerator.unwrap_model(model).get_encoder()
            hidden = encoder(attention_mask=mask, **source).last_hidden_state
            if self.encode_once:
                rows = inputs[RATIONALE + "index"]
                enc = [(hidden, mask), (hidden[rows], mask[rows])]
            else:
                k = la.shape[0]
                enc = [(hidden[:k], mask[:k]), (hidden[k:], mask[k:])]
            passes = [({"encoder_outputs": (h,), "attention_mask": m, **{"decoder_" + k: v for k, v in dec.items()}},
                       labels) for (h, m), dec, labels in zip(enc, (label_dec, rationale_dec), (la, lb))]
            label_sum, rationale_sum = self._target_losses(model, passes, handoff=handoff)
        return _normalise(label_sum, la, n.get("")), _normalise(rationale_sum, lb, n.get(RATIONALE))

    def _embed(self, model, ids: list[torch.Tensor], handoff: WeightGradHandoff | None = None
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

    def _task_loss(self, model, inputs: dict, pre: str, n_items) -> torch.Tensor:
        labels = inputs[pre + "labels"]
        shift = not self.student.is_seq2seq
        kw = self._model_inputs(inputs, pre)
        if self.kd is None:
            (total,) = self._target_losses(model, [(kw, labels)])
            return _normalise(total, labels, n_items)
        ids, mask = kw["input_ids"], kw["attention_mask"]
        logits = model(**kw).logits
        ce = token_cross_entropy(logits, labels, n_items, shift=shift)
        kd, w = self.kd, self._kd_weight()
        if pre + "kd_vals" in inputs:  # the cached teacher
            div = kd_loss_topk(logits, inputs[pre + "kd_vals"], inputs[pre + "kd_ids"], labels, n_items,
                               temperature=kd.temperature, shift=shift)
            self._note(pre + "kd_loss", div)
            return (1 - w) * ce + w * div
        with torch.set_grad_enabled(self.co_distill and model.training), self._autocast():
            t_logits = teacher_logits(self.teacher.model, ids, mask, labels, seq2seq=self.student.is_seq2seq)
        div = kd_loss(logits, t_logits, labels, n_items, kind=kd.kind, temperature=kd.temperature, beta=kd.beta,
                      shift=shift, vocab_size=self._vocab)  # the teacher's logits are detached inside
        self._note(pre + "kd_loss", div)
        loss = (1 - w) * ce + w * div
        if self.co_distill and model.training:  # mutual learning: the teacher learns from the student too
            t_ce = token_cross_entropy(t_logits, labels, n_items, shift=shift)
            t_div = kd_loss(t_logits, logits, labels, n_items, kind=kd.kind, temperature=kd.temperature,
                            beta=kd.beta, shift=shift, vocab_size=self._vocab)
            teacher_loss = (1 - w) * t_ce + w * t_div
            self._note(pre + "student_loss", loss)  # `loss` in the log is the sum of both models' losses
            self._note(pre + "teacher_loss", teacher_loss)
            loss = loss + teacher_loss
        return loss

    def _kd_weight(self) -> float:
        """kd.weight, or 0 during co-distillation's warm-up (both models' early predictions are noise)."""
        if self.co_distill and self.state.global_step < self.kd.warmup_steps:
            return 0.0
        return self.kd.weight

    def _autocast(self):
        """bf16 autocast where training runs in bf16, for what runs outside the student's forward
        (accelerate puts autocast around the forward only): the KD teacher, the fused output layer."""
        if not self.args.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.args.device.type, dtype=torch.bfloat16)

    def _note(self, name: str, value: torch.Tensor) -> None:
        """Add a loss term to what the next log line averages (no .item(): no GPU sync per step)."""
        if self.model.training:
            self._part_sums[name] = self._part_sums.get(name, 0.0) + value.detach()

    def create_optimizer(self, model=None):
        """Co-distillation: the teacher's weights join the optimizer (same schedule and decay)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.co_distill and not getattr(self, "_teacher_in_optimizer", False):
            decay = set(self.get_decay_parameter_names(self.teacher.model))  # no decay on norms and biases, as for the student
            base = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "weight_decay")}
            named = [(n, p) for n, p in self.teacher.model.named_parameters() if p.requires_grad]
            for wd, params in ((self.args.weight_decay, [p for n, p in named if n in decay]),
                               (0.0, [p for n, p in named if n not in decay])):
                if params:
                    optimizer.add_param_group({**base, "weight_decay": wd, "params": params})
            self._teacher_in_optimizer = True
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """alpha * label loss + (1 - alpha) * rationale loss; each task loss is its CE (with kd:
        (1 - w) * CE + w * divergence), a token sum divided by that task's target count over the
        whole accumulated batch (per-micro-batch mean when the counts are not given, e.g. when
        called outside the training loop)."""
        n = num_items_in_batch if isinstance(num_items_in_batch, dict) else {}
        rationale_loss = None
        if self.multitask and RATIONALE + "input_ids" in inputs and (self.fuse_tasks or self.encode_once):
            label_loss, rationale_loss = self._fused_losses(model, inputs, n)
        else:
            label_loss = self._task_loss(model, inputs, "", n.get(""))
        if self.multitask and rationale_loss is None:
            # a micro-batch without rationales still contributes 0, never skips the alpha weight
            rationale_loss = (self._task_loss(model, inputs, RATIONALE, n.get(RATIONALE))
                              if RATIONALE + "input_ids" in inputs else label_loss.new_zeros(()))
        loss = multitask_loss(label_loss, rationale_loss, self.alpha)
        if self.multitask:
            self._note("label_loss", label_loss)
            self._note("rationale_loss", rationale_loss)
        if n and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; counts are global
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._part_steps:
            logs = {**logs, **{k: float(v) / self._part_steps for k, v in self._part_sums.items()}}
            self._part_sums, self._part_steps = {}, 0
        super().log(logs, start_time)

    # -- validation: generate the label task, score with the task ---------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        examples: list[Example] = list(eval_dataset if eval_dataset is not None else self.eval_dataset)
        start = time.time()
        student = Student(self.model, self.student.tokenizer, self.student.is_seq2seq, self.student.fmt)
        preds = predict(student, [e.input for e in examples], prefix=self.label_prefix,
                        batch_size=self.args.per_device_eval_batch_size, max_new_tokens=self.val_max_new_tokens)
        acc = self.task.accuracy(preds, examples)
        metrics = {f"{metric_key_prefix}_accuracy": acc, f"{metric_key_prefix}_runtime": round(time.time() - start, 3)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def build_trainer(
    student: Student,
    method_cfg: MethodConfig,
    training: TrainingConfig,
    train_records: list[TrainRecord],
    val_examples: list[Example],
    task: Task | None,
    out_dir: Path,
    *,
    progress: bool = True,
    teacher_from: Path | None = None,
) -> StepDistillTrainer:
    """The configured Trainer `fit` runs (exposed for tests and custom loops). `teacher_from`:
    a checkpoint's teacher folder to resume a co-distillation from."""
    if not train_records:
        raise StepDistillError("no training records: the method kept none of the examples (see its summary)")
    method = get_method(method_cfg)
    student.fmt = make_format(student, training, method_cfg.task_marker)
    feats = build_features(student, method_cfg, student.fmt, train_records)
    kd, co_distill, teacher = method_cfg.kd, method_cfg.name == "co-distill", None
    if kd is not None and kd.cache:
        feats = attach_topk_cache(kd, student, feats, batch_size=training.batch_size)
    elif kd is not None:
        teacher = load_kd_teacher(kd, student, trainable=co_distill, weights_from=teacher_from)
        teacher.fmt = student.fmt
    has_val = bool(val_examples)
    if has_val and task is None:
        raise StepDistillError("validation examples given without their task: pass task= to score them")
    if has_val and all(e.label is None for e in val_examples):
        raise StepDistillError(
            "the validation examples have no gold labels, so accuracy cannot select a model: "
            "validate on a labelled split (or pass no validation examples)"
        )
    strategy = "steps" if training.eval_steps else "epoch"
    bf16 = resolve_bf16(training.bf16)
    fast_dropout = not torch.cuda.is_available() if training.fast_dropout is None else training.fast_dropout
    if fast_dropout:
        use_fast_dropout(student.model)
        if co_distill:
            use_fast_dropout(teacher.model)
    if training.fused_gelu:
        use_fused_gelu(student.model)
        if co_distill:
            use_fused_gelu(teacher.model)
    longest_label = max_label_tokens(feats)
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        warmup_steps=training.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
        lr_scheduler_type="linear",
        eval_strategy=strategy if has_val else "no",
        save_strategy=strategy,
        eval_steps=training.eval_steps,
        save_steps=training.eval_steps,
        save_total_limit=None,  # _SealCheckpoint rotates (keeping the best), once the new checkpoint is sealed
        load_best_model_at_end=has_val,
        metric_for_best_model="accuracy" if has_val else None,
        greater_is_better=True,
        logging_steps=training.logging_steps,
        bf16=bf16,
        # on a machine without a GPU, say the CPU is meant: Trainer refuses bf16 otherwise (CPU
        # autocast is real), and sets up no DDP under torchrun / accelerate launch (gloo on CPUs)
        use_cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available(),
        activation_checkpointing=training.gradient_checkpointing,
        seed=training.seed,
        report_to="none",
        remove_unused_columns=False,  # our batches carry rat_* keys the model's forward lacks
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    callbacks: list[TrainerCallback] = [_JsonlLog(out_dir / "train_log.jsonl")]
    if has_val and training.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training.patience))
    if co_distill:
        callbacks += [_TeacherSteps(teacher), _TeacherCheckpoint(teacher)]
    callbacks.append(_SealCheckpoint())  # last: after every file of the checkpoint is written
    return StepDistillTrainer(
        model=student.model,
        args=args,
        train_dataset=feats,
        eval_dataset=val_examples if has_val else None,
        data_collator=Collator(student.tokenizer.pad_token_id),
        processing_class=student.tokenizer,
        callbacks=callbacks,
        student=student,
        alpha=method_cfg.alpha,
        multitask=method.multitask,
        task=task,
        label_prefix=method_cfg.label_prefix,
        val_max_new_tokens=min(training.val_max_new_tokens, training.max_target_length,
                               label_token_limit({"max_label_tokens": longest_label})),
        kd=kd,
        teacher=teacher,
        co_distill=co_distill,
        lengths=[feature_length(f) for f in feats] if training.group_by_length else None,
        fuse_tasks=training.fuse_tasks,
        target_logits_only=training.target_logits_only, fused_loss=training.fused_loss,
        max_label_tokens=longest_label,
        label_vocab=label_vocab((f["labels"] for f in feats), student.tokenizer.eos_token_id),
    )


def _save_co_teacher(trainer: StepDistillTrainer, info: dict[str, Any], out_dir: Path,
                     val_examples: list[Example], task: Task | None) -> dict[str, Any]:
    """Co-distillation trains two models: save the teacher from the selected step beside the
    student (out_dir/teacher_model, loadable like any trained model) and score it on validation."""
    teacher = trainer.teacher
    best = trainer.state.best_model_checkpoint
    if best and (Path(best) / TEACHER_DIR).is_dir():
        teacher = load_kd_teacher(trainer.kd, trainer.student, weights_from=Path(best) / TEACHER_DIR)
        teacher.fmt = trainer.student.fmt
    teacher.model.eval()
    model_dir = out_dir / "teacher_model"
    acc = None
    if val_examples and task is not None:
        preds = predict(teacher, [e.input for e in val_examples], prefix=trainer.label_prefix,
                        batch_size=trainer.args.per_device_eval_batch_size, max_new_tokens=trainer.val_max_new_tokens)
        acc = task.accuracy(preds, val_examples)
    teacher_info = {**info, "co_distill_role": "teacher", "base_model": trainer.kd.teacher,
                    "best_val_accuracy": acc, "note": "selected at the student's best validation step"}
    _save_folder(model_dir, lambda d: _save_model(teacher.model, teacher.tokenizer, teacher_info, d))
    return {"teacher_model": str(model_dir), "teacher_val_accuracy": acc}


def _save_model(model, tokenizer, info: dict[str, Any], folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _refused_pickle(e: BaseException) -> bool:
    """torch.load(weights_only=True) met a pickle that is more than tensors (and did not run it)."""
    import pickle

    return isinstance(e, pickle.UnpicklingError) or "weights only load failed" in str(e).lower()


def _failed_write(e: Exception, ckpt_root: Path, step: int) -> StepDistillError | None:
    """A write that failed during training (a checkpoint, the log) as one clear error, or None when
    `e` is no failed write. The unsealed checkpoint is removed (it may be what filled the disk)."""
    folder = ckpt_root / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    unsealed = folder.is_dir() and not _sealed(folder)
    os_err = _os_error(e)
    if not unsealed and os_err is None:
        return None
    if unsealed:
        shutil.rmtree(folder, ignore_errors=True)
    last, _ = find_checkpoints(ckpt_root)
    where = folder if unsealed else Path(os_err.filename or ckpt_root.parent)
    err = write_error(where, os_err or e)
    then = f"training continues from {last.name}" if last else "no checkpoint is complete, so training starts over"
    return StepDistillError(f"training stopped: {err} with --resume: {then}")


def fit(
    student: Student,
    method_cfg: MethodConfig,
    training: TrainingConfig,
    train_records: list[TrainRecord],
    val_examples: list[Example],
    task: Task,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `student` on `train_records`, keep the model with the best validation accuracy,
    save it to out_dir/model, return the metrics.

    Returns {"train_loss": [(step, loss), ...], "best_val_accuracy", "best_step", "steps",
    "seconds", "trainable_params", "total_params", "train_records", "rationale_records"}.
    After fit, `student.model` is the saved model (LoRA adapters merged into the weights).
    """
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    last, incomplete = find_checkpoints(ckpt_root)
    if last and not resume:
        raise StepDistillError(
            f"{out_dir} already holds training checkpoints ({last.name}): pass resume=True to "
            "continue that run, or choose a new output directory"
        )
    if resume and not last:
        log.warning("resume requested but %s has no complete checkpoint: training from the start", ckpt_root)
    main = is_main_process()  # under torchrun / accelerate launch, rank 0 alone writes the run
    for p in incomplete if main else ():  # a run was stopped while writing them: never resume from half a checkpoint
        log.warning("removing %s: incomplete (the run stopped while writing it)", p)
        shutil.rmtree(p)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out_dir, e) from e
    start_step = _step(last) if resume and last else 0
    if main and not (ckpt_root / SEALS).is_file():  # from here on, a checkpoint counts only once sealed
        write_json(ckpt_root / SEALS, {"sealed_after": start_step})
    if main:
        _trim_log(out_dir / "train_log.jsonl", start_step)
    if start_step:
        log.info("resuming from %s (step %d)", last, start_step)
    teacher_from = last / TEACHER_DIR if resume and last and method_cfg.name == "co-distill" else None
    trainer = build_trainer(student, method_cfg, training, train_records, val_examples, task, out_dir,
                            progress=progress, teacher_from=teacher_from)
    # a clear error now rather than an out-of-memory kill minutes in (activations not counted)
    check_training(student.model, device=trainer.args.device)
    if trainer.co_distill:
        check_training(trainer.teacher.model, device=trainer.args.device, what="co-distillation's teacher")
    trainable, total = count_parameters(student.model)
    start = time.time()
    try:
        trainer.train(resume_from_checkpoint=str(last) if resume and last else None)
    except Exception as e:
        if resume and last and _refused_pickle(e):
            raise StepDistillError(
                f"--resume refused: a file in {last} holds more than tensors (torch's weights-only loader refused "
                f"it, and nothing in it ran); move {last.name} aside to resume from an earlier checkpoint, "
                "or start a new run with another --out") from e
        err = _failed_write(e, ckpt_root, trainer.state.global_step)
        if err is None:
            raise
        raise err from e
    seconds = time.time() - start
    state = trainer.state

    # Trainer has reloaded the best checkpoint (load_best_model_at_end) into trainer.model.
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # peft: ship one self-contained model folder
        model = model.merge_and_unload()
    student.model = model
    model_dir = out_dir / "model"
    info = {
        "method": method_cfg.name,
        "label_prefix": method_cfg.label_prefix,
        "rationale_prefix": method_cfg.rationale_prefix,
        "alpha": method_cfg.alpha,
        "label_source": method_cfg.label_source,
        "format": student.fmt.to_dict(),
        "base_model": getattr(model.config, "name_or_path", None) or None,
        "best_val_accuracy": state.best_metric,
        "best_step": state.best_global_step,
        # the longest label target (tokens, eos included): evaluation's task-aware generation limit
        "max_label_tokens": trainer.max_label_tokens,
        # every token of the trained labels, and eos: label_decoding=vocab decodes within them
        "label_vocab": trainer.label_vocab,
    }
    if method_cfg.kd is not None:
        info["kd"] = method_cfg.kd.model_dump()
    extra: dict[str, Any] = {}
    if main:
        _save_folder(model_dir, lambda d: _save_model(model, student.tokenizer, info, d))
        if trainer.co_distill:
            extra = _save_co_teacher(trainer, info, out_dir, val_examples, task)

    history = state.log_history
    return {**extra,
        "train_loss": [(h["step"], h["loss"]) for h in history if "loss" in h],
        "val_accuracy": [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h],
        "best_val_accuracy": state.best_metric,
        "best_step": state.best_global_step,
        "steps": state.global_step,
        "seconds": round(seconds, 2),
        "trainable_params": trainable,
        "total_params": total,
        "train_records": len(train_records),
        "rationale_records": sum(1 for r in train_records if r.rationale),
    }
