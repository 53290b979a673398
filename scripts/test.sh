#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite (arguments go to CTest: -L cpu
# runs the CPU tests alone). Tests tagged [gpu] report "Skipped" (with the reason) where no CUDA
# GPU is present.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
pi0_build
cd "$PI0_BUILD_DIR"
# Say up front why the [gpu] tests will show as Skipped (the runner prints the reason, exit 77):
# those this run selects, since the arguments go to CTest (-L cpu or -LE gpu select none).
test_names() { ctest -N "$@" | sed -n 's/^ *Test *#[0-9]*: //p'; }
gpu_selected="$(grep -cxFf <(test_names -L gpu) <(test_names "$@") || true)"
skip_reason=""
if [ "${gpu_selected:-0}" -gt 0 ]; then
  gpu_probe="$(./tests/pi0_gpu_tests "[none]" 2>&1 || true)"
  if [[ "$gpu_probe" == SKIPPED* ]]; then
    skip_reason="${gpu_probe#SKIPPED: }"
    tests="tests"
    [ "$gpu_selected" = 1 ] && tests="test"
    echo "test: $gpu_selected [gpu] $tests will be reported as Skipped: $skip_reason"
  fi
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
ctest --output-on-failure --timeout 600 "$@" | tee "$log" || status=$?
# CTest's own summary counts a skipped test as passed; say it in one line, last.
total="$(sed -n 's/.* tests failed out of \([0-9]*\)$/\1/p' "$log" | tail -1)"
failed="$(sed -n 's/.* \([0-9]*\) tests failed out of [0-9]*$/\1/p' "$log" | tail -1)"
skipped="$(grep -c '(Skipped)' "$log" || true)"
if [ -n "$total" ] && [ -n "$failed" ]; then
  reason=""
  if [ "$skipped" -gt 0 ] && [ -n "$skip_reason" ]; then reason=" ($skip_reason)"; fi
  echo "test: $((total - failed - skipped)) passed, $failed failed, $skipped skipped$reason"
fi
exit "$status"
