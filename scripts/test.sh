#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite. Tests tagged [gpu] report
# "Skipped" (with the reason) where no CUDA GPU is present.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
pi0_build
cd "$PI0_BUILD_DIR"
# Say up front why the [gpu] tests will show as Skipped (the runner prints the reason, exit 77).
gpu_probe="$(./tests/pi0_gpu_tests "[none]" 2>&1 || true)"
if [[ "$gpu_probe" == SKIPPED* ]]; then
  echo "test: $(ctest -N -L gpu | grep -c 'Test *#') [gpu] tests will be reported as Skipped: ${gpu_probe#SKIPPED: }"
fi
ctest --output-on-failure --timeout 600 "$@"
