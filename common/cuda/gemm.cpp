#include "pi0/cuda/gemm.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include <vector>

#include <spdlog/spdlog.h>

#include "pi0/check.hpp"
#include "pi0/config.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/gemm_check.hpp"
#include "pi0/cuda/gemm_table.hpp"
#include "pi0/cuda/kernels.hpp"
#include "pi0/cuda/skinny_gemm.hpp"

namespace pi0::cuda {
namespace {

// More than the heuristic's first few: as an MPS client with a reduced SM share, the first ones
// can all fail their check (see verify()).
constexpr int kHeuristicCandidates = kMaxGemmCandidates;

// PI0_GEMM_PLAN_SMS=N makes cuBLASLt choose algorithms for N SMs instead of the SM count this
// process sees. The orchestrator gives its workers the whole GPU's count, so that every split
// runs the algorithms of the single-process run (the same bits), not ones chosen for a share.
int32_t planning_sm_count() {
  return static_cast<int32_t>(env_integer("PI0_GEMM_PLAN_SMS", 1, 4096, 0));  // 0: unset
}

template <typename T>
T algo_attribute(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T value{};
  size_t written = 0;
  (void)cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &value, sizeof value, &written);
  return value;
}

GemmAlgoConfig config_of(const cublasLtMatmulAlgo_t& algo) {
  GemmAlgoConfig c;
  c.id = algo_attribute<int32_t>(algo, CUBLASLT_ALGO_CONFIG_ID);
  c.tile = algo_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_TILE_ID);
  c.stages = algo_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID);
  c.split_k = algo_attribute<int32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM);
  c.reduction = algo_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME);
  c.swizzle = algo_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING);
  c.custom = algo_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION);
  c.inner = algo_attribute<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID);
  c.cluster = algo_attribute<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID);
  return c;
}

std::string describe_algo(const cublasLtMatmulAlgo_t& algo) {
  return config_of(algo).describe();
}

template <typename T>
bool set_algo(cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr, T value) {
  return cublasLtMatmulAlgoConfigSetAttribute(&algo, attr, &value, sizeof value) ==
         CUBLAS_STATUS_SUCCESS;
}

// Sets every field but the id, which cublasLtMatmulAlgoInit sets.
bool configure(cublasLtMatmulAlgo_t& algo, const GemmAlgoConfig& c) {
  return set_algo(algo, CUBLASLT_ALGO_CONFIG_TILE_ID, c.tile) &&
         set_algo(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, c.stages) &&
         set_algo(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, c.split_k) &&
         set_algo(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, c.reduction) &&
         set_algo(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, c.swizzle) &&
         set_algo(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, c.custom) &&
         set_algo(algo, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, static_cast<uint16_t>(c.inner)) &&
         set_algo(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, static_cast<uint16_t>(c.cluster));
}

cudaDataType_t to_cuda(DType t) {
  return t == DType::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
}
size_t type_bytes(DType t) {
  return t == DType::kBf16 ? 2 : 4;
}

template <typename T>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value) {
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof value));
}

cublasLtMatrixLayout_t make_layout(cudaDataType_t type, int rows, int cols, int ld, int batch,
                                   int64_t stride) {
  cublasLtMatrixLayout_t layout = nullptr;
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld));
  if (batch > 1) {
    const int32_t count = batch;
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                  &count, sizeof count));
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
        layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
  }
  return layout;
}

bool has_bias(Epilogue e) {
  return e != Epilogue::kNone;
}

}  // namespace

GemmShape linear_shape(int m, int n, int k, DType y_type, Epilogue epilogue, bool accumulate,
                       int ld_y) {
  GemmShape s;
  s.m = m;
  s.n = n;
  s.k = k;
  s.ld_x = k;
  s.ld_w = n;
  s.ld_y = ld_y ? ld_y : n;
  s.y_type = y_type;
  s.epilogue = epilogue;
  s.accumulate = accumulate;
  return s;
}

std::string GemmShape::describe() const {
  std::ostringstream s;
  s << "gemm m=" << m << " n=" << n << " k=" << k << " ld_x=" << ld_x << " ld_w=" << ld_w
    << " ld_y=" << ld_y << (w_transposed ? " W^T" : "")
    << " y=" << (y_type == DType::kBf16 ? "bf16" : "f32")
    << (epilogue == Epilogue::kBias       ? " +bias"
        : epilogue == Epilogue::kGeluBias ? " +bias,gelu"
                                          : "")
    << (accumulate ? " accumulate" : "") << " batch=" << batch << " align=" << alignment
    << (role.empty() ? "" : " role=" + role);
  return s.str();
}

