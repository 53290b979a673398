// encoder_worker: SigLIP + Gemma prefix over the camera views; started by the orchestrator.
#include "pi0/encoder_worker.hpp"

int main(int argc, char** argv) {
  return pi0::ipc::run_worker_main(pi0::ipc::Role::kEncoder, argc, argv, pi0::run_encoder_worker);
}
