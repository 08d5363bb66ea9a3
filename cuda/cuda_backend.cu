// CUDA backend: the block-statistics pass on the GPU. The host gathers a tile's query rows,
// keeps the KV head's keys (and values) resident across tiles, and runs the device pass of
// statistics_pass.cu: block statistics (exact fp32 SIMT kernel, or bf16/fp16 tensor-core
// kernel), row log-sum-exps, and the attention output when v is given. Only the tile's
// statistics come back. Never a T x T buffer. Only plain C++ crosses cuda_backend.hpp.
#include <cuda_runtime.h>

#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "backend/row_statistics.hpp"
#include "common/error.hpp"
#include "cuda_backend.hpp"
#include "device_statistics.hpp"

namespace hysparse::cuda {
namespace {

constexpr int kMaxHeadDim = 256;

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

// A device buffer that only grows.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (data_) cudaFree(data_);
  }
  T* reserve(std::size_t count, const char* what) {
    if (count > capacity_) {
      if (data_) cudaFree(data_);
      data_ = nullptr;
      capacity_ = 0;
      const cudaError_t status = cudaMalloc(&data_, count * sizeof(T));
      if (status != cudaSuccess) {
        data_ = nullptr;
        (void)cudaGetLastError();  // not sticky: the next launch's error check must not see it
        fail(ErrorKind::kResource, "CUDA: cannot allocate {} bytes of device memory for {}: {}", count * sizeof(T), what,
             cudaGetErrorString(status));
      }
      capacity_ = count;
    }
    return data_;
  }
  T* upload(const T* host, std::size_t count, const char* what) {
    T* device = reserve(count, what);
    if (count) check(cudaMemcpy(device, host, count * sizeof(T), cudaMemcpyHostToDevice), what);
    return device;
  }
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
  std::size_t capacity_ = 0;
};

// Sizes a tile for `req` without clearing it: every value is overwritten by the downloads.
void size_tile(const StatsRequest& req, StatsTile& out) {
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
}

