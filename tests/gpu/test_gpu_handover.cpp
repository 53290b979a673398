// The programmatic kernel handover (pi0/cuda/device.hpp, link_kernels) lets a kernel launch before
// the kernel before it has finished. That is safe only where the later kernel waits for the earlier
// one's completion before it reads. The kernels here get a predecessor that lets them start at once
// and writes their input ~50 us later: a kernel that did not wait would read the old input. A copy
// that does not wait, linked by hand, shows that it would; so does cuBLASLt's GEMM (the probe
// below), which is why link_kernels leaves edges into it alone.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "catch.hpp"
#include "gpu_test_util.hpp"
#include "late_copy.hpp"
#include "pi0/cuda/device.hpp"
#include "pi0/cuda/gemm.hpp"
#include "pi0/cuda/kernels.hpp"
#include "pi0/cuda/qkv_rope.hpp"
#include "pi0/cuda/wgmma_attention.hpp"
#include "pi0/cuda_decoder.hpp"
#include "pi0/cuda_encoder.hpp"
#include "pi0/frame_inputs.hpp"
#include "pi0/weights.hpp"

using namespace pi0;
using namespace pi0::test;
using cuda::DeviceBuffer;

namespace {

// Long enough that a kernel which did not wait would surely have read first, even beside other
// processes' work at an MPS share.
constexpr uint64_t kLateNs = 1'000'000;

// Captures `enqueue` on `stream`, lets `link` rewrite the graph (it returns what it linked), and
// runs the graph once.
template <typename Enqueue, typename Link>
cuda::HandoverLinks run_captured(cudaStream_t stream, Enqueue&& enqueue, Link&& link) {
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  cudaGraph_t graph = nullptr;
  try {
    enqueue(stream);
  } catch (...) {
    (void)cudaStreamEndCapture(stream, &graph);
    if (graph) (void)cudaGraphDestroy(graph);
    throw;
  }
  CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cuda::HandoverLinks links;
  cudaGraphExec_t exec = nullptr;
  try {
    links = link(graph);
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  } catch (...) {
    (void)cudaGraphDestroy(graph);
    throw;
  }
  (void)cudaGraphDestroy(graph);
  const cuda::GraphExec owner(exec);
  owner.launch(stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  return links;
}

// The same, linked by link_kernels with `handover`.
template <typename Enqueue>
cuda::HandoverLinks run_linked(cudaStream_t stream, cuda::KernelHandover handover,
                               Enqueue&& enqueue) {
  return run_captured(stream, enqueue,
                      [&](cudaGraph_t graph) { return cuda::link_kernels(graph, handover); });
}

// Sets the process's handover for one scope.
class ScopedHandover {
 public:
  explicit ScopedHandover(cuda::KernelHandover handover) : saved_(cuda::kernel_handover()) {
    cuda::set_kernel_handover(handover);
  }
  ~ScopedHandover() { cuda::set_kernel_handover(saved_); }
  ScopedHandover(const ScopedHandover&) = delete;
  ScopedHandover& operator=(const ScopedHandover&) = delete;

 private:
  cuda::KernelHandover saved_;
};

std::vector<Bf16> random_bf16(size_t n, uint64_t seed) {
  return to_bf16(random_floats(n, seed));
}

DeviceBuffer<Bf16> up_bf16(const std::vector<Bf16>& v) {
  return cuda::upload(v, "test input");
}

}  // namespace

TEST_CASE("kernels linked programmatically wait for their predecessor's late writes", "[gpu]") {
  if (!cuda::kernel_handover_supported()) {
    PI0_SKIP("programmatic launches need sm_90 code on an sm_90 GPU or later");
  }
  cuda::Stream stream;
  const auto early = cuda::KernelHandover::kEarly;

  SECTION("a kernel that does not wait reads the input before the late write") {
    const size_t n = 64 * 1024;
    const auto old_values = random_bf16(n, 1), new_values = random_bf16(n, 2);
    auto in = up_bf16(old_values);
    const auto fresh = up_bf16(new_values);
    auto out = poisoned<Bf16>(n);
    size_t edges = 0;
    run_captured(
        stream.get(),
        [&](cudaStream_t st) {
          launch_late_copy(in.get(), fresh.get(), in.bytes(), kLateNs, st);
          launch_unwaiting_copy(out.get(), in.get(), in.bytes(), st);
        },
        [&](cudaGraph_t graph) {
          // Linked by hand: link_kernels would refuse a kernel that does not wait.
          cuda::HandoverLinks links;
          const cuda::GraphEdges all = cuda::graph_edges(graph);
          edges = all.from.size();
          if (edges == 1) {
            cuda::relink_programmatically(graph, all.from[0], all.to[0], all.data[0]);
            links.linked = 1;
          }
          return links;
        });
    REQUIRE(edges == 1);
    const auto copied = cuda::download(out.get(), n);
    REQUIRE(bitwise_equal(copied.data(), old_values.data(), n * sizeof(Bf16)));
  }

  SECTION("our kernels are linked and see the late write") {
    const size_t n = 64 * 4096;
    const auto old_values = random_bf16(n, 7), new_values = random_bf16(n, 8);
    auto expected = up_bf16(new_values);
    cuda::silu_inplace(expected.get(), n, stream.get());
    auto x = up_bf16(old_values);
    const auto fresh = up_bf16(new_values);
    const auto links = run_linked(stream.get(), early, [&](cudaStream_t s) {
      launch_late_copy(x.get(), fresh.get(), x.bytes(), kLateNs, s);
      cuda::silu_inplace(x.get(), n, s);
    });
    CHECK(links.linked == 1);
    CHECK(links.refused == 0);
    CHECK(bitwise_equal(cuda::download(x.get(), n).data(), cuda::download(expected.get(), n).data(),
                        n * sizeof(Bf16)));
  }

  SECTION("a clustered kernel of ours is linked, except in an MPS client") {
    cuda::WgmmaAttentionShape shape;
    shape.rows = 64 * 8;  // the decoder's shape: 64 tokens x 8 heads against 576 keys
    shape.keys = 576;
    shape.scale = 1.0f / 16;
    shape = cuda::plan_wgmma_attention(shape);
    if (!cuda::wgmma_attention_runs_here(shape) || shape.splits < 2) {
      PI0_SKIP("the wgmma attention's clusters cannot run here");
    }
    int device = 0, mps = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&mps, cudaDevAttrMpsEnabled, device));
    const size_t q_values = size_t{64} * 8 * 256, kv_values = size_t{576} * 256;
    auto q = up_bf16(random_bf16(q_values, 11));
    const auto fresh_q = up_bf16(random_bf16(q_values, 12));
    const auto k = up_bf16(random_bf16(kv_values, 13)), v = up_bf16(random_bf16(kv_values, 14));
    auto out = poisoned<Bf16>(q_values);
    auto expected = poisoned<Bf16>(q_values);
    cuda::wgmma_attention(shape, fresh_q.get(), k.get(), v.get(), expected.get(), stream.get());
    CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    const auto links = run_linked(stream.get(), early, [&](cudaStream_t s) {
      launch_late_copy(q.get(), fresh_q.get(), q.bytes(), kLateNs, s);
      cuda::wgmma_attention(shape, q.get(), k.get(), v.get(), out.get(), s);
    });
    INFO("MPS client: " << (mps ? "yes" : "no") << ", clusters of " << shape.splits);
    CHECK(links.linked == (mps ? 0u : 1u));
    CHECK(links.refused == 0);
    CHECK(bitwise_equal(cuda::download(out.get(), out.size()).data(),
                        cuda::download(expected.get(), expected.size()).data(), out.bytes()));
  }

  SECTION("the fused qkv kernel is linked and reads the late X") {
    const cuda::QkvRopeShape shape{51, 1024, 8, 256};  // the decoder's, C = 50
    // (Where its CTAs do not all fit at once, as at a small MPS share, it runs in waves.)
    if (!cuda::qkv_rope_supported(shape)) PI0_SKIP("this binary has no sm_90a code for this GPU");
    const size_t x_values = size_t{51} * 1024, n = size_t{10} * 256;
    auto x = up_bf16(random_bf16(x_values, 21));
    const auto fresh_x = up_bf16(random_bf16(x_values, 22));
    const auto wt = up_bf16(random_bf16(n * 1024, 23));
    auto q = poisoned<Bf16>(size_t{51} * 8 * 256), k = poisoned<Bf16>(size_t{51} * 256);
    auto v = poisoned<Bf16>(size_t{51} * 256);
    auto eq = poisoned<Bf16>(q.size()), ek = poisoned<Bf16>(k.size()),
         ev = poisoned<Bf16>(v.size());
    cuda::qkv_rope(shape, fresh_x.get(), wt.get(), eq.get(), ek.get(), ev.get(), 576, 10000.0f,
                   1e-6f, stream.get());
    CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    const auto links = run_linked(stream.get(), early, [&](cudaStream_t s) {
      launch_late_copy(x.get(), fresh_x.get(), x.bytes(), kLateNs, s);
      cuda::qkv_rope(shape, x.get(), wt.get(), q.get(), k.get(), v.get(), 576, 10000.0f, 1e-6f, s);
    });
    CHECK(links.linked == 1);
    CHECK(links.refused == 0);
    for (const auto& [got, want] : {std::pair{&q, &eq}, std::pair{&k, &ek}, std::pair{&v, &ev}}) {
      CHECK(bitwise_equal(cuda::download(got->get(), got->size()).data(),
                          cuda::download(want->get(), want->size()).data(), got->bytes()));
    }
  }

  SECTION("cuBLASLt's GEMM is left to start after its predecessor ends") {
    cuda::LtHandle lt;
    DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
    const int m = 64, n = 2560, k = 1024;  // the decoder's qkv product
    const auto shape =
        cuda::linear_shape(m, n, k, cuda::DType::kBf16, cuda::Epilogue::kNone, false);
    cuda::Gemm gemm(lt.get(), shape, ws.get(), ws.bytes());
    if (gemm.chosen_candidate() < 0) {
      PI0_SKIP("the GEMM runs on a kernel of ours here, not cuBLASLt's");
    }
    const auto old_x = random_bf16(size_t{m} * k, 3), new_x = random_bf16(size_t{m} * k, 4);
    const auto w = up_bf16(random_bf16(size_t{k} * n, 5));
    auto x = up_bf16(old_x);
    const auto fresh_x = up_bf16(new_x);
    auto y = poisoned<Bf16>(size_t{m} * n);
    auto expected = poisoned<Bf16>(size_t{m} * n);
    gemm.run(fresh_x.get(), w.get(), expected.get(), nullptr, stream.get());
    CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    const auto links = run_linked(stream.get(), early, [&](cudaStream_t s) {
      launch_late_copy(x.get(), fresh_x.get(), x.bytes(), kLateNs, s);
      gemm.run(x.get(), w.get(), y.get(), nullptr, s);
    });
    INFO(shape.describe() << " as " << gemm.describe_candidate(gemm.chosen_candidate()));
    // Not linked (refused, or at an MPS share possibly not a plain kernel edge), and so right.
    CHECK(links.linked == 0);
    CHECK(bitwise_equal(cuda::download(y.get(), y.size()).data(),
                        cuda::download(expected.get(), expected.size()).data(), y.bytes()));
  }
}

