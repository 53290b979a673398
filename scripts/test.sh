#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite. Tests tagged [gpu] report
# "Skipped" (with the reason) where no CUDA GPU is present.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
pi0_build
cd "$PI0_BUILD_DIR"
ctest --output-on-failure --timeout 600 "$@"