Gemm::Gemm(cublasLtHandle_t handle, const GemmShape& shape, void* workspace, size_t workspace_bytes)
    : handle_(handle), shape_(shape), workspace_(workspace), workspace_bytes_(workspace_bytes) {
  PI0_CHECK(shape.m > 0 && shape.n > 0 && shape.k > 0 && shape.batch > 0,
            "empty " + shape.describe());
  PI0_CHECK(shape.ld_x >= shape.k && shape.ld_y >= shape.n &&
                shape.ld_w >= (shape.w_transposed ? shape.k : shape.n),
            "leading dimension too small in " + shape.describe());
  try {
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_a = shape.w_transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = CUBLAS_OP_N;
    set_desc(desc_, CUBLASLT_MATMUL_DESC_TRANSA, op_a);
    set_desc(desc_, CUBLASLT_MATMUL_DESC_TRANSB, op_b);
    // A = W as column-major: [n, k] with ld_w, or [k, n] read transposed.
    const int a_rows = shape.w_transposed ? shape.k : shape.n;
    const int a_cols = shape.w_transposed ? shape.n : shape.k;
    a_ = make_layout(CUDA_R_16BF, a_rows, a_cols, shape.ld_w, shape.batch, shape.stride_w);
    b_ = make_layout(CUDA_R_16BF, shape.k, shape.m, shape.ld_x, shape.batch, shape.stride_x);
    d_ = make_layout(to_cuda(shape.y_type), shape.n, shape.m, shape.ld_y, shape.batch,
                     shape.stride_y);

    // The heuristic's order, but only an algorithm whose results check out (see verify()).
    const int32_t plan_sms = planning_sm_count();
    if (plan_sms > 0) set_desc(desc_, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, plan_sms);
    // PI0_GEMM_PATH=separate|skinny|builtin starts at that fallback (for their tests).
    const char* path_env = std::getenv("PI0_GEMM_PATH");
    const std::string forced = path_env ? path_env : "";
    PI0_CHECK(forced.empty() || forced == "separate" || forced == "skinny" || forced == "builtin",
              "PI0_GEMM_PATH must be separate, skinny or builtin, got '" + forced + "'");
    const bool force_builtin = forced == "builtin";
    const bool skip_cublaslt = force_builtin || forced == "skinny";
    chosen_ = kNotChosen;
    if (!skip_cublaslt) {
      plan(forced == "separate" && has_bias(shape.epilogue));
      chosen_ = first_verified();
      first_checked_ = chosen_;
      if (chosen_ != kNotChosen && !separate_epilogue_) apply_table_choice();
      if (chosen_ == kNotChosen && has_bias(shape.epilogue) && !separate_epilogue_) {
        // No offered algorithm computes the fused bias / GELU epilogue correctly here: run the
        // product alone and the epilogue in its own kernel, checked the same way.
        plan(true);
        chosen_ = first_verified();
      }
      if (chosen_ == kNotChosen) {
        // The same algorithms without thread-block clusters: a cluster needs SMs of one GPC,
        // which an MPS share need not give.
        const int first = add_clusterless_variants();
        chosen_ = first_verified(first);
        if (chosen_ != kNotChosen)
          spdlog::warn("{}: only an algorithm without clusters checks out on this GPU (share): {}",
                       shape_.describe(),
                       describe_algo(candidates_[static_cast<size_t>(chosen_)].algo));
      }
    }
    if (chosen_ == kNotChosen && !force_builtin && plan_skinny_fallback()) {
      // Our tensor-core kernel (no clusters), bias / GELU in their own kernel, checked the same
      // way.
      if (verify(kSkinnyPath) < tolerance()) {
        chosen_ = kSkinnyPath;
        if (!skip_cublaslt)
          spdlog::warn(
              "no cuBLASLt algorithm computes {} correctly on this GPU (share); using the "
              "skinny tensor-core kernel for it",
              shape.describe());
      }
    }
    if (chosen_ == kNotChosen) {
      // Correct but slow beats fast and wrong: the plain CUDA-core kernel the candidates are
      // checked against.
      if (!force_builtin)
        spdlog::warn(
            "no checked kernel computes {} correctly on this GPU (share) ({} cuBLASLt "
            "candidates tried); using the slow built-in kernel for it",
            shape.describe(), candidates_.size());
      chosen_ = kBuiltinPath;
    }
  } catch (...) {
    release();
    throw;
  }
}