// The engines' graphs with every handover: the same kernels on the same data, so the same bits,
// eager, captured and replayed (the encoder's K/V slot and the decoder's actions).
TEST_CASE("the kernel handover changes no bits in the engines", "[gpu]") {
  EngineRig rig = engine_rig("pi0-2l", RunShape{2, 63, 0}, 1101);

  auto run = [&](cuda::KernelHandover handover) {
    const ScopedHandover scoped(handover);
    CudaEncoder encoder(rig.config, rig.shape, rig.weights);
    CudaDecoder decoder(rig.config, rig.shape, rig.weights);
    std::vector<FrameOutputs> runs;  // eager, capture, replay
    for (int i = 0; i < 3; ++i) runs.push_back(rig.run(encoder, decoder));
    return runs;
  };
  const auto plain = run(cuda::KernelHandover::kCompletion);
  for (const FrameOutputs& r : plain) REQUIRE(count_nonfinite(r.actions) == 0);
  const size_t linked_before = cuda::handover_links_so_far().linked;
  const auto linked = run(cuda::KernelHandover::kEarly);
  // The comparison means something only if edges were linked (where the GPU and build allow it).
  if (cuda::kernel_handover_supported())
    CHECK(cuda::handover_links_so_far().linked > linked_before);
  REQUIRE(linked.size() == plain.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    INFO("run " << i);
    // The poison where the encoder writes nothing compares equal bit for bit.
    CHECK(
        bitwise_equal(linked[i].kv.data(), plain[i].kv.data(), plain[i].kv.size() * sizeof(Bf16)));
    CHECK(bitwise_equal(linked[i].actions.data(), plain[i].actions.data(),
                        plain[i].actions.size() * sizeof(float)));
  }
}

