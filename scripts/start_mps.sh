#!/usr/bin/env bash
# Starts the CUDA MPS control daemon if none answers on the pipe directory (idempotent), then
# prints its status. The orchestrator adopts a daemon started this way and leaves it running.
#   CUDA_MPS_PIPE_DIRECTORY (default /tmp/nvidia-mps), CUDA_MPS_LOG_DIRECTORY (default /tmp/nvidia-mps-log)
set -euo pipefail
script=start_mps
# shellcheck source=mps_control.sh
source "$(dirname "${BASH_SOURCE[0]}")/mps_control.sh"
if daemon_running; then
  echo "start_mps: MPS control daemon already running (pipe $CUDA_MPS_PIPE_DIRECTORY)"
else
  # The daemon (often root's) writes into these: as the orchestrator does, start it only in
  # directories that are ours or root's and writable by no one else, made 0755 whatever the umask
  # (a umask of 002 would leave them group-writable, and the orchestrator would then refuse them).
  for dir in "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"; do
    # shellcheck disable=SC2174  # the mode is for the directory itself, not its parents
    mkdir -p -m 0755 "$dir"
    owner_mode="$(stat -L -c '%u %a' "$dir")"
    if { [ "${owner_mode% *}" != "$(id -u)" ] && [ "${owner_mode% *}" != 0 ]; } ||
      (( 8#${owner_mode#* } & 8#022 )); then
      echo "start_mps: $dir belongs to another user or is writable by others; remove it or set" \
        "CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY to another" >&2
      exit 1
    fi
  done
  # Started by hand, not by a run: no run may take it for its own and quit it.
  rm -f "$(realpath -m "$CUDA_MPS_PIPE_DIRECTORY").pi0/started-by-run"
  ask -d || { echo "start_mps: $control -d failed (exit $?)" >&2; exit 1; }
  # One that does not answer within the deadline ends the script (daemon_running), not each of
  # these tries in turn.
  for _ in $(seq 1 100); do
    daemon_running && break
    sleep 0.05
  done
  daemon_running || { echo "start_mps: daemon does not answer" >&2; exit 1; }
  echo "start_mps: started MPS control daemon (pipe $CUDA_MPS_PIPE_DIRECTORY, log $CUDA_MPS_LOG_DIRECTORY)"
fi
servers="$(echo get_server_list | ask)" || not_answering
echo "start_mps: servers: $(echo "$servers" | tr '\n' ' ')"
