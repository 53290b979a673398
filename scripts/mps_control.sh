# Sourced by start_mps.sh and stop_mps.sh (not run by itself): the MPS directories, the control
# program, and requests to it with a deadline. $script names the caller in messages.
export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}"
export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-mps-log}"
control="${NVIDIA_MPS_CONTROL:-nvidia-cuda-mps-control}"
command -v "$control" >/dev/null || {
  echo "$script: $control not found (it ships with the NVIDIA driver)" >&2
  exit 1
}
# Every request to the control program has a deadline, as the orchestrator's do: a wedged daemon
# must not hang the script. PI0_MPS_TIMEOUT_S (default 10) seconds a request.
deadline="${PI0_MPS_TIMEOUT_S:-10}"
# `timeout` refuses anything else (exit 125, which would read as "no daemon"), and takes 0 as none.
if ! [[ "$deadline" =~ ^[0-9]*\.?[0-9]+$ && "$deadline" =~ [1-9] ]]; then
  echo "$script: PI0_MPS_TIMEOUT_S='$deadline': expected a number of seconds above 0" >&2
  exit 1
fi
ask() { timeout "$deadline" "$control" "$@"; }
# 0: a daemon answers; 124: one may be there and did not answer in time; else: none.
answers() { echo get_server_list | ask >/dev/null 2>&1; }
not_answering() {
  echo "$script: the MPS control daemon (pipe $CUDA_MPS_PIPE_DIRECTORY) did not answer within" \
    "$deadline s" >&2
  exit 1
}
# Whether a daemon answers on the pipe directory; one that may be there but does not answer in
# time ends the script.
daemon_running() {
  local rc=0
  answers || rc=$?
  [ "$rc" = 124 ] && not_answering
  return "$rc"
}