// Probe (not part of the suite): does cuBLASLt honour a programmatic dependency it is captured
// behind? The pending capture dependency is made programmatic before the GEMM is enqueued.
TEST_CASE("probe: cuBLASLt behind a programmatic capture dependency", "[.probe]") {
  cuda::Stream stream;
  cuda::LtHandle lt;
  DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
  struct Product {
    int n, k;
    bool accumulate;
  };
  for (const Product p : {Product{2560, 1024, false}, Product{1024, 4096, true}}) {
    const int m = 64;
    const auto shape =
        cuda::linear_shape(m, p.n, p.k, cuda::DType::kBf16, cuda::Epilogue::kNone, p.accumulate);
    cuda::Gemm gemm(lt.get(), shape, ws.get(), ws.bytes());
    const auto old_x = random_bf16(size_t{64} * p.k, 3), new_x = random_bf16(size_t{64} * p.k, 4);
    const auto w = up_bf16(random_bf16(static_cast<size_t>(p.k) * p.n, 5));
    const auto y0 = random_bf16(size_t{64} * p.n, 6);
    const size_t y_bytes = y0.size() * sizeof(Bf16);
    auto x = up_bf16(old_x);
    const auto fresh_x = up_bf16(new_x);
    auto y = up_bf16(y0);
    const auto y_start = up_bf16(y0);
    auto expected = up_bf16(y0);
    gemm.run(fresh_x.get(), w.get(), expected.get(), nullptr, stream.get());
    CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    const auto want = cuda::download(expected.get(), y0.size());

    cudaStream_t s = stream.get();
    CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    CUDA_CHECK(cudaMemcpyAsync(y.get(), y_start.get(), y_bytes, cudaMemcpyDeviceToDevice, s));
    launch_late_copy(x.get(), fresh_x.get(), x.bytes(), kLateNs, s);
    cudaStreamCaptureStatus status{};
    const cudaGraphNode_t* deps = nullptr;
    const cudaGraphEdgeData* data = nullptr;
    size_t n_deps = 0;
    CUDA_CHECK(cudaStreamGetCaptureInfo(s, &status, nullptr, nullptr, &deps, &data, &n_deps));
    REQUIRE(n_deps == 1);
    cudaGraphNode_t dep = deps[0];
    cudaGraphEdgeData edge{};
    edge.from_port = cudaGraphKernelNodePortProgrammatic;
    edge.type = cudaGraphDependencyTypeProgrammatic;
    CUDA_CHECK(
        cudaStreamUpdateCaptureDependencies(s, &dep, &edge, 1, cudaStreamSetCaptureDependencies));
    gemm.run(x.get(), w.get(), y.get(), nullptr, s);
    cudaGraph_t graph = nullptr;
    CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    const cuda::GraphEdges edges = cuda::graph_edges(graph);
    for (size_t e = 0; e < edges.from.size(); ++e) {
      cudaGraphNodeType tf{}, tt{};
      CUDA_CHECK(cudaGraphNodeGetType(edges.from[e], &tf));
      CUDA_CHECK(cudaGraphNodeGetType(edges.to[e], &tt));
      std::printf("probe %s: edge %d -> %d type %d port %d\n", shape.describe().c_str(),
                  static_cast<int>(tf), static_cast<int>(tt), edges.data[e].type,
                  edges.data[e].from_port);
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    (void)cudaGraphDestroy(graph);
    CUDA_CHECK(inst);
    const cuda::GraphExec owner(exec);
    owner.launch(s);
    CUDA_CHECK(cudaStreamSynchronize(s));
    const bool right =
        bitwise_equal(cuda::download(y.get(), y0.size()).data(), want.data(), y_bytes);
    std::printf("probe %s: %s\n", shape.describe().c_str(),
                right ? "WAITED (right result)" : "STALE (did not wait)");
  }
}

// Probe (not part of the suite): which of cuBLASLt's configurations for the decoder's products
// run kernels that wait for their predecessor when linked by hand? For each of the fastest
// configurations (timed as autotune times them), a late write behind a programmatic edge into the
// GEMM's first kernel: the right result means every kernel it launched waited.
TEST_CASE("probe: cuBLASLt configurations that wait when linked", "[.probe]") {
  cuda::Stream stream;
  cuda::LtHandle lt;
  DeviceBuffer<std::byte> ws(cuda::kGemmWorkspaceBytes, "workspace");
  struct Product {
    const char* label;
    int m, n, k;
    bool accumulate;
  };
  const int count = [] {
    const char* v = std::getenv("PI0_PROBE_COUNT");
    return v ? std::atoi(v) : 24;
  }();
  for (const Product p :
       {Product{"qkv", 64, 2560, 1024, false}, Product{"o", 64, 1024, 2048, true},
        Product{"gate|up", 64, 8192, 1024, false}, Product{"down", 64, 1024, 4096, true},
        Product{"siglip qkv", 512, 3456, 1152, false},
        Product{"gemma qkv", 512, 2560, 2048, false}}) {
    const auto shape =
        cuda::linear_shape(p.m, p.n, p.k, cuda::DType::kBf16, cuda::Epilogue::kNone, p.accumulate);
    cuda::Gemm gemm(lt.get(), shape, ws.get(), ws.bytes());
    if (gemm.chosen_candidate() < 0) continue;
    gemm.widen_candidates();
    const int copies = 18;
    const size_t w_elems = static_cast<size_t>(p.k) * p.n;
    const auto w = up_bf16(random_bf16(w_elems * copies, 5));
    const auto old_x = random_bf16(static_cast<size_t>(p.m) * p.k, 3);
    const auto new_x = random_bf16(static_cast<size_t>(p.m) * p.k, 4);
    const auto y0 = random_bf16(static_cast<size_t>(p.m) * p.n, 6);
    const size_t y_bytes = y0.size() * sizeof(Bf16);
    auto x = up_bf16(old_x);
    const auto fresh_x = up_bf16(new_x);
    auto y = up_bf16(y0);
    const auto y_start = up_bf16(y0);
    cuda::Gemm::AutotuneOptions tune;
    tune.wide = true;
    const auto ranked = gemm.rank_candidates(fresh_x.get(), w.get(), y.get(), nullptr, stream.get(),
                                             tune.over_layers(copies, w_elems), count);
    for (const auto& [ms, c] : ranked) {
      if (!gemm.select_candidate(c)) continue;
      cudaStream_t s = stream.get();
      CUDA_CHECK(cudaMemcpyAsync(y.get(), y_start.get(), y_bytes, cudaMemcpyDeviceToDevice, s));
      gemm.run(fresh_x.get(), w.get(), y.get(), nullptr, s);
      CUDA_CHECK(cudaStreamSynchronize(s));
      const auto want = cuda::download(y.get(), y0.size());
      CUDA_CHECK(cudaMemcpyAsync(x.get(), old_x.data(), x.bytes(), cudaMemcpyHostToDevice, s));
      std::string names;
      run_captured(
          s,
          [&](cudaStream_t st) {
            CUDA_CHECK(
                cudaMemcpyAsync(y.get(), y_start.get(), y_bytes, cudaMemcpyDeviceToDevice, st));
            launch_late_copy(x.get(), fresh_x.get(), x.bytes(), kLateNs, st);
            gemm.run(x.get(), w.get(), y.get(), nullptr, st);
          },
          [&](cudaGraph_t graph) {
            cuda::HandoverLinks links;
            const cuda::GraphEdges edges = cuda::graph_edges(graph);
            for (size_t e = 0; e < edges.from.size(); ++e) {
              const cudaGraphNode_t from = edges.from[e], to = edges.to[e];
              const cudaGraphEdgeData& data = edges.data[e];
              const std::string fn = cuda::kernel_node_name(from);
              const std::string tn = cuda::kernel_node_name(to);
              if (!tn.empty()) {
                names += ' ';
                names.append(tn, 0, 60);
              }
              if (fn.find("late_copy") != std::string::npos && !tn.empty() &&
                  data.type == cudaGraphDependencyTypeDefault) {
                cuda::relink_programmatically(graph, from, to, data);
                ++links.linked;
              }
            }
            return links;
          });
      const bool right =
          bitwise_equal(cuda::download(y.get(), y0.size()).data(), want.data(), y_bytes);
      std::printf("probe %-10s %8.2f us  %s  %s |%s\n", p.label, ms * 1e3,
                  right ? "WAITS" : "stale", gemm.describe_candidate(c).c_str(), names.c_str());
    }
  }
}