void Gemm::plan(bool separate_epilogue) {
  separate_epilogue_ = separate_epilogue;
  cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
  if (!separate_epilogue && shape_.epilogue == Epilogue::kBias) epi = CUBLASLT_EPILOGUE_BIAS;
  if (!separate_epilogue && shape_.epilogue == Epilogue::kGeluBias) {
    epi = CUBLASLT_EPILOGUE_GELU_BIAS;
  }
  set_desc(desc_, CUBLASLT_MATMUL_DESC_EPILOGUE, epi);
  if (epi != CUBLASLT_EPILOGUE_DEFAULT) {
    set_desc(desc_, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, to_cuda(shape_.y_type));
  }
  cublasLtMatmulPreference_t pref = make_preference(CUBLASLT_SEARCH_BEST_FIT);
  cublasStatus_t status = pref ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED;
  int returned = 0;
  candidates_.resize(kHeuristicCandidates);
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasLtMatmulAlgoGetHeuristic(handle_, desc_, a_, b_, d_, d_, pref,
                                            kHeuristicCandidates, candidates_.data(), &returned);
  if (pref) (void)cublasLtMatmulPreferenceDestroy(pref);
  // No algorithm (or a heuristic that refuses the shape) is not an error: the tiers after
  // cuBLASLt's still run.
  if (status != CUBLAS_STATUS_SUCCESS) {
    spdlog::debug("{}: cuBLASLt offers no algorithm ({})", shape_.describe(),
                  cublasGetStatusString(status));
    returned = 0;
  }
  candidates_.resize(static_cast<size_t>(std::max(returned, 0)));
  std::erase_if(candidates_, [](const cublasLtMatmulHeuristicResult_t& c) {
    return c.state != CUBLAS_STATUS_SUCCESS;
  });
  offered_ = candidates();
}

cublasLtMatmulPreference_t Gemm::make_preference(uint32_t search_mode) const {
  cublasLtMatmulPreference_t pref = nullptr;
  if (cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS) return nullptr;
  const uint64_t ws = workspace_bytes_;
  const uint32_t align = static_cast<uint32_t>(shape_.alignment);
  cublasStatus_t status = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_SEARCH_MODE,
                                                  &search_mode, sizeof search_mode);
  for (auto attr :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof align);
  }
  if (status != CUBLAS_STATUS_SUCCESS) {
    (void)cublasLtMatmulPreferenceDestroy(pref);
    return nullptr;
  }
  return pref;
}

int Gemm::append_if_accepted(const GemmAlgoConfig& config) {
  const cudaDataType_t y_type = to_cuda(shape_.y_type);
  cublasLtMatmulAlgo_t algo{};
  if (cublasLtMatmulAlgoInit(handle_, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF,
                             y_type, y_type, config.id, &algo) != CUBLAS_STATUS_SUCCESS ||
      !configure(algo, config) || !(config_of(algo) == config))
    return -1;
  cublasLtMatmulHeuristicResult_t checked{};
  if (cublasLtMatmulAlgoCheck(handle_, desc_, a_, b_, d_, d_, &algo, &checked) !=
          CUBLAS_STATUS_SUCCESS ||
      checked.workspaceSize > workspace_bytes_)
    return -1;
  // cublasLtMatmulAlgoCheck sees no pointers: an algorithm that needs more alignment than the
  // operands have (the heuristic filters by it, a built configuration is not filtered) would pass
  // the reference check on fresh, 256-byte aligned buffers and fail on the real ones. Where
  // cuBLASLt does not say, only fully aligned operands are safe.
  for (auto attr :
       {CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_A_BYTES, CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_C_BYTES, CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_D_BYTES}) {
    uint32_t needed = 0;
    size_t written = 0;
    if (cublasLtMatmulAlgoCapGetAttribute(&algo, attr, &needed, sizeof needed, &written) !=
        CUBLAS_STATUS_SUCCESS)
      needed = 256;
    if (needed > static_cast<uint32_t>(shape_.alignment)) return -1;
  }
  checked.algo = algo;
  checked.state = CUBLAS_STATUS_SUCCESS;
  candidates_.push_back(checked);
  return candidates() - 1;
}

int Gemm::find_or_add(const GemmAlgoConfig& config) {
  for (int c = 0; c < candidates(); ++c)
    if (config_of(candidates_[static_cast<size_t>(c)].algo) == config) return c;
  return append_if_accepted(config);
}

