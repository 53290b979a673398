// orchestrator: the command users launch (see README.md).
#include "pi0/orchestrator.hpp"

int main(int argc, char** argv) { return pi0::orchestrator_main(argc, argv); }
