"""On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): the student also
learns on its own samples, which the teacher scores token by token. It fixes teacher-forced KD's
mismatch: at inference the student conditions on its own tokens, never on the data's.

    method: {name: on-policy, kd: {teacher: T, kind: jsd, beta: 0.5, lmbda: 0.5}}
    method: {name: step-by-step, kd: {teacher: T, lmbda: 0.5}}   # the rationale task too

For each task's micro-batch, with probability `kd.lmbda` its targets are replaced by the
student's own continuations of the same prompts (sampled at `kd.sample_temperature`, batched
through the KV cache, at most as long as the batch's longest target). The loss on such a batch is
`kd.weight` times the divergence (`kd.kind`; `jsd` with `beta` is GKD's generalised JSD) between
the teacher's and the student's distributions at every sampled position. There is no
cross-entropy term: the sample is the student's own, not a target. Other batches keep the
teacher-forced loss, (1 - weight) * cross-entropy + weight * divergence, so `lmbda = 0` is
exactly off-policy KD. Under step-by-step the student writes its own rationale and the teacher
grades it.

The coin and the sampling are seeded from (training seed, optimizer step, micro-batch, task), so
a run is reproducible and a resumed run samples what the uninterrupted one would have. The
sampling's cost is logged as `onpolicy_gen_s` (seconds per logged step) beside `onpolicy_share`.
"""

from __future__ import annotations

import time
import zlib
from typing import Mapping

import torch

from stepdistill.errors import ConfigError
from stepdistill.methods.base import METHODS, RecordSet
from stepdistill.methods.batches import decoder_inputs
from stepdistill.methods.kd import run_teacher
from stepdistill.methods.losses import IGNORE_INDEX, kd_loss
from stepdistill.methods.standard import DistillMethod, StandardMethod
from stepdistill.tasks.base import Example, Parsed

DEFAULT_LMBDA = 0.5  # under method on-policy, when kd.lmbda is not set (GKD's usual mix)


@METHODS.register("on-policy")
class OnPolicyMethod(StandardMethod):
    """The label task on gold labels (`label_source: teacher`: the teacher's), with KD from
    `kd.teacher` on the data's targets and on the student's own samples."""

    name = "on-policy"
    needs_annotations = False  # gold labels by default; label_source teacher asks for them (DistillMethod)

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.kd is None:
            raise ConfigError("method on-policy distils from a white-box teacher: set method.kd.teacher "
                              "(a model sharing the student's tokenizer)")

    @property
    def teacher_labels(self) -> bool:
        return self.cfg.label_source == "teacher"

    def records(self, examples: list[Example], annotations: Mapping[str, Parsed] | None = None) -> RecordSet:
        if self.cfg.label_source == "teacher":
            return DistillMethod(self.cfg).records(examples, annotations)
        return super().records(examples, annotations)


def lmbda(method) -> float:
    """The on-policy share of micro-batches this method trains with."""
    kd = method.cfg.kd
    if kd is None:
        return 0.0
    if kd.lmbda is not None:
        return kd.lmbda
    return DEFAULT_LMBDA if method.name == "on-policy" else 0.0


def _seed(trainer, pre: str) -> int:
    """(training seed, optimizer step, micro-batch within the step, task) as one seed."""
    step = trainer.state.global_step
    last, count = getattr(trainer, "_on_policy_tick", (None, 0))
    count = count + 1 if last == step else 0
    trainer._on_policy_tick = (step, count)
    return zlib.crc32(f"{trainer.args.seed}/{step}/{count}/{pre}".encode())


def on_policy_now(trainer, pre: str) -> torch.Generator | None:
    """A generator to sample this micro-batch's targets with, or None: train on the data's."""
    share = lmbda(trainer.method)
    if share <= 0 or not trainer.model.training:
        return None
    g = torch.Generator().manual_seed(_seed(trainer, pre))
    return g if torch.rand((), generator=g).item() < share else None


def _targets(labels: torch.Tensor) -> list[torch.Tensor]:
    return [row[row.ne(IGNORE_INDEX)] for row in labels]


