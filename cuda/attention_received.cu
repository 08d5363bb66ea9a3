// The attention keys receive from the queries after them (Backend::attention_received; InfLLM's
// representative scores; proxy::attention_received is the definition), on the device, one head at a
// time. A pass takes a slab of query rows: their logits against every causal key in double (a cuBLAS
// DGEMM into a [rows][keys] workspace, never T x T), each row's log-sum-exp (one thread block a row,
// fixed reduction tree), then every key of the slab's windows adds its probabilities row by row in
// ascending query order, as the host does. Only the summation order of each GEMM and log-sum-exp,
// and the device's exp and log, differ from the host's.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "block_reduce.cuh"
#include "common/error.hpp"
#include "device_statistics.hpp"

namespace hysparse::cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kKeyThreads = 256;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA {}: {}", what, cudaGetErrorString(status));
}

__global__ void widen_kernel(const float* source, long long count, double* target) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    target[i] = static_cast<double>(source[i]);
  }
}

// Row i of the slab (query first_row + i): lse = m + log(exp(sink - m) + sum_{j <= t} exp(z_j - m)).
__global__ void __launch_bounds__(kRowThreads) row_lse_kernel(const double* logits, long long ld, long long first_row,
                                                              bool has_sink, double sink, double* lse) {
  __shared__ double scratch[kRowWarps];
  const long long i = blockIdx.x, t = first_row + i;
  const double* z = logits + i * ld;
  double m = -INFINITY;
  for (long long j = threadIdx.x; j <= t; j += kRowThreads) m = fmax(m, z[j]);
  m = block_reduce<kRowWarps>(m, scratch, [](double a, double b) { return fmax(a, b); });
  if (has_sink) m = fmax(m, sink);
  double sum = 0.0;
  for (long long j = threadIdx.x; j <= t; j += kRowThreads) sum += exp(z[j] - m);
  sum = block_reduce<kRowWarps>(sum, scratch, [](double a, double b) { return a + b; });
  if (threadIdx.x == 0) lse[i] = m + log(sum + (has_sink ? exp(sink - m) : 0.0));
}

// Key j of the slab's windows adds p_t(j) for its queries t in [j, j + window) of the slab, t ascending.
__global__ void __launch_bounds__(kKeyThreads) received_kernel(const double* logits, long long ld, long long first_row,
                                                               long long rows, long long first_key, long long window,
                                                               const double* lse, double* received) {
  const long long j = first_key + blockIdx.x * static_cast<long long>(kKeyThreads) + threadIdx.x;
  const long long end = first_row + rows;  // keys of the slab's windows lie below its last query
  if (j >= end) return;
  double sum = received[j];
  const long long t_begin = max(first_row, j), t_end = min(end, j + window);
  for (long long t = t_begin; t < t_end; ++t) sum += exp(logits[(t - first_row) * ld + j] - lse[t - first_row]);
  received[j] = sum;
}

void check_blas(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  if (status == CUBLAS_STATUS_ALLOC_FAILED) {
    (void)cudaGetLastError();  // a failed allocation inside cuBLAS must not reach this thread's next launch check
    fail(ErrorKind::kResource, "cuBLAS {}: out of device memory", what);
  }
  fail(ErrorKind::kDevice, "cuBLAS {}: status {}", what, static_cast<int>(status));
}

}  // namespace

void launch_widen(const float* source, long long count, double* target, cudaStream_t stream) {
  if (count <= 0) return;
  const long long blocks = std::min<long long>((count + 255) / 256, 65535);
  widen_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(source, count, target);
  check(cudaGetLastError(), "widening kernel launch");
}

void received_for_head(cublasContext* blas, const ReceivedHeadArgs& args, cudaStream_t stream) {
  const long long T = args.seq_len, d = args.head_dim, W = args.window;
  check(cudaMemsetAsync(args.received, 0, static_cast<std::size_t>(T) * sizeof(double), stream), "received sums");
  if (W <= 0) return;
  check_blas(cublasSetStream(blas, stream), "stream");
  const double zero = 0.0;
  for (long long t0 = 0; t0 < T; t0 += args.rows_per_pass) {
    const long long rows = std::min(args.rows_per_pass, T - t0), width = t0 + rows;
    // Column-major view: logits^T (width x rows, leading dimension width) = K[0, width) (d x width)^T
    // times Q[t0, t0 + rows) (d x rows): row i of the row-major slab holds query t0 + i's logits.
    check_blas(cublasDgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(width), static_cast<int>(rows), static_cast<int>(d),
                           &args.scale, args.k, static_cast<int>(d), args.q + t0 * d, static_cast<int>(d), &zero, args.logits,
                           static_cast<int>(width)),
               "logits (DGEMM)");
    row_lse_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(args.logits, width, t0, args.has_sink, args.sink,
                                                                            args.lse);
    check(cudaGetLastError(), "row log-sum-exp kernel launch");
    const long long first_key = std::max<long long>(0, t0 - W + 1), keys = width - first_key;
    received_kernel<<<static_cast<unsigned>((keys + kKeyThreads - 1) / kKeyThreads), kKeyThreads, 0, stream>>>(
        args.logits, width, t0, rows, first_key, W, args.lse, args.received);
    check(cudaGetLastError(), "received attention kernel launch");
  }
}

}  // namespace hysparse::cuda
