"""How a (prefix, input, target) triple becomes token ids — the one place training and
prediction both read, so the two can never format differently.

seq2seq: encoder source = prefix + input; decoder target = answer + eos.
causal:  prompt = prefix + input + separator; the model reads prompt + answer + eos and the
         labels mask the prompt with -100, so only the answer is learned. Through the student's
         chat template (student.chat_template): prompt = chat_head + prefix + input + chat_tail,
         the template rendered around one user turn (the task prefix stays the task's switch)
         and ending where the assistant's answer begins.

Long inputs are truncated on the *left* of the input text: the task prefix and the end of the
input (where the question usually sits) survive. Targets are truncated on the right.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import torch
from transformers import StoppingCriteria

from stepdistill.methods.losses import IGNORE_INDEX

FORMAT_VERSION = 1  # bump when the token layout below changes; saved next to every trained model


@dataclass(frozen=True)
class Format:
    """Everything besides the prefix that decides the token layout. Saved in stepdistill.json."""

    kind: Literal["seq2seq", "causal"]
    separator: str = "\n"  # causal only: ends the prompt, so the model knows the answer starts
    max_input_length: int = 512  # tokens of source (seq2seq) or prompt (causal)
    max_target_length: int = 256  # tokens of the answer, eos included
    # seq2seq only. encoder: the task prefix starts the source (the paper). decoder: the source is
    # the input alone (encoded once for both tasks) and the prefix is forced at the decoder's start
    task_marker: Literal["encoder", "decoder"] = "encoder"
    # where the label sits in what the label task generates (methods that put the rationale in
    # the same sequence): before `answer_end` (label, then rationale), or after the last
    # `answer_after` (rationale, then label); neither: the whole generation is the label
    answer_end: Optional[str] = None
    answer_after: Optional[str] = None
    # causal only: the student's chat template around the user turn (empty: no template); the
    # template's own special tokens are in this text, so the prompt adds no others
    chat_head: str = ""
    chat_tail: str = ""
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Format":
        assert d.get("version", FORMAT_VERSION) == FORMAT_VERSION, (
            f"model was trained with format version {d.get('version')}, this code writes {FORMAT_VERSION}"
        )
        return cls(**d)


def extract_answer(fmt: Format, text: str) -> str:
    """The label in a label task's generation (see Format.answer_end / answer_after), stripped.

    >>> extract_answer(Format("causal", answer_end="because"), "(3 + 4) because 3 plus 4 is 7.")
    '(3 + 4)'
    """
    if fmt.answer_end:
        text = text.split(fmt.answer_end, 1)[0]
    elif fmt.answer_after:
        text = text.rsplit(fmt.answer_after, 1)[-1].strip().removesuffix(".")
    return text.strip()


class LabelWritten(StoppingCriteria):
    """Stops each row of a label task's generation once its label is complete: its new tokens
    (from column `start`) decode to text holding `answer_end` (label, then rationale). The test
    is the one extract_answer cuts at, so stopping there changes no extracted label. By the
    decoded text: transformers' `stop_strings` maps the whole vocabulary and fails on tokenizers
    it cannot map."""

    def __init__(self, tokenizer, fmt: Format, start: int):
        self.tokenizer, self.text, self.start = tokenizer, fmt.answer_end, start

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        written = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([self.text in w for w in written], dtype=torch.bool, device=input_ids.device)


def token_ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_source(tokenizer, fmt: Format, prefix: str, text: str) -> list[int]:
    """Token ids the model reads: the encoder source (seq2seq) or the prompt (causal).

    Special tokens (T5's </s>, Llama's <s>) are added the way the tokenizer always adds them.
    """
    head, tail, special = "", fmt.separator if fmt.kind == "causal" else "", True
    if fmt.chat_head or fmt.chat_tail:
        head, tail, special = fmt.chat_head, fmt.chat_tail, False
    ids = token_ids(tokenizer, head + prefix + text + tail, special)
    if len(ids) <= fmt.max_input_length:
        return ids
    # Too long: cut the front of `text` (never the prefix or separator) and retokenise, so the
    # result is what the tokenizer would produce for that shorter text. A few rounds at most.
    for _ in range(8):
        excess = len(ids) - fmt.max_input_length
        cut = _char_cut(tokenizer, text, excess)
        if cut >= len(text):
            text = ""
        else:
            text = text[cut:]
        ids = token_ids(tokenizer, head + prefix + text + tail, special)
        if len(ids) <= fmt.max_input_length or not text:
            break
    # Last resort (prefix alone too long, or a tokenizer that merges across the cut): hard cut
    # that keeps the final tokens, where the separator / eos sit.
    return ids if len(ids) <= fmt.max_input_length else ids[-fmt.max_input_length :]


def _char_cut(tokenizer, text: str, n_tokens: int) -> int:
    """Character offset in `text` after which dropping the first `n_tokens` tokens leaves the rest."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if n_tokens >= len(offsets):
            return len(text)
        return max(offsets[n_tokens][0], 1)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        # slow tokenizers have no offsets: drop a proportional share of characters
        n = max(len(token_ids(tokenizer, text, False)), 1)
        return max(1, int(len(text) * min(1.0, (n_tokens + 1) / n)))


CHAT_SLOT = "\u241eSTEPDISTILL-INPUT\u241e"  # stands in for the user turn while the template is rendered


def chat_wrapper(tokenizer, system: str | None = None) -> tuple[str, str]:
    """(head, tail) of the tokenizer's chat template around one user turn, with the generation
    prompt: the text before and after the user's words when the assistant's answer comes next."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": CHAT_SLOT}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, found, tail = text.partition(CHAT_SLOT)
    assert found, "the chat template dropped the user turn"
    return head, tail


def encode_target(tokenizer, fmt: Format, target: str) -> list[int]:
    """Answer ids + eos, truncated on the right to max_target_length (a cut answer has no eos)."""
    assert tokenizer.eos_token_id is not None, "the student's tokenizer needs an eos token"
    ids = token_ids(tokenizer, target, False) + [tokenizer.eos_token_id]
    return ids[: fmt.max_target_length]


def decoder_marker(tokenizer, prefix: str) -> list[int]:
    """The task prefix as decoder tokens (task_marker=decoder): forced, never predicted."""
    return token_ids(tokenizer, prefix, False)


def encode_example(tokenizer, fmt: Format, prefix: str, text: str, target: str, *,
                   decoder_start: int | None = None) -> dict[str, list[int]]:
    """One training example: {'input_ids', 'labels'} (unpadded lists).

    seq2seq: input_ids = source, labels = target.
    seq2seq, task_marker=decoder: input_ids = the input alone; decoder_input_ids = start +
             marker + target[:-1]; labels = [-100] * len(marker) + target (`decoder_start`: the
             model's decoder start token).
    causal:  input_ids = prompt + target, labels = [-100] * len(prompt) + target.
    """
    marked = fmt.kind == "seq2seq" and fmt.task_marker == "decoder"
    source = encode_source(tokenizer, fmt, "" if marked else prefix, text)
    target_ids = encode_target(tokenizer, fmt, target)
    if marked:
        assert decoder_start is not None, "task_marker=decoder needs the model's decoder start token"
        marker = decoder_marker(tokenizer, prefix)
        return {"input_ids": source, "decoder_input_ids": [decoder_start, *marker, *target_ids[:-1]],
                "labels": [IGNORE_INDEX] * len(marker) + target_ids}
    if fmt.kind == "seq2seq":
        return {"input_ids": source, "labels": target_ids}
    return {"input_ids": source + target_ids, "labels": [IGNORE_INDEX] * len(source) + target_ids}
