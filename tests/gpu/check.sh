#!/bin/sh
# `make gpu-check`: on a GPU machine, install what it lacks from .gpu-wheels (no index), run the
# GPU tier, `vidscale bench step` in bf16 on the 30M model and a 1B-class model at 32k tokens,
# `vidscale bench wan` (the 1B shape against diffusers' Wan) and write one JSON summary:
# runs/gpu-check/summary.json. Nothing here needs a network. Time limits keep it under 8 minutes.
set -u
PY=${PY:-python3}
OUT=${OUT_DIR:-runs/gpu-check}
mkdir -p "$OUT"
INSTALL=${GPU_CHECK_INSTALL:-1}  # 0: use the environment as it is
if [ "$INSTALL" = 1 ] && [ -d .gpu-wheels ] && ls .gpu-wheels/* >/dev/null 2>&1; then
  # deepspeed without its JIT ops at install time (they build on first use, if ever)
  DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-build-isolation --no-deps .gpu-wheels/* \
    > "$OUT/install.log" 2>&1 || echo "gpu-check: installing .gpu-wheels failed (see $OUT/install.log)"
fi
if [ "$INSTALL" = 1 ]; then
  $PY -m pip install -q --no-index --no-build-isolation --no-deps -e . >> "$OUT/install.log" 2>&1 \
    || echo "gpu-check: installing vidscale failed (see $OUT/install.log)"
fi
if ! $PY -c "import vidscale.scaling.config" >/dev/null 2>&1; then
  # no editable install (old setuptools): the same namespace through links on PYTHONPATH
  NS=$(mktemp -d)
  mkdir -p "$NS/vidscale"
  for d in models data scaling cluster; do ln -s "$PWD/$d" "$NS/vidscale/$d"; done
  export PYTHONPATH="$NS${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu-check: vidscale from $NS (links)"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 300 $PY -m pytest -q -ra tests/gpu --junitxml="$OUT/tier.xml" -p no:cacheprovider > "$OUT/tier.log" 2>&1
echo "gpu-check: tier exit $?"
timeout 90 $PY -m vidscale.scaling.cli bench step --json --reps 4 --no-split --set train.device=cuda \
  --set train.dtype=bf16 --set model.attn_backend=varlen > "$OUT/bench_30M.json" 2> "$OUT/bench_30M.log"
echo "gpu-check: bench 30M exit $?"
timeout 120 $PY -m vidscale.scaling.cli bench step --json --reps 4 --no-split --set train.device=cuda \
  --set train.dtype=bf16 --set model.attn_backend=varlen --set model.size=1B \
  --set train.tokens_per_batch=32768 > "$OUT/bench_1B.json" 2> "$OUT/bench_1B.log"
echo "gpu-check: bench 1B exit $?"
timeout 150 $PY -m vidscale.scaling.cli bench wan --json --reps 3 --set train.device=cuda --set train.dtype=bf16 \
  --set model.attn_backend=varlen --set model.size=1B --set train.tokens_per_batch=32768 \
  > "$OUT/bench_wan.json" 2> "$OUT/bench_wan.log"
echo "gpu-check: bench wan exit $?"
$PY tests/gpu/summary.py "$OUT" > "$OUT/summary.json"
cat "$OUT/summary.json"
