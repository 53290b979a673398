// decoder_worker: the action expert's flow-matching steps; started by the orchestrator.
#include "pi0/decoder_worker.hpp"

int main(int argc, char** argv) {
  return pi0::ipc::run_worker_main(pi0::ipc::Role::kDecoder, argc, argv, pi0::run_decoder_worker);
}
