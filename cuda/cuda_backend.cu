// CUDA backend: the exact block-statistics pass on the GPU (fp32 path).
// Kernel 1 streams key chunks past a tile of query rows and keeps, per key block,
// the running (max logit, sum of exp) pair; the host turns those into row
// log-sum-exps with the same code as the CPU backend. Kernel 2 (only when the
// output is wanted) recomputes the scores and accumulates o = sum_j p_j v_j with
// the final normalisation, so no rescaling is needed. Never a T x T buffer.
// Only plain C++ crosses cuda_backend.hpp.
#include <cuda_runtime.h>

#include <cmath>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "backend/row_statistics.hpp"
#include "common/error.hpp"
#include "cuda_backend.hpp"

namespace hysparse::cuda {
namespace {

constexpr int kRows = 64;     // query rows per thread block
constexpr int kKeys = 64;     // keys per chunk
constexpr int kDepth = 32;    // head_dim slice staged in shared memory
constexpr int kThreads = 256;
constexpr int kMaxHeadDim = 256;
constexpr long long kSegmentKeys = 1024;  // keys per thread block in the statistics kernel

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA {}: {}", what, cudaGetErrorString(status));
}

// Scores S[r][j] = q_r . k_{c0+j} (q pre-scaled) for the tile's rows and one key chunk,
// -inf where the key is beyond the row's position or the chunk.
__device__ void score_chunk(const float* __restrict__ q, const float* __restrict__ k, const long long* __restrict__ pos,
                            int rows_here, int d, long long c0, int width, float (*scores)[kKeys + 1],
                            float (*q_stage)[kRows], float (*k_stage)[kKeys]) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  float acc[4][4] = {};
  for (int c_base = 0; c_base < d; c_base += kDepth) {
    for (int i = tid; i < kRows * kDepth; i += kThreads) {
      const int r = i / kDepth, c = i % kDepth;
      q_stage[c][r] = (r < rows_here && c_base + c < d) ? q[static_cast<long long>(r) * d + c_base + c] : 0.0f;
    }
    for (int i = tid; i < kKeys * kDepth; i += kThreads) {
      const int j = i / kDepth, c = i % kDepth;
      k_stage[c][j] = (j < width && c_base + c < d) ? k[(c0 + j) * d + c_base + c] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kDepth; ++c) {
      // One 16-byte shared load each for this thread's 4 rows and 4 keys.
      const float4 q4 = *reinterpret_cast<const float4*>(&q_stage[c][4 * ty]);
      const float4 k4 = *reinterpret_cast<const float4*>(&k_stage[c][4 * tx]);
      const float qv[4] = {q4.x, q4.y, q4.z, q4.w}, kv[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] = fmaf(qv[i], kv[jj], acc[i][jj]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = 4 * ty + i;
    const long long t = r < rows_here ? pos[r] : -1;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = 4 * tx + jj;
      scores[r][j] = (j < width && c0 + j <= t) ? acc[i][jj] : -INFINITY;
    }
  }
  __syncthreads();
}

__device__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
__device__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// grid (row tiles, heads). q: [heads][rows][d]; block_max/sum: [heads][rows][num_blocks].
// grid (row tiles, heads, key segments of `segment` keys, a multiple of both kKeys and block).
__global__ void block_statistics_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                        const long long* __restrict__ positions, int rows, int d, long long block,
                                        long long segment, long long num_blocks, float* __restrict__ block_max,
                                        float* __restrict__ block_sum) {
  __shared__ float scores[kRows][kKeys + 1];
  __shared__ __align__(16) float q_stage[kDepth][kRows];
  __shared__ __align__(16) float k_stage[kDepth][kKeys];
  const int head = blockIdx.y, r0 = blockIdx.x * kRows;
  const int rows_here = min(kRows, rows - r0);
  const long long* pos = positions + r0;
  const float* q_tile = q + (static_cast<long long>(head) * rows + r0) * d;
  const long long last = pos[rows_here - 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // This thread block's key segment: whole key blocks, so no other block writes its cells.
  const long long segment_begin = static_cast<long long>(blockIdx.z) * segment;
  const long long segment_end = min(segment_begin + segment, last + 1);
  for (long long c0 = segment_begin; c0 < segment_end; c0 += kKeys) {
    const int width = static_cast<int>(min(static_cast<long long>(kKeys), segment_end - c0));
    score_chunk(q_tile, k, pos, rows_here, d, c0, width, scores, q_stage, k_stage);
    for (int r = warp; r < rows_here; r += kThreads / 32) {
      const long long t = pos[r];
      if (t < c0) continue;
      const long long visible_end = min(c0 + width, t + 1);  // exclusive
      for (long long b = c0 / block; b * block < visible_end; ++b) {
        const long long lo = max(b * block, c0), hi = min((b + 1) * block, visible_end);
        float m = -INFINITY;
        for (long long j = lo + lane; j < hi; j += 32) m = fmaxf(m, scores[r][j - c0]);
        m = warp_max(m);
        float l = 0.0f;
        for (long long j = lo + lane; j < hi; j += 32) l += expf(scores[r][j - c0] - m);
        l = warp_sum(l);
        if (lane == 0) {
          const long long cell = (static_cast<long long>(head) * rows + r0 + r) * num_blocks + b;
          const float m_old = block_max[cell], l_old = block_sum[cell];
          const float m_new = fmaxf(m_old, m);
          block_sum[cell] = (m_old == -INFINITY ? 0.0f : l_old * expf(m_old - m_new)) + l * expf(m - m_new);
          block_max[cell] = m_new;
        }
      }
    }
    __syncthreads();
  }
}

// grid (row tiles, heads). output[head][row][:] = sum_j exp(z_j - lse_all) v_j.
template <int kCols>
__global__ void output_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                              const long long* __restrict__ positions, const float* __restrict__ lse_all, int rows, int d,
                              float* __restrict__ output) {
  __shared__ float scores[kRows][kKeys + 1];
  __shared__ __align__(16) float q_stage[kDepth][kRows];
  __shared__ __align__(16) float k_stage[kDepth][kKeys];
  extern __shared__ float v_stage[];  // [kKeys][d]
  const int head = blockIdx.y, r0 = blockIdx.x * kRows;
  const int rows_here = min(kRows, rows - r0);
  const long long* pos = positions + r0;
  const float* q_tile = q + (static_cast<long long>(head) * rows + r0) * d;
  const long long last = pos[rows_here - 1];
  const int row = threadIdx.x / 4, part = threadIdx.x % 4;  // 4 threads per row, columns part + 4i
  const float lse = row < rows_here ? lse_all[static_cast<long long>(head) * rows + r0 + row] : 0.0f;
  float acc[kCols] = {};
  for (long long c0 = 0; c0 <= last; c0 += kKeys) {
    const int width = static_cast<int>(min(static_cast<long long>(kKeys), last + 1 - c0));
    score_chunk(q_tile, k, pos, rows_here, d, c0, width, scores, q_stage, k_stage);
    for (int i = threadIdx.x; i < kKeys * d; i += kThreads) {
      const int j = i / d;
      v_stage[i] = j < width ? v[(c0 + j) * d + i % d] : 0.0f;
    }
    __syncthreads();
    if (row < rows_here) {
      for (int j = 0; j < width; ++j) {
        const float s = scores[row][j];
        if (s == -INFINITY) continue;
        const float p = expf(s - lse);
#pragma unroll
        for (int i = 0; i < kCols; ++i) {
          const int c = part + 4 * i;
          if (c < d) acc[i] = fmaf(p, v_stage[j * d + c], acc[i]);
        }
      }
    }
    __syncthreads();
  }
  if (row < rows_here) {
    float* out = output + (static_cast<long long>(head) * rows + r0 + row) * d;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int c = part + 4 * i;
      if (c < d) out[c] = acc[i];
    }
  }
}