const char* describe(Precision precision) {
  switch (precision) {
    case Precision::kFp32: return "fp32 scores (exact, SIMT)";
    case Precision::kBf16: return "bf16 inputs, tensor-core scores with fp32 accumulation";
    case Precision::kFp16: return "fp16 inputs, tensor-core scores with fp32 accumulation";
  }
  return "?";
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
    pass_ = std::make_unique<StatsPass>(prop.multiProcessorCount);
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
    std::lock_guard<std::mutex> lock(mutex_);
    check(cudaSetDevice(device_), "cudaSetDevice");
    const std::int64_t G = req.heads, R = req.num_rows, d = req.head_dim;
    const ResidentKeys& entry = resident(req);
    // The tile's query rows (fp32, unscaled), its row statistics and exact output.
    host_q_.resize(static_cast<std::size_t>(G * R * d));
    host_sink_weight_.resize(static_cast<std::size_t>(G * R));
    for (std::int64_t h = 0; h < G; ++h) {
      for (std::int64_t r = 0; r < R; ++r) {
        const float* src = req.q + (h * req.seq_len + req.rows[r]) * d;
        std::copy(src, src + d, &host_q_[static_cast<std::size_t>((h * R + r) * d)]);
        const double lse_all = tile.lse_all[static_cast<std::size_t>(h * R + r)];
        host_sink_weight_[static_cast<std::size_t>(h * R + r)] =
            req.sink_logits ? std::exp(static_cast<double>(req.sink_logits[h]) - lse_all) : 0.0;
      }
    }
    OutputWalkArgs args;
    args.q = q_.upload(host_q_.data(), host_q_.size(), "query rows");
    args.k = entry.k32.get();
    args.v = entry.v.get();
    args.lse_all = lse_all_.upload(tile.lse_all.data(), tile.lse_all.size(), "row log-sum-exps with sinks");
    args.sink_weight = sink_weight_.upload(host_sink_weight_.data(), host_sink_weight_.size(), "sink weights");
    args.exact = output_.upload(tile.output.data(), tile.output.size(), "exact outputs");
    args.walks = walks_.upload(walks.walks.data(), walks.walks.size(), "output walks");
    args.steps = steps_.upload(walks.steps.data(), walks.steps.size(), "output walk steps");
    args.factors = walks.factors.empty() ? nullptr : factors_.upload(walks.factors.data(), walks.factors.size(), "walk factors");
    args.num_walks = static_cast<long long>(walks.walks.size());
    args.rows = static_cast<int>(R);
    args.head_dim = static_cast<int>(d);
    args.scale = req.scale;
    args.errors = errors_.reserve(errors.size(), "output errors");
    launch_output_walks(args, nullptr);
    download(errors.data(), args.errors, errors.size(), "output walk kernel");
  }

  void block_statistics(const StatsRequest& req, StatsTile& out) const override {
    if (req.num_rows <= 0) throw Error(ErrorKind::kInternal, "block_statistics: no rows");
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
    std::lock_guard<std::mutex> lock(mutex_);
    check(cudaSetDevice(device_), "cudaSetDevice");
    size_tile(req, out);
    const std::int64_t G = req.heads, R = req.num_rows, d = req.head_dim;
    const bool exact = type_ == InputType::kFloat32;
    const int stride = input_stride(type_, static_cast<int>(d));

    // fp32: q scaled exactly as the CPU backend scales it. bf16/fp16: q unscaled with the sign of
    // the scale folded in (exact), so inputs captured in that type round to themselves; the
    // magnitude of the scale multiplies the fp32 scores.
    const auto scale = static_cast<float>(req.scale);
    const float q_factor = exact ? scale : (scale < 0.0f ? -1.0f : 1.0f);
    const float score_scale = exact ? 1.0f : std::fabs(scale);
    host_q_.resize(static_cast<std::size_t>(G * R * d));
    for (std::int64_t h = 0; h < G; ++h) {
      for (std::int64_t r = 0; r < R; ++r) {
        const float* src = req.q + (h * req.seq_len + req.rows[r]) * d;
        float* dst = &host_q_[static_cast<std::size_t>((h * R + r) * d)];
        for (std::int64_t c = 0; c < d; ++c) dst[c] = src[c] * q_factor;
      }
    }
    std::vector<long long> positions(req.rows, req.rows + R);
    float* q32 = q_.upload(host_q_.data(), host_q_.size(), "query rows");
    long long* pos = positions_.upload(positions.data(), positions.size(), "query positions");
    const void* q = q32;
    if (!exact) {
      void* rounded = q_rounded_.reserve(static_cast<std::size_t>(G * R * stride), "rounded query rows");
      convert_rows(type_, q32, G * R, static_cast<int>(d), 1.0f, rounded, overflow_flag(), nullptr);
      check_range("query", req);
      q = rounded;
    }
    const ResidentKeys& entry = resident(req);
    const void* k = exact ? static_cast<const void*>(entry.k32.get()) : static_cast<const void*>(entry.rounded.get());

    const auto cells = static_cast<std::size_t>(G * R * out.num_blocks);
    StatsPassArgs args;
    args.type = type_;
    args.q = q;
    args.k = k;
    args.positions = pos;
    args.host_positions = positions.data();
    args.heads = static_cast<int>(G);
    args.rows = static_cast<int>(R);
    args.head_dim = static_cast<int>(d);
    args.score_scale = score_scale;
    args.block = req.block_size;
    args.num_blocks = out.num_blocks;
    args.sink_logits = req.sink_logits ? sinks_.upload(req.sink_logits, static_cast<std::size_t>(G), "sink logits") : nullptr;
    args.block_max = block_max_.reserve(cells, "block maxima");
    args.block_sum = block_sum_.reserve(cells, "block sums");
    args.lse_tokens = lse_tokens_.reserve(static_cast<std::size_t>(G * R), "row log-sum-exps");
    args.lse_all = lse_all_.reserve(static_cast<std::size_t>(G * R), "row log-sum-exps with sinks");
    pass_->run(args, nullptr);
    download(out.block_max.data(), args.block_max, cells, "block statistics");
    download(out.block_sum.data(), args.block_sum, cells, "block sums");
    download(out.lse_tokens.data(), args.lse_tokens, static_cast<std::size_t>(G * R), "row log-sum-exps");
    download(out.lse_all.data(), args.lse_all, static_cast<std::size_t>(G * R), "row log-sum-exps with sinks");

    if (req.v) {
      float* output = output_.reserve(out.output.size(), "outputs");
      const OutputSegments split = output_segments(args.heads, args.rows, args.head_dim, positions.back() + 1);
      float* workspace = split.workspace_floats ? output_partials_.reserve(split.workspace_floats, "partial outputs") : nullptr;
      launch_output_pass(type_, q, k, entry.v.get(), pos, args.lse_all, args.heads, args.rows, args.head_dim, score_scale, split,
                         output, workspace, nullptr);
      download(out.output.data(), output, out.output.size(), "output kernel");
    }
  }

 private:
  struct ResidentKeys;
  // Keys (and values) of the layer's KV heads stay on the device while the layer runs, so tiles
  // of different heads can come in any order (one layer's K/V at most; buffers are reused by the
  // next layer). fp32 keys are always kept (the output walks read them); bf16/fp16 runs keep the
  // rounded keys for the tensor cores beside them. Call with the mutex held.
  const ResidentKeys& resident(const StatsRequest& req) const {
    const std::int64_t d = req.head_dim, keys = req.rows[req.num_rows - 1] + 1;
    ResidentKeys& entry = resident_[req.kv_head];
    const bool cached = req.tensors_id != 0 && req.kv_head >= 0 && entry.tensors_id == req.tensors_id &&
                        entry.k_host == req.k && keys <= entry.keys && (req.v == nullptr || req.v == entry.v_host);
    if (cached) return entry;
    entry.tensors_id = 0;  // nothing is cached until the uploads below have succeeded
    float* k32 = entry.k32.upload(req.k, static_cast<std::size_t>(req.seq_len * d), "keys");
    if (type_ != InputType::kFloat32) {
      // Zero key rows up to a whole key tile: the tensor-core kernel loads tiles unguarded.
      const int stride = input_stride(type_, static_cast<int>(d));
      const std::int64_t padded = (req.seq_len + kTensorCoreKeyTile - 1) / kTensorCoreKeyTile * kTensorCoreKeyTile;
      auto* rounded = entry.rounded.reserve(static_cast<std::size_t>(padded * stride), "rounded keys");
      check(cudaMemset(rounded + req.seq_len * stride, 0, static_cast<std::size_t>((padded - req.seq_len) * stride) * 2),
            "key padding");
      convert_rows(type_, k32, req.seq_len, static_cast<int>(d), 1.0f, rounded, overflow_flag(), nullptr);
      check_range("key", req);
    }
    if (req.v) entry.v.upload(req.v, static_cast<std::size_t>(req.seq_len * d), "values");
    entry.tensors_id = req.tensors_id;
    entry.k_host = req.k;
    entry.v_host = req.v;
    entry.keys = req.seq_len;
    return entry;
  }

  template <typename T>
  static void download(T* host, const T* device, std::size_t count, const char* what) {
    check(cudaMemcpy(host, device, count * sizeof(T), cudaMemcpyDeviceToHost), what);
  }

  int* overflow_flag() const {
    if (type_ != InputType::kFloat16) return nullptr;
    int* flag = overflow_.reserve(1, "overflow flag");
    check(cudaMemset(flag, 0, sizeof(int)), "overflow flag");
    return flag;
  }

  // fp16 holds magnitudes up to 65504: a larger finite input would become infinite.
  void check_range(const char* what, const StatsRequest& req) const {
    if (type_ != InputType::kFloat16) return;
    int overflow = 0;
    check(cudaMemcpy(&overflow, overflow_.get(), sizeof(int), cudaMemcpyDeviceToHost), "input conversion");
    if (overflow) {
      fail(ErrorKind::kUsage,
           "--precision fp16: a {} value of layer {}, KV head {} exceeds the fp16 range (|x| > 65504); use --precision "
           "bf16 or fp32",
           what, req.layer, req.kv_head);
    }
  }

  int device_;
  Precision precision_;
  InputType type_;
  std::string description_;
  mutable std::mutex mutex_;
  mutable std::unique_ptr<StatsPass> pass_;
  mutable std::vector<float> host_q_;
  // One KV head's keys (fp32, or rounded for the tensor cores) and values on the device, and which
  // host arrays they came from.
  struct ResidentKeys {
    DeviceArray<float> k32, v;
    DeviceArray<unsigned short> rounded;
    std::uint64_t tensors_id = 0;
    std::int64_t keys = 0;
    const float* k_host = nullptr;
    const float* v_host = nullptr;
  };
  mutable std::vector<double> host_sink_weight_;
  mutable DeviceArray<float> q_, sinks_, block_max_, block_sum_, output_, output_partials_;
  mutable DeviceArray<double> lse_tokens_, lse_all_, sink_weight_, factors_, errors_;
  mutable DeviceArray<OutputWalk> walks_;
  mutable DeviceArray<OutputStep> steps_;
  mutable DeviceArray<unsigned short> q_rounded_;
  mutable DeviceArray<int> overflow_;
  mutable DeviceArray<long long> positions_;
  mutable std::map<std::int64_t, ResidentKeys> resident_;  // by KV head
};

}  // namespace

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
