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

.PHONY: setup demo demo-train demo-video test test-fast bench clean gpu-check gpu-wheels

setup: $(STAMP)

# torch is installed first, pinned through constraints.txt; which build that is depends on the
# index (a CPU wheel where the index serves one; PyPI's Linux wheel is the CUDA build): see README.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test,vae]"
	$(BIN)/python -m vidscale.scaling.warmup
	touch $(STAMP)

# The headline: a tiny IsoFLOP sweep (3 widths x 5 budgets as trunks and cooldown branches,
# each run on 2 Ray workers with ZeRO-3 and sp=2 over packed mixed-resolution shards of real
# rendered video) on an embedded local Ray cluster, then the scaling-law fit, its prediction
# of the held-out largest budget, and the report (~7 min on 2 cores after setup).
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

# The GPU machine (Python 3.12, torch with CUDA, no network) lacks these: download them here into
# .gpu-wheels (git-ignored; carried to the GPU machine), then `make gpu-check` there installs them
# with no index (diffusers and requests: `bench wan`; pytest for the tier). Wheels for cp312 manylinux;
# deepspeed and antlr4's runtime only as source archives (pure Python; deepspeed's ops JIT-build on use;
# building them needs setuptools, which tensorboard brings). av (~36 MB) and ray are left out: nothing
# the GPU tier runs imports them. Rehearsed on a CPU machine in a venv holding only what the GPU machine
# has (wheels for its own Python): the install, the tier's collection and CPU `bench step`/`bench wan`.
GPU_WHEELS := .gpu-wheels
GPU_PY     := --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:
gpu-wheels: setup
	mkdir -p $(GPU_WHEELS)
	$(PIP) download --no-deps -d $(GPU_WHEELS) $(GPU_PY) omegaconf==2.3.0 webdataset==1.0.2 braceexpand==0.1.7 \
	  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	  diffusers==0.42.1 importlib-metadata zipp requests==2.34.2 urllib3==2.8.0 idna==3.20 \
	  certifi==2026.10.19.post1 charset-normalizer==3.5.3 \
	  pytest==9.2.0 pytest-timeout==2.4.0 iniconfig==2.3.1 pluggy==1.7.0 Pygments==2.21.0
	$(PIP) download --no-deps --no-build-isolation -d $(GPU_WHEELS) --no-binary=:all: deepspeed==0.19.8 \
	  antlr4-python3-runtime==4.9.3
	du -sh $(GPU_WHEELS)

# On a GPU machine: the GPU tier, bf16 `bench step` (30M, and 1B at 32k tokens) with vidscale plan's
# memory prediction for it, `bench wan` (1B shape at 32k tokens vs diffusers' Wan), one JSON summary
# (runs/gpu-check/summary.json). Uses the python on PATH (PY=...), not .venv.
gpu-check:
	PY=$(PY) sh tests/gpu/check.sh

clean:
	rm -rf runs .pytest_cache
