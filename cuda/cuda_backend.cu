// CUDA backend: the block-statistics pass on the GPU. The host gathers a tile's query rows,
// keeps the KV head's keys (and values) resident across tiles, and runs the device pass of
// statistics_pass.cu: block statistics (exact fp32 SIMT kernel, or bf16/fp16 tensor-core
// kernel), row log-sum-exps, and the attention output when v is given. Only the tile's
// statistics come back. Never a T x T buffer. Only plain C++ crosses cuda_backend.hpp.
//
// The engine calls from many host threads at once. Each call runs on a *lane*: a stream of its
// own with its own device buffers and pinned host staging, so one tile's copies overlap other
// tiles' kernels and copies instead of queueing behind a device-wide lock. Keys are locked per KV
// head: uploading one head's keys holds up only the tiles of that head.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "backend/row_statistics.hpp"
#include "common/error.hpp"
#include "cuda_backend.hpp"
#include "device_statistics.hpp"

namespace hysparse::cuda {
namespace {

std::atomic<std::uint64_t> resident_array_upload_count{0};

constexpr int kMaxHeadDim = 256;
// Lanes per device. Two already overlap one tile's copies with another's kernels; four cover the
// engine's threads finishing tiles at once. Each lane keeps buffers as large as the largest tile it
// ran (the engine caps a tile at 4M cells: 32 MiB of block statistics, on the device and pinned on
// the host), so more lanes would cost memory for little.
constexpr std::size_t kLanesPerDevice = 4;
// prepare_keys copies the next layer's keys only while this fraction of the device's memory stays
// free beside them.
constexpr std::size_t kPrepareHeadroomFraction = 8;
// The logits workspace of Backend::attention_received: query rows per pass so that it holds about this
// many bytes (between 64 and 1024 rows, a multiple of 64).
constexpr long long kReceivedWorkspaceBytes = 512ll << 20;
// The block scores of Backend::token_score_rankings: rows per launch so that they take at most this many bytes
// (set_token_score_workspace_bytes changes it, for tests).
constexpr std::int64_t kTokenScoreWorkspaceBytes = std::int64_t{256} << 20;
std::atomic<std::int64_t> token_score_workspace_bytes{kTokenScoreWorkspaceBytes};
// The shared memory a block may take on backends made from now on, below the device's own (0: the device's);
// set_shared_memory_limit changes it, for tests that play a smaller GPU.
std::atomic<std::int64_t> shared_memory_limit_bytes{0};

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA {}: {}", what, cudaGetErrorString(status));
}

InputType input_type(Precision precision) {
  switch (precision) {
    case Precision::kFp32: return InputType::kFloat32;
    case Precision::kBf16: return InputType::kBfloat16;
    case Precision::kFp16: return InputType::kFloat16;
  }
  return InputType::kFloat32;
}

// A buffer that only grows, in device memory or in pinned (page-locked) host memory: copies
// between the two run asynchronously on a stream, copies from pageable memory do not.
enum class Memory { kDevice, kPinnedHost };
template <typename T, Memory kWhere>
class GrowingArray {
 public:
  GrowingArray() = default;
  GrowingArray(const GrowingArray&) = delete;
  GrowingArray& operator=(const GrowingArray&) = delete;
  ~GrowingArray() { clear(); }
  T* reserve(std::size_t count, const char* what) {
    if (count > capacity_) {
      clear();
      void* memory = nullptr;
      const cudaError_t status =
          kWhere == Memory::kDevice ? cudaMalloc(&memory, count * sizeof(T)) : cudaMallocHost(&memory, count * sizeof(T));
      if (status != cudaSuccess) {
        (void)cudaGetLastError();  // not sticky: the next launch's error check must not see it
        fail(ErrorKind::kResource, "CUDA: cannot allocate {} bytes of {} memory for {}: {}", count * sizeof(T),
             kWhere == Memory::kDevice ? "device" : "pinned host", what, cudaGetErrorString(status));
      }
      data_ = static_cast<T*>(memory);
      capacity_ = count;
    }
    return data_;
  }
  T* get() const { return data_; }

  void clear() {
    if (data_) (void)(kWhere == Memory::kDevice ? cudaFree(data_) : cudaFreeHost(data_));
    data_ = nullptr;
    capacity_ = 0;
  }

 private:
  T* data_ = nullptr;
  std::size_t capacity_ = 0;
};
template <typename T>
using DeviceArray = GrowingArray<T, Memory::kDevice>;
template <typename T>
using PinnedArray = GrowingArray<T, Memory::kPinnedHost>;

// Enqueues host -> device (pageable or pinned source) on `stream`; returns the device copy.
template <typename T>
T* upload(DeviceArray<T>& device, const T* host, std::size_t count, const char* what, cudaStream_t stream) {
  T* data = device.reserve(count, what);
  if (count) check(cudaMemcpyAsync(data, host, count * sizeof(T), cudaMemcpyHostToDevice, stream), what);
  return data;
}
// Enqueues device -> pinned host on `stream`; returns the pinned copy (valid once the stream is synchronised).
template <typename T>
T* download(PinnedArray<T>& host, const T* device, std::size_t count, const char* what, cudaStream_t stream) {
  T* data = host.reserve(count, what);
  if (count) check(cudaMemcpyAsync(data, device, count * sizeof(T), cudaMemcpyDeviceToHost, stream), what);
  return data;
}
template <typename T>
void copy_out(const T* pinned, std::vector<T>& out) {
  if (!out.empty()) std::memcpy(out.data(), pinned, out.size() * sizeof(T));
}

// The block size of a ranking `req` asks for (StatsRequest::rank_block or group_rank_block: `asked`; a
// multiple of block_size, 0 for block_size).
std::int64_t ranked_block(const StatsRequest& req, std::int64_t asked) {
  const std::int64_t block = asked > 0 ? asked : req.block_size;
  if (block % req.block_size != 0) {
    fail(ErrorKind::kInternal, "ranking blocks of {} keys from statistics of blocks of {}", block, req.block_size);
  }
  return block;
}

// How many blocks of each row the device ranks for a request of `wanted` blocks of `block` keys: none
// where the prefix is longer than one thread block sorts (the caller ranks those rows).
std::int64_t device_ranked(const StatsRequest& req, std::int64_t wanted, std::int64_t block, long long prefix_limit) {
  const std::int64_t ranked_blocks = req.rows[req.num_rows - 1] / block + 1;
  const std::int64_t ranked = std::max<std::int64_t>(0, std::min(wanted, ranked_blocks));
  return ranked <= prefix_limit ? ranked : 0;
}

// Sizes a tile for `req` without clearing it: every value is overwritten by the downloads. The device
// ranks prefixes up to prefix_limit (ranked_prefix_limit of its shared memory).
void size_tile(const StatsRequest& req, long long prefix_limit, StatsTile& out) {
  out.heads = req.heads;
  out.rows = req.num_rows;
  out.head_dim = req.head_dim;
  out.num_blocks = req.rows[req.num_rows - 1] / req.block_size + 1;
  const auto cells = static_cast<std::size_t>(out.heads * out.rows * out.num_blocks);
  out.block_max.resize(cells);
  out.block_sum.resize(cells);
  out.lse_tokens.resize(static_cast<std::size_t>(out.heads * out.rows));
  out.lse_all.resize(static_cast<std::size_t>(out.heads * out.rows));
  if (req.v) out.output.resize(static_cast<std::size_t>(out.heads * out.rows * out.head_dim));
  else out.output.clear();
  // Ranked on the device whenever asked, unless the prefix asked is longer than one thread block sorts.
  out.ranked = device_ranked(req, req.rank_blocks, ranked_block(req, req.rank_block), prefix_limit);
  out.mass_order.resize(static_cast<std::size_t>(out.heads * out.rows * out.ranked));
  out.group_ranked = device_ranked(req, req.group_rank_blocks, ranked_block(req, req.group_rank_block), prefix_limit);
  out.group_max_order.resize(static_cast<std::size_t>(out.rows * out.group_ranked));
}

const char* describe(Precision precision) {
  switch (precision) {
    case Precision::kFp32: return "fp32 scores (exact, SIMT)";
    case Precision::kBf16: return "bf16 inputs, tensor-core scores with fp32 accumulation";
    case Precision::kFp16: return "fp16 inputs, tensor-core scores with fp32 accumulation";
  }
  return "?";
}

// One KV head's keys (fp32, and rounded for the tensor cores under bf16/fp16) and values on the
// device, and which host arrays they came from.
struct ResidentKeys {
  std::shared_mutex in_use;  // shared while a lane reads the keys, exclusive while they are replaced
  DeviceArray<float> k32, v;
  DeviceArray<unsigned short> rounded;
  std::uint64_t tensors_id = 0;  // 0: holds nothing; ids grow with every layer the engine reads
  std::int64_t keys = 0;
  const float* k_host = nullptr;
  const float* v_host = nullptr;
  bool holds(const StatsRequest& req) const {
    const std::int64_t wanted = req.rows[req.num_rows - 1] + 1;
    return req.tensors_id != 0 && tensors_id == req.tensors_id && k_host == req.k && wanted <= keys &&
           (req.v == nullptr || req.v == v_host);
  }
  void clear() {
    k32.clear();
    v.clear();
    rounded.clear();
    tensors_id = 0;
  }
};

// One stream with everything a request needs: device buffers, pinned staging, the pass's plan.
struct Lane {
  Lane(int multiprocessors, std::size_t shared_bytes) : pass(multiprocessors, shared_bytes) {
    // Non-blocking: nothing on the legacy default stream may serialise the lanes.
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream creation");
  }
  Lane(const Lane&) = delete;
  Lane& operator=(const Lane&) = delete;
  ~Lane() {
    if (blas) (void)cublasDestroy(blas);
    (void)cudaStreamDestroy(stream);
  }
  void synchronize(const char* what) const { check(cudaStreamSynchronize(stream), what); }

