#!/usr/bin/env bash
# Stops the CUDA MPS control daemon on the pipe directory if one answers (idempotent).
set -euo pipefail
script=stop_mps
# shellcheck source=mps_control.sh
source "$(dirname "${BASH_SOURCE[0]}")/mps_control.sh"
if daemon_running; then
  echo quit | ask || not_answering
  # Gone once a request fails at once; one that does not answer in time is still there (e.g.
  # waiting for its clients), and ends the script (daemon_running).
  for _ in $(seq 1 100); do
    daemon_running || break
    sleep 0.05
  done
  if daemon_running; then
    echo "stop_mps: daemon still answering after quit" >&2; exit 1
  fi
  rm -f "$(realpath -m "$CUDA_MPS_PIPE_DIRECTORY").pi0/started-by-run"  # the mark of a run's daemon, now gone
  echo "stop_mps: stopped MPS control daemon (pipe $CUDA_MPS_PIPE_DIRECTORY)"
else
  echo "stop_mps: no MPS control daemon running (pipe $CUDA_MPS_PIPE_DIRECTORY)"
fi
