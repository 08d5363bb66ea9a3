// NSA's selection scores on the device (Backend::nsa_block_scores; proxy::nsa_block_scores is the
// definition), and their logits alone (Backend::pooled_key_logits: moba's block scores). A row at
// position t sees about t / stride compressed keys, and each of its query heads forms a logit
// against every one of them: T^2 head_dim / stride multiply-adds in double a head over
// every row, the largest host cost of the nsa selector at long contexts. Three passes per tile:
// logits (every thread one compressed key for kLogitRows rows, so each key is read once for all of
// them), each (head, row)'s softmax, and the mapping onto selection blocks summed over the heads in
// order, as the host sums them.
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>

#include "common/error.hpp"
#include "device_statistics.hpp"

namespace hysparse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLogitRows = 16;  // query rows a logit thread block serves (their q in shared memory)

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA {}: {}", what, cudaGetErrorString(status));
}

// Compressed keys row t sees (NsaScoreRequest: each once all its keys are <= t).
__host__ __device__ __forceinline__ long long visible_keys(long long t, const NsaScoreArgs& a) {
  return t >= a.cmp - 1 ? min(a.compressed, (t - a.cmp + 1) / a.stride + 1) : 0;
}

// logits[h][r][i] = scale * (q . c_i), channels ascending, each step fused or not as the host's
// proxy::multiply_add (the intrinsics keep the compiler from fusing or splitting them): the host's bits.
template <bool kFused>
__global__ void __launch_bounds__(kThreads) nsa_logits_kernel(const NsaScoreArgs a) {
  extern __shared__ double q_rows[];  // [kLogitRows][head_dim]
  const int row_chunks = (a.rows + kLogitRows - 1) / kLogitRows;
  const int h = static_cast<int>(blockIdx.x) / row_chunks, r0 = static_cast<int>(blockIdx.x) % row_chunks * kLogitRows;
  const int rows = min(kLogitRows, a.rows - r0), d = a.head_dim;
  for (int i = static_cast<int>(threadIdx.x); i < kLogitRows * d; i += kThreads) {
    const int r = i / d;
    q_rows[i] = r < rows ? static_cast<double>(a.q[(static_cast<long long>(h) * a.rows + r0 + r) * d + i % d]) : 0.0;
  }
  __syncthreads();
  const long long key = static_cast<long long>(blockIdx.y) * kThreads + threadIdx.x;
  if (key >= visible_keys(a.positions[r0 + rows - 1], a)) return;
  double sum[kLogitRows];
#pragma unroll
  for (int r = 0; r < kLogitRows; ++r) sum[r] = 0.0;
  const double* column = a.keys_t + key;
  for (int c = 0; c < d; ++c, column += a.compressed) {
    const double k = *column;
#pragma unroll
    for (int r = 0; r < kLogitRows; ++r) {
      const double x = q_rows[r * d + c];
      sum[r] = kFused ? __fma_rn(x, k, sum[r]) : __dadd_rn(sum[r], __dmul_rn(x, k));
    }
  }
  double* out = a.logits + (static_cast<long long>(h) * a.rows + r0) * a.width + key;
#pragma unroll
  for (int r = 0; r < kLogitRows; ++r) {
    if (r < rows && key < visible_keys(a.positions[r0 + r], a)) out[static_cast<long long>(r) * a.width] = __dmul_rn(sum[r], a.scale);
  }
}

__device__ __forceinline__ double warp_max(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One warp per (head, row): the logits become probabilities exp(z - lse) in place (no sink: NSA's
// compressed attention has none).
__global__ void __launch_bounds__(kThreads) nsa_softmax_kernel(const NsaScoreArgs a) {
  const long long cell = (static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (cell >= static_cast<long long>(a.heads) * a.rows) return;
  const long long n = visible_keys(a.positions[cell % a.rows], a);
  if (n == 0) return;
  double* z = a.logits + cell * a.width;
  double m = -CUDART_INF;
  for (long long i = lane; i < n; i += 32) m = fmax(m, z[i]);
  m = warp_max(m);
  double s = 0.0;
  for (long long i = lane; i < n; i += 32) s += exp(z[i] - m);
  const double lse = m + log(warp_sum(s));
  for (long long i = lane; i < n; i += 32) z[i] = exp(z[i] - lse);
}

// scores[r][b]: per head in order, the probabilities of the compressed keys whose windows meet block b,
// each times the stride-long pieces of its window inside the block, summed in ascending key order.
__global__ void __launch_bounds__(kThreads) nsa_blocks_kernel(const NsaScoreArgs a) {
  const long long cell = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (cell >= static_cast<long long>(a.rows) * a.blocks) return;
  const long long r = cell / a.blocks, b = cell % a.blocks, t = a.positions[r];
  const long long n = visible_keys(t, a);
  double total = 0.0;
  if (b <= t / a.block) {
    const long long per_block = a.block / a.stride, per_window = a.cmp / a.stride;
    const long long first = max(0ll, per_block * b - (per_window - 1)), last = min(n, per_block * (b + 1));
    for (int h = 0; h < a.heads && n > 0; ++h) {
      const double* p = a.logits + (static_cast<long long>(h) * a.rows + r) * a.width;
      double sum = 0.0;
      for (long long i = first; i < last; ++i) {
        const long long pieces = min(i + per_window, per_block * (b + 1)) - max(i, per_block * b);
        sum += static_cast<double>(pieces) * p[i];
      }
      total += sum;
    }
  }
  a.scores[cell] = total;
}

}  // namespace

long long nsa_visible_keys(const NsaScoreArgs& args, long long position) { return visible_keys(position, args); }

void launch_nsa_logits(const NsaScoreArgs& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.heads <= 0 || args.width <= 0) fail(ErrorKind::kInternal, "NSA logits: an empty tile");
  // x: (head, chunk of kLogitRows rows), which may be many (MQA); y: chunks of kThreads compressed keys.
  const long long key_chunks = (args.width + kThreads - 1) / kThreads;
  if (key_chunks > 65535) fail(ErrorKind::kInternal, "NSA logits: {} compressed keys a row", args.width);
  const dim3 grid(static_cast<unsigned>(static_cast<long long>(args.heads) * ((args.rows + kLogitRows - 1) / kLogitRows)),
                  static_cast<unsigned>(key_chunks));
  const std::size_t shared = static_cast<std::size_t>(kLogitRows) * args.head_dim * sizeof(double);  // the rows' q
  if (args.fused) nsa_logits_kernel<true><<<grid, kThreads, shared, stream>>>(args);
  else nsa_logits_kernel<false><<<grid, kThreads, shared, stream>>>(args);
  check(cudaGetLastError(), "NSA logits kernel launch");
}

void launch_nsa_scores(const NsaScoreArgs& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.heads <= 0 || args.blocks <= 0) fail(ErrorKind::kInternal, "NSA scores: an empty tile");
  if (args.width > 0) {
    launch_nsa_logits(args, stream);
    const long long warps = static_cast<long long>(args.heads) * args.rows;
    nsa_softmax_kernel<<<static_cast<unsigned>((warps * 32 + kThreads - 1) / kThreads), kThreads, 0, stream>>>(args);
    check(cudaGetLastError(), "NSA softmax kernel launch");
  }
  const long long cells = static_cast<long long>(args.rows) * args.blocks;
  nsa_blocks_kernel<<<static_cast<unsigned>((cells + kThreads - 1) / kThreads), kThreads, 0, stream>>>(args);
  check(cudaGetLastError(), "NSA blocks kernel launch");
}

}  // namespace hysparse::cuda
