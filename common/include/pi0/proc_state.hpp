// The state letter the kernel gives a process in /proc/<pid>/stat ('R', 'S', 'D', 'Z', ...),
// for the liveness checks of the workers, the orchestrator and the tests. Header-only: it needs
// nothing but the C library.
#pragma once

#include <cstdio>
#include <cstring>

namespace pi0 {

// '\0' when there is no such process or no /proc to ask.
inline char proc_state(int pid) {
  if (pid <= 0) return '\0';
  char path[32];
  std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
  std::FILE* f = std::fopen(path, "re");  // close-on-exec: children spawned meanwhile
  if (f == nullptr) return '\0';
  // "pid (comm) S ...": comm (16 bytes, 64 for some kernel threads) may hold spaces and ')', so the
  // state follows the last ')'.
  char stat[128];
  const size_t n = std::fread(stat, 1, sizeof stat - 1, f);
  std::fclose(f);
  stat[n] = '\0';
  const char* name_end = std::strrchr(stat, ')');
  if (name_end == nullptr || name_end[1] != ' ') return '\0';
  return name_end[2];
}

}  // namespace pi0
