#!/bin/bash
# Device run: build, skinny GEMM tests + sweep, GPU tests, bench A/B (cuBLASLt vs skinny).
set -o pipefail
cd "$(dirname "$0")/../.."
(cmake -S . -B build -DPI0_DEV_SUBSET=gpu -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j16 2>&1 | grep -E "error|warning: .*skinny" ) ; test -x build/tests/dev_subset/pi0_gpu_tests || { echo BUILD FAILED; exit 1; }
T=build/tests/dev_subset/pi0_gpu_tests
B=build/bin/pi0_bench
timeout 120 $T "[skinny]" 2>&1 | tee $OUT/skinny_tests.log | tail -5
timeout 120 $T "[.sweep]" 2>&1 | tee $OUT/sweep.log | grep sweep
timeout 200 $T "~[skinny]" 2>&1 | tee $OUT/gpu_tests.log | tail -8
PI0_DECODER_CUBLAS=1 timeout 60 $B --case 2,63,0 --iters 200 2>&1 | tee $OUT/bench_before.log | tail -6
timeout 60 $B --case 2,63,0 --case 2,50,20 --iters 200 2>&1 | tee $OUT/bench_after.log | tail -8
timeout 60 $B --case 2,63,0 --iters 50 --breakdown 2>&1 | tee $OUT/breakdown.log | grep -A40 "decoder breakdown" | head -40
echo quit | nvidia-cuda-mps-control 2>/dev/null; true
