// The statistics pass on device-resident data: input rounding, the work plan and dispatch to
// the tensor-core kernel, the SIMT kernel (exact fp32, and the fallback for block sizes the
// tensor-core kernel does not take), the row log-sum-exps, and the attention output.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>

#include "common/error.hpp"
#include "device_statistics.hpp"

namespace hysparse::cuda {
namespace {

constexpr int kRows = 64;     // query rows per thread block (SIMT kernels)
constexpr int kKeys = 64;     // keys per chunk (SIMT kernels)
constexpr int kDepth = 32;    // head_dim slice staged in shared memory (SIMT kernels)
constexpr int kThreads = 256;
// The output pass splits the keys into segments until about this many thread blocks run (a fixed
// number, not the device's, so that every GPU sums in the same order), of at least
// kOutputMinSegmentChunks chunks each, at most kOutputMaxSegments.
constexpr long long kOutputTargetBlocks = 1024;
constexpr long long kOutputMaxSegments = 32;
constexpr long long kOutputMinSegmentChunks = 16;
constexpr long long kSimtSegmentKeys = 1024;  // keys per thread block in the SIMT statistics kernel
// Tensor-core work items: enough to fill every multiprocessor several times over, each long
// enough that loading its query rows stays small next to streaming its keys.
constexpr long long kMinItemsPerMultiprocessor = 8;
constexpr long long kMinSegmentKeys = 512, kMaxSegmentKeys = 8192;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA {}: {}", what, cudaGetErrorString(status));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// The tiled fp32 kernel (SimtKernel::kTiled): 64 rows x 64 keys a step over 64 threads, each holding an
// 8 x 8 tile of scores in registers, as an SGEMM does (four 16-byte shared loads feed 64 FMAs, where
// the basic kernel's 4 x 4 tiles are bound by shared-memory bandwidth). The rows' q stays in shared
// memory for the whole key segment; keys are staged 32 channels at a time, the next slice read into
// registers while this one is multiplied. Each score is the same fmaf chain over channels in
// ascending order as the basic kernel's, so logits and block maxima are bit-identical to it; only the
// order of a block's exponential sum differs (per thread, then across the lanes holding the block).
constexpr int kTiledThreads = 64;
constexpr int kTiledSlice = 32;       // channels of a key chunk staged at a time
constexpr int kTiledMaxHeadDim = 256;

// Blocks of 8, 16 or 32 keys lie in one thread's 8 keys or in 2 or 4 neighbouring lanes' keys; a
// multiple of 64 holds the whole chunk. head_dim: whole 16-byte loads, q resident in shared memory.
bool tiled_fp32_supports(long long block, int head_dim) {
  const bool block_ok = block == 8 || block == 16 || block == 32 || (block > 0 && block % 64 == 0);
  return block_ok && head_dim % 4 == 0 && head_dim > 0 && head_dim <= kTiledMaxHeadDim;
}

std::size_t tiled_fp32_shared_bytes(int head_dim) {
  return static_cast<std::size_t>(head_dim * kRows + 2 * kTiledSlice * kKeys) * sizeof(float);
}

// grid, segments and outputs as simt_statistics_kernel's; q and k rows of head_dim floats.
__global__ void __launch_bounds__(kTiledThreads)
tiled_fp32_statistics_kernel(const float* __restrict__ q, const float* __restrict__ k, const long long* __restrict__ positions,
                             int rows, int d, float score_scale, long long block, long long segment, long long num_blocks,
                             float* __restrict__ block_max, float* __restrict__ block_sum) {
  extern __shared__ __align__(16) float tiled_shared[];
  float* q_s = tiled_shared;                  // [d][kRows]: channel-major, a row group's 8 rows in two float4s
  float* k_s = tiled_shared + d * kRows;      // [2][kTiledSlice][kKeys]
  const int tid = static_cast<int>(threadIdx.x), ty = tid / 8, tx = tid % 8;
  const int head = static_cast<int>(blockIdx.y), r0 = static_cast<int>(blockIdx.x) * kRows;
  const int rows_here = min(kRows, rows - r0);
  const long long* pos = positions + r0;
  const float* q_tile = q + (static_cast<long long>(head) * rows + r0) * d;
  const long long segment_begin = static_cast<long long>(blockIdx.z) * segment;
  const long long segment_end = min(segment_begin + segment, pos[rows_here - 1] + 1);
  // Consecutive threads take consecutive rows, so that the transposed stores hit distinct banks.
  for (int i = tid; i < kRows * (d / 4); i += kTiledThreads) {
    const int r = i % kRows, c = (i / kRows) * 4;
    const float4 v = r < rows_here ? *reinterpret_cast<const float4*>(q_tile + static_cast<long long>(r) * d + c)
                                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    q_s[(c + 0) * kRows + r] = v.x;
    q_s[(c + 1) * kRows + r] = v.y;
    q_s[(c + 2) * kRows + r] = v.z;
    q_s[(c + 3) * kRows + r] = v.w;
  }
  long long row_pos[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) row_pos[i] = 8 * ty + i < rows_here ? pos[8 * ty + i] : -1;
  // Lanes holding one block's keys in a chunk: 1, 2 or 4 for blocks of 8, 16, 32; all 8 otherwise.
  const int lanes_per_block = block >= kKeys ? 8 : static_cast<int>(block / 8);
  const int slices = (d + kTiledSlice - 1) / kTiledSlice;
  // Thread tid stages key tid: up to 8 float4s (32 channels) of one slice.
  float4 staged[kTiledSlice / 4];
  auto load_slice = [&](long long c0, int width, int slice) {
    const int c_base = slice * kTiledSlice, quads = min(kTiledSlice, d - c_base) / 4;
#pragma unroll
    for (int u = 0; u < kTiledSlice / 4; ++u) {
      staged[u] = (tid < width && u < quads) ? *reinterpret_cast<const float4*>(k + (c0 + tid) * d + c_base + 4 * u)
                                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  };
  auto store_slice = [&](int buffer) {
    float* dst = k_s + buffer * kTiledSlice * kKeys;
#pragma unroll
    for (int u = 0; u < kTiledSlice / 4; ++u) {
      dst[(4 * u + 0) * kKeys + tid] = staged[u].x;
      dst[(4 * u + 1) * kKeys + tid] = staged[u].y;
      dst[(4 * u + 2) * kKeys + tid] = staged[u].z;
      dst[(4 * u + 3) * kKeys + tid] = staged[u].w;
    }
  };
  for (long long c0 = segment_begin; c0 < segment_end; c0 += kKeys) {
    const int width = static_cast<int>(min(static_cast<long long>(kKeys), segment_end - c0));
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    }
    load_slice(c0, width, 0);
    store_slice(0);
    __syncthreads();  // also orders the q stores above before the first products
    for (int slice = 0; slice < slices; ++slice) {
      if (slice + 1 < slices) load_slice(c0, width, slice + 1);
      const float* ks = k_s + (slice % 2) * kTiledSlice * kKeys;
      const float* qs = q_s + slice * kTiledSlice * kRows;
      const int depth = min(kTiledSlice, d - slice * kTiledSlice);
#pragma unroll 4
      for (int c = 0; c < depth; ++c) {
        const float4 qa = *reinterpret_cast<const float4*>(qs + c * kRows + 8 * ty);
        const float4 qb = *reinterpret_cast<const float4*>(qs + c * kRows + 8 * ty + 4);
        const float4 ka = *reinterpret_cast<const float4*>(ks + c * kKeys + 8 * tx);
        const float4 kb = *reinterpret_cast<const float4*>(ks + c * kKeys + 8 * tx + 4);
        const float qv[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
        const float kv[8] = {ka.x, ka.y, ka.z, ka.w, kb.x, kb.y, kb.z, kb.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(qv[i], kv[j], acc[i][j]);
        }
      }
      if (slice + 1 < slices) store_slice((slice + 1) % 2);
      __syncthreads();
    }
    // Per row: the maximum and exponential sum of each block's visible keys in this chunk, merged
    // into the block's running pair by the block's first lane (one writer per cell: the segment
    // holds whole blocks, and a chunk's cells of a row belong to one thread block).
    const long long first_key = c0 + 8 * tx;
    const long long b = first_key / block;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float s[8];
      float m = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[j] = (8 * tx + j < width && first_key + j <= row_pos[i]) ? acc[i][j] * score_scale : -INFINITY;
        m = fmaxf(m, s[j]);
      }
      for (int offset = 1; offset < lanes_per_block; offset *= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
      float l = 0.0f;
      if (m != -INFINITY) {
#pragma unroll
        for (int j = 0; j < 8; ++j) l += expf(s[j] - m);
      }
      for (int offset = 1; offset < lanes_per_block; offset *= 2) l += __shfl_xor_sync(0xffffffffu, l, offset);
      if (tx % lanes_per_block == 0 && m != -INFINITY) {
        const long long cell = (static_cast<long long>(head) * rows + r0 + 8 * ty + i) * num_blocks + b;
        const float m_old = block_max[cell], l_old = block_sum[cell];
        const float m_new = fmaxf(m_old, m);
        block_sum[cell] = (m_old == -INFINITY ? 0.0f : l_old * expf(m_old - m_new)) + l * expf(m - m_new);
        block_max[cell] = m_new;
      }
    }
  }
}

// Scores S[r][j] = score_scale * (q_r . k_{c0+j}) for the tile's rows and one key chunk, -inf
// where the key is beyond the row's position or the chunk. q rows and k rows have stride ld.
template <typename In>
__device__ void score_chunk(const In* __restrict__ q, const In* __restrict__ k, const long long* __restrict__ pos,
                            int rows_here, int d, int ld, float score_scale, long long c0, int width,
                            float (*scores)[kKeys + 1], float (*q_stage)[kRows], float (*k_stage)[kKeys]) {
  const int tid = static_cast<int>(threadIdx.x), ty = tid / 16, tx = tid % 16;
  float acc[4][4] = {};
  for (int c_base = 0; c_base < d; c_base += kDepth) {
    for (int i = tid; i < kRows * kDepth; i += kThreads) {
      const int r = i / kDepth, c = i % kDepth;
      q_stage[c][r] = (r < rows_here && c_base + c < d) ? to_float(q[static_cast<long long>(r) * ld + c_base + c]) : 0.0f;
    }
    for (int i = tid; i < kKeys * kDepth; i += kThreads) {
      const int j = i / kDepth, c = i % kDepth;
      k_stage[c][j] = (j < width && c_base + c < d) ? to_float(k[(c0 + j) * ld + c_base + c]) : 0.0f;
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
      scores[r][j] = (j < width && c0 + j <= t) ? acc[i][jj] * score_scale : -INFINITY;
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
__device__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// grid (row tiles, heads, key segments of `segment` keys, a multiple of both kKeys and block).
// q: [heads][rows][ld]; block_max/sum: [heads][rows][num_blocks], pre-set to (-inf, 0).
template <typename In>
__global__ void simt_statistics_kernel(const In* __restrict__ q, const In* __restrict__ k,
                                       const long long* __restrict__ positions, int rows, int d, int ld,
                                       float score_scale, long long block, long long segment, long long num_blocks,
                                       float* __restrict__ block_max, float* __restrict__ block_sum) {
  __shared__ float scores[kRows][kKeys + 1];
  __shared__ __align__(16) float q_stage[kDepth][kRows];
  __shared__ __align__(16) float k_stage[kDepth][kKeys];
  const int head = static_cast<int>(blockIdx.y), r0 = static_cast<int>(blockIdx.x) * kRows;
  const int rows_here = min(kRows, rows - r0);
  const long long* pos = positions + r0;
  const In* q_tile = q + (static_cast<long long>(head) * rows + r0) * ld;
  const long long last = pos[rows_here - 1];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  // This thread block's key segment: whole key blocks, so no other block writes its cells.
  const long long segment_begin = static_cast<long long>(blockIdx.z) * segment;
  const long long segment_end = min(segment_begin + segment, last + 1);
  for (long long c0 = segment_begin; c0 < segment_end; c0 += kKeys) {
    const int width = static_cast<int>(min(static_cast<long long>(kKeys), segment_end - c0));
    score_chunk(q_tile, k, pos, rows_here, d, ld, score_scale, c0, width, scores, q_stage, k_stage);
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

// One warp per (head, row): the row log-sum-exps from the finished block pairs, with
// finish_row_statistics' formula (row max in float, the sum in double); also writes
// (-inf, 0) into the row's blocks beyond its position, which no statistics kernel touches.
__global__ void row_lse_kernel(float* __restrict__ block_max, float* __restrict__ block_sum,
                               const long long* __restrict__ positions, int heads, int rows, long long block,
                               long long num_blocks, const float* __restrict__ sink_logits,
                               double* __restrict__ lse_tokens, double* __restrict__ lse_all) {
  const long long warp_id = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (warp_id >= static_cast<long long>(heads) * rows) return;
  const int head = static_cast<int>(warp_id / rows), r = static_cast<int>(warp_id % rows);
  const long long blocks = positions[r] / block + 1;
  float* m = block_max + warp_id * num_blocks;
  float* l = block_sum + warp_id * num_blocks;
  float row_max = -INFINITY;
  for (long long b = lane; b < blocks; b += 32) row_max = fmaxf(row_max, m[b]);
  row_max = warp_max(row_max);
  double total = 0.0;
  for (long long b = lane; b < blocks; b += 32) {
    if (m[b] != -INFINITY) total += static_cast<double>(l[b]) * exp(static_cast<double>(m[b]) - row_max);
  }
  total = warp_sum(total);
  for (long long b = blocks + lane; b < num_blocks; b += 32) {
    m[b] = -INFINITY;
    l[b] = 0.0f;
  }
  if (lane == 0) {
    const double tokens = static_cast<double>(row_max) + log(total);
    double all = tokens;
    if (sink_logits) {
      const double s = sink_logits[head], hi = fmax(tokens, s);
      all = hi + log(exp(tokens - hi) + exp(s - hi));
    }
    lse_tokens[warp_id] = tokens;
    lse_all[warp_id] = all;
  }
}

// grid (row tiles, heads, key segments). out[segment][head][row][:] = sum_j exp(z_j - lse_all) v_j over
// the segment's keys [segment * segment_keys, ...): lse_all is final, so the segments' sums add up
// to the output without rescaling.
template <typename In, int kCols>
__global__ void output_kernel(const In* __restrict__ q, const In* __restrict__ k, const float* __restrict__ v,
                              const long long* __restrict__ positions, const double* __restrict__ lse_all, int rows,
                              int d, int ld, float score_scale, long long segment_keys, float* __restrict__ output) {
  __shared__ float scores[kRows][kKeys + 1];
  __shared__ __align__(16) float q_stage[kDepth][kRows];
  __shared__ __align__(16) float k_stage[kDepth][kKeys];
  extern __shared__ float v_stage[];  // [kKeys][d]
  const int head = static_cast<int>(blockIdx.y), r0 = static_cast<int>(blockIdx.x) * kRows;
  const int rows_here = min(kRows, rows - r0);
  const long long* pos = positions + r0;
  const In* q_tile = q + (static_cast<long long>(head) * rows + r0) * ld;
  const long long last = pos[rows_here - 1];
  const int row = static_cast<int>(threadIdx.x) / 4, part = static_cast<int>(threadIdx.x) % 4;  // 4 threads per row
  const float lse = row < rows_here ? static_cast<float>(lse_all[static_cast<long long>(head) * rows + r0 + row]) : 0.0f;
  const long long begin = static_cast<long long>(blockIdx.z) * segment_keys, end = min(begin + segment_keys, last + 1);
  float acc[kCols] = {};
  for (long long c0 = begin; c0 < end; c0 += kKeys) {
    const int width = static_cast<int>(min(static_cast<long long>(kKeys), end - c0));
    score_chunk(q_tile, k, pos, rows_here, d, ld, score_scale, c0, width, scores, q_stage, k_stage);
    for (int i = static_cast<int>(threadIdx.x); i < kKeys * d; i += kThreads) {
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
    const long long heads = gridDim.y;
    float* out = output + ((static_cast<long long>(blockIdx.z) * heads + head) * rows + r0 + row) * d;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int c = part + 4 * i;
      if (c < d) out[c] = acc[i];
    }
  }
}

// Sums 32 values per lane across the warp, transposed: afterwards lane i holds (in partial[0]) the
// warp's total of partial[i]. Five exchange rounds of halving width, 31 shuffles in all.
template <int kWidth>
__device__ __forceinline__ void exchange_halves(float (&partial)[32], int lane) {
  const bool upper = (lane & kWidth) != 0;
#pragma unroll
  for (int i = 0; i < kWidth; ++i) {
    const float send = upper ? partial[i] : partial[i + kWidth];
    const float keep = upper ? partial[i + kWidth] : partial[i];
    partial[i] = keep + __shfl_xor_sync(0xffffffffu, send, kWidth);
  }
}
__device__ __forceinline__ void transpose_warp_sums(float (&partial)[32], int lane) {
  exchange_halves<16>(partial, lane);
  exchange_halves<8>(partial, lane);
  exchange_halves<4>(partial, lane);
  exchange_halves<2>(partial, lane);
  exchange_halves<1>(partial, lane);
}

// One warp per walk (OutputWalks, backend.hpp); every lane holds kCols columns (lane + 32 i) of q and
// of the running numerator. Keys of a step go 32 at a time: their fp32 products with q are formed
// column-parallel (coalesced rows) and summed across the warp so that lane i holds key i's; its
// logit and weight are formed in double as on the host; the weighted values are then accumulated
// in double, each weight broadcast from its lane.
constexpr int kWalkWarps = 8;
constexpr int kWalkMaxHeadDim = 256;

template <int kCols>
__global__ void output_walk_kernel(OutputWalkArgs a) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const long long w = static_cast<long long>(blockIdx.x) * kWalkWarps + warp;
  if (w >= a.num_walks) return;  // whole warps leave; only warp-level exchanges below
  const OutputWalk walk = a.walks[w];
  const int d = a.head_dim;
  const long long cell = static_cast<long long>(walk.head) * a.rows + walk.row;
  float q[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) q[c] = lane + 32 * c < d ? a.q[cell * d + lane + 32 * c] : 0.0f;
  const double lse = a.lse_all[cell];
  double acc[kCols] = {};
  double denominator = 0.0;  // this lane's keys; summed over the warp at a checkpoint
  for (long long i = walk.first_step; i < walk.first_step + walk.num_steps; ++i) {
    const OutputStep step = a.steps[i];
    if (step.begin < 0) {
      const double total = warp_sum(denominator) + a.sink_weight[cell];
      double diff = 0.0, norm = 0.0;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int column = lane + 32 * c;
        if (column >= d) continue;
        const double exact = a.exact[cell * d + column];
        const double approx = total > 0 ? acc[c] / total : 0.0;
        diff += (approx - exact) * (approx - exact);
        norm += exact * exact;
      }
      diff = warp_sum(diff);
      norm = warp_sum(norm);
      if (lane == 0) a.errors[step.end] = norm > 0 ? sqrt(diff / norm) : CUDART_NAN;
      continue;
    }
    const double factor = a.factors ? a.factors[i] : 1.0;
    for (int j0 = step.begin; j0 < step.end; j0 += 32) {
      const int n = min(32, step.end - j0);
      float partial[32];
#pragma unroll
      for (int t = 0; t < 32; ++t) {
        // Keys past the step read its last key again (a valid row) and are dropped below.
        const float* key = a.k + static_cast<long long>(j0 + min(t, n - 1)) * d;
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          if (lane + 32 * c < d) dot = fmaf(q[c], key[lane + 32 * c], dot);
        }
        partial[t] = dot;
      }
      transpose_warp_sums(partial, lane);
      const double weight = lane < n ? exp(a.scale * static_cast<double>(partial[0]) - lse) * factor : 0.0;
      denominator += weight;
      for (int t = 0; t < n; ++t) {
        const double p = __shfl_sync(0xffffffffu, weight, t);
        const float* value = a.v + static_cast<long long>(j0 + t) * d;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int column = lane + 32 * c;
          if (column < d) acc[c] = fma(p, static_cast<double>(value[column]), acc[c]);
        }
      }
    }
  }
}

template <int kCols>
void launch_output_walk_typed(const OutputWalkArgs& args, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((args.num_walks + kWalkWarps - 1) / kWalkWarps);
  output_walk_kernel<kCols><<<blocks, kWalkWarps * 32, 0, stream>>>(args);
  check(cudaGetLastError(), "output walk kernel launch");
}

// output[i] = sum over segments, in order, of partials[segment][i] (n = heads * rows * head_dim).
__global__ void sum_segments_kernel(const float* __restrict__ partials, int segments, long long n, float* __restrict__ output) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < segments; ++s) sum += partials[s * n + i];
    output[i] = sum;
  }
}