  cudaStream_t stream = nullptr;
  StatsPass pass;
  PinnedArray<float> host_q, host_block_max, host_block_sum, host_output, host_bounds;
  PinnedArray<long long> host_positions;
  PinnedArray<double> host_lse_tokens, host_lse_all, host_sink_weight, host_errors;
  PinnedArray<int> host_overflow, host_rankings, host_group_rankings;
  DeviceArray<int> rankings;  // block or page rankings (one request at a time per lane)
  DeviceArray<int> group_rankings;  // block rankings by group, beside the block rankings by mass
  DeviceArray<float> q, sinks, block_max, block_sum, output, output_partials, bounds;
  DeviceArray<double> lse_tokens, lse_all, sink_weight, factors, errors;
  DeviceArray<OutputWalk> walks;
  DeviceArray<OutputStep> steps;
  DeviceArray<unsigned short> q_rounded;
  DeviceArray<int> overflow;
  DeviceArray<long long> positions;
  // H2O's simulations (Backend::h2o_evictions).
  DeviceArray<float> h2o_q, h2o_keys, h2o_keys_t;
  DeviceArray<long long> h2o_capacity;
  DeviceArray<double> h2o_sinks, h2o_score, h2o_logits;
  DeviceArray<int> h2o_cache, h2o_evicted;
  PinnedArray<int> host_h2o_evicted, h2o_stop;
  // InfLLM's received attention (Backend::attention_received), and the cuBLAS handle its GEMMs use.
  DeviceArray<float> received_input;
  DeviceArray<double> received_q, received_k, received_logits, received_lse, received_sums;
  PinnedArray<double> host_received;
  cublasHandle_t blas = nullptr;
  // NSA's scores and pooled-key logits (Backend::nsa_block_scores, pooled_key_logits): compressed keys of
  // requests that do not name them, logits, scores.
  DeviceArray<double> nsa_keys_t, nsa_logits, nsa_scores;
  PinnedArray<double> host_nsa_scores;
  // Token-score rankings (Backend::token_score_rankings): keys of requests that do not name them, the rows'
  // terms, the block scores' workspace.
  DeviceArray<double> token_keys, token_weights, token_divisors, token_scores;
  DeviceArray<int> token_channels;
  DeviceArray<long long> token_counts;
  PinnedArray<double> host_token_weights, host_token_divisors;
  PinnedArray<int> host_token_channels;
  PinnedArray<long long> host_token_counts;
  PinnedArray<double> host_array;  // the staging of resident arrays' uploads
  PinnedArray<float> host_array32;
  DeviceArray<float> token_keys32;
  ResidentKeys own_keys;  // for requests that do not name their layer's tensors (nothing is shared)
};

// A request's query rows ([heads][seq_len][head_dim] on the host) gathered into the lane's pinned
// [heads][rows][head_dim], each value times `factor` (1, or what the statistics pass folds into q), and
// enqueued to the device on the lane's stream. Every request type names its rows the same way.
template <typename Request>
float* upload_query_rows(const Request& req, Lane& lane, float factor = 1.0f) {
  const std::int64_t G = req.heads, R = req.num_rows, d = req.head_dim;
  float* host_q = lane.host_q.reserve(static_cast<std::size_t>(G * R * d), "query rows (pinned)");
  for (std::int64_t h = 0; h < G; ++h) {
    for (std::int64_t r = 0; r < R; ++r) {
      const float* src = req.q + (h * req.seq_len + req.rows[r]) * d;
      float* dst = host_q + (h * R + r) * d;
      if (factor == 1.0f) std::copy(src, src + d, dst);
      else for (std::int64_t c = 0; c < d; ++c) dst[c] = src[c] * factor;
    }
  }
  return upload(lane.q, host_q, static_cast<std::size_t>(G * R * d), "query rows", lane.stream);
}

// A request's query positions, enqueued to the device on the lane's stream.
template <typename Request>
long long* upload_query_positions(const Request& req, Lane& lane) {
  const auto R = static_cast<std::size_t>(req.num_rows);
  long long* host_positions = lane.host_positions.reserve(R, "query positions (pinned)");
  std::copy(req.rows, req.rows + R, host_positions);
  return upload(lane.positions, host_positions, R, "query positions", lane.stream);
}

// Up to kLanesPerDevice lanes, made on first need; a caller waits while all are busy.
class LanePool {
 public:
  // shared_bytes: the shared memory a block may take (StatsPass's limit).
  LanePool(int multiprocessors, std::size_t shared_bytes) : multiprocessors_(multiprocessors), shared_bytes_(shared_bytes) {}
  class Lease {
   public:
    Lease(LanePool& pool, Lane& lane) : pool_(pool), lane_(lane) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    // Work a failed request left queued must not outlive its lease (the next holder reuses the buffers).
    ~Lease() {
      (void)cudaStreamSynchronize(lane_.stream);
      pool_.give_back(lane_);
    }
    Lane& operator*() const { return lane_; }
    Lane* operator->() const { return &lane_; }

   private:
    LanePool& pool_;
    Lane& lane_;
  };
  // Call with the pool's device current.
  Lease take() {
    std::unique_lock<std::mutex> lock(mutex_);
    idle_changed_.wait(lock, [&] { return !idle_.empty() || lanes_.size() < kLanesPerDevice; });
    if (idle_.empty()) {
      lanes_.push_back(std::make_unique<Lane>(multiprocessors_, shared_bytes_));
      idle_.push_back(lanes_.back().get());
    }
    Lane* lane = idle_.back();
    idle_.pop_back();
    return Lease(*this, *lane);
  }

 private:
  void give_back(Lane& lane) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_.push_back(&lane);
    }
    idle_changed_.notify_one();
  }
  int multiprocessors_;
  std::size_t shared_bytes_;
  std::mutex mutex_;
  std::condition_variable idle_changed_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  std::vector<Lane*> idle_;
};

// Arms a lane's fp16 overflow flag for the conversions enqueued after it (nullptr unless fp16).
int* overflow_flag(InputType type, Lane& lane) {
  if (type != InputType::kFloat16) return nullptr;
  int* flag = lane.overflow.reserve(1, "overflow flag");
  check(cudaMemsetAsync(flag, 0, sizeof(int), lane.stream), "overflow flag");
  return flag;
}
// fp16 holds magnitudes up to 65504: a larger finite input would become infinite. Synchronises the lane.
void check_range(InputType type, Lane& lane, const char* what, const StatsRequest& req) {
  if (type != InputType::kFloat16) return;
  const int* overflow = download(lane.host_overflow, lane.overflow.get(), 1, "input conversion", lane.stream);
  lane.synchronize("input conversion");
  if (*overflow) {
    fail(ErrorKind::kUsage,
         "--precision fp16: a {} value of layer {}, KV head {} exceeds the fp16 range (|x| > 65504); use --precision "
         "bf16 or fp32",
         what, req.layer, req.kv_head);
  }
}

