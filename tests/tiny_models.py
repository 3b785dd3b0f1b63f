"""Tiny students and a fake task for tests: built in memory, no downloads, seconds to train."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from stepdistill.students import Student
from stepdistill.tasks.base import Example, Parsed, Task

# cat/dog -> animal, rose/oak -> plant: learnable from one input word in a few dozen steps.
WORDS = {"cat": "animal", "dog": "animal", "rose": "plant", "oak": "plant"}
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]
VOCAB_WORDS = (
    "predict explain : is a an the word it lives grows because so this thing animal plant "
    "cat dog rose oak small big red old"
).split()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + VOCAB_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


def t5_student(seed: int = 0) -> Student:
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return Student(T5ForConditionalGeneration(cfg), tok, is_seq2seq=True)


def llama_student(seed: int = 0) -> Student:
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
    )
    return Student(LlamaForCausalLM(cfg), tok, is_seq2seq=False)


class FakeTask(Task):
    name = "fake"
    label_kind = "classes"
    classes = ("animal", "plant")

    def normalize(self, label, example=None):
        label = label.strip().lower()
        return label if label in self.classes else None

    def is_correct(self, prediction, example):
        return prediction is not None and self.normalize(prediction) == example.label


def examples(n: int = 16) -> list[Example]:
    adjs = ["small", "big", "red", "old"]
    out = []
    for i in range(n):
        w = list(WORDS)[i % 4]
        out.append(Example(id=f"ex{i}", input=f"the {adjs[(i // 4) % 4]} {w}", label=WORDS[w], index=i))
    return out


def annotations(exs: list[Example], *, bad: set[str] = frozenset()) -> dict[str, Parsed]:
    """Teacher outputs: a rationale whose length varies by example; ids in `bad` failed to parse."""
    out = {}
    for i, e in enumerate(exs):
        w = e.input.split()[-1]
        verb = "lives" if WORDS[w] == "animal" else "grows"
        rationale = " ".join([f"a {w} {verb}"] + ["so it is a thing"] * (i % 3))
        out[e.id] = Parsed(None, None, "no answer phrase") if e.id in bad else Parsed(rationale, WORDS[w])
    return out


def trained_run(out, max_steps: int):
    """A tiny T5 trained with step-by-step for `max_steps` into `out` (model/ and its files), as
    a training run leaves them: for the tests of what comes after training (export, serve)."""
    from stepdistill.config import MethodConfig, TrainingConfig
    from stepdistill.methods import get_method
    from stepdistill.training import fit

    method = MethodConfig(name="step-by-step", alpha=0.5)
    exs = examples(16)
    records = get_method(method).records(exs, annotations(exs)).records
    fit(t5_student(), method, TrainingConfig(max_steps=max_steps, learning_rate=1e-2, batch_size=8, bf16=False),
        records, exs[:8], FakeTask(), out, progress=False)
    return out


def annotated_svamp(d, questions: list[Example]):
    """`questions` as an svamp data file (d/data.jsonl), a tiny Llama student (d/student) and a
    teacher's annotations of them (d/ann, a fake OpenAI server that is always right): what a
    training or sweep test starts from. Returns `d`."""
    import json

    from stepdistill import api
    from stepdistill.testing.openai_server import FakeOpenAIServer

    gold = {e.input: e.label for e in questions}
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps({"input": e.input, "label": e.label}) + "\n" for e in questions))
    s = llama_student(0)
    s.model.save_pretrained(d / "student")
    s.tokenizer.save_pretrained(d / "student")

    def answer(prompt, body):
        q = prompt.rsplit("Q: ", 1)[1].split("\nA:")[0].strip()
        return f"Work it out. The answer is {gold[q]}."

    with FakeOpenAIServer(answer) as srv:
        api.annotate({"task": {"name": "svamp", "path": str(data)}, "split": "train",
                      "teacher": {"kind": "openai", "base_url": srv.url, "model": "m"}},
                     d / "ann", store_path=d / "s.sqlite", echo=lambda _: None)
    return d
