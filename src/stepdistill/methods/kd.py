"""White-box teachers for soft-label distillation: load one, check it can teach this student,
and (for teachers too big to keep beside the student) write its top-k distributions once.

    teacher = load_kd_teacher(kd, student)            # frozen, same device, vocabulary checked
    feats = attach_topk_cache(kd, student, feats)     # kd.cache: top-k log-probs per position

The divergences themselves are pure functions in losses.py (kd_loss, kd_loss_topk);
`soft_label_loss` mixes one into a task's cross-entropy, for any method that has `kd`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from stepdistill.config import KDConfig
from stepdistill.errors import StepDistillError
from stepdistill.methods.batches import RATIONALE, Collator, decoder_inputs
from stepdistill.methods.cross_tokenizer import uld_task_loss
from stepdistill.methods.losses import kd_loss, kd_loss_topk, token_cross_entropy, topk_logprobs
from stepdistill.methods.server_topk import server_topk
from stepdistill.runs import fsync_dir, fsync_tree, write_error, write_json
from stepdistill.students import Student, load_pretrained, model_folder

log = logging.getLogger(__name__)

KD_KEYS = ("kd_vals", "kd_ids")  # feature keys of cached top-k log-probs and token ids (per position)


def load_kd_teacher(kd: KDConfig, student: Student, *, trainable: bool = False,
                    weights_from: Path | None = None) -> Student:
    """The teacher named by kd.teacher, checked against the student: same model kind and the
    same tokenizer vocabulary (soft labels compare distributions token by token).
    `weights_from`: a saved teacher folder (a co-distillation checkpoint) to take the weights from."""

    source = model_folder(kd.teacher)  # a training run's model/, or the path itself
    if weights_from is not None:
        if not (Path(weights_from) / "config.json").is_file():
            raise StepDistillError(f"{weights_from} holds no saved teacher: this co-distillation checkpoint is incomplete; "
                                   "resume from an earlier checkpoint or start the run again")
        source = Path(weights_from)
    kind = "seq2seq" if student.is_seq2seq else "causal"
    teacher = load_pretrained(str(source) if source.exists() else kd.teacher, kind=kind)
    if kd.cross_tokenizer is None:
        check_same_vocabulary(teacher, student, kd.teacher)
    teacher.model.train(trainable)
    teacher.model.requires_grad_(trainable)
    return teacher


def check_same_vocabulary(teacher: Student, student: Student, name: str) -> None:
    t, s = teacher.tokenizer, student.tokenizer
    if len(t) != len(s) or t.get_vocab() != s.get_vocab():
        raise StepDistillError(
            f"the teacher {name} and the student have different vocabularies ({len(t)} vs {len(s)} tokens), "
            "so their token distributions cannot be compared: use a student that shares the teacher's tokenizer "
            "(e.g. `stepdistill make-student --from <teacher>`), set kd.cross_tokenizer: uld, or distil its generated "
            "text instead (method distill or step-by-step on `stepdistill annotate` outputs)"
        )


def vocab_size(teacher: Student, student: Student) -> int | None:
    """The shared vocabulary size when an embedding matrix is padded beyond the tokenizer."""
    sizes = {teacher.model.get_output_embeddings().weight.shape[0], student.model.get_output_embeddings().weight.shape[0]}
    return len(student.tokenizer) if len(sizes) > 1 else None


def teacher_logits(teacher, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *, seq2seq: bool) -> torch.Tensor:
    """Logits aligned with the student's for the same batch (seq2seq: teacher-forced on labels)."""
    if not seq2seq:
        return teacher(input_ids=ids, attention_mask=mask).logits
    return teacher(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs(labels, teacher.config)).logits


