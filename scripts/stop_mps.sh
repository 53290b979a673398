#!/usr/bin/env bash
# Stops the CUDA MPS control daemon on the pipe directory if one answers (idempotent).
set -euo pipefail
export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}"
export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-mps-log}"
control="${NVIDIA_MPS_CONTROL:-nvidia-cuda-mps-control}"
command -v "$control" >/dev/null || { echo "stop_mps: $control not found (it ships with the NVIDIA driver)" >&2; exit 1; }
if echo get_server_list | "$control" >/dev/null 2>&1; then
  echo quit | "$control"
  for _ in $(seq 1 100); do
    echo get_server_list | "$control" >/dev/null 2>&1 || break
    sleep 0.05
  done
  if echo get_server_list | "$control" >/dev/null 2>&1; then
    echo "stop_mps: daemon still answering after quit" >&2; exit 1
  fi
  rm -f "$(realpath -m "$CUDA_MPS_PIPE_DIRECTORY").pi0/started-by-run"  # the mark of a run's daemon, now gone
  echo "stop_mps: stopped MPS control daemon (pipe $CUDA_MPS_PIPE_DIRECTORY)"
else
  echo "stop_mps: no MPS control daemon running (pipe $CUDA_MPS_PIPE_DIRECTORY)"
fi
