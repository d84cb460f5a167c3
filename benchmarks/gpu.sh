#!/usr/bin/env bash
# The GPU script: the CUDA test suite, the default CUDA bench and the bench suites, each part within the GPU
# machine's 10 minutes per command. Run from the repository root on a CUDA machine:
#
#   benchmarks/gpu.sh tests               # every test marked cuda (pytest-xdist when installed) -> pytest-cuda.log
#   benchmarks/gpu.sh bench               # the default `attnkit bench --device cuda`: every mechanism and op, seq 2k-32k
#   benchmarks/gpu.sh bench-layers-a | bench-layers-b | bench-layers-c | bench-ops   # the same bench in four parts
#                                         # (the layers in thirds of the registry's order, then the ops); put the
#                                         # parts back into one JSON + plot with benchmarks/bench_merge.py
#                                         # (a part stopped by its limit: its .jsonl, and a run of its missing cells)
#   benchmarks/gpu.sh SUITE [MODE]        # `attnkit bench --suite SUITE` in each of its modes (or MODE only)
#                                         # -> SUITE-MODE.json; SUITE: dense patterns linear heads sigmoid decode
#   benchmarks/gpu.sh bench-args NAME ARGS...   # any other bench run, logged the same way -> NAME.json
#   benchmarks/gpu.sh readme              # regenerate benchmarks/results/README.md from the result files
#   benchmarks/gpu.sh hf-speed            # attnkit.hf on the H200: ProxyAttn's block-sparse prefill against cuDNN
#                                         # (32k-128k), hf_overhead on the Llama-3.2-1B and -3.1-8B shapes (8k-64k)
#   benchmarks/gpu.sh hf-identify         # `attnkit identify-duo --device cuda` on the shipped subject, timed
#   benchmarks/gpu.sh diffusion-speed     # attnkit.diffusion's sharing methods against the stock FLUX processor on
#                                         # a FLUX.1-dev-shaped double + single block at 1024x1024 (diffusers wheel in .whl/)
#   benchmarks/gpu.sh sp-timeline         # attnkit.distributed: one rank's compute for its share of a 1M-token
#                                         # sequence, and the W-rank ring / LASP-2 timelines simulated from it
#   benchmarks/gpu.sh modules             # issue 28's module kinds (not bench layers) on the GPU: LookupViT and the
#                                         # vision cards at ViT-B shapes 196-2304 tokens, pooling + MODA, recsys, MambAttention at the paper's size,
#                                         # the SMoE routers at T 2048, C 1024
#   benchmarks/gpu.sh hf-pareto           # issue 23's grid: `attnkit eval` of every KV method through its budgets
#                                         # at 2k and 4k (3 runs -> pareto-*/eval.json), and LongHeads past the
#                                         # subject's trained 4k (8k, 16k, --beyond-context -> longheads-16k/)
# Arguments are checked before anything is installed or written (usage and exit 2 otherwise); the script exits
# non-zero when a test or bench run failed (or the results README could not be regenerated).
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds) shorten the parts' limits (BENCH_TIMEOUT is per bench run: a suite
# with two modes runs two; give it one MODE per device command where 10 minutes would not hold both).
#
# Logs and results go to $OUT (default benchmarks/results/h200): pytest-cuda.log; per bench run NAME.log (the
# header below, the command and the terminal table), NAME.json, NAME.jsonl (cells as they finished) and NAME.png.
# After a bench case the results README is regenerated when $OUT is under benchmarks/results; results copied
# back from elsewhere need `python benchmarks/results_readme.py` (tests/bench/test_results_readme.py checks it).
# Optional wheels in .whl/ (the GPU machine has no package registry) are installed first: nvidia-cudnn-frontend
# (the cuDNN band backend) and fla-core (the fla-lightning baseline), fetched with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl fla-core==0.6.0 nvidia-cudnn-frontend==1.18.0
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/h200}
suites=$(python3 -c "from attnkit.bench.suites import SUITES; print(' '.join(SUITES))")
usage() {  # usage [WHY]: the arguments are refused before anything is installed, run or written
  [ -n "${1:-}" ] && echo "benchmarks/gpu.sh: $1" >&2
  echo "usage: benchmarks/gpu.sh tests|bench|bench-layers-a|bench-layers-b|bench-layers-c|bench-ops|readme|hf-speed|hf-identify|hf-pareto|diffusion-speed|sp-timeline|modules|bench-args NAME ARGS...|SUITE [MODE]" >&2
  echo "  SUITE: $suites" >&2
  exit 2
}
case "${1:-}" in
  tests|bench|bench-layers-a|bench-layers-b|bench-layers-c|bench-ops|readme|hf-speed|hf-identify|hf-pareto|diffusion-speed|sp-timeline|modules)
    # extra words were ignored: `gpu.sh bench --seq 1024` ran the default sizes
    [ $# -eq 1 ] || usage "'$1' takes no arguments, got: ${*:2} (any other bench run: bench-args NAME ARGS...)" ;;
  bench-args)
    [ $# -ge 2 ] || usage "bench-args needs a NAME (the files' name under \$OUT)"
    # NAME becomes $OUT/NAME.json: an option in its place (bench-args --seq 64) or a path is a mistake
    [[ "$2" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || usage "bench-args NAME must be a file name (letters, digits, . _ -), got '$2'" ;;
  *)
    { [ -n "${1:-}" ] && [[ " $suites " == *" $1 "* ]]; } || usage "${1:+unknown case '$1'}"
    [ $# -le 2 ] || usage "SUITE [MODE] takes at most one MODE, got: ${*:2}"
    if [ $# -eq 2 ]; then
      [[ " $(python3 -m attnkit.bench.suites "$1") " == *" $2 "* ]] \
        || usage "'$2' is not a mode of suite $1; accepted: $(python3 -m attnkit.bench.suites "$1") (another mode: bench-args NAME --suite $1 --mode MODE)"
    fi ;;
esac
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:/tmp/site
fi
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/diffusers-deps/*.whl >/dev/null 2>&1; then
  # every case, the CUDA suite's diffusion tests included (they errored on import when only diffusion-speed did this)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-diffusers \
    .whl/diffusers-deps/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site-diffusers
fi
header() {
  # the device tool copies the working tree, not always its git HEAD: the code hash says which code ran
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) (as the copy's git says), code hash $(python3 -c 'from attnkit._meta import code_hash; print(code_hash())'), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}
part() {  # third a|b|c of the registered mechanisms (b and c start with mha, the layers' dense reference)
  python3 -c "import attnkit, sys; n=[c.name for c in attnkit.mechanisms()]; k=-(-len(n)//3); i='abc'.index(sys.argv[1]); p=n[i*k:(i+1)*k]; print(','.join(p if i==0 else ['mha', *p]))" "$1"
}
readme() {  # the results README follows the files (only where they are the repository's own results)
  case "$(realpath -m "$OUT")/" in
    "$(realpath -m benchmarks/results)"/*)
      if python3 benchmarks/results_readme.py >/dev/null; then echo "benchmarks/results/README.md regenerated"
      else status=2; fi ;;  # it named the unreadable files
  esac
}
bench() {  # bench NAME ARGS...: one bench run, its log and results under $OUT
  local name=$1; shift
  { header; echo "# attnkit bench --device cuda $*"; } > "$OUT/$name.log"
  timeout "${BENCH_TIMEOUT:-570}" python3 -m attnkit.cli bench --device cuda "$@" --out "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.log" | grep -E "│|Error|error" | cut -c1-200
  local rc=${PIPESTATUS[0]}
  echo "exit $rc" | tee -a "$OUT/$name.log"
  return "$rc"
}
status=0
run_bench() { bench "$@" || status=$?; }  # a failed bench run fails the script (the README is still regenerated)
case "$1" in
  tests)
    { header; echo "# python3 -m pytest -m cuda tests"; } > "$OUT/pytest-cuda.log"
    xdist=(); python3 -c "import xdist" 2>/dev/null && xdist=(-n 12)  # compilation is CPU-bound: run tests side by side
    timeout "${TEST_TIMEOUT:-560}" python3 -m pytest -m cuda tests "${xdist[@]}" -o addopts="" -q -rfEs -p no:cacheprovider -W ignore \
      --durations=15 2>&1 | tee -a "$OUT/pytest-cuda.log" | grep -E "passed|failed|FAILED|ERROR" | cut -c1-300
    status=${PIPESTATUS[0]} ;;
  bench)
    run_bench bench-cuda-fwd; readme ;;
  bench-layers-a|bench-layers-b|bench-layers-c)
    run_bench "bench-cuda-fwd-$1" --mechanisms "$(part "${1#bench-layers-}")" --ops none; readme ;;
  bench-ops)
    run_bench bench-cuda-fwd-ops --mechanisms mha; readme ;;
  bench-args)  # bench-args NAME ARGS...: any bench command, logged like the parts above
    shift; run_bench "$@"; readme ;;
  readme)
    python3 benchmarks/results_readme.py || status=$? ;;
  hf-speed)  # each part logged with its command; the parts share the 10 minutes (HF_TIMEOUT each)
    for part in "proxyattn-speed benchmarks/proxyattn_speed.py --seq 32768 65536 131072 --budget 0.05 0.1 0.2" \
                "hf-overhead-llama-3.2-1b benchmarks/hf_overhead.py --shape llama-3.2-1b" \
                "hf-overhead-llama-3.1-8b benchmarks/hf_overhead.py --shape llama-3.1-8b --seq 32768,65536 --rounds 8"; do
      set -- $part; name=$1; shift
      { header; echo "# python3 $*"; } > "$OUT/$name.log"
      timeout "${HF_TIMEOUT:-190}" python3 "$@" --out "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.log" | tail -12
      rc=${PIPESTATUS[0]}; echo "exit $rc" | tee -a "$OUT/$name.log"; [ "$rc" -eq 0 ] || status=$rc
    done ;;
  hf-identify)
    { header; echo "# attnkit identify-duo --device cuda --out $OUT/duo-pattern-subject-h200.tsv"; } > "$OUT/identify-duo-h200.log"
    start=$SECONDS
    timeout "${HF_TIMEOUT:-560}" python3 -m attnkit.cli identify-duo --device cuda --out "$OUT/duo-pattern-subject-h200.tsv" 2>&1 \
      | tee -a "$OUT/identify-duo-h200.log" | grep -vE "^\s*$" | tail -20
    status=${PIPESTATUS[0]}; echo "exit $status after $((SECONDS - start)) s" | tee -a "$OUT/identify-duo-h200.log" ;;
  hf-pareto)  # one eval per group of methods (a failed group loses only itself), then LongHeads past 4k
    duo=$OUT/duo-pattern-subject-h200.tsv; [ -f "$duo" ] || duo=benchmarks/results/h200/duo-pattern-subject-h200.tsv
    budgets() { for b in 256 512 1024; do for m in "$@"; do
      case $m in taskkv) echo "--method taskkv:budget=$b,recent=$((b / 2))" ;; *) echo "--method $m:budget=$b" ;; esac
    done; done; }
    groups=("pareto-streaming-duo --method full $(for w in 256 512 1024; do echo --method streaming:sink=4,window=$w; done) $(for s in 0.5 0.75 0.9; do echo --method duo:pattern=$duo,sparsity=$s; done)"
            "pareto-scored $(budgets h2o sinklora)"
            "pareto-taskkv-sparse $(budgets taskkv) --method longheads --method proxyattn:budget=0.1 --method proxyattn:budget=0.05"
            "longheads-16k --method full --method longheads --lengths 8192,16384 --depths 0,0.5,1 --samples 2 --bpb-windows 0 --beyond-context")
    for group in "${groups[@]}"; do
      set -- $group; name=$1; shift
      case $name in pareto-*) set -- "$@" --lengths 2048,4096 --samples 4 ;; esac
      { header; echo "# attnkit eval --device cuda $*"; } > "$OUT/$name.log"
      timeout "${HF_TIMEOUT:-150}" python3 -m attnkit.cli eval --device cuda "$@" --out "$OUT/$name" >> "$OUT/$name.log" 2>&1
      rc=$?; echo "exit $rc" | tee -a "$OUT/$name.log"; tail -25 "$OUT/$name.log" | grep -E "│" | cut -c1-160
      [ "$rc" -eq 0 ] || status=$rc
    done ;;
  diffusion-speed)
    if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/diffusers-deps/*.whl >/dev/null 2>&1; then
      # diffusers needs a newer huggingface_hub / safetensors than the machine may have: beside it, not over it
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-diffusers \
        .whl/diffusers-deps/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site-diffusers
    fi
    { header; echo "# python3 benchmarks/diffusion_speed.py"; } > "$OUT/diffusion-speed.log"
    timeout "${HF_TIMEOUT:-300}" python3 benchmarks/diffusion_speed.py --out "$OUT/diffusion-speed.json" 2>&1 \
      | tee -a "$OUT/diffusion-speed.log" | grep -vE "^\s*$|kept in float32" | tail -12
    status=${PIPESTATUS[0]}; echo "exit $status" | tee -a "$OUT/diffusion-speed.log" ;;
  modules)  # each module kind's speed rows, each part logged with its command
    for part in "vision-bench-h200 -m attnkit.vision.experiments bench --device cuda --dtype bfloat16 --batch 64 --tokens 196,576,1024,2304 --dim 768 --heads 12 --tag h200 --out $OUT" \
                "pooling-multimodal-speed benchmarks/pooling_multimodal.py speed --device cuda --repeats 20 --out $OUT/pooling-multimodal-speed.json" \
                "recsys-bench benchmarks/recsys_directions.py --part bench --device cuda --out $OUT/recsys-bench.json" \
                "speech-bench-h200 -m attnkit.speech.experiments bench --device cuda --paper-size --batch 8 --tag h200 --out $OUT" \
                "routing-bench-h200 -m attnkit.routing.experiments bench --device cuda --batch 8 --seq 2048 --dim 1024 --heads 16 --tag h200 --out $OUT"; do
      set -- $part; name=$1; shift
      { header; echo "# python3 $*"; } > "$OUT/$name.log"
      timeout "${HF_TIMEOUT:-150}" python3 "$@" >> "$OUT/$name.log" 2>&1
      rc=$?; echo "exit $rc" | tee -a "$OUT/$name.log"; [ "$rc" -eq 0 ] || status=$rc
    done ;;
  sp-timeline)
    { header; echo "# python3 benchmarks/sp_timeline.py"; } > "$OUT/sp-timeline.log"
    timeout "${HF_TIMEOUT:-300}" python3 benchmarks/sp_timeline.py --out "$OUT/sp-timeline.json" 2>&1 \
      | tee -a "$OUT/sp-timeline.log" | tail -8
    status=${PIPESTATUS[0]}; echo "exit $status" | tee -a "$OUT/sp-timeline.log" ;;
  *)  # SUITE [MODE]
    suite=$1
    for mode in ${2:-$(python3 -m attnkit.bench.suites "$suite")}; do
      run_bench "$suite-$mode" --suite "$suite" --mode "$mode"
    done
    readme ;;
esac
exit "$status"
