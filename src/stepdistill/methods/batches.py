"""Training batches: the rows a method builds, tokenised, padded and stacked.

A feature is one training example: `input_ids`/`labels` for the label task and, where a method
adds one, `rat_input_ids`/`rat_labels` for the rationale task (seq2seq with the decoder task
marker: `decoder_input_ids` too; with a soft-label KD cache: `kd_vals`/`kd_ids`). The Collator pads
each task's rows on their own, so a label row is never padded to a rationale's length. A method
that puts both tasks in one sequence marks the rationale's tokens of that row in `seg_labels`
(`labels` then holds the label's tokens only), so each task's tokens can still be counted apart.
"""

from __future__ import annotations

import torch

from stepdistill.methods.losses import IGNORE_INDEX

RATIONALE = "rat_"  # batch keys of the rationale task: rat_input_ids, rat_attention_mask, rat_labels
SEGMENT = "seg_"  # seg_labels: the rationale's targets inside the label row's own sequence
LABEL_KEYS = ("", RATIONALE, SEGMENT)  # the prefixes of every `labels` key a batch may hold
T_PREFIX = "kdt_"  # an other-tokenizer teacher's row (kdt_input_ids) and aligned logit positions (kdt_spos, kdt_tpos)


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
            if not pre and SEGMENT + "labels" in rows[0]:  # the same width as the labels they share a row with
                batch[SEGMENT + "labels"] = self._pad([f[SEGMENT + "labels"] for f in rows], IGNORE_INDEX)
            if pre + "decoder_input_ids" in rows[0]:  # the task marker forced at the decoder's start
                batch[pre + "decoder_input_ids"] = self._pad([f[pre + "decoder_input_ids"] for f in rows], self.pad_id)
            if pre + "kd_vals" in rows[0]:  # the teacher's cached top-k, one row per logits position
                width = max(f[pre + "kd_vals"].shape[0] for f in rows)
                batch[pre + "kd_vals"] = pad_topk([f[pre + "kd_vals"] for f in rows], width, 0.0).float()
                batch[pre + "kd_ids"] = pad_topk([f[pre + "kd_ids"] for f in rows], width, 0).long()
            if pre + T_PREFIX + "input_ids" in rows[0]:  # kd.cross_tokenizer (methods/cross_tokenizer.py)
                t = pre + T_PREFIX
                batch[t + "input_ids"] = self._pad([f[t + "input_ids"] for f in rows], 0)
                batch[t + "attention_mask"] = self._pad([[1] * len(f[t + "input_ids"]) for f in rows], 0)
                batch[t + "spos"] = self._pad([f[t + "spos"] for f in rows], -1)
                batch[t + "tpos"] = self._pad([f[t + "tpos"] for f in rows], -1)
        return batch


def stack_padded(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    """Rows of `a` then rows of `b`, the narrower right-padded with `value` to the wider's width."""
    width = max(a.shape[1], b.shape[1])
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in (a, b)])


def feature_length(f: dict) -> int:
    """What a training example costs: the tokens of every sequence of both tasks."""
    return sum(len(v) for k, v in f.items() if k.endswith(("input_ids", "labels")))


def decoder_inputs(labels: torch.Tensor, cfg) -> torch.Tensor:
    """Decoder inputs from seq2seq labels (teacher forcing), as T5/BART build them: shifted right
    behind the decoder start token, padding where the labels are masked."""
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
    dec = labels.new_full(labels.shape, cfg.pad_token_id)
    dec[:, 1:] = labels[:, :-1]
    dec[:, 0] = start
    return dec.masked_fill(dec == IGNORE_INDEX, cfg.pad_token_id)


# ---------------------------------------------------------------- the top-k cache


def pad_topk(rows: list[torch.Tensor], width: int, value: float) -> torch.Tensor:
    """(batch, width, k) from per-row (positions, k) tensors, right-padded (padding is masked by labels)."""
    k = rows[0].shape[-1]
    out = torch.full((len(rows), width, k), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
