"""Shipping a student: an exported folder with a model card, and batch prediction on files.

    stepdistill export --model runs/svamp-sbs --out exported/svamp-student
    stepdistill predict --model exported/svamp-student --input problems.jsonl --out answers.jsonl
    stepdistill serve --model exported/svamp-student            # see serve.py

An exported folder is what `load_trained` reads (weights as safetensors, tokenizer,
stepdistill.json) plus README.md: the model card, written from the run's own files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import yaml

from stepdistill.errors import StepDistillError
from stepdistill.gguf_student import CONVERTER_VERSION, QUANTS, check_engine, convert, modelfile
from stepdistill.evaluation import decoding_vocab, explain, label_token_limit, load_trained, predict
from stepdistill.ownership import MARKER, claim_output, output_kind, write_marker
from stepdistill.runs import fsync_tree, write_error, write_jsonl
from stepdistill.students import MODEL_INFO, model_folder
from stepdistill.tasks.io import iter_records

CARD = "README.md"
STAGING_SUFFIX = ".partial"  # an export being written: .<name>.<random>.partial beside --out


def export(run: str | Path, out: str | Path, *, overwrite: bool = False, gguf: tuple[str, ...] = ()) -> Path:
    """Copy a trained student (a run directory or its model/ folder) to `out` with a model card;
    with `gguf` quantisations (e.g. ("q8_0", "f16")), also a GGUF file of each, converted by
    llama.cpp's converter, and an Ollama Modelfile (gguf_student.py).

    Only safetensors weights are exported: a pickle checkpoint is refused, as untrusted code.
    """
    run, out = Path(run), Path(out)
    src = model_folder(run)
    if not (src / MODEL_INFO).is_file():
        raise StepDistillError(f"{run} holds no trained stepdistill model: pass a training run directory or its model/ folder")
    if not any(src.glob("*.safetensors")):
        raise StepDistillError(f"{src} has no .safetensors weights: export ships safetensors only; retrain with stepdistill")
    info = _read(src / MODEL_INFO, "json") or {}
    fmt = info.get("format") or {}
    if gguf:
        bad = [q for q in gguf if q not in QUANTS]
        if bad:
            raise StepDistillError(f"unknown GGUF quantisation {bad[0]!r}: choose from {', '.join(QUANTS)}")
        if fmt.get("kind") != "causal":
            raise StepDistillError(f"{src} is a {fmt.get('kind', 'unknown')} student: GGUF export converts causal "
                                   "students (Llama, Qwen, Mistral, SmolLM families); export it without --format gguf")
    # The folder is checked, and never touched, before the copy: an existing export is swapped
    # out only once the new one is complete, and nothing but an export stepdistill made is replaced.
    claim_output(out, "export", overwrite=overwrite, inputs=(run, src), create=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=STAGING_SUFFIX, dir=out.parent))
    try:
        write_marker(tmp, "export")  # first: a staging folder a killed export left is known as ours
        shutil.copytree(src, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", "*.pkl", "training_args*", MARKER))
        files = [convert(tmp, tmp / f"{out.name}.{q}.gguf", q).name for q in dict.fromkeys(gguf)]
        if files:
            head, tail = _prompt_parts(info)
            (tmp / "Modelfile").write_text(modelfile(files[0], head, tail, label_token_limit(info)))
        (tmp / CARD).write_text(model_card(run, gguf_files=files))
        fsync_tree(tmp)
        old = None
        if out.exists():  # an empty folder, or (--overwrite) an export: set aside, then removed
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(old / "export")
        tmp.replace(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, e) from e
    except BaseException:  # a failed conversion leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _prompt_parts(info: dict[str, Any]) -> tuple[str, str]:
    """The text a causal student's prompt has before and after the input (its chat template's
    wrapping, when it was trained through one)."""
    fmt = info.get("format") or {}
    if fmt.get("chat_head") or fmt.get("chat_tail"):
        return fmt.get("chat_head", "") + info.get("label_prefix", ""), fmt.get("chat_tail", "")
    return info.get("label_prefix", ""), fmt.get("separator", "")


def _remove_stale_staging(out: Path) -> None:
    """What exports a killed process never finished left beside `out`: staging folders carrying
    our marker, and set-aside old exports. Anything else of a similar name is left alone."""
    def ours(p: Path) -> bool:
        if p.is_symlink() or not p.is_dir():
            return False
        entries = list(p.iterdir())
        return not entries or output_kind(p) == "export" or (p.name.endswith(".old") and [e.name for e in entries] == ["export"]
                                                             and output_kind(entries[0]) == "export")

    for p in [*out.parent.glob(f".{out.name}.*{STAGING_SUFFIX}"), *out.parent.glob(f".{out.name}.*.old")]:
        if ours(p):
            shutil.rmtree(p, ignore_errors=True)


def _method(name: str | None):
    """The class of a trained model's method (the base Method when it is unknown or missing)."""
    from stepdistill.methods import METHODS, Method

    return METHODS.get(name) if name in METHODS else Method


