#include "pi0/cuda/device.hpp"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cstdlib>
#include <set>
#include <sstream>
#include <unordered_map>

#include "pi0/cuda/driver_entry.hpp"
#include "pi0/check.hpp"

namespace pi0::cuda {

void* device_alloc(size_t bytes, const std::string& what) {
  if (bytes == 0) return nullptr;
  void* ptr = nullptr;
  const cudaError_t status = cudaMalloc(&ptr, bytes);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls are not blamed
    size_t free_bytes = 0, total_bytes = 0;
    (void)cudaMemGetInfo(&free_bytes, &total_bytes);
    std::ostringstream msg;
    msg << "cannot allocate " << bytes / (1024.0 * 1024.0) << " MiB of GPU memory for " << what
        << ": " << cudaGetErrorString(status) << " (" << free_bytes / (1024.0 * 1024.0)
        << " MiB free of " << total_bytes / (1024.0 * 1024.0) << " MiB)";
    throw Error(msg.str());
  }
  return ptr;
}

void device_free(void* ptr) noexcept {
  if (ptr) (void)cudaFree(ptr);
}

void* pinned_alloc(size_t bytes, const std::string& what) {
  if (bytes == 0) return nullptr;
  void* ptr = nullptr;
  const cudaError_t status = cudaMallocHost(&ptr, bytes);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    throw Error("cannot allocate " + std::to_string(bytes) + " bytes of pinned host memory for " +
                what + ": " + cudaGetErrorString(status));
  }
  return ptr;
}

void pinned_free(void* ptr) noexcept {
  if (ptr) (void)cudaFreeHost(ptr);
}

void copy_to_device(void* dst, const void* src, size_t bytes) {
  CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

void zero_device(void* dst, size_t bytes) {
  if (bytes == 0) return;
  CUDA_CHECK(cudaMemset(dst, 0, bytes));
  CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

Stream::Stream() {
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
}
Stream::~Stream() {
  if (stream_) (void)cudaStreamDestroy(stream_);
}
Stream& Stream::operator=(Stream&& other) noexcept {
  if (this != &other) {
    if (stream_) (void)cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}
void Stream::synchronize() const {
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

Event::Event(unsigned flags) {
  CUDA_CHECK(cudaEventCreateWithFlags(&event_, flags));
}
Event::~Event() {
  if (event_) (void)cudaEventDestroy(event_);
}
Event& Event::operator=(Event&& other) noexcept {
  if (this != &other) {
    if (event_) (void)cudaEventDestroy(event_);
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}
void Event::record(cudaStream_t stream) const {
  CUDA_CHECK(cudaEventRecord(event_, stream));
}
void Event::record_external(cudaStream_t stream) const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status == cudaStreamCaptureStatusActive) {
    CUDA_CHECK(cudaEventRecordWithFlags(event_, stream, cudaEventRecordExternal));
  } else {
    CUDA_CHECK(cudaEventRecord(event_, stream));
  }
}
void Event::synchronize() const {
  CUDA_CHECK(cudaEventSynchronize(event_));
}
bool Event::done() const {
  const cudaError_t status = cudaEventQuery(event_);
  if (status == cudaErrorNotReady) return false;
  CUDA_CHECK(status);
  return true;
}
float Event::elapsed_since(const Event& start) const {
  float ms = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_, event_));
  return ms;
}

GraphExec::~GraphExec() {
  if (exec_) (void)cudaGraphExecDestroy(exec_);
}
GraphExec& GraphExec::operator=(GraphExec&& other) noexcept {
  if (this != &other) {
    if (exec_) (void)cudaGraphExecDestroy(exec_);
    exec_ = std::exchange(other.exec_, nullptr);
  }
  return *this;
}
void GraphExec::launch(cudaStream_t stream) const {
  CUDA_CHECK(cudaGraphLaunch(exec_, stream));
}

LtHandle::LtHandle() {
  CUBLAS_CHECK(cublasLtCreate(&handle_));
}
LtHandle::~LtHandle() {
  if (handle_) (void)cublasLtDestroy(handle_);
}
LtHandle& LtHandle::operator=(LtHandle&& other) noexcept {
  if (this != &other) {
    if (handle_) (void)cublasLtDestroy(handle_);
    handle_ = std::exchange(other.handle_, nullptr);
  }
  return *this;
}

GraphCache::GraphCache(size_t capacity) : capacity_(std::max<size_t>(capacity, 1)) {}
GraphCache::~GraphCache() = default;
GraphCache::GraphCache(GraphCache&&) noexcept = default;
GraphCache& GraphCache::operator=(GraphCache&&) noexcept = default;

GraphCache::Entry* GraphCache::find(const std::vector<const void*>& key) {
  for (auto& e : entries_)
    if (e.key == key) return &e;
  return nullptr;
}

void GraphCache::remember(const std::vector<const void*>& key) {
  if (entries_.size() >= capacity_) entries_.erase(entries_.begin());
  entries_.push_back(Entry{key, GraphExec{}});
}

size_t GraphCache::graphs() const {
  return static_cast<size_t>(
      std::count_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.exec.get(); }));
}

