#include "pi0/cuda/device.hpp"

#include <algorithm>
#include <sstream>

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
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  (void)cudaGraphDestroy(graph);
  CUDA_CHECK(status);
  return GraphExec(exec);
}

}  // namespace pi0::cuda