__global__ void fill_kernel(float* data, long long n, float value) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    data[i] = value;
  }
}

template <typename Out>
__device__ Out from_float(float x);
template <>
__device__ float from_float<float>(float x) { return x; }
template <>
__device__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename Out>
__global__ void convert_kernel(const float* __restrict__ src, long long rows, int d, int stride, float multiplier,
                               Out* __restrict__ dst, int* overflow) {
  const long long n = rows * stride;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = i / stride;
    const int c = static_cast<int>(i % stride);
    const float x = c < d ? src[r * d + c] * multiplier : 0.0f;
    const Out y = from_float<Out>(x);
    if (overflow && isinf(to_float(y)) && isfinite(x)) *overflow = 1;
    dst[i] = y;
  }
}

// SplitMix64: a well-mixed 64-bit hash of a counter.
__device__ unsigned long long mix64(unsigned long long x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

__global__ void fill_normal_kernel(float* data, long long n, unsigned long long seed) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const unsigned long long bits = mix64(seed ^ mix64(static_cast<unsigned long long>(i)));
    // Two uniforms in (0, 1] from the hash's halves, then Box-Muller.
    const float u1 = (static_cast<float>(bits >> 40) + 1.0f) * (1.0f / 16777216.0f);
    const float u2 = static_cast<float>((bits >> 8) & 0xffffffULL) * (1.0f / 16777216.0f);
    data[i] = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  }
}

