#!/usr/bin/env bash
# Titans / HCAM against MHA and sliding-window attention on MQAR and passkey (issue 28), one GPU.
# Each mechanism trains in its own process (the small models are launch-bound, so they share the
# GPU well); the closing `attnkit compare` over all of them reuses the finished runs from the
# cache and writes the JSON + PNG with its own command. Usage: OUT=dir bash benchmarks/memory_compare_gpu.sh
set -u
OUT=${OUT:-/tmp/memory-compare}; CACHE=${CACHE:-/tmp/memory-compare-cache}; LIMIT=${LIMIT:-480}
mkdir -p "$OUT" "$CACHE" /tmp/memory-compare-logs
export PYTHONPATH=src OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
MECHS=${MECHS:-"mha,sliding-window:window=32,titans-mac:chunk_size=32,titans-mag:window=32:chunk_size=32,titans-mal:window=32:chunk_size=32,hcam:chunk_size=16:top_k=1"}
MQAR=(--task mqar --task-options seq_len=128,vocab_size=256,num_pairs=8,train_num_pairs=2/4/8/16 --model dim=128,num_heads=4,num_layers=2 --train batch_size=64,warmup=100 --steps ${MQAR_STEPS:-1500} --seeds 3 --device ${DEVICE:-cuda} --cache-dir "$CACHE")
PASSKEY=(--task passkey --task-options length=256 --model dim=128,num_heads=4,num_layers=2 --train batch_size=32,warmup=100 --steps ${PASSKEY_STEPS:-1500} --seeds 3 --device ${DEVICE:-cuda} --cache-dir "$CACHE")
for m in ${MECHS//,/ }; do
  tag=${m//[:=]/_}
  timeout "$LIMIT" $PY -m attnkit.cli compare "${MQAR[@]}" --mechanisms "$m" --out /tmp/memory-compare-logs/mqar-$tag.json --plot none > /tmp/memory-compare-logs/mqar-$tag.log 2>&1 &
  timeout "$LIMIT" $PY -m attnkit.cli compare "${PASSKEY[@]}" --mechanisms "$m" --out /tmp/memory-compare-logs/passkey-$tag.json --plot none > /tmp/memory-compare-logs/passkey-$tag.log 2>&1 &
done
wait
# the closing tables: the mechanisms whose own runs finished (a missing one would train again here)
for task in mqar passkey; do
  done_mechs=""
  for m in ${MECHS//,/ }; do
    [ -s /tmp/memory-compare-logs/$task-${m//[:=]/_}.json ] && done_mechs="$done_mechs,$m"
  done
  [ "$task" = mqar ] && args=("${MQAR[@]}") || args=("${PASSKEY[@]}")
  timeout 120 $PY -m attnkit.cli compare "${args[@]}" --mechanisms "${done_mechs#,}" --out "$OUT/compare-$task-memory.json" > "$OUT/$task.log" 2>&1
done
tar czf "$OUT/logs.tgz" -C /tmp memory-compare-logs