def _read(path: Path, kind: str) -> Any:
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        return json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def model_card(run: str | Path, gguf_files: list[str] | tuple[str, ...] = ()) -> str:
    """The model card of a trained student, from the files its run left: config, training
    metrics, evaluations, the annotation run's summary. What is not known is said to be unknown."""
    run = Path(run)
    run_dir = run if (run / "model" / MODEL_INFO).is_file() else run.parent
    info = _read(model_folder(run) / MODEL_INFO, "json") or {}
    cfg = _read(run_dir / "config.yaml", "yaml") or {}
    train = _read(run_dir / "metrics.json", "json") or {}
    task = (cfg.get("task") or {}).get("name") or info.get("task") or "unknown"
    kind = _method(info.get("method"))
    teacher = "unknown"
    ann = cfg.get("annotations")
    summary = _read(Path(ann) / "summary.json", "json") if ann else None
    if summary:
        t = summary.get("teacher") or {}
        teacher = f"{t.get('kind', '?')}: {t.get('model', '?')}"
        acc = summary.get("teacher_accuracy")
        if acc is not None:
            teacher += f" (its accuracy on the annotated split: {acc:.1%})"
    elif ((cfg.get("method") or {}).get("kd") or {}).get("teacher"):
        teacher = f"white-box (soft labels): {cfg['method']['kd']['teacher']}"
    elif not kind.needs_annotations and not kind.trains_teacher:
        teacher = "none (trained on gold labels only)"
    evals = []
    for m in sorted(run_dir.glob("eval*/metrics.json")):
        e = _read(m, "json") or {}
        if e.get("accuracy") is not None:
            evals.append(f"| {e.get('task', task)} | {e.get('split', '?')} | {e['accuracy']:.1%} | {e.get('n', '?')} | "
                         f"{e.get('ms_per_example', '?')} |")
    method = info.get("method", "unknown")
    lines = [
        f"# {task} student distilled with stepdistill", "",
        f"- **Task:** {task}",
        f"- **Method:** {method}" + (f" (alpha {info.get('alpha')}: label task + the teacher's rationales)"
                                     if kind.multitask else ""),
        f"- **Teacher:** {teacher}",
        f"- **Base model:** {info.get('base_model') or (cfg.get('student') or {}).get('model') or 'unknown'}",
        f"- **Data used:** {train.get('train_records', 'unknown')} training examples"
        + (f", {train['rationale_records']} with a teacher rationale" if train.get("rationale_records") else ""),
        f"- **Parameters:** {train.get('total_params', 'unknown')}",
        f"- **Input format:** the label task prefix {info.get('label_prefix', '')!r}; "
        f"format {json.dumps(info.get('format', {}))}",
        "",
        "## Metrics", "",
    ]
    if evals:
        lines += ["| task | split | accuracy | n | ms/prediction |", "|---|---|---:|---:|---:|", *evals]
    else:
        lines.append("No evaluation was found beside the run: run `stepdistill eval` and export again.")
    lines += [
        "", "## Intended use", "",
        f"Answering inputs of the {task} task, formatted as in training, with the label task only "
        "(`stepdistill predict`, `stepdistill serve`). It is not a general-purpose model.", "",
        "## Caveats", "",
        "- **Teacher bias.** A distilled student learns its teacher's answers and explanations, "
        "mistakes and biases included; rationales were not checked by a person. Its explanations "
        "(the rationale task) read fluently whether or not they are right.",
        "- Accuracy was measured on the split above only; inputs unlike the training data may fare worse.", "",
        "## Use", "",
        "```python", "from stepdistill.evaluation import load_trained, predict", "",
        "student, info = load_trained(\"path/to/this/folder\")",
        "predict(student, [\"your input\"], prefix=info[\"label_prefix\"])", "```", "",
    ]
    if gguf_files:
        head, tail = _prompt_parts(info)
        prompt = f"{head}<input>{tail}"
        lines += [
            "## GGUF: llama.cpp, Ollama, LM Studio", "",
            f"{', '.join(f'`{f}`' for f in gguf_files)}: converted by llama.cpp's `convert_hf_to_gguf.py` "
            f"(llama-cpp-python {CONVERTER_VERSION}). The student reads the raw prompt it was trained on, "
            f"`{json.dumps(prompt)}`" + (" (its chat template's turn)" if (info.get("format") or {}).get("chat_head")
                                          else " (no chat template)") + ", and answers greedily.", "",
            "```bash",
            "stepdistill predict --model . --engine llamacpp --input problems.jsonl --out answers.jsonl",
            "stepdistill serve --model . --engine llamacpp   # also the OpenAI API under /v1",
            f"llama-cli -m {gguf_files[0]} --temp 0 -n {label_token_limit(info)} -no-cnv -p {json.dumps(prompt)}",
            "ollama create my-student -f Modelfile && ollama run my-student \"<input>\"",
            "```", "",
            "`stepdistill predict --engine llamacpp` passes the student's own token ids to llama.cpp, so its prompt "
            "is exactly the one the transformers student reads; other front ends tokenize the prompt text "
            "themselves, and may differ in the first token.", "",
        ]
    return "\n".join(lines)


