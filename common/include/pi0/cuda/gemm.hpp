// Row-major GEMM on cuBLASLt: Y[m, n] (+)= alpha * X[m, k] @ W[k, n] (+ bias[n]) (then GELU),
// bf16 operands, fp32 accumulation, bf16 or fp32 output.
//
// cuBLASLt is column-major. A row-major matrix with row stride ld is the column-major transpose
// with the same ld, so Y^T = W^T X^T is computed with A = W (column-major [n, k], or [k, n] used
// transposed when W is given as [n, k]), B = X (column-major [k, m]) and D = Y (column-major
// [n, m]). The bias of the epilogue runs along D's rows, i.e. along Y's columns, as wanted.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "pi0/cuda/gemm_table.hpp"
#include "pi0/cuda/skinny_gemm.hpp"

namespace pi0::cuda {

enum class DType { kBf16, kF32 };
enum class Epilogue { kNone, kBias, kGeluBias };  // GELU is the tanh approximation

struct GemmShape {
  int m = 0, n = 0, k = 0;
  int ld_x = 0, ld_w = 0, ld_y = 0;  // row strides in elements
  bool w_transposed = false;         // W stored [n, k] row-major: computes X @ W^T
  DType y_type = DType::kBf16;       // bias, when present, has the same type as Y
  Epilogue epilogue = Epilogue::kNone;
  bool accumulate = false;  // Y += ... (beta = 1); Y is read and written in place
  float alpha = 1.0f;
  int batch = 1;  // strided batches; strides in elements
  int64_t stride_x = 0, stride_w = 0, stride_y = 0;
  // The least alignment, in bytes, of every pointer given to run(): kernels that need more are not
  // considered. Row strides must keep every row at this alignment too.
  int alignment = 256;
  // Sets apart GEMMs of one shape that run in different surroundings, so that a GEMM table can
  // choose for each (the decoder's first flow step runs beside the encoder): part of describe().
  std::string role;

  std::string describe() const;
  double flops() const { return 2.0 * m * n * k * batch; }
};

// A linear layer: Y[m, n] (row stride ld_y, default n) = X[m, k] @ W[k, n], row-major [in, out]
// weights, with `epilogue`; accumulate: Y += ....
GemmShape linear_shape(int m, int n, int k, DType y_type, Epilogue epilogue, bool accumulate,
                       int ld_y = 0);

class Gemm {
 public:
  Gemm() = default;
  // Picks the heuristic's best algorithm for `shape` now, so that run() does no planning (it is
  // called while capturing graphs): the first of cuBLASLt's candidates that matches a plain
  // reference GEMM on random operands, or the configuration the process's GEMM table names for
  // the shape (PI0_GEMM_TABLE, pi0/cuda/gemm_table.hpp), listed or built, where cuBLASLt accepts
  // it here and it checks out (the table applies only where a fused-epilogue candidate checks
  // out);
  // failing that, the same with bias / GELU in a kernel of their own; failing that, our skinny
  // tensor-core kernel (pi0/cuda/skinny_gemm.hpp) where it runs the shape, and last the (slow)
  // plain kernel itself, with a warning. With the environment variable PI0_GEMM_PLAN_SMS=N,
  // cuBLASLt chooses for N SMs instead of the SM count the process sees (an MPS client sees its
  // share). `workspace` is shared by every Gemm on one stream.
  Gemm(cublasLtHandle_t handle, const GemmShape& shape, void* workspace, size_t workspace_bytes);
  ~Gemm();
  Gemm(Gemm&& other) noexcept;
  Gemm& operator=(Gemm&& other) noexcept;
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // x, w: bf16; y: bf16 or fp32 per shape.y_type; bias: same type as y, or nullptr without a bias
  // epilogue. Throws pi0::Error on a misaligned pointer or a failed launch.
  void run(const void* x, const void* w, void* y, const void* bias, cudaStream_t stream);

  struct AutotuneOptions {
    // Time at most this many candidates, from the first one that checks out.
    int max_candidates = 32;
    // Widen the list first (widen_candidates()) and time all of it; the fastest few are then
    // timed again, longer, before one is kept.
    bool wide = false;
    // Time over this many weight matrices, w + i * weight_stride bf16 elements, as a stage's
    // layers read theirs one after another: one matrix, launch after launch, stays in L2, which
    // flatters some algorithms over others. (The decoder's L2 prefetch brings part of each
    // layer's weights into L2 ahead of use: neither timing is the stage exactly.)
    int weight_copies = 1;
    size_t weight_stride = 0;
    // These options, timed over `copies` weight matrices `stride` elements apart.
    AutotuneOptions over_layers(int copies, size_t stride) const {
      AutotuneOptions o = *this;
      o.weight_copies = copies;
      o.weight_stride = stride;
      return o;
    }
  };
  // Times candidates on these operands, each as a CUDA graph of launches (as the engines run
  // them), and keeps the fastest that passes the same check. Y is overwritten (and, when
  // accumulating, grows); call it before real data is there. Off by default: a timing-based
  // choice can differ between processes, and with it the bits of the result (a GEMM table,
  // gemm_table.hpp, carries one process's choice to the others).
  void autotune(const void* x, const void* w, void* y, const void* bias, cudaStream_t stream,
                const AutotuneOptions& options);
  // What autotune() ranks: the fastest `count` candidates that check out, fastest first, with
  // their time per launch (ms), timed as autotune() times them; run()'s choice is unchanged.
  std::vector<std::pair<float, int>> rank_candidates(const void* x, const void* w, void* y,
                                                     const void* bias, cudaStream_t stream,
                                                     const AutotuneOptions& options, int count);
  // run() uses candidate c from now on if it checks out (or is known to); false, and no change,
  // otherwise. For tuning a stage in place (pi0_bench --autotune-inplace).
  bool select_candidate(int c);
  // run() uses the configuration `other` runs (a Gemm of the same shape), listed or built, if
  // it checks out here; false, and no change, otherwise.
  bool select_like(const Gemm& other);
  // Records run()'s choice for a GEMM table (gemm_table.hpp), where it is a cuBLASLt candidate
  // with the fused epilogue.
  void record_choice() const;
  // Appends, after the heuristic's candidates, the configurations cuBLASLt's heuristic gives per
  // algorithm id and their variants in split-K (2, 3, 4, 6, 8; two reduction schemes) and cluster
  // shape (1x1, 2x1, 1x2), each accepted by cublasLtMatmulAlgoCheck for this shape's alignment;
  // returns how many it added. Only on the fused-epilogue cuBLASLt tier (0 elsewhere). For
  // autotuning: none of them is checked against the reference here.
  int widen_candidates();

