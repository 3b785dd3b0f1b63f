"""A causal student as GGUF: converted with llama.cpp's own converter, and run on llama.cpp.

    stepdistill export --model runs/x --out exported/x --format gguf --quant q8_0 --quant f16
    stepdistill predict --model exported/x --engine llamacpp --input problems.jsonl --out answers.jsonl
    stepdistill serve --model exported/x --engine llamacpp

- **The converter** is llama.cpp's `convert_hf_to_gguf.py` with its `gguf-py` and `conversion/`
  modules, at the llama.cpp that llama-cpp-python CONVERTER_VERSION vendors (its sdist on PyPI
  carries them): fetched once with `pip download` into `$STEPDISTILL_HOME/llama.cpp/<version>`,
  or taken from a llama.cpp checkout named by STEPDISTILL_LLAMA_CPP. It runs in a subprocess of
  this Python (it needs torch, transformers, numpy, sentencepiece where the tokenizer does).
  Quantisations: the converter's own, f32, f16, bf16 and q8_0; and llama.cpp's quantiser's 4- and
  5-bit types (q4_0, q4_k_m, q5_k_m), applied to the converter's f16 output through
  llama-cpp-python (`llama_model_quantize`, what the `llama-quantize` tool calls), so they need it
  installed (`pip install 'stepdistill[llamacpp]'`). q4_1 is not offered: on the quickstart's
  4-layer student the file it wrote dequantises (gguf-py) within 2% of the f16 weights, yet
  llama.cpp 0.3.36 generated nonsense from it where q4_0 and q4_k_m kept 16 of 20 answers.
- **The engine** (`LlamaCppModel`) stands where a transformers model stands in
  evaluation.predict: it takes the same token ids (the student's tokenizer encodes, so a prompt
  is byte for byte the one the transformers student reads) and decodes greedily (top-k 1) until
  eos, so labels and rationales come back through the same post-processing.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from stepdistill.errors import StepDistillError
from stepdistill.runs import home

CONVERTER_VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp's converter
CONVERTER_QUANTS = ("f32", "f16", "bf16", "q8_0")
QUANTISER_QUANTS = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
QUANTS = CONVERTER_QUANTS + tuple(QUANTISER_QUANTS)
_VENDORED = "vendor/llama.cpp/"
_NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def check_engine(engine: str, label_decoding: str) -> None:
    """Refuse what llama.cpp cannot do before anything loads (an unknown engine: load_trained)."""
    if engine == "llamacpp" and label_decoding != "generate":
        raise StepDistillError(f"--label-decoding {label_decoding} needs the transformers engine (it cuts the output "
                               "layer): use --label-decoding generate with --engine llamacpp")


def converter() -> Path:
    """Path of llama.cpp's convert_hf_to_gguf.py: STEPDISTILL_LLAMA_CPP's, or the cached one
    (fetched from PyPI the first time)."""
    if os.environ.get("STEPDISTILL_LLAMA_CPP"):
        script = Path(os.environ["STEPDISTILL_LLAMA_CPP"]).expanduser() / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise StepDistillError(f"STEPDISTILL_LLAMA_CPP={os.environ['STEPDISTILL_LLAMA_CPP']} holds no "
                                   "convert_hf_to_gguf.py: point it at a llama.cpp checkout, or unset it")
        return script
    cache = home() / "llama.cpp" / CONVERTER_VERSION
    if not (cache / "convert_hf_to_gguf.py").is_file():
        _fetch(cache)
    return cache / "convert_hf_to_gguf.py"


def _fetch(cache: Path) -> None:
    """Extract the converter from llama-cpp-python's sdist into `cache` (appears by a rename)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               f"llama-cpp-python=={CONVERTER_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            why = (done.stderr.strip().splitlines() or ["no sdist"])[-1][:200]
            raise StepDistillError(f"could not fetch llama.cpp's converter (pip download llama-cpp-python=="
                                   f"{CONVERTER_VERSION}: {why}): set STEPDISTILL_LLAMA_CPP to a llama.cpp checkout")
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(sdists[0]) as tar:
            for m in tar.getmembers():
                rel = m.name.split(_VENDORED, 1)[1] if _VENDORED in m.name else None
                if rel and rel.startswith(_NEEDED) and (m.isfile() or m.isdir()) and ".." not in Path(rel).parts:
                    m.name = rel
                    tar.extract(m, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise StepDistillError(f"llama-cpp-python {CONVERTER_VERSION}'s sdist holds no convert_hf_to_gguf.py: "
                                   "set STEPDISTILL_LLAMA_CPP to a llama.cpp checkout")
        if not cache.exists():
            staging.rename(cache)


def convert(model_dir: Path, out_file: Path, quant: str) -> Path:
    """`model_dir` (a transformers causal model folder) as one GGUF file at `out_file`."""
    if quant not in QUANTS:
        raise StepDistillError(f"unknown GGUF quantisation {quant!r}: choose one of {', '.join(QUANTS)}")
    if quant in QUANTISER_QUANTS:
        try:
            import llama_cpp
        except ImportError:
            raise StepDistillError(f"GGUF {quant} is made by llama.cpp's quantiser, which comes with llama-cpp-python: "
                                   "pip install 'stepdistill[llamacpp]', or choose f16 or q8_0") from None
        with tempfile.TemporaryDirectory(dir=out_file.parent) as tmp:
            f16 = convert(model_dir, Path(tmp) / "f16.gguf", "f16")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, QUANTISER_QUANTS[quant])
            params.nthread = os.cpu_count() or 1
            # llama.cpp writes the output file in place: into the temp folder, then renamed
            staged = Path(tmp) / out_file.name
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(staged).encode(), ctypes.byref(params)) != 0:
                raise StepDistillError(f"llama.cpp's quantiser failed on {model_dir.name} ({quant}): its log above "
                                       "says why; f16 and q8_0 need only the converter")
            staged.replace(out_file)
        return out_file
    script = converter()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, which it was written with
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", quant, "--outfile", str(out_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not out_file.is_file():
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
        raise StepDistillError(f"llama.cpp's converter failed on {model_dir.name} ({quant}): "
                               f"{(lines or ['no output'])[-1][:300]}")
    return out_file


