#!/usr/bin/env bash
# The H200 runs behind benchmarks/results/h200-*: run from the repository root on the GPU machine
# (device tool: OUT is the folder whose files come back). Usage: benchmarks/h200.sh tests|speed|patterns|order|compare|decode|s2|sigmoid|flexpatterns|streamdecode|issue6|issue6b|issue7a|issue7tests|issue7b|issue7c|issue7d|issue6c|issue5b|mqar|session10|session10b|flexfwd|session10c|session11a|session11b|session11c|session11d|session11e|session12a|session12b|session12c|session12d|session12e|session13c|session13d|session13e|session14a|session14b|session14c|session14d|session14e|session14f|session15a|session15b|session15c|session15d|session15e|session15f|session15g|session15h|session16a|session16b|session16c|session16d|session16e|session16f
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
R=$OUT/r; mkdir -p "$R"
bench() { python3 -m attnkit.cli bench --device cuda "$@"; }
# wheels carried in .whl/ (the device has no registry): fla-core (the fla-lightning baseline) and
# nvidia-cudnn-frontend (the cuDNN band backend). Fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl fla-core==0.6.0 nvidia-cudnn-frontend==1.18.0
with_wheels() {
  [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:/tmp/site
}
case "${1:-}" in
  tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    timeout 420 python3 -m pytest -m cuda tests -q -x -p no:cacheprovider 2>&1 | tee "$R/pytest-cuda.log" | tail -8 ;;
  speed)
    bench --mechanisms mha,gqa,mqa --mode fwd --out "$R/h200-fwd.json"
    bench --mechanisms mha,gqa,mqa --mode fwdbwd --ops dense-sdpa,dense-sdpa-cudnn,dense-sdpa-flash,flex,attend --out "$R/h200-fwdbwd.json" ;;
  patterns)
    for p in window:1024 sink:4:1024; do
      for m in fwd fwdbwd; do
        bench --mechanisms none --ops dense-sdpa,dense-sdpa-cudnn,flex,attend --pattern $p --seq 8192,32768 --mode $m \
          --out "$R/h200-${p//:/-}-$m.json" --plot none
      done
    done ;;
  order)  # attend vs raw FlexAttention with the order of the rows swapped (is the gap an order effect?)
    for p in window:1024 sink:4:1024; do
      bench --mechanisms none --ops dense-sdpa,attend,flex --pattern $p --seq 32768 --mode fwd \
        --out "$R/h200-${p//:/-}-fwd-swapped.json" --plot none
    done ;;
  compare)
    python3 -m attnkit.cli compare --preset gpu --device cuda --task mqar --mechanisms mha,gqa,mqa,no-mixing \
      --out "$R/h200-compare-mqar.json" ;;
  decode)
    bench --mechanisms mha,gqa,mqa --ops none --mode decode --batch 1 --seq 4096,16384,65536,131072 --out "$R/h200-decode.json" ;;
  session10)  # MoH core (closed-form block mask), the sigmoid kernel retuned per length, S2 backward tiles
    timeout 110 python3 -m pytest -m cuda tests/ops/test_sigmoid.py tests/layers/test_every_mechanism.py -k "sigmoid or moh" \
      -q -p no:cacheprovider -W ignore 2>&1 | tail -3 | tee "$R/h200-pytest-session10.log"
    timeout 110 python3 benchmarks/moh_core.py --seq 8192,32768 --out "$R/h200-moh-core.json"
    timeout 80 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-sdpa-cudnn,sigmoid \
      --seq 8192,32768 --mode fwd --repeat 20 --out "$R/h200-sigmoid-fwd.json" --plot none | grep "│"
    dense=--dense
    for t in 64,64,64,64,3,4 64,64,128,64,3,8 32,64,128,64,3,4; do
      timeout 75 python3 benchmarks/s2_bwd_tiles.py --tile $t $dense --out "$R/h200-s2-bwd-tiles.jsonl"; dense=
    done ;;
  session10b)  # after the fixes: MoH's block mask without vmap, the sigmoid grid in longest-first order
    timeout 100 python3 -m pytest -m cuda tests/ops/test_sigmoid.py tests/layers/test_every_mechanism.py -k "sigmoid or moh" \
      -q -p no:cacheprovider -W ignore -o addopts="" 2>&1 | tail -3 | tee "$R/h200-pytest-session10.log"
    timeout 80 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-sdpa-cudnn,sigmoid \
      --seq 8192,32768 --mode fwd --repeat 20 --out "$R/h200-sigmoid-fwd.json" --plot none | grep "│"
    timeout 190 python3 benchmarks/moh_core.py --seq 32768 --shared 4,0 --out "$R/h200-moh-core.json" 2>&1 | grep "^T="
    timeout 150 python3 -m attnkit.cli bench --device cuda --mechanisms mha,moh --ops none --seq 8192,32768 --mode fwdbwd \
      --repeat 5 --warmup 3 --out "$R/h200-moh-fwdbwd.json" --plot none | grep "│" ;;
  flexfwd)  # FlexAttention forward tiles against SDPA (is Inductor's default tile the slow part?)
    timeout 200 python3 benchmarks/flex_fwd_tiles.py --seq 32768 --out "$R/h200-flex-fwd-tiles.json" 2>&1 | grep -v Warn ;;
  session10c)  # every CUDA test (ran past its 420 s limit on a cold machine: split it) and a short GPU compare through the new loss path
    timeout 420 python3 -m pytest -m cuda tests -o addopts="" -q -rfE -p no:cacheprovider -W ignore 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR" | cut -c1-300 | tee "$R/h200-pytest-session10.log"
    timeout 100 python3 -m attnkit.cli compare --preset gpu --device cuda --task mqar --mechanisms mha --steps 200 \
      --cache-dir /tmp/cmp --out "$R/h200-compare-smoke.json" 2>&1 | tail -4 ;;
  session11a)  # issue 7: Lightning's state walk split into segments (B = 1 long sequences); tests, sweep, op and layer
    with_wheels
    timeout 120 python3 -m pytest -m cuda tests/ops/test_lightning_op.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session11.log"
    timeout 150 python3 benchmarks/lightning_segments.py --seq 2048,8192,32768,131072 --segments default,all,128,64,32,16 \
      --out "$R/h200-lightning-segments.json" | cut -c1-200
    for m in fwd fwdbwd; do
      timeout 100 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa-cudnn,lightning,fla-lightning \
        --seq 2048,8192,32768,131072 --mode $m --repeat 20 --out "$R/h200-lightning-$m.json" --plot none | grep "│"
    done
    timeout 120 python3 -m attnkit.cli bench --device cuda --mechanisms mha,lightning --ops none \
      --seq 2048,8192,32768,131072 --mode fwdbwd --repeat 5 --warmup 2 --out "$R/h200-lightning-layer-fwdbwd.json" --plot none | grep "│" ;;
  session11b)  # issues 5 and 6: FlexAttention kernel options (TMA, rows guaranteed safe) on the patterned training steps
    timeout 280 python3 benchmarks/flex_options.py --variants default,tma,tma+safe,default --out "$R/h200-flex-options.json" 2>&1 \
      | grep -v Warn | cut -c1-300 ;;
  session11c)  # the final Lightning segment policy (split only when B*H leaves SMs idle) against fla; flex TMA on S2
    with_wheels
    for m in fwd fwdbwd; do
      timeout $([ $m = fwd ] && echo 150 || echo 170) python3 -m attnkit.cli bench --device cuda --mechanisms none \
        --ops dense-sdpa-cudnn,lightning,fla-lightning --seq 2048,8192,32768,131072 --mode $m --repeat 20 \
        --out "$R/h200-lightning-$m.json" --plot none | grep "│"
    done
    timeout 220 python3 benchmarks/flex_options.py --variants default,tma --cases s2,causal --out "$R/h200-flex-options.json" 2>&1 \
      | grep -v Warn | cut -c1-300 ;;
  session11d)  # S2 with TMA loads by default (its CUDA test, S2/window/sink with and without TMA); Lightning tokens/s as throughput
    timeout 100 python3 -m pytest -m cuda tests/layers/test_s2.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session11d.log"
    timeout 220 python3 benchmarks/flex_options.py --variants default,no-tma,tma --cases s2,window,sink \
      --out "$R/h200-flex-options-patterns.json" 2>&1 | grep '^{"case' | cut -c1-300
    for m in fwd fwdbwd; do
      timeout 90 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa-cudnn,lightning \
        --seq 2048,8192,32768,131072 --mode $m --repeat 10 --timing throughput \
        --out "$R/h200-lightning-throughput-$m.json" --plot none | grep "│"
    done ;;
  session11e)  # S2 at 128k: TMA with the forward's warps/stages, and rows guaranteed safe (is 8x within reach?)
    timeout 200 python3 benchmarks/flex_options.py --variants default,tma+safe,tma+fwd8w3s,tma+fwd4w2s,default --cases s2 \
      --out "$R/h200-flex-options-s2.json" 2>&1 | grep '^{"case' | cut -c1-300 ;;
  session12a)  # issue 6: S2 with rows-safe granted after verification (tests, NaN evidence, 128k timing); sigmoid forward with TMA
    timeout 170 python3 -m pytest -m cuda tests/ops/test_attend.py tests/ops/test_sigmoid.py tests/layers/test_s2.py -k "rows_safe or sigmoid or s2" \
      -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session12.log"
    timeout 80 python3 benchmarks/rows_safe_check.py --seq 32768 --out "$R/h200-rows-safe.json" 2>&1 | grep -v Warn | cut -c1-600
    timeout 110 python3 benchmarks/sigmoid_fwd.py --seq 8192,32768 --out "$R/h200-sigmoid-fwd-tma.json" 2>&1 | cut -c1-900
    timeout 200 python3 benchmarks/flex_options.py --variants default,tma-nosafe,default --cases s2 \
      --out "$R/h200-flex-options-rows-safe.json" 2>&1 | grep '^{"case' | cut -c1-300 ;;
  session12b)  # S2 and window/sink on 64 x 64 blocks; MoH's routed FlexAttention with TMA; the sigmoid forward's launch order
    timeout 60 python3 -m pytest -m cuda tests/ops/test_attend.py -k rows_safe -q -rfE -p no:cacheprovider -W ignore -o addopts="" \
      2>&1 | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session12b.log"
    timeout 120 python3 benchmarks/flex_blocks.py --seq 131072 --cases s2 --blocks 128x64,64x64 --sdpa \
      --out "$R/h200-flex-blocks-s2-128k.json" 2>&1 | grep -v Warn | cut -c1-300
    timeout 170 python3 benchmarks/flex_blocks.py --seq 32768 --cases window,sink --blocks 128,128x64,64x64 \
      --out "$R/h200-flex-blocks-64.json" 2>&1 | grep -v Warn | cut -c1-300
    timeout 120 python3 benchmarks/moh_core.py --seq 32768 --shared 4 --flex-options '{};{"USE_TMA": true}' \
      --out "$R/h200-moh-core-tma.json" 2>&1 | grep "T=" | cut -c1-300
    timeout 100 python3 benchmarks/sigmoid_fwd.py --seq 8192,32768 --out "$R/h200-sigmoid-fwd-order.json" 2>&1 | cut -c1-1200 ;;
  session12c)  # the sigmoid forward back in head-after-head order, with TMA and three more tiles offered: tests, A/B, the bench CLI
    timeout 150 python3 -m pytest -m cuda tests/ops/test_sigmoid.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session12c.log"
    timeout 150 python3 benchmarks/sigmoid_fwd.py --seq 8192,32768 --out "$R/h200-sigmoid-fwd-tma.json" 2>&1 | cut -c1-1200
    for m in fwd fwdbwd; do
      timeout 90 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-sdpa-cudnn,sigmoid \
        --seq 8192,32768 --mode $m --repeat 20 --out "$R/h200-sigmoid-$m.json" --plot none | grep "│"
    done ;;
  session12d)  # the final sigmoid forward (8 pointer + 4 TMA tiles): its CUDA tests and one more A/B
    timeout 230 python3 -m pytest -m cuda tests/ops/test_sigmoid.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session12d.log"
    timeout 120 python3 benchmarks/sigmoid_fwd.py --seq 8192,32768 --out "$R/h200-sigmoid-fwd-final.json" 2>&1 | cut -c1-1200 ;;
  session12e)  # Lightning's two state walks merged into one kernel: CUDA tests, and A/B against the copy saved before the merge
    timeout 90 python3 -m pytest -m cuda tests/ops/test_lightning_op.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session12e.log"
    timeout 150 python3 benchmarks/lightning_ab.py --modules attnkit.ops.lightning_triton,attnkit.ops._lightning_triton_before \
      --seq 8192,131072 --repeat 10 --out "$R/h200-lightning-walk-merge-ab.json" 2>&1 | cut -c1-400 ;;
  session13c)  # kernel times per training step (h200-flex-profile-sink.json came from this target at 68528a8, with the sink copies)
    timeout 240 python3 benchmarks/flex_profile.py --cases window,sink,causal --seq 32768 \
      --out "$R/h200-flex-profile.json" 2>&1 | grep '^{"case' | cut -c1-1500 ;;
  session13d)  # window, sink and S2 at 32k with back-to-back timing (the host's per-call gaps out of the kernel ratio)
    for p in window:1024 sink:4:1024 s2:64:16:16; do
      timeout 150 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-flex,attend --pattern $p \
        --seq 32768 --mode fwdbwd --repeat 10 --timing throughput --out "$R/h200-${p//:/-}-throughput.json" --plot none | grep "\[op\]"
    done ;;
  session13e)  # DMA's core at 32k (thresholds by running top-k, block mask in closed form): scattered and block-span biases
    timeout 400 python3 benchmarks/dma_core.py --seq 32768 --keep 2048 --out "$R/h200-dma-core.json" 2>&1 | grep '^{"case' | cut -c1-600
    timeout 120 python3 -m pytest -m cuda tests/layers/test_dynamic_mask.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session13e.log" ;;
  session14a)  # the cuDNN band backend (sliding window): CUDA tests, window 1024 against FlexAttention; DMA's thresholds timed
    with_wheels
    python3 -c "import torch, cudnn; print('cudnn frontend', cudnn.__version__, 'backend', cudnn.backend_version(), 'torch', torch.backends.cudnn.version())"
    timeout 200 python3 -m pytest -m cuda tests/ops/test_cudnn_band.py -q -x -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-400 | tee "$R/h200-pytest-session14a.log"
    for m in fwdbwd fwd; do
      timeout 200 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-flex,flex,attend --pattern window:1024 \
        --seq 8192,32768 --mode $m --repeat 10 --out "$R/h200-window-1024-cudnn-$m.json" --plot none 2>&1 | grep -E "\[op\]|Error|error" | cut -c1-300
    done
    timeout 200 python3 benchmarks/dma_core.py --seq 32768 --keep 2048 --out "$R/h200-dma-core-scan.json" 2>&1 | grep '^{"case' | cut -c1-600 ;;
  session14b)  # the band backend's CUDA tests (all), and its training step at 32k (the fwd+bwd of session14a ran past 120 s)
    with_wheels
    timeout 150 python3 -m pytest -m cuda tests/ops/test_cudnn_band.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | head -30 | tee "$R/h200-pytest-session14b.log"
    timeout 240 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-flex,flex,attend --pattern window:1024 \
      --seq 32768 --mode fwdbwd --repeat 10 --out "$R/h200-window-1024-cudnn-fwdbwd.json" --plot none 2>&1 | tee "$R/bench.log" \
      | grep -E "\[op\]|Error|error" | cut -c1-300 ;;
  session14c)  # sink + window through the cuDNN band and the Triton sink merge: CUDA tests, then window and sink at 32k
    with_wheels
    timeout 200 python3 -m pytest -m cuda tests/ops/test_cudnn_band.py tests/ops/test_attend.py tests/layers/test_streaming.py \
      -k "band or window or sink or streaming" -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | head -30 | tee "$R/h200-pytest-session14c.log"
    for p in sink:4:1024 window:1024; do
      timeout 150 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-flex,flex,attend --pattern $p \
        --seq 32768 --mode fwdbwd --repeat 10 --out "$R/h200-${p//:/-}-cudnn-fwdbwd.json" --plot none 2>&1 \
        | grep -E "\[op\]|Error|error" | cut -c1-300
    done ;;
  session14d)  # DMA's thresholds by a wavelet matrix (O(S log S)): CUDA test and the core at 32k; sink + window timed back to back
    timeout 120 python3 -m pytest -m cuda tests/layers/test_dynamic_mask.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session14d.log"
    timeout 240 python3 benchmarks/dma_core.py --seq 32768 --keep 2048 --out "$R/h200-dma-core-wavelet.json" 2>&1 | grep '^{"case' | cut -c1-600
    with_wheels
    timeout 150 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-flex,flex,attend --pattern sink:4:1024 \
      --seq 32768 --mode fwdbwd --repeat 10 --timing throughput --out "$R/h200-sink-4-1024-cudnn-throughput.json" --plot none 2>&1 \
      | grep -E "\[op\]|Error|error" | cut -c1-300 ;;
  session14e)  # DMA's thresholds through the wavelet matrix with the Triton walk (session14d's per-chunk tensor walk took 54 ms)
    timeout 150 python3 -m pytest tests/ops/test_prefix_quantile.py tests/ops/test_sink_merge.py tests/layers/test_dynamic_mask.py -q -rfE \
      -p no:cacheprovider -W ignore -o addopts="" 2>&1 | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session14e.log"
    timeout 60 python3 -c "
