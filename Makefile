# Two commands on a fresh clone: `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip --disable-pip-version-check -q
export PIP_NO_INPUT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo demo-video test test-fast bench clean

setup: $(STAMP)

# torch is pinned first through constraints.txt: an unpinned torch would pull a CUDA build
# of several GB here; pyproject keeps an open range for GPU users.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test,vae]"
	$(BIN)/python -m scaling.warmup
	touch $(STAMP)

demo: setup
	$(BIN)/vidscale train recipes/debug.yaml --run-dir runs/demo

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
