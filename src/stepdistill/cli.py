"""The `stepdistill` command: parse flags -> build a validated config -> call the API.

    stepdistill annotate --task svamp --data ../shared/data/sbs --split test --teacher paper --out runs/ann
    stepdistill train --config configs/svamp_t5.yaml --set training.epochs=1 --out runs/sbs
    stepdistill eval --model runs/sbs --split test
    stepdistill quickstart
    stepdistill make-student --from model.gguf --layers 4 --out models/small
    stepdistill prune --model smollm2-135m-instruct --layers 8 --heads 1 --ffn 0.25 --out models/pruned

Every domain error becomes one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from stepdistill.errors import StepDistillError

# Flags that set a config field: (flag, dotted config key). The field is the one source of the
# rest: its description is the flag's help, its type the flag's type (a list: repeat the flag; a
# bool: the flag alone turns it on; a Literal: its values shown). A flag overrides the YAML.
_TASK_FLAGS = [("--task", "task.name"), ("--data", "task.path"), ("--spec", "task.spec"), ("--split", "split")]
_FLAGS: dict[str, list[tuple[str, str]]] = {
    "annotate": _TASK_FLAGS + [
        ("--teacher", "teacher.kind"), ("--model", "teacher.model"), ("--base-url", "teacher.base_url"),
        ("--replica", "teacher.replicas"), ("--endpoint", "teacher.endpoint"), ("--concurrency", "teacher.concurrency"),
        ("--budget-usd", "teacher.budget.usd"), ("--budget-tokens", "teacher.budget.tokens"),
        ("--samples", "verify.samples"), ("--verify", "verify.against"), ("--gguf-file", "teacher.gguf_file"),
        ("--batch-size", "teacher.batch_size"), ("--n-shots", "teacher.n_shots"),
        ("--max-new-tokens", "teacher.sampling.max_new_tokens"), ("--temperature", "teacher.sampling.temperature"),
        ("--limit", "limit"), ("--shard", "shard"),
    ],
    "train": _TASK_FLAGS + [
        ("--annotations", "annotations"), ("--method", "method.name"), ("--alpha", "method.alpha"),
        ("--label-source", "method.label_source"), ("--student", "student.model"), ("--epochs", "training.epochs"),
        ("--max-steps", "training.max_steps"), ("--lr", "training.learning_rate"),
        ("--batch-size", "training.batch_size"), ("--grad-accum", "training.grad_accum"), ("--bf16", "training.bf16"),
    ],
    "eval": _TASK_FLAGS + [
        ("--model", "model"), ("--annotations", "annotations"), ("--limit", "limit"), ("--batch-size", "batch_size"),
        ("--max-new-tokens", "max_new_tokens"), ("--label-decoding", "label_decoding"), ("--dtype", "dtype"),
        ("--rationales", "rationales"),
    ],
}


def _add_common(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--config", help="YAML config file (flags and --set override it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set training.learning_rate=1e-4")
    p.add_argument("--out", required=stage != "eval", help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    for flag, key in _FLAGS[stage]:
        p.add_argument(flag, dest="f:" + key, **_flag_options(_config_field(stage, key), key))


def _config_field(stage: str, key: str) -> FieldInfo:
    """The config field a dotted key names: `_config_field("train", "training.epochs")`."""
    from stepdistill.config import AnnotateRun, EvalRun, TrainRun

    model: Any = {"annotate": AnnotateRun, "train": TrainRun, "eval": EvalRun}[stage]
    field = None
    for part in key.split("."):
        field = model.model_fields[part]
        model = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return field


def _flag_options(field: FieldInfo, key: str) -> dict[str, Any]:
    """add_argument's options for a flag that sets `field`. Literal values are shown, not enforced:
    the config validates them, so a bad value is reported with every other config problem at once."""
    assert field.description, f"{key}: give the config field a description (it is the flag's help)"
    typ = field.annotation
    if typing.get_origin(typ) in (typing.Union, types.UnionType):  # Optional[X] -> X
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    help_ = (field.description or "").replace("%", "%%")  # argparse formats help with %
    if typ is bool:
        return {"action": "store_const", "const": True, "help": help_}
    if field.default is not None and field.default is not PydanticUndefined:
        help_ += f" (default: {field.default})".replace("%", "%%")
    if typing.get_origin(typ) is list:  # one flag per item
        return {"action": "append", "type": typing.get_args(typ)[0], "metavar": key.upper(), "help": help_}
    if typing.get_origin(typ) is typing.Literal:
        return {"type": str, "metavar": "{" + ",".join(typing.get_args(typ)) + "}", "help": help_}
    return {"type": typ, "metavar": key.upper(), "help": help_}


def build_parser() -> argparse.ArgumentParser:
    from stepdistill import __version__

    parser = argparse.ArgumentParser(prog="stepdistill", description="Distil an LLM into a small task model.")
    parser.add_argument("--version", action="version", version=f"stepdistill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("annotate", help="get rationales and labels from a teacher")
    _add_common(p, "annotate")
    p.add_argument("--store", help="annotation store file (default $STEPDISTILL_HOME/annotations.sqlite)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (stored completions are reused)")
    p = sub.add_parser("train", help="train a student")
    _add_common(p, "train")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p = sub.add_parser("eval", help="score a trained student")
    _add_common(p, "eval")
    p = sub.add_parser("quickstart", help="the whole pipeline offline on a built-in task, in minutes")
    p.add_argument("--out", default="runs/quickstart", help="where the quickstart's runs go")
    p.add_argument("--overwrite", action="store_true", help="replace an existing quickstart directory")
    p.add_argument("--size", choices=["tiny", "default"], default="default",
                   help="tiny: a one-minute smoke run; default: the real demo")
    p = sub.add_parser("make-student", help="make a small student: cut a pretrained causal LM, or a new T5 with a given tokenizer")
    p.add_argument("--from", dest="source", required=True, help="pretrained causal LM to cut (--arch cut) or whose tokenizer to use (--arch t5): hub id, folder or .gguf")
    p.add_argument("--arch", choices=["cut", "t5"], default="cut", help="cut: --layers of the layers of --from (see --strategy); t5: a randomly initialised T5")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (t5: encoder and decoder layers each)")
    p.add_argument("--strategy", choices=["first", "spread", "every"], default="first",
                   help="cut: which layers to keep: the first --layers, --layers spread evenly, or every --layers-th")
    p.add_argument("--d-model", type=int, default=256, help="t5: hidden size")
    p.add_argument("--out", required=True, help="folder to write the model to")
    p = sub.add_parser("prune", help="prune a causal LM (Llama family): drop layers, heads, FFN neurons, small weights",
                       description="Applies layers -> structured (--heads/--ffn) -> magnitude (--sparsity), saves to --out "
                                   "and prints parameters, size on disk, ms/prediction (and accuracy with --task) before/after. "
                                   "--sparsity only writes zeros: the file is no smaller and dense kernels no faster.")
    p.add_argument("--model", required=True, help="hub id, folder, .gguf, smollm2-135m-instruct, or a training run / its model folder")
    p.add_argument("--out", required=True, help="folder to write the pruned model to (must not exist)")
    p.add_argument("--layers", type=int, help="decoder layers to keep (with --strategy every: keep every N-th layer)")
    p.add_argument("--strategy", choices=["spread", "first", "every"], default="spread",
                   help="which layers: spread = evenly spaced incl. first and last; first = the first N; every = every N-th")
    p.add_argument("--heads", type=int, default=0, help="key/value head groups to remove per layer (each with its query heads)")
    p.add_argument("--ffn", type=float, default=0.0, help="fraction of feed-forward neurons to remove per layer, e.g. 0.25")
    p.add_argument("--importance", choices=["magnitude", "taylor"], default="magnitude",
                   help="how --heads/--ffn pick units: weight L2 norm, or |w * grad| on the first 32 training examples of --task (needs --task)")
    p.add_argument("--sparsity", type=float, default=0.0, help="share of decoder Linear weights to zero by magnitude (zeros only: no smaller, no faster)")
    p.add_argument("--scope", choices=["global", "layer"], default="global", help="--sparsity: one threshold over all weights, or per Linear")
    p.add_argument("--task", help="measure accuracy on this task before and after (and the source of taylor gradients)")
    p.add_argument("--data", help="task data (as for eval); unset = the hub or the built-in task")
    p.add_argument("--split", default="test", help="split to measure accuracy on")
    p.add_argument("--limit", type=int, help="measure accuracy on the first N examples only")
    p = sub.add_parser("store", help="inspect or export the annotation store")
    p.add_argument("action", choices=["stats", "export"], help="stats: counts; export: every completion to --out")
    p.add_argument("--store", help="annotation store file (default $STEPDISTILL_HOME/annotations.sqlite)")
    p.add_argument("--out", help="export: a .jsonl file, or a folder for a Hugging Face Dataset (--format dataset)")
    p.add_argument("--format", choices=["jsonl", "dataset"], default="jsonl", help="export format")
    p = sub.add_parser("sweep", help="a grid of runs: methods x data fractions x students x seeds, evaluated, "
                                      "collected into one table (resumable)")
    p.add_argument("--config", required=True, help="sweep YAML (task, annotations, methods, fractions, students, seeds, training, eval)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set seeds=[0,1,2]")
    p.add_argument("--out", required=True, help="sweep directory (rerun with the same --out to resume; a run "
                                                 "naming part of its grid trains that part and keeps the rest)")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: tabulate exactly this config's grid from the cells in --out, the rest "
                        "marked 'not run' (how a grid shrinks)")
    p.add_argument("--cells", metavar="FILE",
                   help="first restore the finished cells of FILE (a report's cells.tar.gz) that --out lacks, so a "
                        "sweep goes on from another machine's cells; each is checked against the grid")
    p = sub.add_parser("report", help="a sweep as report.html (self-contained) and report.md, with plots and paired tests")
    p.add_argument("sweep", help="sweep directory (stepdistill sweep --out)")
    p.add_argument("--teacher", help="annotation run of the evaluation split: the teacher's accuracy, latency and cost")
    p.add_argument("--out", required=True, help="folder to write report.html, report.md and figures/ to")
    p.add_argument("--cpu-hour-usd", type=float, help="price of one CPU-hour, for the cost of what ran on a CPU")
    p = sub.add_parser("export", help="ship a trained student: safetensors, tokenizer and a model card (and GGUF)")
    p.add_argument("--model", required=True, help="training run directory or its model/ folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--format", choices=["safetensors", "gguf"], default="safetensors",
                   help="gguf: also a GGUF file per --quant (llama.cpp's converter) and an Ollama Modelfile")
    p.add_argument("--quant", action="append", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m"],
                   help="GGUF quantisation, repeatable (default q8_0); q4_*/q5_k_m by llama.cpp's quantiser (needs llama-cpp-python)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p = sub.add_parser("predict", help="label every record of a JSONL/CSV file with a trained student")
    p.add_argument("--model", required=True, help="training run, model folder or exported folder")
    p.add_argument("--input", required=True, help="a .jsonl or .csv file of inputs")
    p.add_argument("--field", default="input", help="the field holding each input's text")
    p.add_argument("--out", required=True, help=".jsonl to write: each record + prediction (+ rationale)")
    p.add_argument("--batch-size", type=int, default=32, help="predictions per batch")
    _add_prediction_flags(p)
    p.add_argument("--rationales", action="store_true", help="also generate explanations (the rationale task)")
    p = sub.add_parser("serve", help="serve a trained student over HTTP (POST /predict)")
    p.add_argument("--model", required=True, help="training run, model folder or exported folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    _add_prediction_flags(p)
    p.add_argument("--model-name", help="the name replies give the model (default: its folder's name; never a path)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="inputs per micro-batch: the worker takes turns between requests one micro-batch at a time")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--max-request-tokens", type=int, default=32_768,
                   help="input tokens per request after truncation (x2 with rationale); more gets 413")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="inputs queued or running, all requests together; more gets 503 with Retry-After")
    p.add_argument("--scheduler", choices=["fair", "fifo"], default="fair",
                   help="fair: requests take turns by micro-batch; fifo: each runs whole, in arrival order")
    sub.add_parser("list", help="list tasks, teachers and methods")
    return parser


def _add_prediction_flags(p: argparse.ArgumentParser) -> None:
    """How a shipped student predicts: the same flags for predict and serve."""
    p.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto",
                   help="weights at prediction (auto: bfloat16 where the hardware is fast)")
    p.add_argument("--max-new-tokens", type=int, help="longest label generated (default: from the trained labels)")
    p.add_argument("--label-decoding", choices=["generate", "vocab"], default="generate",
                   help="vocab: greedy within the tokens of the trained labels (faster: a cut output layer)")
    p.add_argument("--engine", choices=["transformers", "llamacpp"], default="transformers",
                   help="llamacpp: the export's GGUF on llama.cpp (stepdistill export --format gguf)")
    p.add_argument("--quant", help="llamacpp: which GGUF, where the export holds several (e.g. q8_0)")


def _config_dict(args: argparse.Namespace) -> dict[str, Any]:
    from stepdistill.config import load_yaml, parse_overrides, set_dotted

    data = load_yaml(args.config) if args.config else {}
    for name, value in vars(args).items():
        if name.startswith("f:") and value is not None:
            set_dotted(data, name[2:], value)
    for key, value in parse_overrides(args.overrides):
        set_dotted(data, key, value)
    return data


def _eval_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """`eval --model RUN`: take the task from the training run's config unless given."""
    import yaml

    model = data.get("model")
    cfg_file = Path(model) / "config.yaml" if model else None
    if cfg_file and cfg_file.is_file() and "task" not in data:
        data["task"] = (yaml.safe_load(cfg_file.read_text()) or {}).get("task")
    elif cfg_file and cfg_file.is_file():
        train_task = (yaml.safe_load(cfg_file.read_text()) or {}).get("task") or {}
        for k, v in train_task.items():
            data["task"].setdefault(k, v)
    return data


