"""student.chat_template: a causal student trained and queried through its tokenizer's chat
template, the task prefix inside the user turn; off by default."""

from __future__ import annotations

import json

import pytest

from stepdistill import api
from stepdistill.errors import StepDistillError
from stepdistill.methods.formatting import Format, chat_wrapper, encode_source
from stepdistill.tasks import get_task
from tiny_models import llama_student

QUESTIONS = get_task("quickstart").load("train")[:16]
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")


def test_the_wrapper_is_the_template_around_one_user_turn_and_the_prompt_is_encoded_inside_it():
    tok = llama_student(0).tokenizer
    tok.chat_template = TEMPLATE
    head, tail = chat_wrapper(tok)
    assert (head, tail) == ("<s> user ", " </s> <s> assistant ")
    assert chat_wrapper(tok, "be brief")[0] == "<s> system be brief </s> <s> user "
    fmt = Format("causal", chat_head=head, chat_tail=tail)
    ids = encode_source(tok, fmt, "predict: ", "how many apples")
    assert ids == tok(head + "predict: how many apples" + tail, add_special_tokens=False)["input_ids"]
    assert ids != encode_source(tok, Format("causal"), "predict: ", "how many apples")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    (d / "data.jsonl").write_text("".join(json.dumps({"input": e.input, "label": e.label}) + "\n" for e in QUESTIONS))
    for name, template in (("plain", None), ("chat", TEMPLATE)):
        s = llama_student(0)
        if template:
            s.tokenizer.chat_template = template
        s.model.save_pretrained(d / name)
        s.tokenizer.save_pretrained(d / name)
    return d


def train(data, student, mode, out):
    return api.train({"task": {"name": "svamp", "path": str(data / "data.jsonl")}, "method": {"name": "standard"},
                      "student": {"model": str(data / student), "chat_template": mode},
                      "training": {"max_steps": 2, "batch_size": 4, "val_fraction": 0.25, "bf16": False}},
                     data / out, echo=lambda _: None)


def test_auto_trains_through_the_template_where_there_is_one_and_the_model_remembers_it(data):
    from stepdistill.evaluation import load_trained, predict

    train(data, "chat", "auto", "run-chat")
    train(data, "plain", "auto", "run-plain")
    chat = json.loads((data / "run-chat" / "model" / "stepdistill.json").read_text())["format"]
    plain = json.loads((data / "run-plain" / "model" / "stepdistill.json").read_text())["format"]
    assert chat["chat_head"] == "<s> user " and chat["chat_tail"] == " </s> <s> assistant "
    assert plain["chat_head"] == plain["chat_tail"] == ""
    student, info = load_trained(data / "run-chat")
    assert student.fmt.chat_head == "<s> user "  # predictions read the prompt the student was trained on
    assert len(predict(student, [QUESTIONS[0].input], prefix=info["label_prefix"], max_new_tokens=4)) == 1


def test_off_is_the_default_and_on_without_a_template_is_a_clear_error(data):
    train(data, "chat", "off", "run-off")
    assert json.loads((data / "run-off" / "model" / "stepdistill.json").read_text())["format"]["chat_head"] == ""
    with pytest.raises(StepDistillError, match="chat_template=on needs a causal student whose tokenizer has a chat"):
        train(data, "plain", "on", "run-on")
    from stepdistill.config import StudentConfig

    assert StudentConfig(model="x").chat_template == "off"
