"""Shipping a student: export with a model card, batch prediction on files, and the HTTP
server started on 127.0.0.1 and queried. A tiny model trained in the test."""

import json
import threading
import time

import httpx
import pytest

from stepdistill import cli
from stepdistill.config import MethodConfig
from stepdistill.deploy import export, predict_file
from stepdistill.errors import DataError, StepDistillError
from stepdistill.evaluation import label_token_limit, load_trained, predict
from tiny_models import FakeTask, examples, trained_run

SBS = MethodConfig(name="step-by-step", alpha=0.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = trained_run(tmp_path_factory.mktemp("train") / "run", max_steps=30)
    (out / "eval-test").mkdir()
    (out / "eval-test" / "metrics.json").write_text(json.dumps(
        {"task": "fake", "split": "test", "accuracy": 0.75, "n": 8, "ms_per_example": 3.2}))
    return out


def test_export_ships_safetensors_tokenizer_and_a_model_card(run, tmp_path):
    out = export(run, tmp_path / "exported")
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "stepdistill.json" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    card = (out / "README.md").read_text()
    assert "**Method:** step-by-step" in card and "| fake | test | 75.0% | 8 | 3.2 |" in card
    assert "Teacher bias" in card and "Intended use" in card
    student, info = load_trained(out)  # the exported folder is a model folder
    exs = examples(8)
    original, _ = load_trained(run)
    inputs = [e.input for e in exs]
    assert predict(student, inputs, prefix=info["label_prefix"]) == predict(original, inputs, prefix="predict: ")
    with pytest.raises(StepDistillError, match="already holds a stepdistill export"):
        export(run, out)
    assert export(run, out, overwrite=True) == out and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging or set-aside folder left


def test_export_refuses_a_folder_without_a_trained_model(tmp_path):
    with pytest.raises(StepDistillError, match="holds no trained stepdistill model"):
        export(tmp_path, tmp_path / "out")


def test_predict_file_labels_every_record(run, tmp_path):
    src = tmp_path / "in.jsonl"
    exs = examples(10)
    src.write_text("".join(json.dumps({"id": e.id, "text": e.input}) + "\n" for e in exs))
    n = predict_file(run, src, tmp_path / "out.jsonl", field="text", batch_size=4, rationales=True)
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == len(rows) == 10 and [r["id"] for r in rows] == [e.id for e in exs]  # order kept, fields kept
    assert all(isinstance(r["prediction"], str) and "rationale" in r for r in rows)
    assert FakeTask().accuracy([r["prediction"] for r in rows], exs) >= 0.5


def test_predict_file_within_the_label_tokens_gives_the_same_labels(run, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"input": e.input}) + "\n" for e in examples(10)))
    predict_file(run, src, tmp_path / "gen.jsonl", batch_size=4)
    predict_file(run, src, tmp_path / "vocab.jsonl", batch_size=4, label_decoding="vocab")
    gen, vocab = ([json.loads(x)["prediction"] for x in (tmp_path / f).read_text().splitlines()]
                  for f in ("gen.jsonl", "vocab.jsonl"))
    assert vocab == gen and len(set(gen)) > 1


def test_predict_file_bad_line_writes_nothing(run, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"input": "the small cat"}\n{"inp": "no input field"}\n')
    with pytest.raises(DataError, match="line 2: no field 'input'"):
        predict_file(run, src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_export_and_predict(run, tmp_path, capsys):
    cli.run(["export", "--model", str(run), "--out", str(tmp_path / "exp")])
    src = tmp_path / "in.jsonl"
    src.write_text('{"input": "the small cat"}\n')
    cli.run(["predict", "--model", str(tmp_path / "exp"), "--input", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert "wrote 1 predictions" in capsys.readouterr().out
    with pytest.raises(StepDistillError, match="exists: choose a new --out"):
        cli.run(["predict", "--model", str(tmp_path / "exp"), "--input", str(src), "--out", str(tmp_path / "o.jsonl")])


def test_serve_answers_over_http(run):
    import uvicorn

    from stepdistill.serve import create_app

    from stepdistill.testing.llama_server import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        exs = examples(4)
        r = httpx.post(f"{base}/predict", json={"inputs": [e.input for e in exs], "rationale": True}, timeout=30)
        assert r.status_code == 200
        preds = r.json()["predictions"]
        assert len(preds) == 4 and all("label" in p and "rationale" in p for p in preds)
        student, info = load_trained(run)  # the same answers as predicting in-process
        assert [p["label"] for p in preds] == predict(student, [e.input for e in exs], prefix=info["label_prefix"],
                                                      max_new_tokens=label_token_limit(info))
        one = httpx.post(f"{base}/predict", json={"input": exs[0].input}, timeout=30).json()["predictions"]
        assert one == [{"label": preds[0]["label"]}]  # no rationale unless asked
        bad = httpx.post(f"{base}/predict", json={"text": "wrong field"}, timeout=30)
        assert bad.status_code == 422 and "input" in bad.text
        # hostile or broken requests: each a 422 with its reason, and the server still answers after them
        from stepdistill.serve import MAX_INPUT_CHARS, MAX_INPUTS

        for body, reason in (({"input": "x" * (MAX_INPUT_CHARS + 1)}, "at most 100000 characters"),
                             ({"inputs": ["2 + 2"] * (MAX_INPUTS + 1)}, "at most 256 items"),
                             ({"inputs": [1, None]}, "valid string"),
                             ({"input": "2 + 2", "rationale": "maybe"}, "valid boolean"),
                             ({"input": "2 + 2", "inputs": ["2 + 2"]}, "either `input`"),
                             ({"inputs": []}, "is empty")):
            r = httpx.post(f"{base}/predict", json=body, timeout=30)
            assert r.status_code == 422 and reason in r.text, (body.keys(), r.text[:300])
        for raw in (b"{not json", b"\xff\xfe", b""):
            r = httpx.post(f"{base}/predict", content=raw, headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == 422, (raw, r.status_code)
        assert httpx.post(f"{base}/predict", json={"input": exs[0].input}, timeout=30).json()["predictions"] == one
    finally:
        server.should_exit = True
        thread.join(timeout=10)
