# Two commands on a fresh clone: `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip --disable-pip-version-check -q
# TORCH_INDEX: an index to take torch from (e.g. PyTorch's CPU wheels); default: the configured one
TORCH_INDEX ?=
export PIP_NO_INPUT := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-train demo-video test test-fast bench clean

setup: $(STAMP)

# torch is installed first, pinned through constraints.txt; which build that is depends on the
# index (a CPU wheel where the index serves one; PyPI's Linux wheel is the CUDA build): see README.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test,vae]"
	$(BIN)/python -m vidscale.scaling.warmup
	touch $(STAMP)

# The headline: a tiny IsoFLOP sweep (3 widths x 2 budgets, each run on 2 Ray workers with
# ZeRO-3 and sp=2 over packed mixed-resolution shards of real rendered video) on an embedded
# local Ray cluster, then the scaling-law fit and report (~10 min on 2 cores).
demo: setup
	test -f runs/demo/shards/index.json || { $(BIN)/vidscale make-videos runs/demo/videos --n 48 && \
	  $(BIN)/vidscale prepare runs/demo/videos runs/demo/shards; }
	$(BIN)/vidscale sweep recipes/sweeps/demo.yaml --launcher ray

# one training run of the debug recipe (seconds)
demo-train: setup
	$(BIN)/vidscale train recipes/debug.yaml --run-dir runs/demo-train

# the same model trained from real video: write shape videos, prepare shards, train on them
demo-video: setup
	$(BIN)/vidscale make-videos runs/demo-video/videos --n 48
	$(BIN)/vidscale prepare runs/demo-video/videos runs/demo-video/shards
	$(BIN)/vidscale train recipes/debug.yaml --set data.source=runs/demo-video/shards --run-dir runs/demo-video/run

test: setup
	$(BIN)/python -m pytest -q -ra tests

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not dist and not e2e and not cluster" tests

clean:
	rm -rf runs .pytest_cache