// Frees a lane's layer-sized buffers (a layer's queries and workspace: gigabytes at 128K tokens) when a
// request ends, its stream synchronised first, so that the keys of later layers find the room.
template <typename... Arrays>
class FreedAtEnd {
 public:
  explicit FreedAtEnd(cudaStream_t stream, Arrays&... arrays) : stream_(stream), arrays_(arrays...) {}
  FreedAtEnd(const FreedAtEnd&) = delete;
  FreedAtEnd& operator=(const FreedAtEnd&) = delete;
  ~FreedAtEnd() {
    (void)cudaStreamSynchronize(stream_);
    std::apply([](auto&... array) { (array.clear(), ...); }, arrays_);
  }

 private:
  cudaStream_t stream_;
  std::tuple<Arrays&...> arrays_;
};

// Waits for `stream`'s work, polling `stop_requested` (may be null) every millisecond: false once it
// asks to stop (after setting *device_flag, when given, which the running kernel reads), with the
// work still running; the caller returns, and its lease waits for the stream.
bool finish_unless_stopped(cudaStream_t stream, bool (*stop_requested)(), volatile int* device_flag, const char* what) {
  cudaError_t status = cudaErrorNotReady;
  while ((status = cudaStreamQuery(stream)) == cudaErrorNotReady) {
    if (stop_requested && stop_requested()) {
      if (device_flag) *device_flag = 1;
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  check(status, what);
  return true;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, Precision precision) : device_(device), precision_(precision), type_(input_type(precision)) {
    check(cudaSetDevice(device_), "cudaSetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
    description_ = fmt::format("cuda:{} {} (sm_{}{}, {} SMs, {:.1f} GiB), {}", device_, prop.name, prop.major, prop.minor,
                               prop.multiProcessorCount, static_cast<double>(prop.totalGlobalMem) / 1073741824.0,
                               describe(precision_));
    if (prop.major < 8) {
      fail(ErrorKind::kDevice, "cuda:{} {} has compute capability {}.{}; hysparse's kernels need 8.0 or newer (bf16 tensor cores)",
           device_, prop.name, prop.major, prop.minor);
    }
    if (!has_kernels_for_current_device()) {
      fail(ErrorKind::kDevice, "cuda:{} {} has compute capability {}.{}, and this build has no code for it (CUDA architectures {}): "
           "configure with -DCMAKE_CUDA_ARCHITECTURES={}{} and rebuild", device_, prop.name, prop.major, prop.minor,
           HYSPARSE_CUDA_ARCHITECTURES, prop.major, prop.minor);
    }
    // Rankings take as long a prefix as a block's shared memory holds (Hopper: 16,384 blocks; 99-163 KiB
    // GPUs: 8,192); the kernels may take the device's whole limit, the decisions follow the (test) limit.
    int device_shared = 0;
    check(cudaDeviceGetAttribute(&device_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_), "shared memory limit");
    const std::int64_t cap = shared_memory_limit_bytes.load();
    shared_bytes_ = static_cast<std::size_t>(cap > 0 ? std::min<std::int64_t>(cap, device_shared) : device_shared);
    if (shared_bytes_ < kMinRankingSharedBytes) {
      fail(ErrorKind::kDevice, "cuda:{} {} lets a thread block take {} bytes of shared memory; the rankings need {}", device_,
           prop.name, shared_bytes_, kMinRankingSharedBytes);
    }
    prefix_limit_ = ranked_prefix_limit(shared_bytes_);
    lanes_ = std::make_unique<LanePool>(prop.multiProcessorCount, shared_bytes_);
    configure_ranking_kernels(static_cast<std::size_t>(device_shared));
    configure_token_score_kernels(static_cast<std::size_t>(device_shared));
  }
  std::string name() const override { return "cuda"; }
  std::string device() const override { return description_; }
  Precision precision() const override { return precision_; }
  std::int64_t preferred_tile_rows() const override { return 4096; }

  void output_errors(const StatsRequest& req, const StatsTile& tile, const OutputWalks& walks,
                     std::vector<double>& errors) const override {
    check_output_request(req, tile, walks);
    errors.assign(static_cast<std::size_t>(walks.checkpoints), std::numeric_limits<double>::quiet_NaN());
    if (walks.walks.empty()) return;
    if (req.head_dim > kMaxHeadDim) {
      fail(ErrorKind::kUsage, "--device cuda supports head_dim up to {} (capture has {})", kMaxHeadDim, req.head_dim);
    }
    check(cudaSetDevice(device_), "cudaSetDevice");
    LanePool::Lease lane = lanes_->take();
    const cudaStream_t stream = lane->stream;
    const std::int64_t G = req.heads, R = req.num_rows, d = req.head_dim;
    // The tile's query rows (fp32, unscaled), its row statistics and exact output.
    double* host_sink_weight = lane->host_sink_weight.reserve(static_cast<std::size_t>(G * R), "sink weights (pinned)");
    for (std::int64_t h = 0; h < G; ++h) {
      for (std::int64_t r = 0; r < R; ++r) {
        const double lse_all = tile.lse_all[static_cast<std::size_t>(h * R + r)];
        host_sink_weight[h * R + r] = req.sink_logits ? std::exp(static_cast<double>(req.sink_logits[h]) - lse_all) : 0.0;
      }
    }
    const KeysInUse keys = resident(req, *lane);
    OutputWalkArgs args;
    args.q = upload_query_rows(req, *lane);
    args.k = keys.entry.k32.get();
    args.v = keys.entry.v.get();
    args.lse_all = upload(lane->lse_all, tile.lse_all.data(), tile.lse_all.size(), "row log-sum-exps with sinks", stream);
    args.sink_weight = upload(lane->sink_weight, host_sink_weight, static_cast<std::size_t>(G * R), "sink weights", stream);
    args.exact = upload(lane->output, tile.output.data(), tile.output.size(), "exact outputs", stream);
    args.walks = upload(lane->walks, walks.walks.data(), walks.walks.size(), "output walks", stream);
    args.steps = upload(lane->steps, walks.steps.data(), walks.steps.size(), "output walk steps", stream);
    args.factors = walks.factors.empty() ? nullptr
                                         : upload(lane->factors, walks.factors.data(), walks.factors.size(), "walk factors", stream);
    args.num_walks = static_cast<long long>(walks.walks.size());
    args.rows = static_cast<int>(R);
    args.head_dim = static_cast<int>(d);
    args.scale = req.scale;
    args.errors = lane->errors.reserve(errors.size(), "output errors");
    launch_output_walks(args, stream);
    const double* host_errors = download(lane->host_errors, args.errors, errors.size(), "output walk errors", stream);
    lane->synchronize("output walk kernel");
    copy_out(host_errors, errors);
  }

  bool h2o_evictions(const H2oRequest& req, std::vector<std::int32_t>& evicted) const override {
    if (req.seq_len <= 0 || req.heads <= 0 || req.budgets <= 0 || req.sets <= 0 || req.kv_heads <= 0) {
      fail(ErrorKind::kInternal, "H2O simulation of {} keys, {} sets of {} heads, {} budgets", req.seq_len, req.sets, req.heads,
           req.budgets);
    }
    if (req.stop_requested && req.stop_requested()) return false;
    // This device first: h2o_shared_bytes reads the kernel's attributes on the current one (a fresh thread of a
    // multi-device backend starts on GPU 0).
    check(cudaSetDevice(device_), "cudaSetDevice");
    // Key indices are int on the device; the step's queries must fit in shared memory.
    if (req.seq_len > std::numeric_limits<int>::max() / 2 ||
        h2o_shared_bytes(static_cast<int>(req.heads), static_cast<int>(req.head_dim)) > shared_bytes_) {
      return false;
    }
    try {
      LanePool::Lease lane = lanes_->take();
      const cudaStream_t stream = lane->stream;
      const FreedAtEnd freed(stream, lane->h2o_q, lane->h2o_keys, lane->h2o_keys_t, lane->h2o_score, lane->h2o_logits,
                             lane->h2o_cache, lane->h2o_evicted, lane->host_h2o_evicted);
      const std::int64_t T = req.seq_len, d = req.head_dim, G = req.heads, NB = req.budgets, S = req.sets, K = req.kv_heads;
      H2oSimulationArgs args;
      args.q = upload(lane->h2o_q, req.q, static_cast<std::size_t>(S * G * T * d), "H2O queries", stream);
      const float* keys = upload(lane->h2o_keys, req.k, static_cast<std::size_t>(K * T * d), "H2O keys", stream);
      args.keys_t = lane->h2o_keys_t.reserve(static_cast<std::size_t>(K * T * d), "H2O keys, transposed");
      args.seq_len = T;
      args.sets = S;
      args.kv_heads = K;
      args.heads = static_cast<int>(G);
      args.head_dim = static_cast<int>(d);
      args.scale = req.scale;
      args.sink_logits = req.sink_logits ? upload(lane->h2o_sinks, req.sink_logits, static_cast<std::size_t>(S * G), "H2O sinks", stream)
                                         : nullptr;
      args.recent_percent = req.recent_percent;
      args.budgets = static_cast<int>(NB);
      static_assert(sizeof(long long) == sizeof(std::int64_t), "capacities are copied as long long");
      args.capacity = upload(lane->h2o_capacity, reinterpret_cast<const long long*>(req.capacity),
                             static_cast<std::size_t>(NB * (T - 1)), "H2O capacities", stream);
      args.cache = lane->h2o_cache.reserve(static_cast<std::size_t>(NB * S * 2 * T), "H2O caches");
      args.score = lane->h2o_score.reserve(static_cast<std::size_t>(NB * S * T), "H2O scores");
      args.logits = lane->h2o_logits.reserve(static_cast<std::size_t>(NB * S * G * T), "H2O logits");
      args.evicted = lane->h2o_evicted.reserve(static_cast<std::size_t>(NB * S * T), "H2O evictions");
      // A flag in pinned host memory that the kernel reads: set at a signal, it ends the simulations early.
      volatile int* stop = lane->h2o_stop.reserve(1, "H2O stop flag");
      *stop = 0;
      void* stop_on_device = nullptr;
      check(cudaHostGetDevicePointer(&stop_on_device, const_cast<int*>(stop), 0), "H2O stop flag");
      args.stop = static_cast<const volatile int*>(stop_on_device);
      launch_h2o_simulation(args, keys, stream);
      evicted.resize(static_cast<std::size_t>(NB * S * T));
      const int* host = download(lane->host_h2o_evicted, static_cast<const int*>(args.evicted), evicted.size(), "H2O evictions", stream);
      // Seconds to minutes at long sequences: the wait polls for a signal, which ends the kernel within
      // kStopPollSteps positions (the lease then waits for it); the caller checks for the signal.
      if (!finish_unless_stopped(stream, req.stop_requested, stop, "H2O kernel")) return false;
      static_assert(sizeof(int) == sizeof(std::int32_t), "evictions are copied as int");
      std::memcpy(evicted.data(), host, evicted.size() * sizeof(std::int32_t));
      return true;
    } catch (const Error& error) {
      if (error.kind() != ErrorKind::kResource) throw;
      return false;  // no room on the device: the selector simulates on the host
    }
  }

  bool attention_received(const ReceivedRequest& req, std::vector<double>& received) const override {
    if (req.seq_len <= 0 || req.heads <= 0 || req.kv_heads <= 0 || req.heads % req.kv_heads != 0 || req.head_dim <= 0) {
      fail(ErrorKind::kInternal, "received attention of {} keys, {} heads over {} KV heads, head_dim {}", req.seq_len, req.heads,
           req.kv_heads, req.head_dim);
    }
    if (req.seq_len > std::numeric_limits<int>::max()) return false;  // cuBLAS's dimensions are int
    try {
      check(cudaSetDevice(device_), "cudaSetDevice");
      LanePool::Lease lane = lanes_->take();
      const cudaStream_t stream = lane->stream;
      const FreedAtEnd freed(stream, lane->received_input, lane->received_q, lane->received_k, lane->received_logits,
                             lane->received_lse, lane->received_sums, lane->host_received);
      if (!lane->blas) {
        const cublasStatus_t status = cublasCreate(&lane->blas);
        if (status != CUBLAS_STATUS_SUCCESS) {
          lane->blas = nullptr;
          (void)cudaGetLastError();  // as after a failed allocation: not for this thread's next launch check
          fail(status == CUBLAS_STATUS_ALLOC_FAILED ? ErrorKind::kResource : ErrorKind::kDevice, "cuBLAS handle: status {}",
               static_cast<int>(status));
        }
      }
      const long long T = req.seq_len, d = req.head_dim, H = req.heads, G = req.heads / req.kv_heads;
      long long rows_per_pass = req.rows_per_pass;
      if (rows_per_pass <= 0) {
        rows_per_pass = std::clamp<long long>(kReceivedWorkspaceBytes / static_cast<long long>(sizeof(double)) / T, 64, 1024) / 64 * 64;
      }
      const auto cells = static_cast<std::size_t>(T * d);
      float* input = lane->received_input.reserve(cells, "received attention: inputs");
      double* queries = lane->received_q.reserve(cells, "received attention: queries in double");
      double* keys = lane->received_k.reserve(cells, "received attention: keys in double");
      ReceivedHeadArgs args;
      args.q = queries;
      args.k = keys;
      args.logits = lane->received_logits.reserve(static_cast<std::size_t>(rows_per_pass * T), "received attention: logits");
      args.lse = lane->received_lse.reserve(static_cast<std::size_t>(rows_per_pass), "received attention: log-sum-exps");
      args.received = lane->received_sums.reserve(static_cast<std::size_t>(T), "received attention: sums");
      double* host = lane->host_received.reserve(static_cast<std::size_t>(H * T), "received attention (pinned)");
      args.seq_len = T;
      args.head_dim = d;
      args.window = std::min<long long>(req.window, T);  // a longer window adds nothing (and cannot overflow j + window)
      args.rows_per_pass = rows_per_pass;
      args.scale = req.scale;
      long long widened_kv_head = -1;
      for (long long h = 0; h < H; ++h) {
        if (req.stop_requested && req.stop_requested()) return false;
        if (h / G != widened_kv_head) {
          widened_kv_head = h / G;
          check(cudaMemcpyAsync(input, req.k + widened_kv_head * T * d, cells * sizeof(float), cudaMemcpyHostToDevice, stream),
                "received attention: keys");
          launch_widen(input, static_cast<long long>(cells), keys, stream);
        }
        check(cudaMemcpyAsync(input, req.q + h * T * d, cells * sizeof(float), cudaMemcpyHostToDevice, stream),
              "received attention: queries");
        launch_widen(input, static_cast<long long>(cells), queries, stream);
        args.has_sink = req.sink_logits != nullptr;
        args.sink = args.has_sink ? req.sink_logits[h] : 0.0;
        received_for_head(lane->blas, args, stream);
        check(cudaMemcpyAsync(host + h * T, args.received, static_cast<std::size_t>(T) * sizeof(double), cudaMemcpyDeviceToHost, stream),
              "received attention: sums");
        // A head takes up to about 0.4 s at 128K tokens: a signal waits for one head at most.
        if (!finish_unless_stopped(stream, req.stop_requested, nullptr, "received attention kernels")) return false;
      }
      received.assign(host, host + H * T);
      return true;
    } catch (const Error& error) {
      if (error.kind() != ErrorKind::kResource) throw;
      return false;  // no room on the device: the selector computes it on the host
    }
  }

  bool nsa_block_scores(const NsaScoreRequest& req, std::vector<double>& scores) const override {
    try {
      return run_nsa(req, NsaResult::kBlockScores, scores);
    } catch (const Error& error) {
      if (error.kind() != ErrorKind::kResource) throw;
      return false;  // no room on the device: the selector scores on the host
    }
  }

  bool pooled_key_logits(const NsaScoreRequest& req, std::vector<double>& logits) const override {
    try {
      return run_nsa(req, NsaResult::kLogits, logits);
    } catch (const Error& error) {
      if (error.kind() != ErrorKind::kResource) throw;
      return false;  // no room on the device: the selector computes them on the host
    }
  }

  // NSA's block scores, or its logits alone (Backend::pooled_key_logits), of one request into `out`.
  enum class NsaResult { kBlockScores, kLogits };
  bool run_nsa(const NsaScoreRequest& req, NsaResult what, std::vector<double>& out) const {
    if (req.num_rows <= 0 || req.heads <= 0 || req.head_dim <= 0 || req.stride < 1 || req.cmp < 1 || req.block < 1 ||
        req.block % req.stride != 0 || req.cmp % req.stride != 0 || req.compressed < 0) {
      fail(ErrorKind::kInternal, "NSA scores of {} rows, {} heads, head_dim {}, block {}, cmp {}, stride {}, {} compressed keys",
           req.num_rows, req.heads, req.head_dim, req.block, req.cmp, req.stride, req.compressed);
    }
    if (req.head_dim > kMaxHeadDim) return false;
    const std::int64_t R = req.num_rows, G = req.heads, d = req.head_dim, C = req.compressed;
    NsaScoreArgs args;
    args.heads = static_cast<int>(G);
    args.rows = static_cast<int>(R);
    args.head_dim = static_cast<int>(d);
    args.compressed = C;
    args.cmp = req.cmp;
    args.stride = req.stride;
    args.block = req.block;
    args.scale = req.scale;
    args.fused = req.fused;
    args.width = nsa_visible_keys(args, req.rows[R - 1]);
    args.blocks = req.rows[R - 1] / req.block + 1;
    const bool logits_only = what == NsaResult::kLogits;
    out.assign(static_cast<std::size_t>(logits_only ? G * R * args.width : R * args.blocks), 0.0);
    if (args.width == 0) return true;  // no row sees a compressed key yet: every score is 0, and no logit
    check(cudaSetDevice(device_), "cudaSetDevice");
    LanePool::Lease lane = lanes_->take();
    const cudaStream_t stream = lane->stream;
    args.q = upload_query_rows(req, *lane);
    args.positions = upload_query_positions(req, *lane);
    args.logits = lane->nsa_logits.reserve(static_cast<std::size_t>(G * R * args.width), "NSA logits");
    if (!logits_only) args.scores = lane->nsa_scores.reserve(out.size(), "NSA scores");
    const double* result = nullptr;
    auto compute = [&] {
      if (logits_only) {
        // Logits past a row's visible keys are never written: zeroed first, so that they read 0.
        check(cudaMemsetAsync(args.logits, 0, out.size() * sizeof(double), stream), "NSA logits clear");
        launch_nsa_logits(args, stream);
      } else {
        launch_nsa_scores(args, stream);
      }
      result = download(lane->host_nsa_scores, static_cast<const double*>(logits_only ? args.logits : args.scores), out.size(),
                        logits_only ? "pooled-key logits" : "NSA scores", stream);
      lane->synchronize(logits_only ? "pooled-key logits kernel" : "NSA score kernels");
    };
    // Channel-major, so that a warp's threads (consecutive keys) read consecutive words.
    auto transpose = [&](double* host) {
      for (std::int64_t i = 0; i < C; ++i) {
        for (std::int64_t c = 0; c < d; ++c) host[c * C + i] = req.keys[i * d + c];
      }
    };
    with_array(lane->nsa_keys_t, req.kv_head, req.keys_id, req.keys, d, C, "compressed keys", *lane, transpose, [&](const double* keys) {
      args.keys_t = keys;
      compute();
    });
    copy_out(result, out);
    return true;
  }

  bool token_score_rankings(const TokenScoreRequest& req, std::vector<std::int32_t>& order) const override {
    try {
      return rank_token_scores(req, order);
    } catch (const Error& error) {
      if (error.kind() != ErrorKind::kResource) throw;
      return false;  // no room on the device: the selector ranks on the host
    }
  }

  bool rank_token_scores(const TokenScoreRequest& req, std::vector<std::int32_t>& order) const {
    check_token_score_request(req);  // before any index of the request reaches the device
    const std::int64_t R = req.num_rows, S = req.sets, U = req.terms, n = req.channels, W = req.width, T = req.seq_len;
    std::int64_t stride = 0;  // the largest count (proxy::token_score_stride)
    for (std::int64_t r = 0; r < R; ++r) stride = std::max(stride, req.counts[r]);
    // Longer prefixes than one thread block sorts, or more keys than int indexes: the caller ranks them.
    constexpr std::int64_t kMaxInt = std::numeric_limits<int>::max();
    if (stride > prefix_limit_ || T > kMaxInt || S * R > kMaxInt || W > kMaxInt || U > kMaxInt || n > kMaxInt) return false;
    TokenScoreArgs args;
    args.width = static_cast<int>(W);
    args.sets = static_cast<int>(S);
    args.terms = static_cast<int>(U);
    args.channels = static_cast<int>(n);
    args.prefix_limit = prefix_limit_;
    args.shared_bytes = shared_bytes_;
    // Wider keys, or more terms a row, than a score block's shared memory holds: the caller ranks them.
    if (!token_scores_fit(args)) return false;
    check(cudaSetDevice(device_), "cudaSetDevice");
    LanePool::Lease lane = lanes_->take();
    const cudaStream_t stream = lane->stream;
    const auto terms = static_cast<std::size_t>(S * R * U), weights = terms * static_cast<std::size_t>(n);
    // The rows' terms (channels spelled out where the request leaves them implicit) and counts.
    int* host_channels = lane->host_token_channels.reserve(weights, "token-score channels (pinned)");
    double* host_weights = lane->host_token_weights.reserve(weights, "token-score weights (pinned)");
    long long* host_counts = lane->host_token_counts.reserve(static_cast<std::size_t>(R), "token-score counts (pinned)");
    for (std::size_t i = 0; i < weights; ++i) {
      host_channels[i] = req.channel ? req.channel[i] : static_cast<int>(i % static_cast<std::size_t>(n));
      host_weights[i] = req.weight[i];
    }
    for (std::int64_t r = 0; r < R; ++r) host_counts[r] = req.counts[r];
    args.channel = upload(lane->token_channels, host_channels, weights, "token-score channels", stream);
    args.weight = upload(lane->token_weights, host_weights, weights, "token-score weights", stream);
    if (req.divisor) {
      double* host_divisors = lane->host_token_divisors.reserve(terms, "token-score divisors (pinned)");
      std::copy_n(req.divisor, terms, host_divisors);
      args.divisor = upload(lane->token_divisors, host_divisors, terms, "token-score divisors", stream);
    }
    args.positions = upload_query_positions(req, *lane);
    const long long* host_positions = lane->host_positions.get();
    args.counts = upload(lane->token_counts, host_counts, static_cast<std::size_t>(R), "token-score counts", stream);
    args.total_rows = static_cast<int>(R);
    args.local = req.local;
    args.block = req.block;
    args.num_blocks = req.rows[R - 1] / req.block + 1;
    args.fused = req.fused;
    args.stride = static_cast<int>(stride);
    order.assign(static_cast<std::size_t>(S * R * stride), 0);
    args.order = lane->rankings.reserve(std::max<std::size_t>(1, order.size()), "token-score rankings");
    check(cudaMemsetAsync(args.order, 0, order.size() * sizeof(int), stream), "token-score rankings clear");
    // Rows in chunks whose block scores fit the workspace (one row at least).
    const std::int64_t chunk = std::clamp<std::int64_t>(token_score_workspace_bytes.load() / static_cast<std::int64_t>(sizeof(double)) /
                                                            (S * args.num_blocks), 1, R);
    args.scores = lane->token_scores.reserve(static_cast<std::size_t>(S * chunk * args.num_blocks), "token-score workspace");
    auto compute = [&] {
      for (std::int64_t r0 = 0; r0 < R; r0 += chunk) {
        args.row_begin = static_cast<int>(r0);
        args.rows = static_cast<int>(std::min(chunk, R - r0));
        launch_token_score_rankings(args, host_positions, host_counts, stream);
      }
      const int* ranked = download(lane->host_rankings, static_cast<const int*>(args.order), order.size(), "token-score rankings", stream);
      lane->synchronize("token-score kernels");
      copy_out(ranked, order);
    };
    // The keys as the request gives them (fp32 widened on the device, exactly).
    const std::int64_t values = T * W;
    if (req.keys) {
      auto copy = [&](float* host) { std::copy_n(req.keys, values, host); };
      with_array(lane->token_keys32, req.kv_head, req.keys_id, req.keys, T, W, "token-score keys", *lane, copy, [&](const float* keys) {
        args.keys32 = keys;
        compute();
      });
    } else {
      auto copy = [&](double* host) { std::copy_n(req.keys64, values, host); };
      with_array(lane->token_keys, req.kv_head, req.keys_id, req.keys64, T, W, "token-score keys", *lane, copy, [&](const double* keys) {
        args.keys = keys;
        compute();
      });
    }
    return true;
  }

  bool page_bound_rankings(const PageBoundRequest& req, std::vector<std::int32_t>& order) const override {
    try {
      return rank_pages(req, order);
    } catch (const Error& error) {
      if (error.kind() != ErrorKind::kResource) throw;
      return false;  // no room on the device for this tile's bounds: the selector ranks on the host
    }
  }

  bool rank_pages(const PageBoundRequest& req, std::vector<std::int32_t>& order) const {
    if (req.num_rows <= 0 || req.count <= 0 || req.count > req.pages || req.page <= 0) {
      fail(ErrorKind::kInternal, "page ranking of {} rows, {} of {} pages of {} keys a row", req.num_rows, req.count, req.pages,
           req.page);
    }
    // Longer rows than one thread block sorts, or wider heads than its staging: the caller ranks them.
    if (req.pages > kMaxRankedPages || req.head_dim > kMaxBoundHeadDim) return false;
    check(cudaSetDevice(device_), "cudaSetDevice");
    LanePool::Lease lane = lanes_->take();
    const cudaStream_t stream = lane->stream;
    const std::int64_t G = req.heads, R = req.num_rows, d = req.head_dim, P = req.pages;
    const std::int64_t count = req.count;
    // Bounds channel-major, so that a warp's threads (consecutive pages) read consecutive words; the
    // bounds are key values, exact in fp32.
    float* host_bounds = lane->host_bounds.reserve(static_cast<std::size_t>(2 * d * P), "page bounds (pinned)");
    for (std::int64_t b = 0; b < P; ++b) {
      for (std::int64_t c = 0; c < d; ++c) {
        host_bounds[c * P + b] = static_cast<float>(req.lo[b * d + c]);
        host_bounds[(d + c) * P + b] = static_cast<float>(req.hi[b * d + c]);
      }
    }
    PageBoundRankingArgs args;
    args.q = upload_query_rows(req, *lane);
    const float* bounds = upload(lane->bounds, host_bounds, static_cast<std::size_t>(2 * d * P), "page bounds", stream);
    args.lo = bounds;
    args.hi = bounds + d * P;
    args.positions = upload_query_positions(req, *lane);
    args.heads = static_cast<int>(G);
    args.rows = static_cast<int>(R);
    args.head_dim = static_cast<int>(d);
    args.page = req.page;
    args.pages = P;
    args.count = static_cast<int>(count);
    order.resize(static_cast<std::size_t>(G * R * count));
    args.order = lane->rankings.reserve(order.size(), "page rankings");
    launch_page_bound_ranking(args, stream);
    const int* ranked = download(lane->host_rankings, static_cast<const int*>(args.order), order.size(), "page rankings", stream);
    lane->synchronize("page ranking kernel");
    copy_out(ranked, order);
    return true;
  }

  void block_statistics(const StatsRequest& req, StatsTile& out) const override {
    if (req.num_rows <= 0 || req.block_size <= 0) {
      fail(ErrorKind::kInternal, "block_statistics: {} rows, blocks of {} keys", req.num_rows, req.block_size);
    }
    if (req.attn) {
      fail(ErrorKind::kUsage, "--device cuda replays q/k layers; this capture has dense attn layers (use --device cpu)");
    }
    if (req.head_dim > kMaxHeadDim) {
      fail(ErrorKind::kUsage, "--device cuda supports head_dim up to {} (capture has {})", kMaxHeadDim, req.head_dim);
    }
    // Key ranges are int on the device; positions beyond that would not fit in memory anyway.
    if (req.seq_len > std::numeric_limits<int>::max() / 2) {
      fail(ErrorKind::kUsage, "--device cuda supports up to {} tokens (capture has {})", std::numeric_limits<int>::max() / 2,
           req.seq_len);
    }
    check(cudaSetDevice(device_), "cudaSetDevice");
    LanePool::Lease lane = lanes_->take();
    const cudaStream_t stream = lane->stream;
    size_tile(req, prefix_limit_, out);
    const std::int64_t G = req.heads, R = req.num_rows, d = req.head_dim;
    const bool exact = type_ == InputType::kFloat32;
    const int stride = input_stride(type_, static_cast<int>(d));

    // fp32: q scaled exactly as the CPU backend scales it. bf16/fp16: q unscaled with the sign of
    // the scale folded in (exact), so inputs captured in that type round to themselves; the
    // magnitude of the scale multiplies the fp32 scores.
    const auto scale = static_cast<float>(req.scale);
    const float q_factor = exact ? scale : (scale < 0.0f ? -1.0f : 1.0f);
    const float score_scale = exact ? 1.0f : std::fabs(scale);
    float* q32 = upload_query_rows(req, *lane, q_factor);
    long long* pos = upload_query_positions(req, *lane);
    const long long* host_positions = lane->host_positions.get();
    const void* q = q32;
    if (!exact) {
      void* rounded = lane->q_rounded.reserve(static_cast<std::size_t>(G * R * stride), "rounded query rows");
      convert_rows(type_, q32, G * R, static_cast<int>(d), 1.0f, rounded, overflow_flag(type_, *lane), stream);
      check_range(type_, *lane, "query", req);
      q = rounded;
    }
    const KeysInUse keys = resident(req, *lane);
    const void* k = exact ? static_cast<const void*>(keys.entry.k32.get()) : static_cast<const void*>(keys.entry.rounded.get());

    const auto cells = static_cast<std::size_t>(G * R * out.num_blocks);
    const auto rows = static_cast<std::size_t>(G * R);
    StatsPassArgs args;
    args.type = type_;
    args.q = q;
    args.k = k;
    args.positions = pos;
    args.host_positions = host_positions;
    args.heads = static_cast<int>(G);
    args.rows = static_cast<int>(R);
    args.head_dim = static_cast<int>(d);
    args.score_scale = score_scale;
    args.block = req.block_size;
    args.num_blocks = out.num_blocks;
    args.sink_logits = req.sink_logits ? upload(lane->sinks, req.sink_logits, static_cast<std::size_t>(G), "sink logits", stream)
                                       : nullptr;
    args.block_max = lane->block_max.reserve(cells, "block maxima");
    args.block_sum = lane->block_sum.reserve(cells, "block sums");
    args.lse_tokens = lane->lse_tokens.reserve(rows, "row log-sum-exps");
    args.lse_all = lane->lse_all.reserve(rows, "row log-sum-exps with sinks");
    lane->pass.run(args, stream);
    const float* block_max = download(lane->host_block_max, args.block_max, cells, "block statistics", stream);
    const float* block_sum = download(lane->host_block_sum, args.block_sum, cells, "block sums", stream);
    const double* lse_tokens = download(lane->host_lse_tokens, args.lse_tokens, rows, "row log-sum-exps", stream);
    const double* lse_all = download(lane->host_lse_all, args.lse_all, rows, "row log-sum-exps with sinks", stream);
    // The rankings asked beside the statistics (by mass, and by largest probability over the group), each
    // into its own device array and pinned copy.
    auto rank = [&](std::int64_t asked_block, std::int64_t count, bool by_group_max, DeviceArray<int>& device_order,
                    PinnedArray<int>& host_order, std::size_t entries, const char* what) {
      BlockRankingArgs ranking;
      ranking.block_max = args.block_max;
      ranking.block_sum = args.block_sum;
      ranking.lse_tokens = args.lse_tokens;
      ranking.lse_all = args.lse_all;
      ranking.positions = pos;
      ranking.heads = args.heads;
      ranking.rows = args.rows;
      ranking.block = args.block;
      ranking.num_blocks = args.num_blocks;
      ranking.factor = static_cast<int>(ranked_block(req, asked_block) / req.block_size);
      ranking.count = static_cast<int>(count);
      ranking.order = device_order.reserve(entries, what);
      ranking.prefix_limit = prefix_limit_;
      ranking.by_group_max = by_group_max;
      launch_block_ranking(ranking, stream);
      return download(host_order, static_cast<const int*>(ranking.order), entries, what, stream);
    };
    const int* mass_order = out.ranked > 0 ? rank(req.rank_block, out.ranked, false, lane->rankings, lane->host_rankings,
                                                  out.mass_order.size(), "block rankings")
                                           : nullptr;
    const int* group_max_order = out.group_ranked > 0
                                     ? rank(req.group_rank_block, out.group_ranked, true, lane->group_rankings,
                                            lane->host_group_rankings, out.group_max_order.size(), "block rankings by group")
                                     : nullptr;
    const float* output = nullptr;
    if (req.v) {
      float* device_output = lane->output.reserve(out.output.size(), "outputs");
      const OutputSegments split = output_segments(args.heads, args.rows, args.head_dim, host_positions[R - 1] + 1);
      float* workspace = split.workspace_floats ? lane->output_partials.reserve(split.workspace_floats, "partial outputs") : nullptr;
      launch_output_pass(type_, q, k, keys.entry.v.get(), pos, args.lse_all, args.heads, args.rows, args.head_dim, score_scale,
                         split, device_output, workspace, stream);
      output = download(lane->host_output, device_output, out.output.size(), "outputs", stream);
    }
    lane->synchronize("statistics pass");
    copy_out(block_max, out.block_max);
    copy_out(block_sum, out.block_sum);
    copy_out(lse_tokens, out.lse_tokens);
    copy_out(lse_all, out.lse_all);
    if (output) copy_out(output, out.output);
    if (mass_order) copy_out(mass_order, out.mass_order);
    if (group_max_order) copy_out(group_max_order, out.group_max_order);
  }

 private:
  // Keys (and values) of a layer's KV heads stay on the device while the layer runs, so tiles of
  // different heads can come in any order. Each KV head has two generations: the layer that runs and
  // the next one, copied while it runs (prepare_keys); a new layer replaces the older generation, so
  // the device holds two layers' keys at most. fp32 keys are always kept (the output walks read
  // them); bf16/fp16 runs keep the rounded keys for the tensor cores beside them.
  struct HeadKeys {
    ResidentKeys generation[2];
    std::mutex replacing;  // one replacement per KV head at a time
  };
  // A KV head's resident keys, held shared until the request's lane has finished with them.
  // The lane's work is finished before the keys are let go (a request that fails midway leaves
  // kernels queued that read them; a replacement must not overwrite them meanwhile).
  struct KeysInUse {
    const ResidentKeys& entry;
    std::shared_lock<std::shared_mutex> lock;
    cudaStream_t stream;
    ~KeysInUse() { (void)cudaStreamSynchronize(stream); }
  };
  enum class Need { kNow, kSoon };  // a request, or prepare_keys (which never frees keys to make room)

  HeadKeys& head_keys(std::int64_t kv_head) const {
    std::lock_guard<std::mutex> lock(resident_mutex_);
    std::unique_ptr<HeadKeys>& slot = resident_[kv_head];
    if (!slot) slot = std::make_unique<HeadKeys>();
    return *slot;
  }

  // The generation of req's KV head that holds its keys, uploaded first when none does.
  KeysInUse resident(const StatsRequest& req, Lane& lane, Need need = Need::kNow) const {
    if (req.kv_head < 0 || req.tensors_id == 0) {
      std::unique_lock<std::shared_mutex> exclusive(lane.own_keys.in_use);
      replace(req, lane, lane.own_keys);
      exclusive.unlock();
      return KeysInUse{lane.own_keys, std::shared_lock<std::shared_mutex>(lane.own_keys.in_use), lane.stream};
    }
    HeadKeys& head = head_keys(req.kv_head);
    for (;;) {
      for (ResidentKeys& entry : head.generation) {
        std::shared_lock<std::shared_mutex> shared(entry.in_use);
        if (entry.holds(req)) return KeysInUse{entry, std::move(shared), lane.stream};
      }
      std::lock_guard<std::mutex> replacing(head.replacing);
      std::uint64_t ids[2];
      bool held = false;
      for (int g = 0; g < 2; ++g) {
        std::shared_lock<std::shared_mutex> shared(head.generation[g].in_use);
        ids[g] = head.generation[g].tensors_id;
        held = held || head.generation[g].holds(req);
      }
      if (held) continue;  // uploaded by another request meanwhile
      ResidentKeys& older = head.generation[ids[0] <= ids[1] ? 0 : 1];
      ResidentKeys& newer = head.generation[ids[0] <= ids[1] ? 1 : 0];
      std::unique_lock<std::shared_mutex> exclusive(older.in_use);
      try {
        replace(req, lane, older);
      } catch (const Error& e) {
        // Two layers' keys may not fit where one does: a request frees the other generation (a layer
        // no request reads now) and tries once more; prepare_keys gives up.
        // Blocking is safe: a holder of `newer` waits for nothing (lock order: replacing, older, newer).
        if (e.kind() != ErrorKind::kResource || need == Need::kSoon) throw;
        lane.synchronize("key upload");  // the failed upload's queued work reads these buffers
        std::unique_lock<std::shared_mutex> other(newer.in_use);
        newer.clear();
        older.clear();
        replace(req, lane, older);
      }
      // Taken shared before `replacing` is let go, so that no other request replaces these keys before
      // this one has read them (with more layers in flight than generations, they could otherwise
      // replace each other's keys in turn).
      exclusive.unlock();
      return KeysInUse{older, std::shared_lock<std::shared_mutex>(older.in_use), lane.stream};
    }
  }

  // Uploads one KV head's keys (and values) into `entry`; call with its lock held exclusively.
  // Synchronous on the lane, so every lane can read them as soon as the lock is released.
  void replace(const StatsRequest& req, Lane& lane, ResidentKeys& entry) const {
    const std::int64_t d = req.head_dim;
    entry.tensors_id = 0;  // nothing is held until the uploads below have succeeded
    float* k32 = upload(entry.k32, req.k, static_cast<std::size_t>(req.seq_len * d), "keys", lane.stream);
    if (type_ != InputType::kFloat32) {
      // Zero key rows up to a whole key tile: the tensor-core kernel loads tiles unguarded.
      const int stride = input_stride(type_, static_cast<int>(d));
      const std::int64_t padded = (req.seq_len + kTensorCoreKeyTile - 1) / kTensorCoreKeyTile * kTensorCoreKeyTile;
      auto* rounded = entry.rounded.reserve(static_cast<std::size_t>(padded * stride), "rounded keys");
      check(cudaMemsetAsync(rounded + req.seq_len * stride, 0, static_cast<std::size_t>((padded - req.seq_len) * stride) * 2,
                            lane.stream),
            "key padding");
      convert_rows(type_, k32, req.seq_len, static_cast<int>(d), 1.0f, rounded, overflow_flag(type_, lane), lane.stream);
      check_range(type_, lane, "key", req);
    }
    if (req.v) upload(entry.v, req.v, static_cast<std::size_t>(req.seq_len * d), "values", lane.stream);
    lane.synchronize("key upload");
    entry.tensors_id = req.tensors_id;
    entry.k_host = req.k;
    entry.v_host = req.v;
    entry.keys = req.seq_len;
  }

  // Arrays of doubles a selector names by an id (NsaScoreRequest::keys_id, TokenScoreRequest::keys_id), kept
  // on the device while they stay the same: each `nsa` spec of a replay names its compressed keys (its own
  // cmp and stride), each `moba` spec its blocks' means, each `doublesparsity` and `sparq` spec the layer's
  // keys and each `loki` spec its projected keys, so a KV head keeps kResidentArrays of them; a request for
  // another replaces the oldest (the smallest id: ids grow with every layer a selector prepares).
  static constexpr int kResidentArrays = 8;
  struct ResidentArray {
    std::shared_mutex in_use;  // shared while a lane reads it, exclusive while it is replaced
    DeviceArray<double> data;  // the array, in double or in float (one of them holds it)
    DeviceArray<float> data32;
    std::uint64_t id = 0;  // 0: holds nothing
    const void* host = nullptr;
    std::int64_t rows = 0, width = 0;
    bool holds(std::uint64_t id_, const void* host_, std::int64_t rows_, std::int64_t width_) const {
      return id != 0 && id == id_ && host == host_ && rows == rows_ && width == width_;
    }
    template <typename T>
    DeviceArray<T>& array() {
      if constexpr (std::is_same_v<T, float>) {
        return data32;
      } else {
        return data;
      }
    }
    template <typename T>
    const T* device_data() const {
      if constexpr (std::is_same_v<T, float>) {
        return data32.get();
      } else {
        return data.get();
      }
    }
  };
  struct ArrayInUse {
    const ResidentArray& entry;
    std::shared_lock<std::shared_mutex> lock;
    cudaStream_t stream;
    ~ArrayInUse() { (void)cudaStreamSynchronize(stream); }  // the lane's kernels read it
  };
  struct ResidentArrays {
    ResidentArray set[kResidentArrays];
    std::mutex replacing;  // one replacement per KV head at a time
  };

  // rows x width values (float or double) written by fill(pinned) into the lane's staging and uploaded
  // into `target`; synchronous on the lane.
  template <typename T, typename Fill>
  T* upload_array(DeviceArray<T>& target, std::int64_t rows, std::int64_t width, const char* what, Lane& lane, Fill fill) const {
    const auto count = static_cast<std::size_t>(rows * width);
    T* host = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      host = lane.host_array32.reserve(count, what);
    } else {
      host = lane.host_array.reserve(count, what);
    }
    fill(host);
    T* data = upload(target, host, count, what, lane.stream);
    lane.synchronize(what);  // the pinned staging is the lane's, reused by its next request
    resident_array_upload_count.fetch_add(1, std::memory_order_relaxed);
    return data;
  }

  // The array a request names (id, host address, shape) on the device: the resident one, or uploaded
  // (fill as in upload_array) in place of its KV head's oldest.
  template <typename T, typename Fill>
  ArrayInUse resident_array(std::int64_t kv_head, std::uint64_t id, const void* host, std::int64_t rows, std::int64_t width,
                            const char* what, Lane& lane, Fill fill) const {
    ResidentArrays* sets = nullptr;
    {
      std::lock_guard<std::mutex> lock(resident_mutex_);
      std::unique_ptr<ResidentArrays>& slot = resident_arrays_[kv_head];
      if (!slot) slot = std::make_unique<ResidentArrays>();
      sets = slot.get();
    }
    for (;;) {
      for (ResidentArray& entry : sets->set) {
        std::shared_lock<std::shared_mutex> shared(entry.in_use);
        if (entry.holds(id, host, rows, width)) return ArrayInUse{entry, std::move(shared), lane.stream};
      }
      // Lock order: replacing, then one entry exclusively; a reader holds one entry's shared lock and waits for nothing.
      std::lock_guard<std::mutex> replacing(sets->replacing);
      ResidentArray* oldest = nullptr;
      bool held = false;
      for (ResidentArray& entry : sets->set) {
        std::shared_lock<std::shared_mutex> shared(entry.in_use);
        held = held || entry.holds(id, host, rows, width);
        if (!oldest || entry.id < oldest->id) oldest = &entry;
      }
      if (held) continue;  // uploaded by another request meanwhile
      std::unique_lock<std::shared_mutex> exclusive(oldest->in_use);
      oldest->id = 0;  // nothing is held until the upload has succeeded
      oldest->data.clear();  // whichever type held the previous array
      oldest->data32.clear();
      upload_array(oldest->array<T>(), rows, width, what, lane, fill);
      oldest->id = id;
      oldest->host = host;
      oldest->rows = rows;
      oldest->width = width;
      // Taken shared before `replacing` is let go (as in resident()): with more than
      // kResidentArrays ids in use, requests could otherwise replace each other's arrays in turn.
      exclusive.unlock();
      return ArrayInUse{*oldest, std::shared_lock<std::shared_mutex>(oldest->in_use), lane.stream};
    }
  }

  // Runs compute(device pointer) on the array a request names: with id 0 uploaded into the lane's own
  // `scratch`, otherwise the resident copy (resident_array), held while compute runs.
  template <typename T, typename Fill, typename Compute>
  void with_array(DeviceArray<T>& scratch, std::int64_t kv_head, std::uint64_t id, const void* host, std::int64_t rows,
                  std::int64_t width, const char* what, Lane& lane, Fill fill, Compute compute) const {
    if (id == 0) {
      compute(static_cast<const T*>(upload_array(scratch, rows, width, what, lane, fill)));
      return;
    }
    const ArrayInUse in_use = resident_array<T>(kv_head, id, host, rows, width, what, lane, fill);
    compute(in_use.entry.template device_data<T>());
  }

 public:
  void prepare_keys(const StatsRequest& req) const override {
    if (req.num_rows <= 0 || req.attn || req.head_dim > kMaxHeadDim || req.kv_head < 0 || req.tensors_id == 0) return;
    check(cudaSetDevice(device_), "cudaSetDevice");
    // Only with room to spare: the lanes' buffers grow with the tiles of the layer that runs.
    std::size_t free_bytes = 0, total_bytes = 0;
    check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    const auto values = static_cast<std::size_t>(req.seq_len * req.head_dim);
    std::size_t bytes = values * sizeof(float) * (req.v ? 2 : 1);
    if (type_ != InputType::kFloat32) {  // the rounded keys: rows padded to the stride, to whole key tiles
      const std::int64_t padded = (req.seq_len + kTensorCoreKeyTile - 1) / kTensorCoreKeyTile * kTensorCoreKeyTile;
      bytes += static_cast<std::size_t>(padded * input_stride(type_, static_cast<int>(req.head_dim))) * 2;
    }
    if (bytes + total_bytes / kPrepareHeadroomFraction > free_bytes) return;
    LanePool::Lease lane = lanes_->take();
    resident(req, *lane, Need::kSoon);
  }

 private:
  int device_;
  Precision precision_;
  InputType type_;
  std::string description_;
  std::size_t shared_bytes_ = 0;  // shared memory a block may take (the device's opt-in limit, or a test's smaller one)
  long long prefix_limit_ = 0;    // ranked_prefix_limit(shared_bytes_): longer prefixes are left to the host
  std::unique_ptr<LanePool> lanes_;
  mutable std::mutex resident_mutex_;  // guards the map; each entry has its own lock
  mutable std::map<std::int64_t, std::unique_ptr<HeadKeys>> resident_;  // by KV head
  mutable std::map<std::int64_t, std::unique_ptr<ResidentArrays>> resident_arrays_;  // by KV head, under resident_mutex_
};

}  // namespace

std::uint64_t resident_array_uploads() { return resident_array_upload_count.load(std::memory_order_relaxed); }

std::int64_t set_shared_memory_limit(std::int64_t bytes) { return shared_memory_limit_bytes.exchange(std::max<std::int64_t>(bytes, 0)); }

std::int64_t set_token_score_workspace_bytes(std::int64_t bytes) {
  return token_score_workspace_bytes.exchange(bytes > 0 ? bytes : kTokenScoreWorkspaceBytes);
}

CudaStatus status() {
  CudaStatus result;
  result.compiled = true;
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    result.why_none = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(rc);
    return result;
  }
  if (count == 0) {
    result.why_none = "the CUDA runtime reports no devices";
    return result;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    result.devices.push_back(fmt::format("cuda:{} {} (sm_{}{}, {} SMs, {:.1f} GiB)", i, prop.name, prop.major,
                                         prop.minor, prop.multiProcessorCount,
                                         static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0)));
  }
  if (result.devices.empty()) result.why_none = "no device answered cudaGetDeviceProperties";
  return result;
}

std::unique_ptr<Backend> make_backend(int device_index, Precision precision) {
  return std::make_unique<CudaBackend>(device_index, precision);
}

}  // namespace hysparse::cuda