def _cut_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def sample_batch(trainer, model, inputs: dict, pre: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The task's sub-batch with its targets replaced by the student's own samples:
    {input_ids, attention_mask, labels} (seq2seq: decoder_input_ids too), right-padded as the
    Collator pads, labels -100 off the sampled tokens."""
    student = trainer.student
    net = getattr(model, "module", model)  # under DDP, generate on the wrapped model
    ids, mask, labels = inputs[pre + "input_ids"], inputs[pre + "attention_mask"], inputs[pre + "labels"]
    longest = max(len(t) for t in _targets(labels))
    tok = student.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = {t for t in ([net.generation_config.eos_token_id] if not isinstance(net.generation_config.eos_token_id, list)
                       else net.generation_config.eos_token_id) if t is not None} or {tok.eos_token_id}
    if student.is_seq2seq:
        prompts = ids
        prompt_mask = mask
    else:  # the prompt is what precedes the first target token; generation wants it left-padded
        starts = [int(row.ne(IGNORE_INDEX).nonzero()[0, 0]) if row.ne(IGNORE_INDEX).any() else int(m.sum())
                  for row, m in zip(labels, mask)]
        width = max(starts)
        prompts = ids.new_full((ids.shape[0], width), pad)
        prompt_mask = mask.new_zeros((ids.shape[0], width))
        for i, s in enumerate(starts):
            prompts[i, width - s:] = ids[i, :s]
            prompt_mask[i, width - s:] = 1
    was_training = net.training
    net.eval()
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    try:
        with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []), trainer.autocast():
            torch.manual_seed(seed)
            out = net.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True,
                               temperature=trainer.kd.sample_temperature, top_k=0, top_p=1.0,
                               max_new_tokens=longest, pad_token_id=pad)
    finally:
        net.train(was_training)
    if student.is_seq2seq:
        gen = [_cut_after_eos(row[1:].tolist(), eos) for row in out]  # after the decoder start token
        width = max(len(g) for g in gen)
        new_labels = torch.tensor([g + [IGNORE_INDEX] * (width - len(g)) for g in gen], device=ids.device)
        return {"input_ids": ids, "attention_mask": mask, "labels": new_labels,
                "decoder_input_ids": decoder_inputs(new_labels, net.config)}
    gen = [_cut_after_eos(row[prompts.shape[1]:].tolist(), eos) for row in out]
    rows = [ids[i, :s].tolist() + g for i, (s, g) in enumerate(zip(starts, gen))]
    width = max(len(r) for r in rows)
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=ids.device),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=ids.device),
        "labels": torch.tensor([[IGNORE_INDEX] * s + g + [IGNORE_INDEX] * (width - s - len(g))
                                for s, g in zip(starts, gen)], device=ids.device),
    }


def on_policy_loss(trainer, model, inputs: dict, pre: str, n_items, generator: torch.Generator) -> torch.Tensor:
    """kd.weight * the divergence between teacher and student on the student's own samples of
    this task's prompts, weighted like the teacher-forced batch it replaces (its share of the
    accumulated batch's target tokens)."""
    t0 = time.perf_counter()
    batch = sample_batch(trainer, model, inputs, pre, generator)
    trainer.note("onpolicy_gen_s", torch.tensor(time.perf_counter() - t0))
    trainer.note("onpolicy_share", torch.tensor(1.0))
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in batch}
    labels = batch["labels"]
    logits = model(**kw).logits
    kd = trainer.kd
    div = kd_loss(logits, run_teacher(trainer, kw, labels), labels, None, kind=kd.kind, temperature=kd.temperature,
                  beta=kd.beta, shift=not trainer.student.is_seq2seq, vocab_size=trainer.kd_vocab)
    trainer.note(pre + "kd_loss", div)
    share = 1.0
    if n_items is not None:  # the replaced batch's target tokens over the accumulated batch's
        local = _count(inputs[pre + "labels"], shift=not trainer.student.is_seq2seq)
        share = local / (n_items.to(local.device) if torch.is_tensor(n_items) else torch.tensor(float(n_items)))
    return trainer.method.kd_weight(trainer.state.global_step) * div * share


def _count(labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    return (labels[:, 1:] if shift else labels).ne(IGNORE_INDEX).sum().float()


def check_on_policy(method, student) -> None:
    """Refuse what on-policy sampling cannot do, before training starts."""
    if lmbda(method) <= 0:
        return
    if method.trains_teacher:
        raise ConfigError(f"method {method.name} does not sample on-policy: set kd.lmbda to 0, or use method on-policy")
    if method.cfg.kd.cache:
        raise ConfigError("kd.cache holds the teacher's distributions on the data's targets only, not on the student's "
                          "own samples: drop kd.cache to run the teacher on the fly, or set kd.lmbda to 0")
    if student.is_seq2seq and method.cfg.task_marker == "decoder":
        raise ConfigError("on-policy KD samples targets with generate(), which cannot force the decoder task marker: "
                          "use task_marker: prefix, or set kd.lmbda to 0")
