#!/usr/bin/env bash
# Installs what is missing, builds, and runs the orchestrator (arguments are passed on).
# Without a GPU it runs the tiny model on the CPU backend and says so.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
pi0_build >/dev/null
exec "$PI0_BUILD_DIR/bin/orchestrator" "$@"
