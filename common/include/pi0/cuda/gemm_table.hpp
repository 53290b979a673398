// Tuned GEMM choices that every process can share. For each GEMM shape (GemmShape::describe())
// the table names the cuBLASLt configuration autotuning kept (GemmAlgoConfig: algorithm, tile,
// stages, split-K, reduction, swizzle, custom option, inner shape, cluster). A Gemm that reads it
// takes the candidate with that description, or builds that configuration where the heuristic
// did not offer it (a wide search, Gemm::widen_candidates, finds such ones), provided cuBLASLt
// accepts it on this GPU and it passes the reference check; otherwise the entry is ignored with a
// warning. Where no candidate with the fused epilogue checks out at all (some MPS shares), the
// Gemm's fallbacks run and the entry is not looked at. Autotuning in each process would pick by
// timing, so two processes could differ in the last bits; reading one table they cannot.
//
// File: one entry a line, `shape <TAB> candidate <TAB> description`; `#` starts a comment line.
// The candidate is where the configuration stood in the tuning process's list (for the reader of
// the file; the description is what is matched). Written by `pi0_bench --autotune[-decoder]
// [--autotune-wide] --write-gemm-table FILE`, read by every Gemm of a process whose environment
// has PI0_GEMM_TABLE=FILE (the orchestrator's workers inherit it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <map>
#include <optional>
#include <string>

namespace pi0::cuda {

// One cuBLASLt matmul configuration, as cublasLtMatmulAlgoConfigSetAttribute takes it.
struct GemmAlgoConfig {
  int32_t id = 0;
  uint32_t tile = 0, stages = 0;
  int32_t split_k = 1;
  uint32_t reduction = 0, swizzle = 0, custom = 0;
  uint32_t inner = 0, cluster = 0;  // uint16_t in cuBLASLt

  // "algo 66 tile 12 stages 35 split-k 1 reduction 0 swizzle 0 custom 0 inner 0 cluster 2"
  std::string describe() const;
  // Reads describe()'s form (fields in its order, unsigned decimal numbers of up to 9 digits; any
  // whitespace between them); nullopt for anything else (an older table's shorter form, say).
  static std::optional<GemmAlgoConfig> parse(const std::string& text);
  bool operator==(const GemmAlgoConfig& o) const {
    return id == o.id && tile == o.tile && stages == o.stages && split_k == o.split_k &&
           reduction == o.reduction && swizzle == o.swizzle && custom == o.custom &&
           inner == o.inner && cluster == o.cluster;
  }
};

struct GemmChoice {
  int candidate = 0;  // where it stood in the tuning process's list, 0 .. kMaxGemmTableIndex
  std::string algo;   // GemmAlgoConfig::describe() of the configuration
};

// The most heuristic candidates a Gemm asks cuBLASLt for.
inline constexpr int kMaxGemmCandidates = 32;
// A wide search lists up to a few thousand configurations.
inline constexpr int kMaxGemmTableIndex = 9999;
// The longest line a table file may have (its entries are a few hundred characters).
inline constexpr size_t kMaxGemmTableLine = 4096;

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
