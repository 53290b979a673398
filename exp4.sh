#!/usr/bin/env bash
set -u
export PI0_BUILD_DIR=$PWD/build-gpu PI0_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a"
source scripts/setup.sh; set +e
pi0_build > $OUT/build.log 2>&1 || { grep -E "error" $OUT/build.log | head; exit 1; }
B=$PI0_BUILD_DIR/bin
seq() { $B/orchestrator --mode sequential --encoder-pct 100 --decoder-pct 100 --frames 300 --warmup 20 --quiet-workers "$@" 2>&1 | grep -E "latency p50|latency p99" | tr '\n' ' '; echo; }
for i in 1 2; do
  echo "== single"; $B/pi0_bench --case 2,63,0 --iters 300 2>&1 | grep -oE "e2e median [0-9.]+ ms|host to host median [0-9.]+ ms" | tr '\n' ' '; echo
  echo "== seq busy"; seq --busy-wait
  echo "== seq sleep"; seq
done
for busy in "" --busy-wait; do
  echo "== concurrent 65/35 b3 $busy"
  $B/orchestrator --encoder-pct 65 --decoder-pct 35 --decoder-batch 3 --frames 300 --warmup 20 --quiet-workers $busy 2>&1 | grep -E "latency p50|latency p99|throughput" | tr '\n' ' '; echo
done
