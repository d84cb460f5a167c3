#!/usr/bin/env bash
# The GPU check: the whole CUDA test suite and the default `attnkit bench --device cuda`, each part
# within the GPU machine's 10 minutes per command. Run from the repository root on a CUDA machine:
#
#   benchmarks/gpu_check.sh tests     # every test marked cuda (pytest-xdist when installed)
#   benchmarks/gpu_check.sh bench     # the default CUDA bench: every mechanism and op, seq 2k-32k
#   benchmarks/gpu_check.sh bench-layers-a | bench-layers-b | bench-ops   # the same bench in three parts
#   benchmarks/gpu_check.sh bench-args NAME ARGS...   # any other bench run, logged the same way
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds) shorten the parts' limits.
#
# Logs and results go to $OUT (default benchmarks/results/h200): pytest-cuda.log, bench-*.log,
# bench-*.json / .jsonl / .png. Optional wheels in .whl/ (the GPU machine has no package registry)
# are installed first: nvidia-cudnn-frontend (the cuDNN band backend) and fla-core (the
# fla-lightning baseline), fetched with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl fla-core==0.6.0 nvidia-cudnn-frontend==1.18.0
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/h200}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:/tmp/site
fi
header() {
  # the device tool copies the working tree, not always its git HEAD: the code hash says which code ran
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) (as the copy's git says), code hash $(python3 -c 'from attnkit._meta import code_hash; print(code_hash())'), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}
# the default run's rows, in three parts of about equal time
mechanisms() { python3 -c "import attnkit; print(','.join(c.name for c in attnkit.mechanisms()))"; }
half() {  # half a|b of the registered mechanisms
  python3 -c "import attnkit, sys; n=[c.name for c in attnkit.mechanisms()]; h=len(n)//2; print(','.join(n[:h] if sys.argv[1]=='a' else ['mha', *n[h:]]))" "$1"
}
bench() {  # bench NAME ARGS...: one part of the default CUDA bench, its log and results under $OUT
  local name=$1; shift
  { header; echo "# attnkit bench --device cuda $*"; } > "$OUT/$name.log"
  timeout "${BENCH_TIMEOUT:-570}" python3 -m attnkit.cli bench --device cuda "$@" --out "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.log" | grep -E "│|Error|error" | cut -c1-200
  echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
case "${1:-}" in
  tests)
    { header; echo "# python3 -m pytest -m cuda tests"; } > "$OUT/pytest-cuda.log"
    xdist=(); python3 -c "import xdist" 2>/dev/null && xdist=(-n 12)  # compilation is CPU-bound: run tests side by side
    timeout "${TEST_TIMEOUT:-560}" python3 -m pytest -m cuda tests "${xdist[@]}" -o addopts="" -q -rfEs -p no:cacheprovider -W ignore \
      --durations=15 2>&1 | tee -a "$OUT/pytest-cuda.log" | grep -E "passed|failed|FAILED|ERROR" | cut -c1-300 ;;
  bench)
    bench bench-cuda-fwd ;;
  bench-layers-a)
    bench bench-cuda-fwd-layers-a --mechanisms "$(half a)" --ops none ;;
  bench-layers-b)
    bench bench-cuda-fwd-layers-b --mechanisms "$(half b)" --ops none ;;
  bench-ops)
    bench bench-cuda-fwd-ops --mechanisms mha ;;
  bench-args)  # bench-args NAME ARGS...: any bench command, logged like the parts above
    shift; bench "$@" ;;
  *)
    echo "usage: benchmarks/gpu_check.sh tests|bench|bench-layers-a|bench-layers-b|bench-ops|bench-args NAME ARGS..." >&2; exit 2 ;;
esac
