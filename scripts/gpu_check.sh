#!/usr/bin/env bash
# The GPU check (H100, sm_90a): builds, runs the [gpu] and [mps] tests, the single-process
# benchmark and the split sweep with its baselines, and prints a short table last.
#   scripts/gpu_check.sh [build] [tests] [bench] [sweep] [gemm-sweep]
# (default: tests bench sweep; every step builds first, and "build" alone does nothing else)
# "tests" is two passes, which may also run alone: "tests-whole" (every [gpu] and [mps] test under
# CTest on the whole GPU) and "tests-share" (the non-[mps] ones as an MPS client with a 30% share).
# Figures, logs, JSON and the sweep plot go to $OUT (default: ./gpu_check_out).
# PI0_SWEEP_ARGS / PI0_RATE_ARGS add orchestrator options to the sweep / the camera-rate runs
# (e.g. "--decoder-batch 2 --sweep-min 40 --sweep-max 70 --sweep-step 5").
set -uo pipefail
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests bench sweep)
for step in "${STEPS[@]}"; do
  case "$step" in
    build | tests | tests-whole | tests-share | bench | sweep | gemm-sweep) ;;
    *)
      echo "gpu_check: unknown step '$step' (steps: build tests tests-whole tests-share bench" \
        "sweep gemm-sweep)" >&2
      exit 2
      ;;
  esac
done
# The deadline of every request to the MPS control program, here and in the scripts the steps run
# (mps_control.sh checks it the same way); refused before any step starts.
mps_timeout="${PI0_MPS_TIMEOUT_S:-10}"
if ! [[ "$mps_timeout" =~ ^[0-9]*\.?[0-9]+$ && "$mps_timeout" =~ [1-9] ]]; then
  echo "gpu_check: PI0_MPS_TIMEOUT_S='$mps_timeout': expected a number of seconds above 0" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
export PI0_BUILD_DIR="${PI0_BUILD_DIR:-$ROOT/build-gpu}"
# sm_90a: sm_90 with Hopper's arch-specific instructions; the skinny GEMM's wgmma mainloop needs it.
export PI0_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a ${PI0_CMAKE_ARGS:-}"
want() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

# Every step but the build needs the GPU, and the test and sweep steps the MPS control program.
if [[ " ${STEPS[*]} " != " build " ]]; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU or driver here (nvidia-smi missing or failing)" >&2
    exit 1
  fi
  if { want tests || want tests-share || want sweep; } &&
    ! command -v nvidia-cuda-mps-control >/dev/null; then
    echo "gpu_check: nvidia-cuda-mps-control not found (it ships with the NVIDIA driver)" >&2
    exit 1
  fi
fi
mkdir -p "$OUT_DIR"  # only once the GPU checks above have passed: a refused run leaves nothing
# A daemon that answers now is someone else's and is left running; one a step started and left
# behind when it failed half-way must not outlive this script.
daemon_before=0
echo get_server_list | timeout "$mps_timeout" nvidia-cuda-mps-control >/dev/null 2>&1 && daemon_before=1
cleanup() {
  [ "$daemon_before" = 1 ] || echo quit | timeout "$mps_timeout" nvidia-cuda-mps-control >/dev/null 2>&1 || true
}
trap cleanup EXIT
failed=0  # the exit status: 1 if any step failed

nvidia-smi --query-gpu=name,memory.total,compute_mode,driver_version --format=csv,noheader 2>/dev/null
# On an H100 or H200 (the same chip, 132 SMs; the H200 has faster memory) every step (tests,
# benchmark, the workers of the sweep) reads the GEMM table tuned on the H100,
# bench/gemm_table_h100.tsv, unless PI0_GEMM_TABLE is set (empty: no table).
gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
if [ -z "${PI0_GEMM_TABLE+x}" ] && [[ "$gpu_name" == *H100* || "$gpu_name" == *H200* ]]; then
  export PI0_GEMM_TABLE="$ROOT/bench/gemm_table_h100.tsv"