def run_teacher(trainer, kw: dict[str, torch.Tensor], labels: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """The teacher's logits for the student's batch, in the student's precision (with gradients
    only for a teacher that is trained too)."""
    with torch.set_grad_enabled(grad), trainer.autocast():
        return teacher_logits(trainer.teacher.model, kw["input_ids"], kw["attention_mask"], labels,
                              seq2seq=trainer.student.is_seq2seq)


def mixed_loss(trainer, logits: torch.Tensor, other: torch.Tensor, labels: torch.Tensor, n_items,
               note: str | None = None) -> torch.Tensor:
    """(1 - w) * cross-entropy + w * the divergence from `other`'s distribution (detached inside),
    with w = the method's KD weight at this step; the divergence is logged as `note`."""
    kd, w = trainer.kd, trainer.method.kd_weight(trainer.state.global_step)
    shift = not trainer.student.is_seq2seq
    ce = token_cross_entropy(logits, labels, n_items, shift=shift)
    div = kd_loss(logits, other, labels, n_items, kind=kd.kind, temperature=kd.temperature, beta=kd.beta,
                  shift=shift, vocab_size=trainer.kd_vocab)
    if note:
        trainer.note(note, div)
    return (1 - w) * ce + w * div


def soft_label_loss(trainer, logits: torch.Tensor, kw: dict[str, torch.Tensor], inputs: dict, pre: str,
                    n_items) -> torch.Tensor:
    """One task's soft-label KD loss: (1 - w) * CE + w * the divergence to the teacher, whose
    distributions come from the batch (kd.cache: top-k) or from running the frozen teacher now."""
    if trainer.kd.cross_tokenizer == "uld":
        return uld_task_loss(trainer, logits, inputs, pre, n_items)
    labels = inputs[pre + "labels"]
    if pre + "kd_vals" not in inputs:
        return mixed_loss(trainer, logits, run_teacher(trainer, kw, labels), labels, n_items, pre + "kd_loss")
    kd, w = trainer.kd, trainer.method.kd_weight(trainer.state.global_step)
    shift = not trainer.student.is_seq2seq
    ce = token_cross_entropy(logits, labels, n_items, shift=shift)
    div = kd_loss_topk(logits, inputs[pre + "kd_vals"], inputs[pre + "kd_ids"], labels, n_items,
                       temperature=kd.temperature, shift=shift)
    trainer.note(pre + "kd_loss", div)
    return (1 - w) * ce + w * div


def _fingerprint(teacher: str) -> list:
    """The teacher's weights as files (name, size, mtime): a retrained teacher at the same path
    must not be served a cache made from the old one."""
    from stepdistill.teachers.base import portable_name

    p = model_folder(teacher)
    if p.is_dir():
        return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()
                      if f.suffix in {".safetensors", ".bin", ".json", ".gguf"})
    return [portable_name(teacher)]  # a file (size included) or a hub id


def _digest(kd: KDConfig, feats: list[dict]) -> str:
    """What the cache was computed from: teacher weights, temperature, k and every token it saw."""
    source = {"server": kd.base_url, "model": kd.teacher} if kd.base_url else _fingerprint(kd.teacher)
    h = hashlib.sha256(json.dumps({"teacher": source, "T": kd.temperature, "k": kd.top_k}).encode())
    for f in feats:
        for pre in ("", RATIONALE):
            if pre + "input_ids" in f:
                h.update(json.dumps([f[pre + "input_ids"], f[pre + "labels"]]).encode())
    return h.hexdigest()