// Returns the kernel's name ("simt-tiled" or "simt").
// shared_optin: the device's shared memory a block may opt in to (the tiled kernel's q tile needs up to 80 KiB).
template <typename In>
const char* launch_simt_statistics(const StatsPassArgs& a, int stride, int shared_optin, cudaStream_t stream) {
  const bool tiled_applies = std::is_same_v<In, float> && tiled_fp32_supports(a.block, a.head_dim) &&
                             tiled_fp32_shared_bytes(a.head_dim) <= static_cast<std::size_t>(shared_optin);
  if (a.simt_kernel == SimtKernel::kTiled && !tiled_applies) {
    fail(ErrorKind::kUsage, "statistics pass: the tiled SIMT kernel takes fp32 inputs, head_dim a multiple of 4 up to {} "
         "(its queries within the device's {} bytes of shared memory a block) and blocks of 8, 16, 32 or a multiple of 64 "
         "keys (got head_dim {}, block {})", kTiledMaxHeadDim, shared_optin, a.head_dim, a.block);
  }
  const bool tiled = tiled_applies && a.simt_kernel != SimtKernel::kBasic;
  const auto cells = static_cast<long long>(a.heads) * a.rows * a.num_blocks;
  fill_kernel<<<1024, 256, 0, stream>>>(a.block_max, cells, -INFINITY);
  fill_kernel<<<1024, 256, 0, stream>>>(a.block_sum, cells, 0.0f);
  // Key segments of whole blocks spread a long row over many thread blocks.
  const long long keys = a.host_positions[a.rows - 1] + 1;
  const long long unit = std::lcm(static_cast<long long>(kKeys), a.block);
  // Longer segments where a row's keys would need more of them than a grid's third dimension holds (65,535).
  const long long segments_held = 65535;
  const long long fewest_units = (keys + unit * segments_held - 1) / (unit * segments_held);
  const long long segment = unit * std::max({1LL, kSimtSegmentKeys / unit, fewest_units});
  const dim3 grid(static_cast<unsigned>((a.rows + kRows - 1) / kRows), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>((keys + segment - 1) / segment));
  if (tiled) {
    const std::size_t shared = tiled_fp32_shared_bytes(a.head_dim);
    // The largest head_dim's allowance (within the device's), not this launch's: a value set per launch could
    // lower the limit under another lane's launch of a larger head_dim between its own set and launch.
    const std::size_t allowance = std::min(tiled_fp32_shared_bytes(kTiledMaxHeadDim), static_cast<std::size_t>(shared_optin));
    check(cudaFuncSetAttribute(tiled_fp32_statistics_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(allowance)),
          "tiled SIMT kernel shared memory");
    tiled_fp32_statistics_kernel<<<grid, kTiledThreads, shared, stream>>>(
        static_cast<const float*>(a.q), static_cast<const float*>(a.k), a.positions, a.rows, a.head_dim, a.score_scale, a.block,
        segment, a.num_blocks, a.block_max, a.block_sum);
    check(cudaGetLastError(), "tiled SIMT statistics kernel launch");
    return "simt-tiled";
  }
  simt_statistics_kernel<In><<<grid, kThreads, 0, stream>>>(static_cast<const In*>(a.q), static_cast<const In*>(a.k),
                                                            a.positions, a.rows, a.head_dim, stride, a.score_scale,
                                                            a.block, segment, a.num_blocks, a.block_max, a.block_sum);
  check(cudaGetLastError(), "SIMT statistics kernel launch");
  return "simt";
}