  const GemmShape& shape() const { return shape_; }
  // True when no fast path computes this shape correctly here and the plain kernel runs it.
  bool on_builtin_kernel() const { return chosen_ == kBuiltinPath; }
  // Which tier runs it: "cublaslt", "cublaslt+epilogue" (bias / GELU in their own kernel),
  // "skinny" (our tensor-core kernel) or "builtin" (the plain checking kernel).
  const char* path_name() const {
    return chosen_ == kBuiltinPath  ? "builtin"
           : chosen_ == kSkinnyPath ? "skinny"
           : separate_epilogue_     ? "cublaslt+epilogue"
                                    : "cublaslt";
  }
  int candidates() const { return static_cast<int>(candidates_.size()); }
  // The candidate run() uses (-1 on the skinny or built-in tiers): one of the heuristic's, or one
  // appended after them (a table's built configuration, a widened or clusterless one); and a
  // candidate's description, as a GEMM table names it (gemm_table.hpp).
  int chosen_candidate() const { return chosen_ >= 0 ? chosen_ : -1; }
  std::string describe_candidate(int candidate) const;

 private:
  void release() noexcept;
  // Asks cuBLASLt for candidates, with the bias / GELU epilogue fused or (separate_epilogue)
  // left to apply_bias_epilogue after the product.
  void plan(bool separate_epilogue);
  // Runs candidate `c` on random operands: its relative difference from reference_gemm
  // (gemm_check.hpp), infinite when it fails to run.
  double verify(int c);
  int first_verified(int from = 0);  // -1 if none
  // Moves chosen_ to the process's GEMM table's configuration for this shape (gemm_table.hpp),
  // found among the candidates or built, where cuBLASLt accepts it here and it checks out.
  void apply_table_choice();
  // The candidate with this configuration's description, appended when cuBLASLt accepts it for
  // this shape and it is not listed yet; -1 when it does not.
  int find_or_add(const GemmAlgoConfig& config);
  // Appends `config` where cuBLASLt runs it for this shape here, with the operands' alignment and
  // the workspace, and returns its index; -1 where it does not.
  int append_if_accepted(const GemmAlgoConfig& config);
  // cuBLASLt's preferences for this shape: workspace, operand alignment, and `search_mode`.
  cublasLtMatmulPreference_t make_preference(uint32_t search_mode) const;
  // Time per launch (ms) of candidate c, as `graphs` replays of a graph of launches; NaN when it
  // cannot run.
  float time_candidate(int c, const void* x, const void* w, void* y, const void* bias,
                       cudaStream_t stream, const AutotuneOptions& options, int graphs);
  int add_clusterless_variants();  // returns the index of the first one added
  double tolerance() const;
  // Plans the fallback on our skinny tensor-core kernel; false where it cannot run this shape.
  bool plan_skinny_fallback();
  // Values of chosen_ (and of launch()'s candidate) besides cuBLASLt's candidates 0, 1, ...
  static constexpr int kNotChosen = -1;
  static constexpr int kSkinnyPath = -2;   // skinny_gemm + apply_bias_epilogue
  static constexpr int kBuiltinPath = -3;  // simple_gemm (gemm_check.hpp)
  void launch(int candidate, const void* x, const void* w, void* y, const void* bias,
              cudaStream_t stream);

  cublasLtHandle_t handle_ = nullptr;
  GemmShape shape_{};
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, d_ = nullptr;
  std::vector<cublasLtMatmulHeuristicResult_t> candidates_;
  int chosen_ = kNotChosen;
  int first_checked_ = kNotChosen;  // first_verified()'s pick in the first plan, before a table's
  int offered_ = 0;  // the heuristic's candidates; built, widened and clusterless ones follow
  bool separate_epilogue_ = false;
  SkinnyShape skinny_{};  // the plan of kSkinnyPath
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
};

// One of a stage's GEMMs, for tuning the stage in place: its candidates ranked alone (fastest
// first, each checked), to be tried one at a time in the stage's own graph.
struct TunableGemm {
  std::string label;
  Gemm* gemm = nullptr;
  std::vector<int> finalists;
  // The decoder's first flow step runs beside the encoder: its GEMMs are tuned by the time of
  // the two stages overlapped, not of the decoder alone.
  bool overlapped = false;
};

// Autotunes `gemm` (Gemm::autotune); with `tunables`, ranks its candidates instead, starts it on
// the fastest alone, records that for a GEMM table and lists its few fastest there under `label`,
// for tuning in place (whose caller records the final choice: Gemm::record_choice).
void autotune_gemm(Gemm& gemm, const void* x, const void* w, void* y, const void* bias,
                   cudaStream_t stream, const Gemm::AutotuneOptions& options, const char* label,
                   std::vector<TunableGemm>* tunables);

// 32 MiB: what NVIDIA recommends for cuBLASLt on Hopper.
inline constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;

}  // namespace pi0::cuda
