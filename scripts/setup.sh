#!/usr/bin/env bash
# Sourced by run.sh, test.sh and gpu_check.sh: installs what the build needs when it is missing
# (Debian/Ubuntu packages), then configures and builds into $PI0_BUILD_DIR (default: build/).
# Extra CMake arguments: PI0_CMAKE_ARGS.
set -euo pipefail

PI0_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PI0_BUILD_DIR="${PI0_BUILD_DIR:-$PI0_ROOT/build}"
PI0_PACKAGES=(cmake g++ make libboost-dev libspdlog-dev libcli11-dev catch2 nlohmann-json3-dev)

pi0_have_dependencies() {
  command -v cmake >/dev/null && command -v g++ >/dev/null && command -v make >/dev/null &&
    [ -d /usr/include/boost/interprocess ] && [ -d /usr/include/spdlog ] &&
    [ -f /usr/include/CLI/CLI.hpp ] && [ -d /usr/include/nlohmann ] &&
    { [ -f /usr/include/catch2/catch.hpp ] || [ -f /usr/include/catch2/catch_test_macros.hpp ]; }
}

pi0_install_dependencies() {
  if pi0_have_dependencies; then return 0; fi
  echo "setup: installing build dependencies: ${PI0_PACKAGES[*]}"
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${PI0_PACKAGES[@]}" >/dev/null
  pi0_have_dependencies || { echo "setup: dependencies still missing after apt-get" >&2; return 1; }
}

pi0_find_cuda() {
  if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
      export CUDACXX=/usr/local/cuda/bin/nvcc
    else
      echo "setup: the CUDA toolkit (nvcc) is required: install it at /usr/local/cuda" >&2
      return 1
    fi
  fi
}

# Each step returns on failure by itself: a caller's `if ! pi0_build` turns errexit off inside.
pi0_build() {
  pi0_install_dependencies || return 1
  pi0_find_cuda || return 1
  local jobs
  jobs="$(nproc 2>/dev/null || echo 2)"
  # shellcheck disable=SC2086
  cmake -S "$PI0_ROOT" -B "$PI0_BUILD_DIR" -DCMAKE_BUILD_TYPE=Release ${PI0_CMAKE_ARGS:-} \
    >/dev/null || return 1
  cmake --build "$PI0_BUILD_DIR" -j "$jobs"
}
