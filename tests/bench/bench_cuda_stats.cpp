// GPU benchmark of the block-statistics pass (not a test): score elements per second of
// the CUDA backend next to cuBLAS's bf16 GEMM rate on the same card, in one run.
// One score element costs 2 x head_dim flops.
//   hysparse_bench_cuda [--seq-lens 8192,32768] [--head-dim 128] [--q-heads 32] [--kv-heads 8] [--block 64]
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "common/random.hpp"

using namespace hysparse;
using Clock = std::chrono::steady_clock;

namespace {

double cublas_bf16_gemm_flops(int n, int d) {
  // C[n x n] = A[n x d] * B[d x n] in bf16 with fp32 accumulation, the score product's shape.
  __nv_bfloat16 *a, *b;
  float* c;
  cudaMalloc(&a, sizeof(__nv_bfloat16) * static_cast<size_t>(n) * d);
  cudaMalloc(&b, sizeof(__nv_bfloat16) * static_cast<size_t>(n) * d);
  cudaMalloc(&c, sizeof(float) * static_cast<size_t>(n) * n);
  cudaMemset(a, 0x3c, sizeof(__nv_bfloat16) * static_cast<size_t>(n) * d);  // ~1.0-ish values
  cudaMemset(b, 0x3c, sizeof(__nv_bfloat16) * static_cast<size_t>(n) * d);
  cublasHandle_t handle;
  cublasCreate(&handle);
  const float one = 1.0f, zero = 0.0f;
  auto run = [&]() {
    cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, n, d, &one, b, CUDA_R_16BF, d, a, CUDA_R_16BF, d, &zero, c,
                 CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  for (int i = 0; i < 3; ++i) run();
  cudaDeviceSynchronize();
  const int repeats = 20;
  const auto start = Clock::now();
  for (int i = 0; i < repeats; ++i) run();
  cudaDeviceSynchronize();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  cublasDestroy(handle);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * n * static_cast<double>(n) * d * repeats / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::int64_t> seq_lens = {8192, 32768};
  std::int64_t d = 128, Hq = 32, Hkv = 8, block = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--seq-lens") {
      seq_lens.clear();
      std::stringstream list(value);
      std::string item;
      while (std::getline(list, item, ',')) seq_lens.push_back(std::stoll(item));
    } else if (flag == "--head-dim") d = std::stoll(value);
    else if (flag == "--q-heads") Hq = std::stoll(value);
    else if (flag == "--kv-heads") Hkv = std::stoll(value);
    else if (flag == "--block") block = std::stoll(value);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const CudaStatus status = cuda_status();
  if (status.devices.empty()) {
    std::printf("no CUDA device: %s\n", status.why_none.c_str());
    return 1;
  }
  std::printf("device: %s\n", status.devices[0].c_str());
  const double gemm = cublas_bf16_gemm_flops(8192, static_cast<int>(d));
  const double gemm_elements = gemm / (2.0 * static_cast<double>(d));
  std::printf("cuBLAS bf16 GEMM 8192x8192x%lld: %.1f TFLOP/s = %.3e score elements/s\n", static_cast<long long>(d), gemm / 1e12,
              gemm_elements);
  const auto backend = make_backend("cuda");
  const std::int64_t G = Hq / Hkv, tile = backend->preferred_tile_rows();
  for (std::int64_t T : seq_lens) {
    Rng rng(7);
    std::vector<float> q(static_cast<std::size_t>(G * T * d)), k(static_cast<std::size_t>(T * d));
    for (auto& x : q) x = static_cast<float>(rng.normal());
    for (auto& x : k) x = static_cast<float>(rng.normal());
    std::vector<std::int64_t> rows(static_cast<std::size_t>(T));
    for (std::int64_t t = 0; t < T; ++t) rows[static_cast<std::size_t>(t)] = t;
    size_t free_before = 0, total = 0;
    cudaMemGetInfo(&free_before, &total);
    StatsTile out;
    // One KV group's heads stand for all groups (the same work repeats per group).
    const auto start = Clock::now();
    for (std::int64_t r0 = 0; r0 < T; r0 += tile) {
      StatsRequest req;
      req.q = q.data();
      req.k = k.data();
      req.heads = G;
      req.seq_len = T;
      req.head_dim = d;
      req.scale = 1.0 / std::sqrt(static_cast<double>(d));
      req.rows = rows.data() + r0;
      req.num_rows = std::min(tile, T - r0);
      req.block_size = block;
      req.layer = 0;
      req.kv_head = 0;
      backend->block_statistics(req, out);
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    size_t free_after = 0;
    cudaMemGetInfo(&free_after, &total);
    const double elements = static_cast<double>(G) * static_cast<double>(T) * static_cast<double>(T + 1) / 2.0;
    std::printf("T=%lld: %d heads of one KV group, %.3e causal elements in %.3f s = %.3e elements/s, %.3f of the cuBLAS bound;"
                " device memory in use after: %.1f MiB of %.1f GiB\n",
                static_cast<long long>(T), static_cast<int>(G), elements, seconds, elements / seconds,
                elements / seconds / gemm_elements, static_cast<double>(total - free_after) / 1048576.0,
                static_cast<double>(total) / 1073741824.0);
  }
  return 0;
}