void GraphCache::begin_capture() {
  // Thread-local mode: other threads of the process (the worker's IPC threads) may keep making
  // CUDA calls that would be illegal during a global capture.
  CUDA_CHECK(cudaStreamBeginCapture(capture_stream_.get(), cudaStreamCaptureModeThreadLocal));
}

void GraphCache::abort_capture() noexcept {
  cudaGraph_t graph = nullptr;
  (void)cudaStreamEndCapture(capture_stream_.get(), &graph);
  if (graph) (void)cudaGraphDestroy(graph);
  (void)cudaGetLastError();
}

GraphExec GraphCache::end_capture() {
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamEndCapture(capture_stream_.get(), &graph));
  try {
    link_kernels(graph, kernel_handover());
  } catch (...) {
    (void)cudaGraphDestroy(graph);
    throw;
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  (void)cudaGraphDestroy(graph);
  CUDA_CHECK(status);
  return GraphExec(exec);
}

int current_device_attribute(cudaDeviceAttr attr, int otherwise) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return otherwise;
  }
  return value;
}

namespace {

std::atomic<int> g_handover{-1};  // -1: not chosen yet

// cuBLASLt launches its kernels through the driver API, so their names come from the driver's
// kernel node parameters; the entry points are looked up once, without linking libcuda.
struct DriverCalls {
  PFN_cuGraphKernelNodeGetParams_v12000 node_params = nullptr;
  PFN_cuFuncGetName_v12030 function_name = nullptr;
  PFN_cuKernelGetName_v12030 kernel_name = nullptr;
};

const DriverCalls& driver_calls() {
  static const DriverCalls calls = [] {
    DriverCalls c;
    load_driver_call("cuGraphKernelNodeGetParams", 12030, c.node_params);
    load_driver_call("cuFuncGetName", 12030, c.function_name);
    load_driver_call("cuKernelGetName", 12030, c.kernel_name);
    return c;
  }();
  return calls;
}

}  // namespace

std::string kernel_node_name(cudaGraphNode_t node) {
  const DriverCalls& d = driver_calls();
  CUDA_KERNEL_NODE_PARAMS_v2 params{};
  if (!d.node_params || d.node_params(node, &params) != CUDA_SUCCESS) return {};
  const char* name = nullptr;
  if (params.func && d.function_name && d.function_name(&name, params.func) == CUDA_SUCCESS && name)
    return name;
  if (params.kern && d.kernel_name && d.kernel_name(&name, params.kern) == CUDA_SUCCESS && name)
    return name;
  return {};
}