fi
echo "gpu_check: GEMM table: ${PI0_GEMM_TABLE:-none}"
source "$ROOT/scripts/setup.sh"
set +e  # setup.sh turns errexit on; here a failing step is reported and the others still run
t0=$(date +%s)
BUILD_LOG="$PI0_BUILD_DIR.log"
if ! pi0_build >"$BUILD_LOG" 2>&1; then
  cp "$BUILD_LOG" "$OUT_DIR/build.log"
  grep -E "error|Error" "$BUILD_LOG" | head -40
  echo "gpu_check: build failed (log: $OUT_DIR/build.log)"
  exit 1
fi
echo "gpu_check: built in $(( $(date +%s) - t0 )) s"
BIN="$PI0_BUILD_DIR/bin"
status_tests="not run"; status_bench="not run"; status_sweep="not run"

if want tests || want tests-whole; then
  (cd "$PI0_BUILD_DIR" && ctest -L gpu --output-on-failure --timeout 900) >"$OUT_DIR/gpu_tests.log" 2>&1
  rc=$?
  grep -E "rel error|SMs|tests passed|Failed|FAILED" "$OUT_DIR/gpu_tests.log" | head -60
  status_tests="$(grep -E 'tests passed' "$OUT_DIR/gpu_tests.log" | tail -1) (rc $rc)"
  # CTest counts a skipped test as passed; here a skip means the GPU path did not run.
  skipped=$(grep -c '(Skipped)' "$OUT_DIR/gpu_tests.log")
  [ "$skipped" -gt 0 ] && status_tests="$status_tests, $skipped of them SKIPPED"
  [ "$rc" = 0 ] && [ "$skipped" = 0 ] || failed=1
fi
if want tests || want tests-share; then
  [ "$status_tests" = "not run" ] && status_tests="whole-GPU pass not run"
  # The engines again as an MPS client with a 30% SM share: cuBLASLt chooses its algorithms by
  # the SM count it sees, so a split must not change the numerics beyond bf16 rounding.
  # Planned for the whole GPU, as the orchestrator has its workers do (PI0_GEMM_PLAN_SMS).
  # "[gpu]~[mps]", not "~[mps]": Catch2 2's exclusion-only filter also runs the hidden probes.
  # Without a daemon the share would not apply and the pass would run on the whole GPU.
  device_sms="$("$BIN/pi0_bench" --sm-count)" || { echo "gpu_check: pi0_bench --sm-count failed"; failed=1; }
  if bash "$ROOT/scripts/start_mps.sh" >/dev/null; then
    PI0_GEMM_PLAN_SMS="$device_sms" CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30 \
      "$PI0_BUILD_DIR/tests/pi0_gpu_tests" "[gpu]~[mps]" >"$OUT_DIR/gpu_tests_30pct.log" 2>&1
    rc30=$?
    [ "$daemon_before" = 1 ] || bash "$ROOT/scripts/stop_mps.sh" >/dev/null
    grep -E "FAILED|rel error [0-9.e+-]+$" "$OUT_DIR/gpu_tests_30pct.log" | grep -E "FAILED|e-0[01]" | head -20
    status_tests="$status_tests; at a 30% MPS share: $(grep -E '^(test cases|All tests passed)' "$OUT_DIR/gpu_tests_30pct.log" | tail -1) (rc $rc30)"
    [ "$rc30" = 0 ] || failed=1
  else
    status_tests="$status_tests; the 30% MPS pass NOT RUN: the MPS daemon did not start"
    failed=1
  fi
fi

