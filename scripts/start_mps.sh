#!/usr/bin/env bash
# Starts the CUDA MPS control daemon if none answers on the pipe directory (idempotent), then
# prints its status. The orchestrator adopts a daemon started this way and leaves it running.
#   CUDA_MPS_PIPE_DIRECTORY (default /tmp/nvidia-mps), CUDA_MPS_LOG_DIRECTORY (default /tmp/nvidia-mps-log)
set -euo pipefail
export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}"
export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-mps-log}"
control="${NVIDIA_MPS_CONTROL:-nvidia-cuda-mps-control}"
command -v "$control" >/dev/null || { echo "start_mps: $control not found (it ships with the NVIDIA driver)" >&2; exit 1; }
if echo get_server_list | "$control" >/dev/null 2>&1; then
  echo "start_mps: MPS control daemon already running (pipe $CUDA_MPS_PIPE_DIRECTORY)"
else
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  # Started by hand, not by a run: no run may take it for its own and quit it.
  rm -f "$(realpath -m "$CUDA_MPS_PIPE_DIRECTORY").pi0/started-by-run"
  "$control" -d
  for _ in $(seq 1 100); do
    echo get_server_list | "$control" >/dev/null 2>&1 && break
    sleep 0.05
  done
  echo get_server_list | "$control" >/dev/null 2>&1 || { echo "start_mps: daemon does not answer" >&2; exit 1; }
  echo "start_mps: started MPS control daemon (pipe $CUDA_MPS_PIPE_DIRECTORY, log $CUDA_MPS_LOG_DIRECTORY)"
fi
echo "start_mps: servers: $(echo get_server_list | "$control" | tr '\n' ' ')"