def gguf_file(folder: Path, quant: str | None = None) -> Path:
    """The folder's GGUF (the one of `quant`, when it holds several)."""
    found = sorted(folder.glob("*.gguf"))
    if quant is not None:
        found = [f for f in found if f.name.endswith(f".{quant}.gguf")]
    if len(found) == 1:
        return found[0]
    if not found:
        raise StepDistillError(f"{folder} holds no {'.' + quant + ' ' if quant else ''}GGUF file: export it with "
                               "`stepdistill export --format gguf`, or use --engine transformers")
    raise StepDistillError(f"{folder} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}): "
                           "pick one with --quant")


class LlamaCppModel(torch.nn.Module):
    """A GGUF student on llama.cpp, in the place of a transformers causal LM for greedy
    `generate` (what evaluation.predict calls). Rows are run one at a time: llama.cpp's
    single-sequence decoding is what a user's llama.cpp or Ollama does at batch 1."""

    def __init__(self, path: Path, n_ctx: int = 2048):
        super().__init__()
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise StepDistillError('--engine llamacpp needs llama-cpp-python: pip install "stepdistill[llamacpp]"') from e
        self.path = path
        self.llm = Llama(str(path), n_ctx=n_ctx, n_threads=torch.get_num_threads(), verbose=False)
        self._anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # a device for callers to read

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int, pad_token_id: int, **_) -> torch.Tensor:
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = [t for t, m in zip(ids, mask) if m]  # left padding off
            if len(prompt) + max_new_tokens > self.llm.n_ctx():
                raise StepDistillError(f"an input of {len(prompt)} tokens and {max_new_tokens} new ones do not fit "
                                       f"llama.cpp's context of {self.llm.n_ctx()}: use a shorter input")
            new: list[int] = []
            for tok in self.llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                if tok == eos_token_id or len(new) >= max_new_tokens:
                    break
                new.append(tok)
            rows.append(new)
        width = max((len(r) for r in rows), default=0)
        new_ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long)
        return torch.cat([input_ids.cpu(), new_ids.reshape(len(rows), width)], dim=1)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


def modelfile(gguf_name: str, prompt_prefix: str, prompt_suffix: str, max_tokens: int) -> str:
    """An Ollama Modelfile for the GGUF beside it: the raw prompt the student was trained on,
    greedy decoding, the label's length."""
    def quoted(s: str) -> str:
        return s.replace("\\", "\\\\").replace('"', '\\"')

    return (f"# ollama create my-student -f Modelfile && ollama run my-student \"<your input>\"\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{quoted(prompt_prefix)}{{{{ .Prompt }}}}{quoted(prompt_suffix)}"""\n'
            "PARAMETER temperature 0\n"
            "PARAMETER top_k 1\n"
            f"PARAMETER num_predict {max_tokens}\n")