int Gemm::widen_candidates() {
  if (chosen_ < 0 || separate_epilogue_) return 0;
  const int before = candidates();
  const cudaDataType_t y_type = to_cuda(shape_.y_type);
  // Every configuration is looked at once (a few thousand a shape): `seen` holds their
  // descriptions, `bases` the listed ones whose variants are tried.
  std::set<std::string> seen;
  std::vector<GemmAlgoConfig> bases;
  for (const auto& c : candidates_) {
    const GemmAlgoConfig config = config_of(c.algo);
    if (seen.insert(config.describe()).second) bases.push_back(config);
  }
  auto add = [&](const GemmAlgoConfig& config) {
    return seen.insert(config.describe()).second && append_if_accepted(config) >= 0;
  };
  // cuBLASLt's own configurations, per algorithm id.
  std::vector<int> ids(256);
  int id_count = 0;
  if (cublasLtMatmulAlgoGetIds(handle_, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF,
                               y_type, y_type, static_cast<int>(ids.size()), ids.data(),
                               &id_count) != CUBLAS_STATUS_SUCCESS)
    id_count = 0;
  cublasLtMatmulPreference_t pref = make_preference(CUBLASLT_SEARCH_LIMITED_BY_ALGO_ID);
  for (int i = 0; pref && i < id_count; ++i) {
    std::vector<cublasLtMatmulHeuristicResult_t> found(64);
    bool ready = true;
    for (auto& f : found)
      ready =
          ready && cublasLtMatmulAlgoInit(handle_, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF,
                                          CUDA_R_16BF, y_type, y_type, ids[static_cast<size_t>(i)],
                                          &f.algo) == CUBLAS_STATUS_SUCCESS;
    int returned = 0;
    if (!ready || cublasLtMatmulAlgoGetHeuristic(handle_, desc_, a_, b_, d_, d_, pref,
                                                 static_cast<int>(found.size()), found.data(),
                                                 &returned) != CUBLAS_STATUS_SUCCESS)
      continue;
    for (int r = 0; r < returned; ++r) {
      const auto& f = found[static_cast<size_t>(r)];
      if (f.state == CUBLAS_STATUS_SUCCESS && add(config_of(f.algo)))
        bases.push_back(config_of(f.algo));
    }
  }
  if (pref) (void)cublasLtMatmulPreferenceDestroy(pref);
  // Their split-K and cluster variants: a 64-row product with a narrow output has too few tiles
  // to stream its weights on every SM without splitting K, and a cluster need not pay.
  for (const GemmAlgoConfig& base : bases) {
    for (const uint32_t cluster : {CUBLASLT_CLUSTER_SHAPE_1x1x1, CUBLASLT_CLUSTER_SHAPE_2x1x1,
                                   CUBLASLT_CLUSTER_SHAPE_1x2x1}) {
      for (const int split : {1, 2, 3, 4, 6, 8}) {
        for (const uint32_t reduction :
             {CUBLASLT_REDUCTION_SCHEME_NONE, CUBLASLT_REDUCTION_SCHEME_INPLACE,
              CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE}) {
          if ((split == 1) != (reduction == CUBLASLT_REDUCTION_SCHEME_NONE)) continue;
          GemmAlgoConfig v = base;
          v.cluster = cluster;
          v.split_k = split;
          v.reduction = reduction;
          (void)add(v);
        }
      }
    }
  }
  spdlog::debug("{}: {} candidates after widening ({} offered)", shape_.describe(), candidates(),
                offered_);
  return candidates() - before;
}

double Gemm::tolerance() const {
  // bf16 output rounds each value (~2e-3); fp32 output differs only in summation order.
  return shape_.y_type == DType::kF32 ? 1e-3 : 2e-2;
}

bool Gemm::plan_skinny_fallback() {
  const GemmShape& g = shape_;
  if (g.w_transposed || g.batch != 1 || g.alpha != 1.0f) return false;
  if (g.y_type == DType::kBf16 && g.accumulate) return false;
  SkinnyShape s;
  s.m = g.m;
  s.n = g.n;
  s.k = g.k;
  s.ld_x = g.ld_x;
  s.ld_w = g.ld_w;
  s.ld_y = g.ld_y;
  s.out = g.y_type == DType::kBf16 ? SkinnyOut::kBf16
          : g.accumulate           ? SkinnyOut::kF32Accumulate
                                   : SkinnyOut::kF32;
  if (!skinny_supported(s)) return false;
  s.splits = 1;  // K splits are thread-block clusters, which this fallback must not use
  skinny_ = plan_skinny(s, 1);
  skinny_init();
  separate_epilogue_ = true;
  return true;
}