if want bench; then
  "$BIN/pi0_bench" --json "$OUT_DIR/bench.json" --log-level info >"$OUT_DIR/bench.log" 2>&1
  rc=$?
  tail -30 "$OUT_DIR/bench.log"
  status_bench="rc $rc"
  [ "$rc" = 0 ] || failed=1
  # Where the time goes (V=2), and the alternatives each left opt-in or opt-out, on this GPU.
  # Each must run: one that fails fails the step (its line names it in bench_extra.log).
  extras_failed=0
  extra() {
    "$@" || { echo "gpu_check: the run above failed (rc $?)"; extras_failed=$((extras_failed + 1)); }
  }
  {
    extra "$BIN/pi0_bench" --case 2,63,0 --iters 50 --breakdown
    echo "== encoder vision attention as GEMMs + softmax (PI0_VISION_ATTENTION=gemm)"
    PI0_VISION_ATTENTION=gemm extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== encoder lm attention in the fused kernel (PI0_LM_ATTENTION=fused)"
    PI0_LM_ATTENTION=fused extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== kernels handed over at completion only (PI0_KERNEL_HANDOVER=completion)"
    PI0_KERNEL_HANDOVER=completion extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== without a GEMM table (PI0_GEMM_TABLE=): cuBLASLt's heuristic choices"
    PI0_GEMM_TABLE= extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== decoder without the L2 weight prefetch (PI0_DECODER_PREFETCH=0)"
    PI0_DECODER_PREFETCH=0 extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== decoder's work between flow steps as six nodes (PI0_DECODER_STEP_GLUE=0)"
    PI0_DECODER_STEP_GLUE=0 extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== decoder qkv product, norm, RoPE and K/V write as one kernel (PI0_DECODER_QKV_ROPE=1)"
    PI0_DECODER_QKV_ROPE=1 extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== decoder attention as GEMMs + softmax in every step (PI0_DECODER_ATTENTION=gemm)"
    PI0_DECODER_ATTENTION=gemm extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== decoder attention in the fused kernel (PI0_DECODER_ATTENTION=fused)"
    PI0_DECODER_ATTENTION=fused extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== decoder attention in the tiled kernels (PI0_DECODER_ATTENTION=tiled)"
    PI0_DECODER_ATTENTION=tiled extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== attention as GEMMs where the keys are unaligned (PI0_DECODER_ATTENTION=gemm PI0_LM_ATTENTION=gemm)"
    PI0_DECODER_ATTENTION=gemm PI0_LM_ATTENTION=gemm extra "$BIN/pi0_bench" --case 2,50,20 --iters 200
    echo "== decoder weight GEMMs on the skinny kernel (PI0_DECODER_SKINNY=1)"
    PI0_DECODER_SKINNY=1 extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
    echo "== decoder layers in the persistent kernel (PI0_DECODER_LAYERS=1)"
    PI0_DECODER_LAYERS=1 extra "$BIN/pi0_bench" --case 2,63,0 --iters 200
  } >"$OUT_DIR/bench_extra.log" 2>&1
  grep -E "breakdown|^== |^V=2 C=(63 P=0|50 P=20) |^gpu_check:" "$OUT_DIR/bench_extra.log"
  if [ "$extras_failed" != 0 ]; then
    status_bench="$status_bench; $extras_failed of the alternatives' runs FAILED (bench_extra.log)"
    failed=1
  fi
  grep -A12 "decoder breakdown" "$OUT_DIR/bench_extra.log" | head -13
fi

if want gemm-sweep; then
  # Both skinny GEMM mainloops (mma.sync, wgmma) over every tile and split, on the decoder's shapes.
  "$PI0_BUILD_DIR/tests/pi0_gpu_tests" "[.sweep]" >"$OUT_DIR/gemm_sweep.log" 2>&1 || failed=1
  grep -E "<- plan|failed" "$OUT_DIR/gemm_sweep.log"
fi

