// RAII owners of CUDA resources (device memory, streams, events, graphs, cuBLASLt handles).
// All are move-only; destructors never throw (a failure to release is ignored: there is nothing
// sensible to do with it while unwinding).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "pi0/bf16.hpp"

namespace pi0::cuda {

// Allocates `bytes` of device memory; throws pi0::Error naming `what`, the size and the free
// memory when the allocation fails.
void* device_alloc(size_t bytes, const std::string& what);
void device_free(void* ptr) noexcept;
// Page-locked host memory, which asynchronous copies need to overlap the host.
void* pinned_alloc(size_t bytes, const std::string& what);
void pinned_free(void* ptr) noexcept;

struct DeviceMemory {
  static void* allocate(size_t bytes, const std::string& what) { return device_alloc(bytes, what); }
  static void release(void* ptr) noexcept { device_free(ptr); }
};
struct PinnedHostMemory {
  static void* allocate(size_t bytes, const std::string& what) { return pinned_alloc(bytes, what); }
  static void release(void* ptr) noexcept { pinned_free(ptr); }
};

template <typename T, typename Memory>
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t count, const std::string& what)
      : ptr_(static_cast<T*>(Memory::allocate(count * sizeof(T), what))), count_(count) {}
  ~Buffer() { Memory::release(ptr_); }
  Buffer(Buffer&& other) noexcept
      : ptr_(std::exchange(other.ptr_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      Memory::release(ptr_);
      ptr_ = std::exchange(other.ptr_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }
  bool empty() const { return count_ == 0; }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

template <typename T>
using DeviceBuffer = Buffer<T, DeviceMemory>;
template <typename T>
using PinnedBuffer = Buffer<T, PinnedHostMemory>;

// What an engine holds on the GPU, for its memory report: weights apart from workspace. Buffers
// pass through it as they are made; it names workspace allocations after its owner, so an
// out-of-memory error says whose buffer failed.
class MemoryLedger {
 public:
  explicit MemoryLedger(std::string owner) : owner_(std::move(owner)) {}
  template <typename T>
  DeviceBuffer<T> weight(DeviceBuffer<T> buf) {
    weight_bytes_ += buf.bytes();
    return buf;
  }
  template <typename T>
  DeviceBuffer<T> work(size_t count, const char* what) {
    DeviceBuffer<T> buf(count, owner_ + " " + what);
    workspace_bytes_ += buf.bytes();
    return buf;
  }
  void add_workspace(size_t bytes) { workspace_bytes_ += bytes; }
  size_t weight_bytes() const { return weight_bytes_; }
  size_t workspace_bytes() const { return workspace_bytes_; }

 private:
  std::string owner_;
  size_t weight_bytes_ = 0, workspace_bytes_ = 0;
};

// Synchronous copies (tests, setup); the async forms are used on hot paths.
void copy_to_device(void* dst, const void* src, size_t bytes);
void copy_to_host(void* dst, const void* src, size_t bytes);
// Zeroes device memory and waits for it. A plain cudaMemset runs on the legacy default stream,
// which nothing orders before the engines' non-blocking streams (device.hpp's Stream).
void zero_device(void* dst, size_t bytes);

template <typename T>
DeviceBuffer<T> upload(const T* host, size_t count, const std::string& what) {
  DeviceBuffer<T> buf(count, what);
  if (count) copy_to_device(buf.get(), host, count * sizeof(T));
  return buf;
}
template <typename T>
DeviceBuffer<T> upload(const std::vector<T>& host, const std::string& what) {
  return upload(host.data(), host.size(), what);
}
template <typename T>
std::vector<T> download(const T* device, size_t count) {
  std::vector<T> out(count);
  if (count) copy_to_host(out.data(), device, count * sizeof(T));
  return out;
}

// An attribute of the current device, or `otherwise` where it cannot be read (no usable GPU).
int current_device_attribute(cudaDeviceAttr attr, int otherwise);

class Stream {
 public:
  Stream();  // non-blocking with respect to the legacy default stream
  ~Stream();
  Stream(Stream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}
  Stream& operator=(Stream&& other) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }
  void synchronize() const;

 private:
  cudaStream_t stream_ = nullptr;
};

class Event {
 public:
  explicit Event(unsigned flags = cudaEventDefault);
  ~Event();
  Event(Event&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
  Event& operator=(Event&& other) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return event_; }
  void record(cudaStream_t stream) const;
  // Under stream capture, becomes an event-record node of the graph (a plain record would only
  // order the capture); outside capture, the same as record().
  void record_external(cudaStream_t stream) const;
  void synchronize() const;
  // True once the work before the last record() has finished (never blocks).
  bool done() const;
  // Milliseconds from `start` to this event (both recorded and complete).
  float elapsed_since(const Event& start) const;

 private:
  cudaEvent_t event_ = nullptr;
};

class GraphExec {
 public:
  GraphExec() = default;
  explicit GraphExec(cudaGraphExec_t exec) : exec_(exec) {}
  ~GraphExec();
  GraphExec(GraphExec&& other) noexcept : exec_(std::exchange(other.exec_, nullptr)) {}
  GraphExec& operator=(GraphExec&& other) noexcept;
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;
  cudaGraphExec_t get() const { return exec_; }
  void launch(cudaStream_t stream) const;

 private:
  cudaGraphExec_t exec_ = nullptr;
};

class LtHandle {
 public:
  LtHandle();
  ~LtHandle();
  LtHandle(LtHandle&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  LtHandle& operator=(LtHandle&& other) noexcept;
  LtHandle(const LtHandle&) = delete;
  LtHandle& operator=(const LtHandle&) = delete;
  cublasLtHandle_t get() const { return handle_; }

 private:
  cublasLtHandle_t handle_ = nullptr;
};

// How a captured graph hands over from one kernel to the next (programmatic dependent launch,
// sm_90 and later). kCompletion is CUDA's default: a kernel launches once the kernel before it has
// finished and flushed its memory. kEarly lets one of our kernels launch once every block of the
// kernel before has exited or allowed it (cuBLASLt's GEMMs allow it early); its blocks then wait
// (griddepcontrol.wait) for that kernel's completion and memory before they touch memory. That
// hides the launch and the hand-over, not the work. (A launch-completion edge, which would launch
// it once every block of the kernel before has started, is not ordered by griddepcontrol.wait at
// all: tried, it read stale inputs.)
enum class KernelHandover { kCompletion, kEarly };
const char* handover_name(KernelHandover handover);
// The process's choice: set_kernel_handover() if called, else PI0_KERNEL_HANDOVER (completion |
// early), else kEarly. A bad value throws pi0::Error naming it (the engines ask at construction,
// so it shows at start). kEarly is the default since it took V=2 0.06-0.16 ms lower on eight
// H100s of nine (one was 0.03-0.08 ms slower; bench/NOTES.md v15, v16).
KernelHandover kernel_handover();
void set_kernel_handover(KernelHandover handover);
// A value of PI0_KERNEL_HANDOVER: "completion" or "early"; null or empty is the default, kEarly.
// Anything else throws pi0::Error naming it.
KernelHandover parse_kernel_handover(const char* value);

struct HandoverLinks {
  size_t linked = 0;   // kernel-to-kernel edges made programmatic
  size_t refused = 0;  // kernel-to-kernel edges left alone: the later kernel does not wait
};
// Rewrites `graph`'s edges from one kernel node to the next as programmatic (kEarly) where that is
// safe and pays: the edge is the only one out of the earlier node and the only one into the later,
// neither is a cooperative launch, the later kernel is one of ours (each waits for its predecessor
// first thing; cuBLASLt's GEMMs do not wait, and read stale inputs when launched early), and the
// later kernel does not run before a wait on another stream's progress (a decoder's first flow
// step beside the encoder, layer_signal.hpp): blocks launched early there would sit on SMs the
// other stream's GEMMs need. In an MPS client, edges into kernels launched in clusters are left
// alone too (slower there when linked). Does nothing for kCompletion or on a GPU before sm_90.
HandoverLinks link_kernels(cudaGraph_t graph, KernelHandover handover);
// What link_kernels has linked and refused in this process so far (tests check that it linked).
HandoverLinks handover_links_so_far();
// Whether link_kernels can link here: an sm_90 or later GPU, and our kernels compiled for it with
// their wait (our_kernels_wait_for_prior_grids: sm_90 code or PTX).
bool kernel_handover_supported();
bool our_kernels_wait_for_prior_grids();
// The (mangled) name of a kernel node's function, ours or a library's; empty where the driver does
// not say.
std::string kernel_node_name(cudaGraphNode_t node);
// A graph's edges, e-th edge from[e] -> to[e] of kind data[e] (link_kernels and the handover
// test's probes read them).
struct GraphEdges {
  std::vector<cudaGraphNode_t> from, to;
  std::vector<cudaGraphEdgeData> data;
};
GraphEdges graph_edges(cudaGraph_t graph);
// Replaces the ordinary edge `old` from `from` to `to` with a programmatic one: `to` may launch
// once every block of `from` has exited or allowed it. Safe only where `to` waits (link_kernels).
void relink_programmatically(cudaGraph_t graph, cudaGraphNode_t from, cudaGraphNode_t to,
                             const cudaGraphEdgeData& old);

// Runs a fixed sequence of stream work, keyed by the device pointers it touches: the first call for
// a key runs eagerly (module loading, lazy allocations and first-touch costs stay out of the
// graph), the second captures the sequence into a CUDA graph and launches it, later calls replay
// it. Capture happens on a private stream, so the caller's stream may be the legacy default one.
class GraphCache {
 public:
  explicit GraphCache(size_t capacity = 8);
  ~GraphCache();
  GraphCache(GraphCache&&) noexcept;
  GraphCache& operator=(GraphCache&&) noexcept;

  template <typename Enqueue>
  void run(const std::vector<const void*>& key, cudaStream_t stream, Enqueue&& enqueue) {
    Entry* entry = find(key);
    if (entry == nullptr) {
      enqueue(stream);
      remember(key);
      return;
    }
    if (!entry->exec.get()) {
      begin_capture();
      try {
        enqueue(capture_stream_.get());
      } catch (...) {
        abort_capture();
        throw;
      }
      entry->exec = end_capture();
    }
    entry->exec.launch(stream);
  }
  size_t graphs() const;
  // Forgets every graph: the next run of each key runs eagerly, then captures anew (after the
  // work's plan changed, e.g. a GEMM's algorithm). Safe while a graph still runs: CUDA frees an
  // executable graph that is destroyed while in flight when it completes.
  void clear() { entries_.clear(); }

 private:
  struct Entry {
    std::vector<const void*> key;
    GraphExec exec;
  };
  Entry* find(const std::vector<const void*>& key);
  void remember(const std::vector<const void*>& key);
  void begin_capture();
  void abort_capture() noexcept;
  GraphExec end_capture();

  size_t capacity_;
  std::vector<Entry> entries_;  // oldest first
  Stream capture_stream_;
};

// Whether `ptr` is aligned to `bytes`.
inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace pi0::cuda
