#!/usr/bin/env bash
# Stops the CUDA MPS control daemon on the pipe directory if one answers (idempotent).
set -euo pipefail
export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}"
export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-mps-log}"
control="${NVIDIA_MPS_CONTROL:-nvidia-cuda-mps-control}"
command -v "$control" >/dev/null || { echo "stop_mps: $control not found (it ships with the NVIDIA driver)" >&2; exit 1; }
# Every request to the control program has a deadline, as the orchestrator's do: a wedged daemon
# must not hang the script. PI0_MPS_TIMEOUT_S (default 10) seconds a request.
deadline="${PI0_MPS_TIMEOUT_S:-10}"
ask() { timeout "$deadline" "$control" "$@"; }
# 0: a daemon answers; 124: one may be there and did not answer in time; else: none.
answers() { echo get_server_list | ask >/dev/null 2>&1; }
not_answering() {
  echo "stop_mps: the MPS control daemon (pipe $CUDA_MPS_PIPE_DIRECTORY) did not answer within" \
    "$deadline s" >&2
  exit 1
}
rc=0
answers || rc=$?
[ "$rc" = 124 ] && not_answering
if [ "$rc" = 0 ]; then
  echo quit | ask || not_answering
  for _ in $(seq 1 100); do
    answers || break
    sleep 0.05
  done
  if answers; then
    echo "stop_mps: daemon still answering after quit" >&2; exit 1
  fi
  rm -f "$(realpath -m "$CUDA_MPS_PIPE_DIRECTORY").pi0/started-by-run"  # the mark of a run's daemon, now gone
  echo "stop_mps: stopped MPS control daemon (pipe $CUDA_MPS_PIPE_DIRECTORY)"
else
  echo "stop_mps: no MPS control daemon running (pipe $CUDA_MPS_PIPE_DIRECTORY)"
fi
