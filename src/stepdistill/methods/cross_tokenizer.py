"""Soft-label KD from a teacher with another tokenizer: the Universal Logit Distillation loss
(ULD, Boizard et al. 2024), `kd.cross_tokenizer: uld`.

Two tokenizers cut the same text into different tokens, and their vocabularies share no index, so
the teacher's distribution cannot be compared with the student's token by token. ULD compares
what can be compared: at a position where both predict the next piece of the same text, the
student's probabilities sorted from largest to smallest against the teacher's sorted the same way
(the shorter vector padded with zeros). The distance is their L1 difference, the closed form of
the Wasserstein-1 distance between the two sorted distributions:

    uld = sum over aligned positions of sum_i | sort(p_student)_i - sort(p_teacher)_i |

with p = softmax(logits / T); each task's loss is (1 - kd.weight) * CE + kd.weight * uld /
(the task's target tokens), normalised like the cross-entropy so accumulation stays exact.

**Alignment, on the text.** Each training row's prompt and target are decoded to text with the
student's tokenizer and tokenised again with the teacher's. A student target token and a teacher
target token are aligned when they start at the same character of the target, counting
non-whitespace characters only, so that the two tokenizers' conventions for spaces do not matter.
The end of the sequence (each tokenizer's eos) is aligned too. A target token whose start the
other tokenizer does not share is left out of the ULD term (it still has its cross-entropy).
Causal students and teachers only.
"""

from __future__ import annotations

import torch

from stepdistill.errors import ConfigError
from stepdistill.methods.batches import RATIONALE, T_PREFIX
from stepdistill.methods.losses import IGNORE_INDEX, normalise, token_cross_entropy

def _starts(tokenizer, ids: list[int]) -> list[int | None]:
    """Per token: how many non-whitespace characters of the decoded text precede it (None for a
    token that adds none, such as a lone space)."""
    out, before = [], 0
    for j in range(len(ids)):
        now = sum(not c.isspace() for c in tokenizer.decode(ids[: j + 1], skip_special_tokens=True))
        out.append(before if now > before else None)
        before = max(before, now)
    return out


def align(student_tok, student_ids: list[int], teacher_tok, teacher_ids: list[int]) -> list[tuple[int, int]]:
    """(student index, teacher index) pairs of target tokens that start at the same
    non-whitespace character of the text; each side's final token (its eos) pairs with the other's."""
    s, t = _starts(student_tok, student_ids[:-1]), _starts(teacher_tok, teacher_ids[:-1])
    at = {v: k for k, v in enumerate(t) if v is not None}
    pairs = [(j, at[v]) for j, v in enumerate(s) if v is not None and v in at]
    return pairs + [(len(student_ids) - 1, len(teacher_ids) - 1)]


def teacher_rows(student_tok, teacher_tok, feats: list[dict]) -> list[dict]:
    """Each feature with the teacher's row of each task it trains (kdt_input_ids, rat_kdt_input_ids)
    and the aligned logit positions (kdt_spos in the student's row, kdt_tpos in the teacher's)."""
    eos = teacher_tok.eos_token_id
    out = []
    for f in feats:
        g = dict(f)
        for pre in ("", RATIONALE):
            if pre + "input_ids" not in f:
                continue
            ids, labels = f[pre + "input_ids"], f[pre + "labels"]
            p = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)  # the target's first token
            target = [x for x in labels[p:] if x != IGNORE_INDEX]
            prompt_text = student_tok.decode(ids[:p], skip_special_tokens=True)
            target_text = student_tok.decode(target, skip_special_tokens=True)
            t_prompt = teacher_tok(prompt_text)["input_ids"]
            t_target = teacher_tok(target_text, add_special_tokens=False)["input_ids"] + [eos]
            pairs = align(student_tok, target, teacher_tok, t_target)
            # logits at position i predict token i + 1: target token j is predicted at p + j - 1
            g[pre + T_PREFIX + "input_ids"] = t_prompt + t_target
            g[pre + T_PREFIX + "spos"] = [p + j - 1 for j, _ in pairs]
            g[pre + T_PREFIX + "tpos"] = [len(t_prompt) + k - 1 for _, k in pairs]
        out.append(g)
    return out


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spos: torch.Tensor, tpos: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Summed ULD distance over the aligned positions: student_logits (batch, seq, V_s),
    teacher_logits (batch, seq_t, V_t), spos / tpos (batch, pairs) logit positions (-1: padding)."""
    keep = spos.ge(0)
    rows = keep.nonzero()[:, 0]
    s = torch.softmax(student_logits[rows, spos[keep]].float() / temperature, -1)
    t = torch.softmax(teacher_logits.detach()[rows.to(teacher_logits.device), tpos[keep].to(teacher_logits.device)]
                      .float() / temperature, -1).to(s.device)
    s, t = s.sort(-1, descending=True).values, t.sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))
    t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum()


def uld_task_loss(trainer, logits: torch.Tensor, inputs: dict, pre: str, n_items) -> torch.Tensor:
    """One task's (1 - w) * cross-entropy + w * ULD to the other-tokenizer teacher."""
    labels = inputs[pre + "labels"]
    kd, w = trainer.kd, trainer.method.kd_weight(trainer.state.global_step)
    ce = token_cross_entropy(logits, labels, n_items, shift=True)
    with torch.no_grad(), trainer.autocast():
        t_logits = trainer.teacher.model(input_ids=inputs[pre + T_PREFIX + "input_ids"],
                                         attention_mask=inputs[pre + T_PREFIX + "attention_mask"]).logits
    div = normalise(uld_loss(logits, t_logits, inputs[pre + T_PREFIX + "spos"], inputs[pre + T_PREFIX + "tpos"],
                             kd.temperature), labels[:, 1:], n_items)
    trainer.note(pre + "kd_loss", div)
    return (1 - w) * ce + w * div


def check_cross_tokenizer(method, student) -> None:
    """Refuse what ULD here cannot do, before anything is written."""
    kd = method.cfg.kd
    if kd is None or kd.cross_tokenizer is None:
        return
    if student.is_seq2seq:
        raise ConfigError("kd.cross_tokenizer: uld supports causal students and teachers: use a causal student, or "
                          "distil the teacher's generated text instead (method distill or step-by-step)")
    if method.trains_teacher or (kd.lmbda or 0) > 0 or method.name == "on-policy":
        raise ConfigError(f"kd.cross_tokenizer: uld does not combine with method {method.name} or kd.lmbda yet: "
                          "use standard, distill or step-by-step with kd.lmbda 0")