template <typename In, int kCols>
void launch_output_with(const void* q, const void* k, const float* v, const long long* positions, const double* lse_all,
                        int heads, int rows, int d, int ld, float score_scale, const OutputSegments& split,
                        float* output, float* workspace, cudaStream_t stream) {
  const std::size_t shared = static_cast<std::size_t>(kKeys * d) * sizeof(float);
  // The instantiation's largest head_dim (4 kCols), not this launch's: a value set per launch could lower the
  // limit under another lane's launch between its own set and launch.
  check(cudaFuncSetAttribute(output_kernel<In, kCols>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(static_cast<std::size_t>(kKeys * 4 * kCols) * sizeof(float))),
        "output kernel shared memory");
  const dim3 grid(static_cast<unsigned>((rows + kRows - 1) / kRows), static_cast<unsigned>(heads),
                  static_cast<unsigned>(split.segments));
  float* target = split.segments == 1 ? output : workspace;
  output_kernel<In, kCols><<<grid, kThreads, shared, stream>>>(static_cast<const In*>(q), static_cast<const In*>(k), v,
                                                               positions, lse_all, rows, d, ld, score_scale,
                                                               split.segment_keys, target);
  check(cudaGetLastError(), "output kernel launch");
  if (split.segments == 1) return;
  const long long n = static_cast<long long>(heads) * rows * d;
  const auto blocks = static_cast<unsigned>(std::min<long long>((n + kThreads - 1) / kThreads, 65535));
  sum_segments_kernel<<<blocks, kThreads, 0, stream>>>(workspace, split.segments, n, output);
  check(cudaGetLastError(), "output segment sum launch");
}