if want sweep; then
  # Workers log warnings only (e.g. a GEMM that falls back to a slower kernel at some share).
  "$BIN/orchestrator" --sweep --frames "${PI0_SWEEP_FRAMES:-300}" --warmup 20 ${PI0_SWEEP_ARGS:-} \
    --latency-budget-ms "${PI0_LATENCY_BUDGET_MS:-25}" --json "$OUT_DIR/sweep.json" \
    --plot "$OUT_DIR/sweep.svg" --log-level warn >"$OUT_DIR/sweep.log" 2>&1
  rc=$?
  status_sweep="rc $rc"
  [ "$rc" = 0 ] || failed=1
  runs_failed=0  # of the runs after the sweep; each that fails fails the step
  # Open loop at camera rates (the run's report goes to rates.log).
  : >"$OUT_DIR/rates.log"
  : >"$OUT_DIR/sequential.log"
  # At the split asked for (50/50 unless PI0_RATE_ENC/DEC say) and at 100/100, which at a camera
  # rate has the lower latency.
  rate_splits=("${PI0_RATE_ENC:-50} ${PI0_RATE_DEC:-50}")
  [ "${rate_splits[0]}" != "100 100" ] && rate_splits+=("100 100")
  for split in "${rate_splits[@]}"; do
    for hz in 30 60; do
      echo "== $hz Hz at ${split/ //}" >>"$OUT_DIR/rates.log"
      "$BIN/orchestrator" --rate "$hz" --frames 150 --warmup 10 --quiet-workers ${PI0_RATE_ARGS:-} \
        --encoder-pct "${split% *}" --decoder-pct "${split#* }" >>"$OUT_DIR/rates.log" 2>&1 ||
        { echo "gpu_check: $hz Hz run at ${split/ //} failed (rc $?)" | tee -a "$OUT_DIR/rates.log"
          runs_failed=$((runs_failed + 1)); }
    done
  done
  grep -E "^== |camera rate|latency p|throughput" "$OUT_DIR/rates.log"
  # Sequential 100/100, the latency comparison with the single process, under each wait policy
  # of the host's processes: adaptive (the default), asleep, spinning.
  for wait in adaptive sleep spin; do
    echo "== sequential 100/100 --wait $wait" >>"$OUT_DIR/sequential.log"
    "$BIN/orchestrator" --mode sequential --encoder-pct 100 --decoder-pct 100 --frames 300 \
      --warmup 20 --quiet-workers --wait "$wait" >>"$OUT_DIR/sequential.log" 2>&1 ||
      { echo "gpu_check: sequential run --wait $wait failed (rc $?)" | tee -a "$OUT_DIR/sequential.log"
        runs_failed=$((runs_failed + 1)); }
  done
  grep -E "^== sequential|latency p50|latency p99|error" "$OUT_DIR/sequential.log"
  # The decoder worker's attention in flow steps 2-10: wgmma (its default at a share of 50% or
  # more) against the GEMMs (bench/NOTES.md v23: +4.7% frames/s at 50/50, parity sequential).
  : >"$OUT_DIR/worker_attention.log"
  for att in gemm wgmma; do
    for mode in "concurrent --encoder-pct 50 --decoder-pct 50" "sequential --encoder-pct 100 --decoder-pct 100"; do
      echo "== worker attention $att, $mode" >>"$OUT_DIR/worker_attention.log"
      PI0_DECODER_ATTENTION=$att "$BIN/orchestrator" --mode $mode --frames 200 --warmup 20 \
        --quiet-workers >>"$OUT_DIR/worker_attention.log" 2>&1 ||
        { echo "gpu_check: worker attention run failed (rc $?)" | tee -a "$OUT_DIR/worker_attention.log"
          runs_failed=$((runs_failed + 1)); }
    done
  done
  grep -E "^== worker|latency p50|throughput|error" "$OUT_DIR/worker_attention.log"
  if [ "$runs_failed" != 0 ]; then
    status_sweep="$status_sweep; $runs_failed of the rate, sequential and worker attention runs FAILED"
    failed=1
  fi
fi

echo
echo "================ gpu_check summary ($(date -u +%FT%TZ)) ================"
echo "GEMM table: ${PI0_GEMM_TABLE:-none}"
echo "gpu tests : $status_tests"
echo "benchmark : $status_bench"
# Only this run's tables: $OUT may hold an earlier run's logs.
want bench && sed -n '/^== table/,$p' "$OUT_DIR/bench.log"
echo "sweep     : $status_sweep"
want sweep && sed -n '/^== split sweep/,$p' "$OUT_DIR/sweep.log"
exit "$failed"