import sys, torch; sys.path.insert(0, 'benchmarks'); from cuda_timing import timed
from attnkit.ops.prefix_quantile import kth_largest_of_prefixes as f
v = torch.randn(16, 32768, device='cuda'); seen = torch.arange(1, 32769, device='cuda')
print({b: round(timed(lambda: f(v, 2048, seen, backend=b), 10), 3) for b in ('torch', 'triton')}, 'ms: thresholds at 32k, 16 heads')"
    timeout 240 python3 benchmarks/dma_core.py --seq 32768 --keep 2048 --out "$R/h200-dma-core-wavelet-triton.json" 2>&1 | grep '^{"case' | cut -c1-600 ;;
  session14f)  # the layers: sliding-window and streaming at 32k, FlexAttention (no frontend) then the cuDNN band; band tests on the final code
    for m in flex cudnn; do
      [ $m = cudnn ] && with_wheels
      timeout 150 python3 -m attnkit.cli bench --device cuda --mechanisms mha,sliding-window,streaming --ops none --seq 32768 --mode fwdbwd \
        --repeat 5 --warmup 2 --out "$R/h200-streaming-layers-$m.json" --plot none 2>&1 | grep -E "│ (mha|sliding|streaming)|Error|error" | cut -c1-300
    done
    timeout 150 python3 -m pytest -m cuda tests/ops/test_cudnn_band.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session14f.log" ;;
  session15a)  # issue 5: MoH's routed heads through the cuDNN split (attnkit.ops.picked_causal): CUDA tests, the core at 32k on both routed paths, the layer
    with_wheels
    timeout 170 python3 -m pytest -m cuda tests/ops/test_picked_causal.py tests/ops/test_cudnn_band.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session15a.log"
    timeout 240 python3 benchmarks/moh_core.py --seq 32768 --shared 4 --paths picked,flex --out "$R/h200-moh-core-picked.json" 2>&1 \
      | grep -E "T=|Error|error" | cut -c1-300
    timeout 150 python3 -m attnkit.cli bench --device cuda --mechanisms mha,moh --ops none --seq 8192,32768 --mode fwdbwd \
      --repeat 5 --warmup 3 --out "$R/h200-moh-layer-picked.json" --plot none 2>&1 | grep -E "│ (mha|moh)|Error|error" | cut -c1-300 ;;
  session15b)  # the split's time by leaf size and a profiler table of one step; the CUDA tests after the fixes
    with_wheels
    timeout 200 python3 benchmarks/picked_profile.py --seq 32768 --leaf 128,512,1024 --profile "$R/h200-picked-profile.txt" \
      --out "$R/h200-picked-profile.json" 2>&1 | cut -c1-250
    timeout 170 python3 -m pytest -m cuda tests/ops/test_picked_causal.py tests/ops/test_cudnn_band.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session15b.log" ;;
  session15c)  # after the Triton plan, strided rows and a 512-token leaf: CUDA tests, the split alone, MoH's core and layer
    with_wheels
    timeout 170 python3 -m pytest -m cuda tests/ops/test_picked_causal.py tests/ops/test_cudnn_band.py tests/layers/test_mixture_of_heads.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session15c.log"
    timeout 120 python3 benchmarks/picked_profile.py --seq 32768 --leaf 512,256,1024 --profile "$R/h200-picked-profile-c.txt" \
      --out "$R/h200-picked-profile-c.json" 2>&1 | grep "T=" | cut -c1-250
    timeout 150 python3 benchmarks/moh_core.py --seq 32768 --shared 4,0 --paths picked --out "$R/h200-moh-core-picked-c.json" 2>&1 \
      | grep -E "T=|Error|error" | cut -c1-300
    timeout 120 python3 -m attnkit.cli bench --device cuda --mechanisms mha,moh --ops none --seq 8192,32768 --mode fwdbwd \
      --repeat 5 --warmup 3 --out "$R/h200-moh-layer-picked-c.json" --plot none 2>&1 | grep -E "│ (mha|moh)|Error|error" | cut -c1-300 ;;
  session15d)  # MoH splits q, k, v instead of slicing; where the split's GPU idles; MoH's core on both paths, the layer
    with_wheels
    timeout 100 python3 benchmarks/picked_profile.py --seq 32768 --leaf 512 --repeat 5 --profile "$R/h200-picked-profile-d.txt" --gaps \
      --out "$R/h200-picked-profile-d.json" 2>&1 | grep -E "T=|idle|span" | cut -c1-250
    timeout 200 python3 benchmarks/moh_core.py --seq 32768 --shared 4,0 --paths picked,flex --out "$R/h200-moh-core-picked-d.json" 2>&1 \
      | grep -E "T=|Error|error" | cut -c1-300
    timeout 120 python3 -m attnkit.cli bench --device cuda --mechanisms mha,moh --ops none --seq 8192,32768 --mode fwdbwd \
      --repeat 5 --warmup 3 --out "$R/h200-moh-layer-picked-d.json" --plot none 2>&1 | grep -E "│ (mha|moh)|Error|error" | cut -c1-300
    timeout 100 python3 -m pytest -m cuda tests/layers/test_mixture_of_heads.py tests/ops/test_picked_causal.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session15d.log" ;;
  session15e)  # final: MoH builds the split's plan before queueing its shared heads; CUDA tests; the split alone; MoH's core on both paths; the layer
    with_wheels
    timeout 200 python3 -m pytest -m cuda tests/ops/test_picked_causal.py tests/ops/test_cudnn_band.py tests/layers/test_mixture_of_heads.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session15e.log"
    timeout 60 python3 -m pytest -m cuda tests/layers/test_every_mechanism.py -k moh -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee -a "$R/h200-pytest-session15e.log"
    timeout 100 python3 benchmarks/picked_profile.py --seq 32768 --leaf 512 --repeat 10 --profile "$R/h200-picked-profile-e.txt" --gaps \
      --out "$R/h200-picked-profile-e.json" 2>&1 | grep -E "T=|span" | cut -c1-250
    timeout 200 python3 benchmarks/moh_core.py --seq 32768 --shared 4,0 --paths picked,flex --out "$R/h200-moh-core-picked.json" 2>&1 \
      | grep -E "T=|Error|error" | cut -c1-300
    timeout 120 python3 -m attnkit.cli bench --device cuda --mechanisms mha,moh --ops none --seq 8192,32768 --mode fwdbwd \
      --repeat 5 --warmup 3 --out "$R/h200-moh-layer-picked.json" --plot none 2>&1 | grep -E "│ (mha|moh)|Error|error" | cut -c1-300 ;;
  session15f)  # MoH's shared heads on a side stream beside the routed split: CUDA tests, the core (3 paths), the layer, the layer compiled
    with_wheels
    timeout 150 python3 -m pytest -m cuda tests/ops/test_picked_causal.py tests/layers/test_mixture_of_heads.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session15f.log"
    timeout 150 python3 benchmarks/moh_core.py --seq 32768 --shared 4 --paths picked,picked-serial,flex --out "$R/h200-moh-core-overlap.json" 2>&1 \
      | grep -E "T=|Error|error" | cut -c1-300
    timeout 100 python3 -m attnkit.cli bench --device cuda --mechanisms mha,moh --ops none --seq 8192,32768 --mode fwdbwd \
      --repeat 5 --warmup 3 --out "$R/h200-moh-layer-overlap.json" --plot none 2>&1 | grep -E "│ (mha|moh)|Error|error" | cut -c1-300
    timeout 150 python3 -m attnkit.cli bench --device cuda --mechanisms moh --ops none --seq 8192 --mode fwdbwd --compile \
      --repeat 5 --warmup 3 --out "$R/h200-moh-layer-compiled.json" --plot none 2>&1 | grep -E "│ (mha|moh)|Error|error" | cut -c1-300 ;;
  session15g)  # unpicked rows' dO no longer zeroed (lse 1e30 instead): CUDA tests, the split alone, MoH's core (3 paths)
    with_wheels
    timeout 150 python3 -m pytest -m cuda tests/ops/test_picked_causal.py tests/layers/test_mixture_of_heads.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session15g.log"
    timeout 90 python3 benchmarks/picked_profile.py --seq 32768 --leaf 512 --repeat 10 --profile "$R/h200-picked-profile-g.txt" \
      --out "$R/h200-picked-profile-g.json" 2>&1 | grep -E "T=" | cut -c1-250
    timeout 150 python3 benchmarks/moh_core.py --seq 32768 --shared 4,0 --paths picked,picked-serial,flex --out "$R/h200-moh-core-final.json" 2>&1 \
      | grep -E "T=|Error|error" | cut -c1-300 ;;
  session15h)  # the CUDA tests on the final commit (after the review)
    with_wheels
    timeout 200 python3 -m pytest -m cuda tests/ops/test_picked_causal.py tests/ops/test_cudnn_band.py tests/layers/test_mixture_of_heads.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session15h.log" ;;
  session16a)  # S2 on keys reordered per KV head (stripes first): CUDA tests, then natural against reordered
    # (ran at commit 614f397; the reordered path and benchmarks/s2_order.py were removed after it measured slower)
    timeout 150 python3 -m pytest -m cuda tests/ops/test_s2_reordered.py tests/layers/test_s2.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session16a.log"
    timeout 170 python3 benchmarks/s2_order.py --seq 32768 --variants natural,reordered --out "$R/h200-s2-order-32k.json" 2>&1 \
      | grep -E "T=|over SDPA" | cut -c1-300
    timeout 250 python3 benchmarks/s2_order.py --seq 131072 --variants natural,reordered,reordered-tile128 --out "$R/h200-s2-order-128k.json" 2>&1 \
      | grep -E "T=|over SDPA" | cut -c1-300 ;;
  session16b)  # the sigmoid forward with the key loop warp-specialized; its CUDA tests
    timeout 200 python3 benchmarks/sigmoid_fwd.py --seq 8192,32768 --warp-specialize --out "$R/h200-sigmoid-fwd-ws.json" 2>&1 | grep -v Warn | cut -c1-1500
    timeout 200 python3 -m pytest -m cuda tests/ops/test_sigmoid.py tests/layers/test_s2.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session16b.log" ;;
  session16c)  # the sigmoid kernels' two formulas: elementwise and output accuracy, speed; the CUDA tests
    timeout 300 python3 benchmarks/sigmoid_formula.py --seq 8192,32768 --out "$R/h200-sigmoid-formula.json" 2>&1 | grep -v Warn | cut -c1-1500
    timeout 220 python3 -m pytest -m cuda tests/ops/test_sigmoid.py tests/layers/test_s2.py -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session16c.log" ;;
  session16d)  # the CUDA tests on the final sigmoid code (SIGMOID_FORMULA "auto") and S2
    timeout 300 python3 -m pytest -m cuda tests/ops/test_sigmoid.py tests/layers/test_s2.py "tests/layers/test_every_mechanism.py::test_cuda_fast_path_matches_reference" -k "not cuda_fast_path or sigmoid or s2" -q -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep -E "passed|failed|FAILED|ERROR|^E " | cut -c1-300 | tee "$R/h200-pytest-session16d.log" ;;
  session16e)  # session16d again, fewer tests and every line kept (16d ran past its 300 s limit with nothing printed)
    timeout 330 python3 -m pytest -m cuda tests/layers/test_s2.py tests/ops/test_sigmoid.py -k "s2 or long_rows or exp_formula or (bf16 and auto)" \
      -v -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 | grep --line-buffered -E "PASS|FAIL|ERROR|passed|failed|^E " | cut -c1-300 | tee "$R/h200-pytest-session16e.log" ;;
  session16f)  # the sigmoid forward with two-programs-per-SM tiles offered; the sigmoid CUDA tests
    timeout 150 python3 benchmarks/sigmoid_fwd.py --seq 8192,32768 --repeat 20 --out "$R/h200-sigmoid-fwd-2cta.json" 2>&1 | grep -v Warn | cut -c1-2500
    timeout 100 python3 -m pytest -m cuda tests/ops/test_sigmoid.py -k "auto" -v -rfE -p no:cacheprovider -W ignore -o addopts="" 2>&1 \
      | grep --line-buffered -E "PASS|FAIL|ERROR|passed|failed|^E " | cut -c1-300 | tee "$R/h200-pytest-session16f.log" ;;
  issue6)  # everything issue 6 measures, in one call (device time is scarce)
    timeout 170 python3 -m pytest -m cuda tests/layers tests/ops/test_sigmoid.py -q --maxfail=10 -p no:cacheprovider -p no:logging -W ignore \
      2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | cut -c1-300 | tail -40 > "$R/h200-pytest-issue6.log"; tail -12 "$R/h200-pytest-issue6.log"
    for m in fwd fwdbwd; do
      timeout 100 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-flex,attend \
        --pattern s2:64:16:16 --seq 32768,131072 --mode $m --repeat 10 --warmup 3 --out "$R/h200-s2-$m.json" --plot none | tail -8
    done
    timeout 90 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-sdpa-cudnn,dense-flex,sigmoid \
      --seq 8192,32768 --mode fwd --out "$R/h200-sigmoid-fwd.json" --plot none | tail -10
    timeout 90 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-sdpa-cudnn,dense-flex,sigmoid \
      --seq 8192,32768 --mode fwdbwd --repeat 10 --out "$R/h200-sigmoid-fwdbwd.json" --plot none | tail -10
    for p in window:1024 sink:4:1024; do
      timeout 60 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-flex,attend --pattern $p \
        --seq 32768 --mode fwdbwd --repeat 10 --out "$R/h200-${p//:/-}-vsflex.json" --plot none | tail -5
    done
    timeout 60 python3 -m attnkit.cli bench --device cuda --mechanisms mha --ops none --mode decode --batch 1 \
      --seq 16384,65536 --out "$R/h200-mha-decode-check.json" --plot none | tail -5 ;;
  issue6b)  # the re-run after the fixes (Triton sigmoid tuning, S2 training blocks)
    timeout 150 python3 -m pytest -m cuda tests/layers tests/ops/test_sigmoid.py -q --maxfail=20 -p no:cacheprovider \
      -p no:logging -W ignore 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | cut -c1-300 | tail -40 > "$R/h200-pytest-issue6.log"
    cat "$R/h200-pytest-issue6.log"
    for m in fwd fwdbwd; do
      timeout 75 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-sdpa-cudnn,dense-flex,sigmoid \
        --seq 8192,32768 --mode $m --repeat 10 --out "$R/h200-sigmoid-$m.json" --plot none | grep "│"
      timeout 100 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-flex,attend \
        --pattern s2:64:16:16 --seq 32768,131072 --mode $m --repeat 5 --warmup 2 --out "$R/h200-s2-$m.json" --plot none | grep "│"
    done ;;
  s2)  # issue 6: S2-Attention against dense causal (cuDNN SDPA and FlexAttention)
    for m in fwd fwdbwd; do
      bench --mechanisms none --ops dense-sdpa,dense-sdpa-cudnn,dense-flex,flex,attend --pattern s2:64:16:16 \
        --seq 32768,131072 --mode $m --out "$R/h200-s2-$m.json" --plot none
    done ;;
  sigmoid)  # issue 6: sigmoid attention against softmax at the same shape
    for m in fwd fwdbwd; do
      bench --mechanisms none --ops dense-sdpa,dense-sdpa-cudnn,dense-flex,sigmoid --seq 8192,32768 --mode $m \
        --out "$R/h200-sigmoid-$m.json" --plot none
    done ;;
  flexpatterns)  # issue 6: each pattern's speedup over dense FlexAttention against its FLOP reduction
    for p in window:1024 sink:4:1024; do
      bench --mechanisms none --ops dense-sdpa,dense-flex,attend --pattern $p --seq 32768 --mode fwdbwd \
        --out "$R/h200-${p//:/-}-vsflex.json" --plot none
    done ;;
  streamdecode)  # issue 6: sink + window decode, flat in context length
    bench --mechanisms streaming,sliding-window,mha --ops none --mode decode --batch 1 --seq 4096,16384,65536,131072 \
      --out "$R/h200-streaming-decode.json" ;;
  issue7a)  # issue 7, part 1: CUDA tests of every mechanism + the Lightning kernels; the op against fla and cuDNN
    with_wheels
    python3 -c "import fla, triton; print('fla', fla.__version__, 'triton', triton.__version__)"
    for m in fwd fwdbwd; do
      timeout 120 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa-cudnn,lightning,fla-lightning \
        --seq 2048,8192,32768,131072 --mode $m --repeat 20 --out "$R/h200-lightning-$m.json" --plot none | grep "│"
    done ;;
  issue7tests)  # issue 7: CUDA tests of every mechanism (flex compiles: minutes) and of the Lightning kernels
    timeout 420 python3 -m pytest -m cuda tests/ops/test_lightning_op.py tests/layers/test_every_mechanism.py -v --tb=line \
      -p no:cacheprovider -p no:logging -W ignore 2>&1 | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E |Error" \
      | cut -c1-250 > "$R/h200-pytest-issue7.log"; grep -c PASSED "$R/h200-pytest-issue7.log"; grep -v PASSED "$R/h200-pytest-issue7.log" | tail -30 ;;
  issue7c)  # issue 7: CUDA tests, then the layers again after the prefix-sum and pooling fixes
    timeout 370 python3 -m pytest -m cuda tests/ops/test_lightning_op.py tests/layers/test_every_mechanism.py -v --tb=line \
      -p no:cacheprovider -p no:logging -W ignore 2>&1 | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E |Error" \
      | cut -c1-250 > "$R/h200-pytest-issue7.log"; grep -c PASSED "$R/h200-pytest-issue7.log"; grep -v PASSED "$R/h200-pytest-issue7.log" | tail -30
    timeout 170 python3 -m attnkit.cli bench --device cuda --mechanisms mha,lightning,flow,agent-causal,agent --ops none \
      --seq 2048,8192,32768,131072 --mode fwdbwd --repeat 5 --warmup 2 --out "$R/h200-linear-layers-fwdbwd.json" --plot none | grep "│" ;;
  issue7d)  # issue 7: the agent fixes (materialised N x n scores; causal stage-1 bias removed), re-tested and re-timed
    timeout 200 python3 -m pytest -m cuda tests/layers/test_every_mechanism.py -k "agent or static" -v --tb=line \
      -p no:cacheprovider -p no:logging -W ignore 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|^E " | cut -c1-250 \
      > "$R/h200-pytest-issue7-agent.log"; cat "$R/h200-pytest-issue7-agent.log"
    for m in fwd fwdbwd; do
      timeout 120 python3 -m attnkit.cli bench --device cuda --mechanisms mha,agent --ops none \
        --seq 2048,8192,32768,131072 --mode $m --repeat 5 --warmup 2 --out "$R/h200-agent-$m.json" --plot none | grep "│"
    done ;;
  issue7b)  # issue 7, part 2: the layers (crossover against MHA, linear growth) and decode state/latency
    for m in fwd fwdbwd; do
      timeout 150 python3 -m attnkit.cli bench --device cuda --mechanisms mha,lightning,flow,agent-causal,agent --ops none \
        --seq 2048,8192,32768,131072 --mode $m --repeat 5 --warmup 2 --out "$R/h200-linear-layers-$m.json" --plot none | grep "│"
    done
    timeout 150 python3 -m attnkit.cli bench --device cuda --mechanisms mha,lightning,flow,agent-causal --ops none --mode decode \
      --batch 1 --seq 4096,32768,131072 --out "$R/h200-linear-decode.json" --plot none | grep "│" ;;
  issue6c)  # issue 6: S2 training on its own 64-token key blocks (a 64 x 64 backward tile); block shapes per pattern
    timeout 150 python3 -m pytest -m cuda tests/layers/test_s2.py -q -p no:cacheprovider -p no:logging -W ignore 2>&1 \
      | grep -E "^(FAILED|ERROR|E )|passed|failed" | cut -c1-300 > "$R/h200-pytest-issue6c.log"; cat "$R/h200-pytest-issue6c.log"
    timeout 200 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,dense-flex,attend \
      --pattern s2:64:16:16 --seq 32768,131072 --mode fwdbwd --repeat 5 --warmup 2 --out "$R/h200-s2-fwdbwd.json" --plot none | grep "│"
    timeout 180 python3 benchmarks/flex_blocks.py --seq 32768 --out "$R/h200-flex-blocks.json" ;;
  issue5b)  # issue 5: SQA's attention core (GQA-shaped op rows) and layers at 32k; CCA prefill at 16k
    for hk in 16:16 16:4 8:4 8:8 4:4 4:1; do
      timeout 60 python3 -m attnkit.cli bench --device cuda --mechanisms none --ops dense-sdpa,attend --heads ${hk%:*} \
        --kv-heads ${hk#*:} --head-dim 128 --seq 32768 --mode fwdbwd --repeat 10 --out "$R/h200-sqa-core-${hk/:/-}.json" --plot none | grep "│"
    done
    timeout 120 python3 -m attnkit.cli bench --device cuda --mechanisms mha,gqa,sqa,ssqa,xsqa,xsmqa --ops none --seq 32768 \
      --mode fwdbwd --repeat 10 --out "$R/h200-sqa-layers-fwdbwd.json" --plot none | grep "│"
    for m in fwd fwdbwd; do
      timeout 120 python3 -m attnkit.cli bench --device cuda --mechanisms mha,gqa,cca,ccgqa --ops none --seq 16384 \
        --mode $m --repeat 10 --out "$R/h200-cca-$m.json" --plot none | grep "│"
    done ;;
  mqar)  # issue 4: the GPU preset of the MQAR comparison
    python3 -m attnkit.cli compare --preset gpu --device cuda --task mqar --mechanisms mha,gqa,mqa,no-mixing \
      --cache-dir "$OUT/c" --out "$R/h200-compare-mqar.json" 2>&1 | tail -12 ;;
  *) echo "usage: $0 tests|speed|patterns|order|compare|decode|s2|sigmoid|flexpatterns|streamdecode|issue6|issue6b|issue7a|issue7tests|issue7b|issue7c|issue7d|issue6c|issue5b|mqar|session10|session10b|flexfwd|session10c"; exit 2 ;;
esac