def attach_topk_cache(kd: KDConfig, student: Student, feats: list[dict], *, batch_size: int = 8) -> list[dict]:
    """Add the teacher's top-k log-probs (kd_vals, kd_ids; rat_kd_* for the rationale task) to
    each feature, reading kd.cache or, when it is missing, computing it once and writing it."""
    from safetensors.torch import save_file

    cache = Path(kd.cache)
    digest = _digest(kd, feats)
    meta_file, tensors_file = cache / "meta.json", cache / "topk.safetensors"
    if meta_file.is_file() and tensors_file.is_file():
        tensors = _read_cache(cache, digest)
        log.info("kd: read the teacher's top-%d distributions from %s", kd.top_k, cache)
    elif cache.exists():
        raise StepDistillError(f"{cache} exists but is not a complete top-k cache (no meta.json/topk.safetensors): "
                               "delete it, or point kd.cache to a new folder")
    else:
        log.info("kd: writing the teacher's top-%d distributions to %s (once)", kd.top_k, cache)
        if kd.base_url:  # a teacher behind a server: it never loads here
            if student.is_seq2seq:
                raise StepDistillError("kd.base_url gives log-probs of one causal sequence: use a causal student")
            tensors = server_topk(kd, student, feats)
        else:
            teacher = load_kd_teacher(kd, student)
            teacher.model.to("cuda" if torch.cuda.is_available() else "cpu")
            tensors = _compute_topk(kd, teacher, student.is_seq2seq, feats, batch_size)
            del teacher
        tmp = cache.with_name(cache.name + ".tmp")  # a crash leaves only this, rewritten by the next run
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / "topk.safetensors"))
            write_json(tmp / "meta.json", {"digest": digest, "teacher": kd.teacher, "top_k": kd.top_k,
                                           "temperature": kd.temperature, "features": len(feats),
                                           "files": fsync_tree(tmp)})  # sizes of the files above
            tmp.rename(cache)
            fsync_dir(cache.parent)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(cache, e) from e
    out = []
    for i, f in enumerate(feats):
        g = dict(f)
        for pre in ("", RATIONALE):
            if f"{pre}{i}.vals" in tensors:
                g[pre + "kd_vals"] = tensors[f"{pre}{i}.vals"]
                g[pre + "kd_ids"] = tensors[f"{pre}{i}.ids"]
        out.append(g)
    return out


def _read_cache(cache: Path, digest: str) -> dict[str, torch.Tensor]:
    """The cache's tensors, if it was written for this teacher and data and is whole; else one
    clear error (a cache is only ever renamed into place complete, but disks fail and people copy)."""
    from safetensors.torch import load_file

    fix = "delete it (it is rewritten) or point kd.cache to a new folder"
    try:
        meta = json.loads((cache / "meta.json").read_text())
        sizes = meta.get("files") or {}
        whole = all((cache / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError) as e:
        raise StepDistillError(f"the top-k cache {cache} cannot be read ({type(e).__name__}: {e}): {fix}") from e
    if meta.get("digest") != digest:
        raise StepDistillError(f"the top-k cache {cache} was written for another teacher, temperature, k or "
                               f"training data: {fix}")
    if not whole:
        raise StepDistillError(f"the top-k cache {cache} is incomplete (a file has the wrong size): {fix}")
    try:
        return load_file(str(cache / "topk.safetensors"))
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise StepDistillError(f"the top-k cache {cache} is damaged ({type(e).__name__}: {e}): {fix}") from e


@torch.inference_mode()
def _compute_topk(kd: KDConfig, teacher: Student, seq2seq: bool, feats: list[dict], batch_size: int
                  ) -> dict[str, torch.Tensor]:
    """Per feature and task: (positions, k) log-probs at temperature T and their token ids, for
    the positions the student's logits have (decoder positions for seq2seq, all for causal)."""

    model = teacher.model
    collate = Collator(teacher.tokenizer.pad_token_id or 0)
    tensors: dict[str, torch.Tensor] = {}
    for pre in ("", RATIONALE):
        rows = [(i, f) for i, f in enumerate(feats) if pre + "input_ids" in f]
        for b in range(0, len(rows), batch_size):
            chunk = rows[b : b + batch_size]
            batch = collate([f for _, f in chunk])  # the padding training uses
            ids, mask, labels = batch[pre + "input_ids"], batch[pre + "attention_mask"], batch[pre + "labels"]
            device = next(model.parameters()).device
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = teacher_logits(model, ids.to(device), mask.to(device), labels.to(device), seq2seq=seq2seq)
            vals, idx = topk_logprobs(logits.float(), kd.top_k, kd.temperature)
            vals, idx = vals.cpu(), idx.cpu()
            for j, (i, f) in enumerate(chunk):
                n = len(f[pre + "labels"]) if seq2seq else len(f[pre + "input_ids"])
                tensors[f"{pre}{i}.vals"] = vals[j, :n].to(torch.float16).contiguous()
                tensors[f"{pre}{i}.ids"] = idx[j, :n].to(torch.int32).contiguous()
    return tensors