int Gemm::add_clusterless_variants() {
  const int first = static_cast<int>(candidates_.size());
  for (int c = 0; c < first; ++c) {
    cublasLtMatmulAlgo_t algo = candidates_[static_cast<size_t>(c)].algo;
    const auto cluster = algo_attribute<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID);
    if (cluster == CUBLASLT_CLUSTER_SHAPE_1x1x1) continue;
    const uint16_t single = CUBLASLT_CLUSTER_SHAPE_1x1x1;
    if (cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &single,
                                             sizeof single) != CUBLAS_STATUS_SUCCESS)
      continue;
    cublasLtMatmulHeuristicResult_t checked{};
    if (cublasLtMatmulAlgoCheck(handle_, desc_, a_, b_, d_, d_, &algo, &checked) !=
            CUBLAS_STATUS_SUCCESS ||
        checked.workspaceSize > workspace_bytes_)
      continue;
    checked.algo = algo;
    checked.state = CUBLAS_STATUS_SUCCESS;
    candidates_.push_back(checked);
  }
  spdlog::debug("{}: {} clusterless variant(s) of the failed candidates", shape_.describe(),
                candidates_.size() - static_cast<size_t>(first));
  return first;
}

std::string Gemm::describe_candidate(int candidate) const {
  PI0_CHECK(candidate >= 0 && candidate < candidates(), "candidate " + std::to_string(candidate) +
                                                            " of " + std::to_string(candidates()) +
                                                            " for " + shape_.describe());
  return describe_algo(candidates_[static_cast<size_t>(candidate)].algo);
}

void Gemm::apply_table_choice() {
  const GemmTable* table = process_gemm_table();
  if (table == nullptr) return;
  // A GEMM with a role of its own takes its role's entry, else (none, or one that does not
  // apply here) its shape's.
  std::vector<std::string> keys{shape_.describe()};
  if (!shape_.role.empty()) {
    GemmShape plain = shape_;
    plain.role.clear();
    keys.push_back(plain.describe());
  }
  for (const std::string& key : keys) {
    const GemmChoice* choice = table->find(key);
    if (choice == nullptr) continue;
    const std::optional<GemmAlgoConfig> config = GemmAlgoConfig::parse(choice->algo);
    // Not a configuration (an older table's form), or one cuBLASLt does not accept here (another
    // GPU, SM plan or cuBLASLt).
    const int c = config ? find_or_add(*config) : -1;
    if (c < 0) {
      spdlog::warn("{}: the GEMM table's configuration ({}) {}", key, choice->algo,
                   config ? "is not accepted by cuBLASLt here" : "is not one this build reads");
      continue;
    }
    // first_verified() has checked, and failed, every candidate before chosen_.
    if (c != chosen_ && (c < chosen_ || verify(c) >= tolerance())) {
      spdlog::warn("{}: the GEMM table's configuration ({}) fails its check here", key,
                   choice->algo);
      continue;
    }
    spdlog::debug("{}: candidate {} from the GEMM table ({})", shape_.describe(), c, choice->algo);
    chosen_ = c;
    return;
  }
}

int Gemm::first_verified(int from) {
  for (int c = from; c < static_cast<int>(candidates_.size()); ++c) {
    const double err = verify(c);
    if (err < tolerance()) {
      if (c > from)
        spdlog::info("{}: {} candidate(s) failed the check; using {}", shape_.describe(), c - from,
                     describe_algo(candidates_[static_cast<size_t>(c)].algo));
      return c;
    }
    spdlog::debug("cuBLASLt candidate {} of {} ({}) fails its check for {}{}: rel error {:.3g}", c,
                  candidates_.size(), describe_algo(candidates_[static_cast<size_t>(c)].algo),
                  shape_.describe(), separate_epilogue_ ? " (epilogue apart)" : "", err);
  }
  return kNotChosen;
}

Gemm::~Gemm() {
  release();
}

void Gemm::release() noexcept {
  if (a_) (void)cublasLtMatrixLayoutDestroy(a_);
  if (b_) (void)cublasLtMatrixLayoutDestroy(b_);
  if (d_) (void)cublasLtMatrixLayoutDestroy(d_);
  if (desc_) (void)cublasLtMatmulDescDestroy(desc_);
  a_ = b_ = d_ = nullptr;
  desc_ = nullptr;
}

Gemm::Gemm(Gemm&& other) noexcept
    : handle_(other.handle_),
      shape_(std::move(other.shape_)),
      desc_(std::exchange(other.desc_, nullptr)),
      a_(std::exchange(other.a_, nullptr)),
      b_(std::exchange(other.b_, nullptr)),
      d_(std::exchange(other.d_, nullptr)),
      candidates_(std::move(other.candidates_)),
      chosen_(other.chosen_),
      first_checked_(other.first_checked_),
      offered_(other.offered_),
      separate_epilogue_(other.separate_epilogue_),
      skinny_(other.skinny_),
      workspace_(other.workspace_),
      workspace_bytes_(other.workspace_bytes_) {}

