// An environment variable set for one scope, for tests of what a variable switches. Plain C++:
// the CPU tests and the GPU runner (and its dev-subset build, without the orchestrator) share it.
#pragma once

#include <cstdlib>

#include <string>

namespace pi0::test {

// Sets an environment variable (value nullptr: unsets it) for one scope and restores what was
// there before, so that a failed REQUIRE does not leave a path switch on for the tests after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) {
      saved_ = old;
      had_ = true;
    }
    if (value) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (had_) {
      ::setenv(name_, saved_.c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::string saved_;
  bool had_ = false;
};

}  // namespace pi0::test