namespace {

// Kernels whose every block runs griddepcontrol.wait before it touches memory: ours (namespace
// pi0::cuda, each starting with wait_for_prior_grids(), which a CPU test checks in the sources).
// cuBLASLt's Hopper GEMMs (nvjet) do not wait: launched early behind a kernel that writes their
// input late, they read the old input (bench/NOTES.md v15, the handover test's [.probe] cases),
// so edges into them stay full. Nor does any other of cuBLASLt 13.1's configurations for our
// products (v27: the fastest of each wide list are all nvjet and read stale inputs when linked;
// the only sm_90 functions with the wait in libcublasLt's fatbinary are its split-K reductions).
// (cuBLASLt links its own split-K GEMM to its reduction kernel programmatically, which is its
// business.)
bool waits_for_predecessor(const std::string& name) {
  return name.rfind("_ZN3pi04cuda", 0) == 0;
}

int node_type(cudaGraphNode_t node) {
  cudaGraphNodeType type{};
  if (cudaGraphNodeGetType(node, &type) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return static_cast<int>(type);
}

bool is_kernel(cudaGraphNode_t node) {
  return node_type(node) == cudaGraphNodeTypeKernel;
}

// A captured stream memory operation: in our graphs only the decoder's front-end layer waits
// (cuStreamWaitValue64; the runtime's node types have no name for it).
bool is_memory_operation(cudaGraphNode_t node) {
  return node_type(node) == CU_GRAPH_NODE_TYPE_BATCH_MEM_OP;
}

bool is_cooperative(cudaGraphNode_t node) {
  cudaLaunchAttributeValue value{};
  if (cudaGraphKernelNodeGetAttribute(node, cudaLaunchAttributeCooperative, &value) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // unknown: leave it alone
  }
  return value.cooperative != 0;
}

// A kernel launched in thread-block clusters.
bool is_clustered(cudaGraphNode_t node) {
  cudaLaunchAttributeValue value{};
  if (cudaGraphKernelNodeGetAttribute(node, cudaLaunchAttributeClusterDimension, &value) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // unknown: an MPS client leaves it alone
  }
  return value.clusterDim.x * value.clusterDim.y * value.clusterDim.z > 1;
}

bool current_context_is_mps_client() {
  return current_device_attribute(cudaDevAttrMpsEnabled, 0) != 0;
}

std::atomic<size_t> g_linked{0}, g_refused{0};

}  // namespace

const char* handover_name(KernelHandover handover) {
  switch (handover) {
    case KernelHandover::kCompletion:
      return "completion";
    case KernelHandover::kEarly:
      return "early";
  }
  return "?";
}

KernelHandover parse_kernel_handover(const char* value) {
  if (value == nullptr || *value == '\0') return KernelHandover::kEarly;
  const std::string v(value);
  for (KernelHandover h : {KernelHandover::kCompletion, KernelHandover::kEarly})
    if (v == handover_name(h)) return h;
  throw Error("PI0_KERNEL_HANDOVER must be completion or early, not '" + v + "'");
}

KernelHandover kernel_handover() {
  int h = g_handover.load();
  if (h < 0) {
    h = static_cast<int>(parse_kernel_handover(std::getenv("PI0_KERNEL_HANDOVER")));
    g_handover.store(h);
  }
  return static_cast<KernelHandover>(h);
}

void set_kernel_handover(KernelHandover handover) {
  g_handover.store(static_cast<int>(handover));
}

// The GPU must be sm_90 or later, and our kernels must have been compiled for it: a build for an
// older architecture, JIT-compiled from its PTX here, has no wait in them.
bool kernel_handover_supported() {
  return current_device_attribute(cudaDevAttrComputeCapabilityMajor, 0) >= 9 &&
         our_kernels_wait_for_prior_grids();
}

void relink_programmatically(cudaGraph_t graph, cudaGraphNode_t from, cudaGraphNode_t to,
                             const cudaGraphEdgeData& old) {
  cudaGraphEdgeData edge{};
  edge.from_port = cudaGraphKernelNodePortProgrammatic;
  edge.type = cudaGraphDependencyTypeProgrammatic;
  CUDA_CHECK(cudaGraphRemoveDependencies(graph, &from, &to, &old, 1));
  CUDA_CHECK(cudaGraphAddDependencies(graph, &from, &to, &edge, 1));
}

HandoverLinks handover_links_so_far() {
  return HandoverLinks{g_linked.load(), g_refused.load()};
}

GraphEdges graph_edges(cudaGraph_t graph) {
  size_t count = 0;
  CUDA_CHECK(cudaGraphGetEdges(graph, nullptr, nullptr, nullptr, &count));
  GraphEdges e{std::vector<cudaGraphNode_t>(count), std::vector<cudaGraphNode_t>(count),
               std::vector<cudaGraphEdgeData>(count)};
  if (count > 0)
    CUDA_CHECK(cudaGraphGetEdges(graph, e.from.data(), e.to.data(), e.data.data(), &count));
  return e;
}

HandoverLinks link_kernels(cudaGraph_t graph, KernelHandover handover) {
  HandoverLinks links;
  if (handover == KernelHandover::kCompletion || !kernel_handover_supported()) return links;
  const auto [from, to, data] = graph_edges(graph);
  const size_t count = from.size();
  // Each node looked at once: its edge counts, predecessors, and (for kernels) its name and
  // whether it is a cooperative launch.
  struct Node {
    int in = 0, out = 0;
    std::vector<cudaGraphNode_t> predecessors;
    bool kernel = false, cooperative = false, clustered = false;
    std::string name;
  };
  std::unordered_map<cudaGraphNode_t, Node> nodes;
  for (size_t e = 0; e < count; ++e) {
    ++nodes[from[e]].out;
    Node& t = nodes[to[e]];
    ++t.in;
    t.predecessors.push_back(from[e]);
  }
  std::vector<cudaGraphNode_t> pending;  // waits on another stream's progress
  for (auto& [handle, node] : nodes) {
    node.kernel = is_kernel(handle);
    if (node.kernel) {
      node.name = kernel_node_name(handle);
      node.cooperative = is_cooperative(handle);
      node.clustered = is_clustered(handle);
    }
    if (node.name.find("wait_layer_kernel") != std::string::npos || is_memory_operation(handle))
      pending.push_back(handle);
  }
  // The waits, and every node before them.
  std::set<cudaGraphNode_t> before_waits;
  while (!pending.empty()) {
    const cudaGraphNode_t handle = pending.back();
    pending.pop_back();
    if (!before_waits.insert(handle).second) continue;
    for (cudaGraphNode_t p : nodes.at(handle).predecessors) pending.push_back(p);
  }
  // As an MPS client, a clustered kernel launched early costs far more than it hides: with the
  // decoder's wgmma attention linked the decode took 9.6 ms at a 100% share, 8.1 with no edge into
  // a clustered kernel linked, and the kernel separated by event nodes took as long as without
  // MPS (bench/NOTES.md v23).
  const bool link_into_clusters = !current_context_is_mps_client();
  std::set<std::string> refused_names;
  for (size_t e = 0; e < count; ++e) {
    const cudaGraphEdgeData& old = data[e];
    if (old.type != cudaGraphDependencyTypeDefault || old.from_port != 0 || old.to_port != 0)
      continue;
    const Node& f = nodes.at(from[e]);
    const Node& t = nodes.at(to[e]);
    if (f.out != 1 || t.in != 1 || !f.kernel || !t.kernel) continue;
    if (f.cooperative || t.cooperative) continue;
    if (t.clustered && !link_into_clusters) continue;
    if (!waits_for_predecessor(t.name)) {
      ++links.refused;
      refused_names.insert(t.name.empty() ? std::string("(unnamed)") : t.name);
      continue;
    }
    if (before_waits.count(to[e])) continue;
    relink_programmatically(graph, from[e], to[e], old);
    ++links.linked;
  }
  g_linked += links.linked;
  g_refused += links.refused;
  spdlog::debug("kernel handover '{}': {} edges linked, {} left", handover_name(handover),
                links.linked, links.refused);
  for (const auto& name : refused_names)
    spdlog::trace("kernel handover: {} starts only after its predecessor ends", name);
  return links;
}

}  // namespace pi0::cuda