Gemm& Gemm::operator=(Gemm&& other) noexcept {
  if (this != &other) {
    release();
    handle_ = other.handle_;
    shape_ = std::move(other.shape_);
    desc_ = std::exchange(other.desc_, nullptr);
    a_ = std::exchange(other.a_, nullptr);
    b_ = std::exchange(other.b_, nullptr);
    d_ = std::exchange(other.d_, nullptr);
    candidates_ = std::move(other.candidates_);
    chosen_ = other.chosen_;
    first_checked_ = other.first_checked_;
    offered_ = other.offered_;
    separate_epilogue_ = other.separate_epilogue_;
    skinny_ = other.skinny_;
    workspace_ = other.workspace_;
    workspace_bytes_ = other.workspace_bytes_;
  }
  return *this;
}

void Gemm::launch(int candidate, const void* x, const void* w, void* y, const void* bias,
                  cudaStream_t stream) {
  PI0_CHECK(!has_bias(shape_.epilogue) || bias != nullptr, "missing bias for " + shape_.describe());
  if (candidate == kBuiltinPath) {
    simple_gemm(shape_, x, w, bias, y, stream);
    return;
  }
  if (candidate == kSkinnyPath) {
    skinny_gemm(skinny_, static_cast<const Bf16*>(x), static_cast<const Bf16*>(w), y, nullptr,
                stream);
    if (has_bias(shape_.epilogue)) apply_bias_epilogue(shape_, bias, y, stream);
    return;
  }
  const float beta = shape_.accumulate ? 1.0f : 0.0f;
  if (has_bias(shape_.epilogue)) {
    // The descriptor is read when the call is enqueued, so changing the pointer per call (one
    // Gemm serves every layer) is safe under graph capture too.
    if (!separate_epilogue_) set_desc(desc_, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  }
  CUBLAS_CHECK(cublasLtMatmul(handle_, desc_, &shape_.alpha, w, a_, x, b_, &beta, y, d_, y, d_,
                              &candidates_[static_cast<size_t>(candidate)].algo, workspace_,
                              workspace_bytes_, stream));
  if (separate_epilogue_) apply_bias_epilogue(shape_, bias, y, stream);
}

void Gemm::run(const void* x, const void* w, void* y, const void* bias, cudaStream_t stream) {
  PI0_CHECK(desc_ != nullptr, "Gemm used before construction");
  const size_t a = static_cast<size_t>(shape_.alignment);
  if (!is_aligned(x, a) || !is_aligned(w, a) || !is_aligned(y, a) ||
      (bias && !is_aligned(bias, std::min<size_t>(a, 16)))) {
    throw Error("misaligned operand (need " + std::to_string(a) + " bytes) for " +
                shape_.describe());
  }
  launch(chosen_, x, w, y, bias, stream);
}

namespace {
// Elements spanned by `batch` strided matrices of `rows` x `cols` with row stride `ld`.
size_t extent(int batch, int64_t stride, int rows, int ld, int cols) {
  return static_cast<size_t>(static_cast<int64_t>(batch - 1) * stride +
                             static_cast<int64_t>(rows - 1) * ld + cols);
}
}  // namespace

double Gemm::verify(int c) {
  const GemmShape& s = shape_;
  const bool f32 = s.y_type == DType::kF32;
  const size_t x_n = extent(s.batch, s.stride_x, s.m, s.ld_x, s.k);
  const size_t w_n = s.w_transposed ? extent(s.batch, s.stride_w, s.n, s.ld_w, s.k)
                                    : extent(s.batch, s.stride_w, s.k, s.ld_w, s.n);
  const size_t y_n = extent(s.batch, s.stride_y, s.m, s.ld_y, s.n);
  const size_t y_bytes = y_n * (f32 ? sizeof(float) : sizeof(Bf16));
  const Stream stream;
  cudaStream_t st = stream.get();
  DeviceBuffer<Bf16> x(x_n, "gemm check x"), w(w_n, "gemm check w");
  DeviceBuffer<float> y0(y_n, "gemm check y0"), y(y_n, "gemm check y"),
      bias(s.n, "gemm check bias");
  DeviceBuffer<float> ref(static_cast<size_t>(s.batch) * s.m * s.n, "gemm check reference");
  fill_random(x.get(), x_n, 0x5eed1, 1.0f, st);
  fill_random(w.get(), w_n, 0x5eed2, 1.0f / std::sqrt(static_cast<float>(s.k)), st);
  if (f32) {
    fill_random(y0.get(), y_n, 0x5eed3, 1.0f, st);
    fill_random(bias.get(), static_cast<size_t>(s.n), 0x5eed4, 0.5f, st);
  } else {
    fill_random(reinterpret_cast<Bf16*>(y0.get()), y_n, 0x5eed3, 1.0f, st);
    fill_random(reinterpret_cast<Bf16*>(bias.get()), static_cast<size_t>(s.n), 0x5eed4, 0.5f, st);
  }
  const void* b = has_bias(s.epilogue) ? bias.get() : nullptr;
  reference_gemm(s, x.get(), w.get(), b, y0.get(), ref.get(), st);
  CUDA_CHECK(cudaMemcpyAsync(y.get(), y0.get(), y_bytes, cudaMemcpyDeviceToDevice, st));
  try {
    if (c >= 0)
      spdlog::trace("{}: checking candidate {} ({})", s.describe(), c,
                    describe_algo(candidates_[static_cast<size_t>(c)].algo));
    launch(c, x.get(), w.get(), y.get(), b, st);
    CUDA_CHECK(cudaStreamSynchronize(st));
    CUDA_CHECK(cudaGetLastError());  // a launch that failed without cuBLASLt saying so
  } catch (const Error& e) {
    (void)cudaGetLastError();
    spdlog::debug("{} candidate {}: {}", shape_.describe(), c, e.what());
    return INFINITY;
  }
  return relative_difference(s, y.get(), ref.get(), st);
}

float Gemm::time_candidate(int c, const void* x, const void* w, void* y, const void* bias,
                           cudaStream_t stream, const AutotuneOptions& options, int graphs) {
  const int copies = std::max(options.weight_copies, 1);
  const int per_graph = std::max(20, copies);
  GraphCache cache(1);
  const std::vector<const void*> key{reinterpret_cast<const void*>(static_cast<intptr_t>(c + 1))};
  auto enqueue = [&](cudaStream_t s) {
    for (int i = 0; i < per_graph; ++i) {
      const Bf16* wi =
          static_cast<const Bf16*>(w) + static_cast<size_t>(i % copies) * options.weight_stride;
      launch(c, x, wi, y, bias, s);
    }
  };
  try {
    cache.run(key, stream, enqueue);  // eager: warms up
    cache.run(key, stream, enqueue);  // captured
    CUDA_CHECK(cudaStreamSynchronize(stream));
  } catch (const Error&) {
    (void)cudaGetLastError();
    return NAN;  // a candidate cuBLASLt accepted that cannot run here
  }
  Event start, stop;
  start.record(stream);
  for (int i = 0; i < graphs; ++i) cache.run(key, stream, enqueue);
  stop.record(stream);
  stop.synchronize();
  return stop.elapsed_since(start) / static_cast<float>(per_graph * graphs);
}

std::vector<std::pair<float, int>> Gemm::rank_candidates(const void* x, const void* w, void* y,
                                                         const void* bias, cudaStream_t stream,
                                                         const AutotuneOptions& options,
                                                         int count) {
  // first_verified() walks the candidates in order, so every one before `from` (its pick) has
  // already failed its check: only `from` and those after it are timed, and the fastest of them
  // that check out are returned (`from` and chosen_ need no second check). Each is timed as a CUDA
  // graph of launches, as the engines run them: a loop of launches from the host is bound by the
  // host's launch rate (~4.5 us a launch), which is slower than most of these products and hides
  // their differences. A GEMM table's choice (apply_table_choice) may stand after candidates that
  // check out too: timing starts at the first one that does, so a new table is not biased towards
  // the old.
  const int from = first_checked_ >= 0 ? first_checked_ : chosen_;
  if (from < 0) return {};
  PI0_CHECK(options.weight_copies <= 1 ||
                options.weight_stride * sizeof(Bf16) % static_cast<size_t>(shape_.alignment) == 0,
            "autotune: a weight stride that breaks the alignment of " + shape_.describe());
  if (options.wide) widen_candidates();
  const int end = options.wide ? candidates()
                               : std::min(candidates(), from + std::max(options.max_candidates, 1));
  // A wide list (hundreds) gets a short look each, then its fastest few a longer one.
  constexpr int kGraphs = 10, kGlanceGraphs = 2, kFinalists = 8;
  std::vector<std::pair<float, int>> timed;  // (ms per launch, candidate)
  for (int c = from; c < end; ++c) {
    const float ms =
        time_candidate(c, x, w, y, bias, stream, options, options.wide ? kGlanceGraphs : kGraphs);
    if (!std::isnan(ms)) timed.emplace_back(ms, c);
  }
  std::sort(timed.begin(), timed.end());
  // The fastest that pass the check, in order; only chosen_ and `from` are known to pass. A wide
  // list's are timed again, longer.
  const size_t wanted = static_cast<size_t>(std::max(count, options.wide ? kFinalists : 1));
  std::vector<std::pair<float, int>> passed;
  for (const auto& t : timed) {
    const int c = t.second;
    if (c == from || c == chosen_ || verify(c) < tolerance()) passed.push_back(t);
    if (passed.size() == wanted) break;
  }
  if (options.wide) {
    for (auto& [ms, c] : passed) ms = time_candidate(c, x, w, y, bias, stream, options, kGraphs);
    std::erase_if(passed, [](const auto& t) { return std::isnan(t.first); });
    std::sort(passed.begin(), passed.end());
  }
  if (passed.size() > static_cast<size_t>(std::max(count, 1)))
    passed.resize(static_cast<size_t>(std::max(count, 1)));
  return passed;
}

void Gemm::autotune(const void* x, const void* w, void* y, const void* bias, cudaStream_t stream,
                    const AutotuneOptions& options) {
  const int from = first_checked_ >= 0 ? first_checked_ : chosen_;
  if (from < 0) return;
  // Nothing to choose between (and a table's choice stands).
  if (!options.wide &&
      std::min(candidates(), from + std::max(options.max_candidates, 1)) - from <= 1)
    return;
  const auto ranked = rank_candidates(x, w, y, bias, stream, options, 1);
  if (ranked.empty()) {
    spdlog::warn("{}: autotune found no candidate that checks out; keeping candidate {}",
                 shape_.describe(), chosen_);
    return;
  }
  const auto [ms, c] = ranked.front();
  spdlog::info(
      "{}: autotune keeps candidate {} of {} ({} offered; {:.2f} us a launch over {} "
      "weight copies): {}",
      shape_.describe(), c, candidates(), offered_, 1000.0f * ms,
      std::max(options.weight_copies, 1), describe_algo(candidates_[static_cast<size_t>(c)].algo));
  chosen_ = c;
  record_choice();
}

bool Gemm::select_candidate(int c) {
  PI0_CHECK(c >= 0 && c < candidates(), "select_candidate: candidate " + std::to_string(c) +
                                            " of " + std::to_string(candidates()));
  if (c == chosen_) return true;
  // first_verified() checked, and failed, every candidate before first_checked_.
  if ((first_checked_ >= 0 && c < first_checked_) || verify(c) >= tolerance()) return false;
  chosen_ = c;
  return true;
}

bool Gemm::select_like(const Gemm& other) {
  if (other.chosen_ < 0 || chosen_ < 0 || other.separate_epilogue_ != separate_epilogue_)
    return false;
  const int c = find_or_add(config_of(other.candidates_[static_cast<size_t>(other.chosen_)].algo));
  return c >= 0 && select_candidate(c);
}

void Gemm::record_choice() const {
  // A table entry is for the fused epilogue's configurations (apply_table_choice runs only
  // there). Its index only says where the configuration stood; descriptions are matched.
  if (chosen_ < 0 || separate_epilogue_) return;
  record_tuned_gemm_choice(
      shape_.describe(), GemmChoice{std::min(chosen_, kMaxGemmTableIndex),
                                    describe_algo(candidates_[static_cast<size_t>(chosen_)].algo)});
}

void autotune_gemm(Gemm& gemm, const void* x, const void* w, void* y, const void* bias,
                   cudaStream_t stream, const Gemm::AutotuneOptions& options, const char* label,
                   std::vector<TunableGemm>* tunables) {
  if (tunables == nullptr) {
    gemm.autotune(x, w, y, bias, stream, options);
    return;
  }
  // Six finalists: a stage is timed once for each, and beyond the sixth alone-fastest the
  // products hardly differ alone (bench/NOTES.md v14).
  constexpr int kFinalists = 6;
  TunableGemm t{label, &gemm, {}, false};
  for (const auto& [ms, c] : gemm.rank_candidates(x, w, y, bias, stream, options, kFinalists))
    t.finalists.push_back(c);
  if (t.finalists.empty()) return;
  if (!gemm.select_candidate(t.finalists.front())) t.finalists.erase(t.finalists.begin());
  // Recorded as it stands; tuning in place (pi0_bench) records its final choice over it.
  gemm.record_choice();
  tunables->push_back(std::move(t));
}

}  // namespace pi0::cuda