__global__ void fill_kernel(float* data, long long n, float value) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    data[i] = value;
  }
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

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    check(cudaSetDevice(device_), "cudaSetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
    description_ = fmt::format("cuda:{} {} (sm_{}{}, {} SMs, {:.1f} GiB)", device_, prop.name, prop.major, prop.minor,
                               prop.multiProcessorCount, static_cast<double>(prop.totalGlobalMem) / 1073741824.0);
  }
  std::string name() const override { return "cuda"; }
  std::string device() const override { return description_; }
  std::int64_t preferred_tile_rows() const override { return 4096; }

  void block_statistics(const StatsRequest& req, StatsTile& out) const override {
    if (req.num_rows <= 0) throw Error(ErrorKind::kInternal, "block_statistics: no rows");
    if (req.attn) {
      fail(ErrorKind::kUsage, "--device cuda replays q/k layers; this capture has dense attn layers (use --device cpu)");
    }
    if (req.head_dim > kMaxHeadDim) {
      fail(ErrorKind::kUsage, "--device cuda supports head_dim up to {} (capture has {})", kMaxHeadDim, req.head_dim);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    check(cudaSetDevice(device_), "cudaSetDevice");
    allocate_tile(req, out);
    const std::int64_t G = req.heads, R = req.num_rows, d = req.head_dim, keys = req.rows[R - 1] + 1;

    // The tile's query rows, scaled exactly as the CPU backend scales them.
    host_q_.resize(static_cast<std::size_t>(G * R * d));
    const auto scale = static_cast<float>(req.scale);
    for (std::int64_t h = 0; h < G; ++h) {
      for (std::int64_t r = 0; r < R; ++r) {
        const float* src = req.q + (h * req.seq_len + req.rows[r]) * d;
        float* dst = &host_q_[static_cast<std::size_t>((h * R + r) * d)];
        for (std::int64_t c = 0; c < d; ++c) dst[c] = src[c] * scale;
      }
    }
    std::vector<long long> positions(req.rows, req.rows + R);
    float* q = q_.upload(host_q_.data(), host_q_.size(), "query rows");
    long long* pos = positions_.upload(positions.data(), positions.size(), "query positions");
    // Keys (and values) of the KV head: kept on the device while the same layer and head repeat.
    const bool cached = req.layer >= 0 && req.layer == cached_layer_ && req.kv_head == cached_kv_head_ &&
                        req.k == cached_k_ && keys <= cached_keys_ && (req.v == nullptr || req.v == cached_v_);
    if (!cached) {
      k_.upload(req.k, static_cast<std::size_t>(req.seq_len * d), "keys");
      if (req.v) v_.upload(req.v, static_cast<std::size_t>(req.seq_len * d), "values");
      cached_layer_ = req.layer;
      cached_kv_head_ = req.kv_head;
      cached_k_ = req.k;
      cached_v_ = req.v;
      cached_keys_ = req.seq_len;
    }
    const auto cells = static_cast<long long>(G * R * out.num_blocks);
    float* block_max = block_max_.reserve(static_cast<std::size_t>(cells), "block maxima");
    float* block_sum = block_sum_.reserve(static_cast<std::size_t>(cells), "block sums");
    fill_kernel<<<256, 256>>>(block_max, cells, -INFINITY);
    fill_kernel<<<256, 256>>>(block_sum, cells, 0.0f);
    const dim3 grid(static_cast<unsigned>((R + kRows - 1) / kRows), static_cast<unsigned>(G));
    // Key segments of whole blocks spread a long row over many thread blocks.
    const long long unit = std::lcm(static_cast<long long>(kKeys), static_cast<long long>(req.block_size));
    const long long segment = unit * std::max(1LL, kSegmentKeys / unit);
    const dim3 split_grid(grid.x, grid.y, static_cast<unsigned>((keys + segment - 1) / segment));
    block_statistics_kernel<<<split_grid, kThreads>>>(q, k_.get(), pos, static_cast<int>(R), static_cast<int>(d),
                                                      req.block_size, segment, out.num_blocks, block_max, block_sum);
    check(cudaGetLastError(), "block statistics kernel launch");
    check(cudaMemcpy(out.block_max.data(), block_max, static_cast<std::size_t>(cells) * sizeof(float), cudaMemcpyDeviceToHost),
          "block statistics kernel");
    check(cudaMemcpy(out.block_sum.data(), block_sum, static_cast<std::size_t>(cells) * sizeof(float), cudaMemcpyDeviceToHost),
          "block sums download");
    for (std::int64_t h = 0; h < G; ++h) finish_row_statistics(req, out, h);

    if (req.v) {
      std::vector<float> lse(out.lse_all.begin(), out.lse_all.end());
      float* lse_device = lse_.upload(lse.data(), lse.size(), "row normalisers");
      float* output = output_.reserve(out.output.size(), "outputs");
      const std::size_t shared = static_cast<std::size_t>(kKeys * d) * sizeof(float);
      const int ri = static_cast<int>(R), di = static_cast<int>(d);
      if (d <= 64) launch_output<16>(grid, shared, q, pos, lse_device, ri, di, output);
      else if (d <= 128) launch_output<32>(grid, shared, q, pos, lse_device, ri, di, output);
      else launch_output<64>(grid, shared, q, pos, lse_device, ri, di, output);
      check(cudaMemcpy(out.output.data(), output, out.output.size() * sizeof(float), cudaMemcpyDeviceToHost),
            "output kernel");
    }
  }

 private:
  template <int kCols>
  void launch_output(dim3 grid, std::size_t shared, const float* q, const long long* pos, const float* lse, int rows,
                     int d, float* output) const {
    check(cudaFuncSetAttribute(output_kernel<kCols>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)),
          "output kernel shared memory");
    output_kernel<kCols><<<grid, kThreads, shared>>>(q, k_.get(), v_.get(), pos, lse, rows, d, output);
    check(cudaGetLastError(), "output kernel launch");
  }

  int device_;
  std::string description_;
  mutable std::mutex mutex_;
  mutable std::vector<float> host_q_;
  mutable DeviceArray<float> q_, k_, v_, block_max_, block_sum_, lse_, output_;
  mutable DeviceArray<long long> positions_;
  mutable std::int64_t cached_layer_ = -1, cached_kv_head_ = -1, cached_keys_ = 0;
  mutable const float* cached_k_ = nullptr;
  mutable const float* cached_v_ = nullptr;
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

std::unique_ptr<Backend> make_backend(int device_index) { return std::make_unique<CudaBackend>(device_index); }

}  // namespace hysparse::cuda