# One function per subcommand: parsed flags in, exit code out.


def _cmd_annotate(args: argparse.Namespace) -> int:
    from stepdistill.api import annotate

    annotate(_config_dict(args), args.out, overwrite=args.overwrite, resume=args.resume, store_path=args.store)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from stepdistill.api import train

    train(_config_dict(args), args.out, overwrite=args.overwrite, resume=args.resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from stepdistill.api import evaluate

    evaluate(_eval_defaults(_config_dict(args)), args.out, overwrite=args.overwrite)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from stepdistill.sweep import sweep

    sweep(_config_dict(args), args.out, collect=args.collect, cells_from=args.cells)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from stepdistill.methods import METHODS
    from stepdistill.tasks import TASKS
    from stepdistill.teachers import TEACHERS

    print("tasks:    " + ", ".join(TASKS.names()))
    print("teachers: " + ", ".join(TEACHERS.names()))
    print("methods:  " + ", ".join(METHODS.names()))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from stepdistill.quickstart import quickstart

    quickstart(args.out, overwrite=args.overwrite, size=args.size)
    return 0


def _cmd_make_student(args: argparse.Namespace) -> int:
    from stepdistill.pruning import cut_layers
    from stepdistill.students import count_parameters, load_pretrained, new_t5

    if args.arch == "cut":
        out = cut_layers(args.source, args.layers, args.out, strategy=args.strategy)
    else:
        out = new_t5(args.source, args.out, n_layers=args.layers, d_model=args.d_model,
                     n_heads=max(1, args.d_model // 64), d_ff=4 * args.d_model)
    print(f"wrote {out} ({count_parameters(load_pretrained(str(out)).model)[1] / 1e6:.1f}M parameters)")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from stepdistill.pruning import prune

    prune(args.model, args.out, layers=args.layers, strategy=args.strategy, heads=args.heads, ffn=args.ffn,
          importance=args.importance, sparsity=args.sparsity, scope=args.scope, task=args.task, data=args.data,
          split=args.split, limit=args.limit)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from stepdistill.report import report

    out = report(args.sweep, args.out, teacher_run=args.teacher, cpu_hour_usd=args.cpu_hour_usd)
    print(f"wrote {out / 'report.html'} and {out / 'report.md'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from stepdistill.deploy import export

    gguf = tuple(args.quant or ["q8_0"]) if args.format == "gguf" else ()
    if args.quant and args.format != "gguf":
        raise StepDistillError("--quant is for GGUF: add --format gguf")
    print(f"wrote {export(args.model, args.out, overwrite=args.overwrite, gguf=gguf)} (model card: README.md"
          + (f"; GGUF: {', '.join(gguf)}; Ollama: Modelfile" if gguf else "") + ")")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from stepdistill.deploy import predict_file

    if Path(args.out).exists():
        raise StepDistillError(f"{args.out} exists: choose a new --out (predictions never overwrite a file)")
    n = predict_file(args.model, args.input, args.out, field=args.field, batch_size=args.batch_size,
                     rationales=args.rationales, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                     label_decoding=args.label_decoding, engine=args.engine, quant=args.quant)
    print(f"wrote {n} predictions to {args.out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from stepdistill.serve import serve

    serve(args.model, host=args.host, port=args.port, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
          label_decoding=args.label_decoding, batch_size=args.batch_size, model_name=args.model_name,
          max_body_bytes=args.max_body_bytes, max_request_tokens=args.max_request_tokens,
          max_queue=args.max_queue, scheduler=args.scheduler, engine=args.engine, quant=args.quant)
    return 0


def _cmd_store(args: argparse.Namespace) -> int:
    import json

    from stepdistill.runs import home
    from stepdistill.store import AnnotationStore

    path = Path(args.store) if args.store else home() / "annotations.sqlite"
    if not path.is_file():
        raise StepDistillError(f"no annotation store at {path}: run `stepdistill annotate` first, or pass --store")
    store = AnnotationStore(path)
    try:
        if args.action == "stats":
            print(json.dumps(store.stats(), indent=2))
            return 0
        if not args.out:
            raise StepDistillError("store export needs --out: a .jsonl file, or a folder with --format dataset")
        if Path(args.out).exists():
            raise StepDistillError(f"{args.out} exists: choose a new --out (an export never overwrites)")
        if args.format == "jsonl":
            n = store.export_jsonl(args.out)
        else:
            ds = store.to_dataset()
            ds.save_to_disk(args.out)
            n = len(ds)
        print(f"wrote {n} completions to {args.out}")
    finally:
        store.close()
    return 0




COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "annotate": _cmd_annotate, "train": _cmd_train, "eval": _cmd_eval, "sweep": _cmd_sweep,
    "quickstart": _cmd_quickstart, "make-student": _cmd_make_student, "prune": _cmd_prune,
    "store": _cmd_store, "report": _cmd_report, "export": _cmd_export, "predict": _cmd_predict,
    "serve": _cmd_serve, "list": _cmd_list,
}


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` and run its subcommand; the exit code (domain errors propagate to main())."""
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except StepDistillError as e:
        print(f"stepdistill: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        code = 1
    except KeyboardInterrupt:
        print("stepdistill: interrupted: teacher completions so far are in the store and training checkpoints in "
              "the run; annotate/train continue with --resume", file=sys.stderr)
        code = 130
    except Exception as e:
        if os.environ.get("STEPDISTILL_DEBUG"):
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:300]
        print(f"stepdistill: internal error: {type(e).__name__}: {first} (set STEPDISTILL_DEBUG=1 for the traceback)", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
