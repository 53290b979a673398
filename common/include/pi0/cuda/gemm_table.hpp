// Tuned GEMM choices that every process can share. For each GEMM shape (GemmShape::describe())
// the table names which of cuBLASLt's heuristic candidates autotuning kept, and that candidate's
// description (algorithm, tile, stages, split-K, cluster), which the Gemm compares with what the
// heuristic offers where it is read: the same list comes back for the same GPU, SM plan and
// cuBLASLt, and an entry that no longer matches is ignored. Autotuning in each process would pick
// by timing, so two processes could differ in the last bits; reading one table they cannot.
//
// File: one entry a line, `shape <TAB> candidate <TAB> description`; `#` starts a comment line.
// Written by `pi0_bench --autotune-decoder --write-gemm-table FILE`, read by every Gemm of a
// process whose environment has PI0_GEMM_TABLE=FILE (the orchestrator's workers inherit it).
#pragma once

#include <cstddef>
#include <iosfwd>
#include <map>
#include <string>

namespace pi0::cuda {

struct GemmChoice {
  int candidate = 0;  // index into the heuristic's list, 0 .. kMaxGemmCandidates - 1
  std::string algo;   // describe_algo() of that candidate where it was tuned
};

// The most heuristic candidates a Gemm asks cuBLASLt for.
inline constexpr int kMaxGemmCandidates = 32;

class GemmTable {
 public:
  // Throws pi0::Error naming `source` and the line of the first malformed entry.
  static GemmTable parse(std::istream& in, const std::string& source);
  // Throws pi0::Error naming the path when it cannot be read or does not parse.
  static GemmTable load(const std::string& path);
  void write(std::ostream& out) const;
  // Writes to a temporary file beside `path`, then renames it over `path`.
  void save(const std::string& path) const;

  void set(const std::string& shape, GemmChoice choice);
  const GemmChoice* find(const std::string& shape) const;
  size_t size() const { return entries_.size(); }

 private:
  std::map<std::string, GemmChoice> entries_;
};

// The table named by PI0_GEMM_TABLE, loaded at the first call; null when the variable is unset or
// empty. Throws pi0::Error when the file cannot be loaded (a named table that is not there is a
// configuration mistake, not a reason to run untuned in silence).
const GemmTable* process_gemm_table();

// Tests: process_gemm_table() returns `table` (null: none) while this lives, whatever
// PI0_GEMM_TABLE says. Not for use while other threads construct Gemms.
class ScopedGemmTable {
 public:
  explicit ScopedGemmTable(const GemmTable* table);
  ~ScopedGemmTable();
  ScopedGemmTable(const ScopedGemmTable&) = delete;
  ScopedGemmTable& operator=(const ScopedGemmTable&) = delete;

 private:
  const GemmTable* previous_;
  bool had_previous_;
};

// Choices autotuning made in this process (Gemm::autotune records each), for --write-gemm-table.
GemmTable tuned_gemm_choices();
void record_tuned_gemm_choice(const std::string& shape, const GemmChoice& choice);

}  // namespace pi0::cuda