template <typename In>
void launch_output_typed(const void* q, const void* k, const float* v, const long long* positions, const double* lse_all,
                         int heads, int rows, int d, int ld, float score_scale, const OutputSegments& split,
                         float* output, float* workspace, cudaStream_t stream) {
  if (d <= 64) launch_output_with<In, 16>(q, k, v, positions, lse_all, heads, rows, d, ld, score_scale, split, output, workspace, stream);
  else if (d <= 128) launch_output_with<In, 32>(q, k, v, positions, lse_all, heads, rows, d, ld, score_scale, split, output, workspace, stream);
  else launch_output_with<In, 64>(q, k, v, positions, lse_all, heads, rows, d, ld, score_scale, split, output, workspace, stream);
}

}  // namespace

int input_stride(InputType type, int head_dim) {
  if (type == InputType::kFloat32) return head_dim;
  for (int depth : {64, 128, 256}) {
    if (head_dim <= depth) return depth;
  }
  return 0;
}

std::size_t element_bytes(InputType type) { return type == InputType::kFloat32 ? 4 : 2; }

void convert_rows(InputType type, const float* src, long long rows, int head_dim, float multiplier, void* dst,
                  int* overflow, cudaStream_t stream) {
  const int stride = input_stride(type, head_dim);
  if (stride == 0) fail(ErrorKind::kInternal, "convert_rows: head_dim {} has no padded layout", head_dim);
  if (rows == 0) return;
  const long long n = rows * stride;
  const auto blocks = static_cast<unsigned>(std::min<long long>(4096, (n + 255) / 256));
  switch (type) {
    case InputType::kFloat32:
      convert_kernel<float><<<blocks, 256, 0, stream>>>(src, rows, head_dim, stride, multiplier, static_cast<float*>(dst), nullptr);
      break;
    case InputType::kBfloat16:
      convert_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(src, rows, head_dim, stride, multiplier,
                                                                static_cast<__nv_bfloat16*>(dst), nullptr);
      break;
    case InputType::kFloat16:
      convert_kernel<__half><<<blocks, 256, 0, stream>>>(src, rows, head_dim, stride, multiplier, static_cast<__half*>(dst),
                                                         overflow);
      break;
  }
  check(cudaGetLastError(), "input conversion kernel launch");
}