def predict_file(model: str | Path, inputs: str | Path, out: str | Path, *, field: str = "input",
                 batch_size: int = 32, rationales: bool = False, max_new_tokens: int | None = None,
                 dtype: str = "float32", label_decoding: str = "generate", engine: str = "transformers",
                 quant: str | None = None) -> int:
    """Predict a label for every record of a JSONL/CSV file (its `field`), streaming, in batches,
    with a progress bar; writes `out` (each input record + `prediction`, and `rationale` when
    asked) atomically. Returns the number of predictions."""
    from tqdm import tqdm

    check_engine(engine, label_decoding)
    student, info = load_trained(model, dtype=dtype, engine=engine, quant=quant)
    limit = max_new_tokens or label_token_limit(info)
    vocab = decoding_vocab(info, label_decoding, model)
    total = sum(1 for _ in iter_records(inputs, (field,)))  # checks every record first: a bad line costs nothing

    def rows() -> Iterator[dict[str, Any]]:
        records = (record for _, record in iter_records(inputs, (field,)))
        with tqdm(total=total, desc="predict", unit="ex") as bar:
            while batch := list(islice(records, batch_size)):
                yield from _predict_batch(student, info, batch, field, rationales, limit, vocab)
                bar.update(len(batch))

    write_jsonl(out, rows())
    return total


def _predict_batch(student, info, batch, field, rationales, limit, vocab=None):
    texts = [str(r[field]) for r in batch]
    labels = predict(student, texts, prefix=info["label_prefix"], batch_size=len(texts), max_new_tokens=limit,
                     vocab=vocab)
    why = explain(student, info, texts, limit=limit, batch_size=len(texts)) if rationales else None
    for i, r in enumerate(batch):
        row = {**r, "prediction": labels[i]}
        if why is not None:
            row["rationale"] = why[i]
        yield row
