"""`stepdistill serve` speaks the OpenAI API: the official openai client, against a real uvicorn on
127.0.0.1, gets the same labels /predict gives, the rationale on request, streaming, and errors
in OpenAI's shape. A tiny model trained in the test."""

import httpx
import pytest

from test_serve_limits import app_for, served
from tiny_models import examples, trained_run

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = trained_run(tmp_path_factory.mktemp("train") / "svamp-tiny", max_steps=10)
    with served(app_for(run, model_name="tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def predict(server, texts, rationale=False):
    r = httpx.post(server + "/predict", json={"inputs": texts, "rationale": rationale}, timeout=60)
    r.raise_for_status()
    return r.json()["predictions"]


def test_models_lists_the_label_and_the_rationale_task(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny:rationale"]


def test_chat_completions_answer_the_last_user_message_with_the_label_predict_gives(server, client):
    texts = [e.input for e in examples()[:3]]
    expected = predict(server, texts)
    for text, want in zip(texts, expected):
        r = client.chat.completions.create(model="tiny", messages=[
            {"role": "system", "content": "ignored"}, {"role": "user", "content": "an earlier turn"},
            {"role": "assistant", "content": "(1 + 1)"}, {"role": "user", "content": text}])
        assert r.choices[0].message.content == want["label"] and r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.model == "tiny" and r.object == "chat.completion"


def test_the_rationale_by_model_name_or_by_an_extra_field(server, client):
    text = examples()[0].input
    (want,) = predict(server, [text], rationale=True)
    r = client.chat.completions.create(model="tiny:rationale", messages=[{"role": "user", "content": text}])
    assert r.choices[0].message.content == want["rationale"]
    assert r.choices[0].model_extra["stepdistill"] == {"label": want["label"], "rationale": want["rationale"]}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                       extra_body={"rationale": True})
    assert r.choices[0].message.content == want["label"]
    assert r.choices[0].model_extra["stepdistill"]["rationale"] == want["rationale"]


def test_chat_streaming_sends_the_label_in_openai_chunks(server, client):
    text = examples()[1].input
    (want,) = predict(server, [text])
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == want["label"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


def test_completions_take_a_list_of_prompts_and_stream(server, client):
    texts = [e.input for e in examples()[:4]]
    expected = [p["label"] for p in predict(server, texts)]
    r = client.completions.create(model="tiny", prompt=texts)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected
    streamed = {}
    for c in client.completions.create(model="tiny", prompt=texts, stream=True):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[i] for i in range(4)] == expected


def test_errors_come_in_openai_shape(server, client):
    with pytest.raises(openai.NotFoundError, match="'gpt-4' is not served here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="n=3"):
        client.chat.completions.create(model="tiny", n=3, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="no user message"):
        client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "x"}])
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny"}, timeout=30)  # no messages
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    # sampling fields are accepted and ignored: the student decodes greedily
    r = client.chat.completions.create(model="tiny", temperature=1.3, top_p=0.5, seed=3,
                                       messages=[{"role": "user", "content": examples()[0].input}])
    assert r.choices[0].message.content == predict(server, [examples()[0].input])[0]["label"]