void fill_normal(float* data, std::size_t count, std::uint64_t seed, cudaStream_t stream) {
  if (count == 0) return;
  const auto n = static_cast<long long>(count);
  fill_normal_kernel<<<static_cast<unsigned>(std::min<long long>(8192, (n + 255) / 256)), 256, 0, stream>>>(data, n, seed);
  check(cudaGetLastError(), "random fill kernel launch");
}

StatsPass::StatsPass(int multiprocessors, std::size_t shared_limit) : multiprocessors_(multiprocessors), wgmma_(wgmma_available()) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&shared_optin_, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "shared memory limit");
  if (shared_limit > 0) shared_optin_ = static_cast<int>(std::min<std::size_t>(shared_limit, static_cast<std::size_t>(shared_optin_)));
}

StatsPass::~StatsPass() {
  if (device_plan_) cudaFree(device_plan_);
}

const char* StatsPass::run(const StatsPassArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.heads <= 0) fail(ErrorKind::kInternal, "statistics pass: no rows");
  const int stride = input_stride(a.type, a.head_dim);
  // kAuto: wgmma wherever it runs (compute capability 9.0; measured faster there, README), else mma.sync
  // where a block's shared memory holds its key stages (not at head_dim 256 on 99 KiB GPUs), else SIMT.
  const bool asked_wgmma = a.tensor_core_kernel == TensorCoreKernel::kWgmma;
  const bool wgmma = asked_wgmma || (a.tensor_core_kernel == TensorCoreKernel::kAuto && wgmma_);
  const bool tensor_cores = a.type != InputType::kFloat32 && tensor_core_supports(a.block, stride) && a.score_scale > 0.0f &&
                            (wgmma || a.tensor_core_kernel == TensorCoreKernel::kMma ||
                             mma_shared_bytes(stride) <= static_cast<std::size_t>(shared_optin_));
  const char* kernel = "simt";
  if (tensor_cores) {
    if (asked_wgmma && !wgmma_) fail(ErrorKind::kUsage, "statistics pass: the wgmma kernel needs a compute capability 9.0 GPU");
    kernel = wgmma ? "wgmma" : "mma";
    // Thread blocks of 128 query rows: one row group (a warp of 16 or 32 rows for mma.sync, a
    // warpgroup of 64 for wgmma) per head of the group, up to the number of row groups, shares
    // each key tile, so the keys are read once per row tile and head chunk, not once per head;
    // the remaining row groups take further row slices of the same heads.
    const int rows_per_warp = tensor_core_rows_per_warp(stride, a.tensor_core_rows_per_warp);
    const int group_rows = wgmma ? kWgmmaRowsPerWarpgroup : rows_per_warp;
    const int row_groups = wgmma ? kWgmmaWarpgroups : kTensorCoreRowsPerBlock / rows_per_warp;
    const int heads_per_cta = std::min(a.heads, row_groups);
    const int subtiles = std::max(1, row_groups / heads_per_cta);
    const int tile_rows = group_rows * subtiles;
    const int row_tiles = (a.rows + tile_rows - 1) / tile_rows;
    const int head_chunks = (a.heads + heads_per_cta - 1) / heads_per_cta;
    const long long unit = tensor_core_key_unit(a.block);
    auto causal_keys = [&](int tile) {  // keys the tile's last row sees, rounded up to whole key tiles
      const long long last = a.host_positions[std::min((tile + 1) * tile_rows, a.rows) - 1];
      return (last + kTensorCoreKeyTile) / kTensorCoreKeyTile * kTensorCoreKeyTile;
    };
    long long total_keys = 0;
    for (int tile = 0; tile < row_tiles; ++tile) total_keys += causal_keys(tile) * head_chunks;
    // Segments of whole blocks, short enough for several items per multiprocessor.
    const long long wanted_items = kMinItemsPerMultiprocessor * multiprocessors_;
    long long segment = std::clamp(total_keys / std::max(1LL, wanted_items), kMinSegmentKeys, kMaxSegmentKeys);
    segment = std::max(unit, segment / unit * unit);
    plan_.clear();
    for (int tile = row_tiles - 1; tile >= 0; --tile) {
      const long long keys = causal_keys(tile);
      for (long long begin = 0; begin < keys; begin += segment) {
        const long long end = std::min(begin + segment, keys);
        for (int chunk = 0; chunk < head_chunks; ++chunk) {
          plan_.push_back({tile, chunk, static_cast<int>(begin), static_cast<int>(end)});
        }
      }
    }
    // Whole segments first, the shorter diagonal ones last: they fill the tail of the launch.
    std::stable_partition(plan_.begin(), plan_.end(), [&](const TensorCoreWorkItem& w) { return w.key_end - w.key_begin == segment; });
    if (plan_.size() > device_plan_capacity_) {
      if (device_plan_) check(cudaFree(device_plan_), "free work plan");
      device_plan_ = nullptr;
      device_plan_capacity_ = 0;
      const cudaError_t status = cudaMalloc(&device_plan_, plan_.size() * sizeof(TensorCoreWorkItem));
      if (status != cudaSuccess) {
        device_plan_ = nullptr;
        (void)cudaGetLastError();
        fail(ErrorKind::kResource, "CUDA: cannot allocate {} bytes of device memory for the work plan: {}",
             plan_.size() * sizeof(TensorCoreWorkItem), cudaGetErrorString(status));
      }
      device_plan_capacity_ = plan_.size();
    }
    check(cudaMemcpyAsync(device_plan_, plan_.data(), plan_.size() * sizeof(TensorCoreWorkItem), cudaMemcpyHostToDevice, stream),
          "work plan upload");
    TensorCoreLaunch launch;
    launch.fp16 = a.type == InputType::kFloat16;
    launch.q = a.q;
    launch.k = a.k;
    launch.positions = a.positions;
    launch.work = device_plan_;
    launch.num_items = static_cast<long long>(plan_.size());
    launch.heads = a.heads;
    launch.rows = a.rows;
    launch.depth = stride;
    launch.rows_per_warp = rows_per_warp;
    launch.heads_per_cta = heads_per_cta;
    launch.row_subtiles = subtiles;
    launch.block = a.block;
    launch.num_blocks = a.num_blocks;
    launch.score_scale = a.score_scale;
    launch.block_max = a.block_max;
    launch.block_sum = a.block_sum;
    if (wgmma) launch_wgmma_statistics(launch, stream);
    else launch_tensor_core_statistics(launch, stream);
  } else {
    switch (a.type) {
      case InputType::kFloat32: kernel = launch_simt_statistics<float>(a, stride, shared_optin_, stream); break;
      case InputType::kBfloat16: kernel = launch_simt_statistics<__nv_bfloat16>(a, stride, shared_optin_, stream); break;
      case InputType::kFloat16: kernel = launch_simt_statistics<__half>(a, stride, shared_optin_, stream); break;
    }
  }
  const long long warps = static_cast<long long>(a.heads) * a.rows;
  const auto lse_blocks = static_cast<unsigned>((warps * 32 + 255) / 256);
  row_lse_kernel<<<lse_blocks, 256, 0, stream>>>(a.block_max, a.block_sum, a.positions, a.heads, a.rows, a.block,
                                                 a.num_blocks, a.sink_logits, a.lse_tokens, a.lse_all);
  check(cudaGetLastError(), "row log-sum-exp kernel launch");
  return kernel;
}

OutputSegments output_segments(int heads, int rows, int head_dim, long long keys) {
  const long long ctas = static_cast<long long>((rows + kRows - 1) / kRows) * heads;
  const long long chunks = (keys + kKeys - 1) / kKeys;
  long long segments = (kOutputTargetBlocks + ctas - 1) / ctas;
  segments = std::max(1LL, std::min({segments, kOutputMaxSegments, chunks / kOutputMinSegmentChunks}));
  OutputSegments split;
  split.segment_keys = (chunks + segments - 1) / segments * kKeys;
  split.segments = static_cast<int>((keys + split.segment_keys - 1) / split.segment_keys);
  split.workspace_floats = split.segments == 1 ? 0 : static_cast<std::size_t>(split.segments) * heads * rows * head_dim;
  return split;
}

void launch_output_pass(InputType type, const void* q, const void* k, const float* v, const long long* positions,
                        const double* lse_all, int heads, int rows, int head_dim, float score_scale,
                        const OutputSegments& split, float* output, float* workspace, cudaStream_t stream) {
  const int ld = input_stride(type, head_dim);
  if (split.segments > 1 && workspace == nullptr) fail(ErrorKind::kInternal, "output pass: {} segments and no workspace", split.segments);
  switch (type) {
    case InputType::kFloat32:
      launch_output_typed<float>(q, k, v, positions, lse_all, heads, rows, head_dim, ld, score_scale, split, output, workspace, stream);
      break;
    case InputType::kBfloat16:
      launch_output_typed<__nv_bfloat16>(q, k, v, positions, lse_all, heads, rows, head_dim, ld, score_scale, split, output,
                                         workspace, stream);
      break;
    case InputType::kFloat16:
      launch_output_typed<__half>(q, k, v, positions, lse_all, heads, rows, head_dim, ld, score_scale, split, output, workspace,
                                  stream);
      break;
  }
}

void launch_output_walks(const OutputWalkArgs& args, cudaStream_t stream) {
  if (args.num_walks == 0) return;
  if (args.head_dim < 1 || args.head_dim > kWalkMaxHeadDim) {
    fail(ErrorKind::kInternal, "output walks: head_dim {} outside 1..{}", args.head_dim, kWalkMaxHeadDim);
  }
  switch ((args.head_dim + 31) / 32) {
    case 1: launch_output_walk_typed<1>(args, stream); break;
    case 2: launch_output_walk_typed<2>(args, stream); break;
    case 3: launch_output_walk_typed<3>(args, stream); break;
    case 4: launch_output_walk_typed<4>(args, stream); break;
    case 5: launch_output_walk_typed<5>(args, stream); break;
    case 6: launch_output_walk_typed<6>(args, stream); break;
    case 7: launch_output_walk_typed<7>(args, stream); break;
    default: launch_output_walk_typed<8>(args, stream); break;
  }
}

}  // namespace hysparse::cuda
