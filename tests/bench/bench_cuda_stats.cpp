// GPU benchmark of the block-statistics pass (not a test): score elements per second of the
// device pass (every KV group, every causal row, inputs and statistics resident on the GPU)
// in fp32 and bf16, next to cuBLAS's bf16 GEMM rates on the same card in the same run; then
// the rate through the backend interface the replay engine uses (statistics copied back to
// the host per tile). One score element costs 2 x head_dim flops.
//
//   hysparse_bench_cuda [--seq-lens 8192,32768,131072] [--head-dim 128] [--q-heads 32] [--kv-heads 8]
//                       [--block 64] [--precisions fp32,bf16] [--repeats 3] [--fp32-max-elements 3e9]
//                       [--host-api-seq-lens 8192,32768] [--tc-kernels auto,mma] [--profile]
//                       [--ranking-seq-lens 32768,131072] [--mass-rank-count 36] [--group-rank-count 32]
// --tc-kernels times these tensor-core kernels for bf16/fp16: auto (the backend's choice: wgmma on
// compute capability 9.0, else mma.sync), wgmma (compute capability 9.0; skipped elsewhere), mma (16
// rows per warp), mma32 (32 rows per warp).
// --profile runs one bf16 pass of one KV group at the first length per --tc-kernels entry and
// nothing else (for ncu).
// The block rankings a replay asks beside the statistics are timed on one KV group's statistics of every causal
// row (--ranking-seq-lens; the counts: the default budgets' longest, 2,048 tokens = 32 blocks, plus the blocks a
// window touches, and by group the longest of the budgets and the reuse matrix's), next to that group's bf16 pass.
// Lines starting with RESULT are for scripts/bench_torch_stats.py.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "device_statistics.hpp"

using namespace hysparse;

namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "CUDA %s: %s\n", what, cudaGetErrorString(status));
    std::exit(1);
  }
}
void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuBLAS %s: status %d\n", what, static_cast<int>(status));
    std::exit(1);
  }
}

template <typename T>
T* device_alloc(std::size_t count, const char* what) {
  void* p = nullptr;
  check(cudaMalloc(&p, count * sizeof(T)), what);
  return static_cast<T*>(p);
}

// Standard normal values on the device; each call draws new ones.
struct Normal {
  std::uint64_t seed = 20261128;
  void fill(float* data, std::size_t count) {
    cuda::fill_normal(data, count, seed++, nullptr);
    check(cudaGetLastError(), "random fill");
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Milliseconds of `work` on the default stream, by events: the median of `repeats` runs after one warm-up.
template <typename Work>
double time_ms(int repeats, Work work) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  work();
  check(cudaDeviceSynchronize(), "warm-up");
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    check(cudaEventRecord(start), "event record");
    work();
    check(cudaEventRecord(stop), "event record");
    check(cudaEventSynchronize(stop), "timed work");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, stop), "event time");
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return median(times);
}

// C[m x n] = A[m x k] B[k x n] in bf16 with fp32 accumulation, on random inputs; returns FLOP/s.
double cublas_bf16_gemm_flops(Normal& gen, int m, int n, int k, bool fp32_output) {
  float* staging = device_alloc<float>(static_cast<std::size_t>(std::max(m, n)) * k, "GEMM staging");
  auto* a = device_alloc<__nv_bfloat16>(static_cast<std::size_t>(m) * k, "GEMM A");
  auto* b = device_alloc<__nv_bfloat16>(static_cast<std::size_t>(n) * k, "GEMM B");
  void* c = nullptr;
  check(cudaMalloc(&c, static_cast<std::size_t>(m) * n * (fp32_output ? 4 : 2)), "GEMM C");
  std::vector<float> host(static_cast<std::size_t>(std::max(m, n)) * k);
  std::vector<__nv_bfloat16> host_bf16(host.size());
  for (auto* target : {a, b}) {
    const std::size_t count = static_cast<std::size_t>(target == a ? m : n) * k;
    gen.fill(staging, count);
    check(cudaMemcpy(host.data(), staging, count * sizeof(float), cudaMemcpyDeviceToHost), "GEMM staging");
    for (std::size_t i = 0; i < count; ++i) host_bf16[i] = __float2bfloat16(host[i]);
    check(cudaMemcpy(target, host_bf16.data(), count * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice), "GEMM inputs");
  }
  cublasHandle_t handle;
  check(cublasCreate(&handle), "create");
  const float one = 1.0f, zero = 0.0f;
  const double ms = time_ms(20, [&]() {
    check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, b, CUDA_R_16BF, k, a, CUDA_R_16BF, k, &zero, c,
                       fp32_output ? CUDA_R_32F : CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "GEMM");
  });
  cublasDestroy(handle);
  cudaFree(staging);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * m * static_cast<double>(n) * k / (ms * 1e-3);
}

// C[m x n] = A[m x k] B[k x n] in fp32 on the CUDA cores (CUBLAS_COMPUTE_32F_PEDANTIC: no TF32, no
// tensor cores), fp32 out, on random inputs; returns FLOP/s. The fp32 pass's yardstick.
double cublas_fp32_gemm_flops(Normal& gen, int m, int n, int k) {
  float* a = device_alloc<float>(static_cast<std::size_t>(m) * k, "GEMM A");
  float* b = device_alloc<float>(static_cast<std::size_t>(n) * k, "GEMM B");
  float* c = device_alloc<float>(static_cast<std::size_t>(m) * n, "GEMM C");
  gen.fill(a, static_cast<std::size_t>(m) * k);
  gen.fill(b, static_cast<std::size_t>(n) * k);
  cublasHandle_t handle;
  check(cublasCreate(&handle), "create");
  const float one = 1.0f, zero = 0.0f;
  const double ms = time_ms(10, [&]() {
    check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, b, CUDA_R_32F, k, a, CUDA_R_32F, k, &zero, c,
                       CUDA_R_32F, n, CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT),
          "fp32 GEMM");
  });
  cublasDestroy(handle);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * m * static_cast<double>(n) * k / (ms * 1e-3);
}

std::vector<std::int64_t> parse_list(const std::string& text) {
  std::vector<std::int64_t> out;
  std::stringstream list(text);
  std::string item;
  while (std::getline(list, item, ',')) out.push_back(std::stoll(item));
  return out;
}

std::vector<std::string> parse_words(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream list(text);
  std::string item;
  while (std::getline(list, item, ',')) out.push_back(item);
  return out;
}

double causal_elements(std::int64_t heads, std::int64_t T) {
  return static_cast<double>(heads) * static_cast<double>(T) * static_cast<double>(T + 1) / 2.0;
}

double used_gib() {
  size_t free_bytes = 0, total = 0;
  cudaMemGetInfo(&free_bytes, &total);
  return static_cast<double>(total - free_bytes) / 1073741824.0;
}

struct Options {
  std::vector<std::int64_t> seq_lens = {8192, 32768, 131072};
  std::vector<std::int64_t> host_api_seq_lens = {8192, 32768};
  std::vector<std::int64_t> ranking_seq_lens = {32768, 131072};
  int mass_rank_count = 36, group_rank_count = 32;
  std::vector<std::string> precisions = {"fp32", "bf16"};
  std::vector<std::string> tc_kernels = {"auto", "mma"};
  std::int64_t d = 128, q_heads = 32, kv_heads = 8, block = 64;
  int repeats = 3;
  double fp32_max_elements = 3e9;
  bool profile = false;
};

// The device pass over `groups` KV groups at length T: input rounding plus statistics and row
// log-sum-exps, every causal row. Returns milliseconds (median over repeats). `after`, where given, is called
// with the last group's arguments and the milliseconds while its statistics are still on the device.
double device_pass_ms(const Options& o, Precision precision, std::int64_t T, std::int64_t groups, int repeats,
                      Normal& gen, double* memory_gib, const std::string& tc_kernel = "auto", std::string* used_kernel = nullptr,
                      const std::function<void(const cuda::StatsPassArgs&, double ms)>& after = {}) {
  const std::int64_t G = o.q_heads / o.kv_heads, d = o.d;
  const cuda::InputType type = precision == Precision::kFp32 ? cuda::InputType::kFloat32
                               : precision == Precision::kBf16 ? cuda::InputType::kBfloat16
                                                               : cuda::InputType::kFloat16;
  const int stride = cuda::input_stride(type, static_cast<int>(d));
  const std::int64_t padded = (T + cuda::kTensorCoreKeyTile - 1) / cuda::kTensorCoreKeyTile * cuda::kTensorCoreKeyTile;
  const std::int64_t num_blocks = (T - 1) / o.block + 1;
  const auto cells = static_cast<std::size_t>(G * T * num_blocks);
  // Inputs of every group (fp32, as captured), then the rounded copies and statistics of one group at a time.
  float* q32 = device_alloc<float>(static_cast<std::size_t>(groups * G * T * d), "q");
  float* k32 = device_alloc<float>(static_cast<std::size_t>(groups * T * d), "k");
  gen.fill(q32, static_cast<std::size_t>(groups * G * T * d));
  gen.fill(k32, static_cast<std::size_t>(groups * T * d));
  void* q_in = nullptr;
  void* k_in = nullptr;
  check(cudaMalloc(&q_in, static_cast<std::size_t>(G * T * stride) * cuda::element_bytes(type)), "rounded q");
  check(cudaMalloc(&k_in, static_cast<std::size_t>(padded * stride) * cuda::element_bytes(type)), "rounded k");
  check(cudaMemset(k_in, 0, static_cast<std::size_t>(padded * stride) * cuda::element_bytes(type)), "key padding");
  std::vector<long long> positions(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) positions[static_cast<std::size_t>(t)] = t;
  auto* pos = device_alloc<long long>(positions.size(), "positions");
  check(cudaMemcpy(pos, positions.data(), positions.size() * sizeof(long long), cudaMemcpyHostToDevice), "positions");
  float* block_max = device_alloc<float>(cells, "block maxima");
  float* block_sum = device_alloc<float>(cells, "block sums");
  double* lse_tokens = device_alloc<double>(static_cast<std::size_t>(G * T), "lse");
  double* lse_all = device_alloc<double>(static_cast<std::size_t>(G * T), "lse");
  // Poison: a cell the pass forgets stays NaN and is caught below.
  check(cudaMemset(block_max, 0xff, cells * sizeof(float)), "poison");
  check(cudaMemset(block_sum, 0xff, cells * sizeof(float)), "poison");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "properties");
  cuda::StatsPass pass(prop.multiProcessorCount);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  cuda::StatsPassArgs last;
  auto run_all = [&]() {
    for (std::int64_t g = 0; g < groups; ++g) {
      // fp32 keeps the CPU backend's convention (q pre-scaled); bf16/fp16 scale the fp32 scores.
      const bool exact = type == cuda::InputType::kFloat32;
      cuda::convert_rows(type, q32 + g * G * T * d, G * T, static_cast<int>(d), exact ? static_cast<float>(scale) : 1.0f, q_in,
                         nullptr, nullptr);
      cuda::convert_rows(type, k32 + g * T * d, T, static_cast<int>(d), 1.0f, k_in, nullptr, nullptr);
      cuda::StatsPassArgs a;
      a.type = type;
      a.q = q_in;
      a.k = k_in;
      a.positions = pos;
      a.host_positions = positions.data();
      a.heads = static_cast<int>(G);
      a.rows = static_cast<int>(T);
      a.head_dim = static_cast<int>(d);
      a.score_scale = exact ? 1.0f : static_cast<float>(scale);
      a.block = o.block;
      a.num_blocks = num_blocks;
      a.block_max = block_max;
      a.block_sum = block_sum;
      a.lse_tokens = lse_tokens;
      a.lse_all = lse_all;
      a.tensor_core_kernel = tc_kernel == "wgmma"  ? cuda::TensorCoreKernel::kWgmma
                             : tc_kernel == "auto" ? cuda::TensorCoreKernel::kAuto
                                                   : cuda::TensorCoreKernel::kMma;
      a.tensor_core_rows_per_warp = tc_kernel == "mma32" ? 32 : 16;
      a.simt_kernel = tc_kernel == "simt" ? cuda::SimtKernel::kBasic : cuda::SimtKernel::kAuto;
      const char* used = pass.run(a, nullptr);
      if (used_kernel) *used_kernel = used;
      last = a;
    }
  };
  const double ms = time_ms(repeats, run_all);
  check(cudaGetLastError(), "statistics pass");
  if (after) after(last, ms);
  if (memory_gib) *memory_gib = used_gib();
  // Every cell written (no NaN left) and finite log-sum-exps, on the first and last rows of each head.
  std::vector<float> sample(static_cast<std::size_t>(64 * num_blocks));
  std::vector<double> lse(static_cast<std::size_t>(G * T));
  check(cudaMemcpy(lse.data(), lse_tokens, lse.size() * sizeof(double), cudaMemcpyDeviceToHost), "lse");
  bool ok = std::all_of(lse.begin(), lse.end(), [](double x) { return std::isfinite(x); });
  for (std::int64_t h = 0; h < G; ++h) {
    for (std::int64_t r0 : {std::int64_t{0}, std::max<std::int64_t>(0, T - 64)}) {
      const std::int64_t n = std::min<std::int64_t>(64, T - r0) * num_blocks;
      for (float* array : {block_max, block_sum}) {
        check(cudaMemcpy(sample.data(), array + (h * T + r0) * num_blocks, static_cast<std::size_t>(n) * sizeof(float),
                         cudaMemcpyDeviceToHost),
              "sample");
        ok = ok && std::none_of(sample.begin(), sample.begin() + n, [](float x) { return std::isnan(x); });
      }
    }
  }
  if (!ok) {
    std::fprintf(stderr, "T=%lld %s: the pass left NaN or non-finite values\n", static_cast<long long>(T), to_string(precision));
    std::exit(1);
  }
  for (void* p : {static_cast<void*>(q32), static_cast<void*>(k32), q_in, k_in, static_cast<void*>(pos),
                  static_cast<void*>(block_max), static_cast<void*>(block_sum), static_cast<void*>(lse_tokens),
                  static_cast<void*>(lse_all)}) {
    cudaFree(p);
  }
  return ms;
}

// The rankings of one KV group's statistics of every causal row at length T (`pass`: resident on the device):
// by mass, every (head, row)'s first `count` blocks; by group, every row's. Each timed with rows held in shared
// memory selected first where rank_row chooses to (the backend's ranking) and sorted whole, which must give the
// same orders. Prints a line each; returns false if the two disagree.
bool bench_rankings(const Options& o, const cuda::StatsPassArgs& pass, double pass_ms, int repeats) {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "properties");
  cuda::configure_ranking_kernels(prop.sharedMemPerBlockOptin);
  bool same = true;
  for (const bool by_group : {false, true}) {
    cuda::BlockRankingArgs args;
    args.block_max = pass.block_max;
    args.block_sum = pass.block_sum;
    args.lse_tokens = pass.lse_tokens;
    args.lse_all = pass.lse_all;
    args.positions = pass.positions;
    args.heads = pass.heads;
    args.rows = pass.rows;
    args.block = pass.block;
    args.num_blocks = pass.num_blocks;
    args.count = static_cast<int>(std::min<long long>(by_group ? o.group_rank_count : o.mass_rank_count, pass.num_blocks));
    args.prefix_limit = cuda::ranked_prefix_limit(prop.sharedMemPerBlockOptin);
    args.by_group_max = by_group;
    const long long cells = by_group ? args.rows : static_cast<long long>(args.heads) * args.rows;
    const auto entries = static_cast<std::size_t>(cells * args.count);
    int* orders[2] = {device_alloc<int>(entries, "rankings"), device_alloc<int>(entries, "rankings")};
    double ms[2] = {0, 0};
    for (int strategy = 0; strategy < 2; ++strategy) {
      args.select_in_shared = strategy == 0;
      args.order = orders[strategy];
      ms[strategy] = time_ms(repeats, [&]() { cuda::launch_block_ranking(args, nullptr); });
    }
    std::vector<int> selected(entries), sorted(entries);
    check(cudaMemcpy(selected.data(), orders[0], entries * sizeof(int), cudaMemcpyDeviceToHost), "rankings");
    check(cudaMemcpy(sorted.data(), orders[1], entries * sizeof(int), cudaMemcpyDeviceToHost), "rankings");
    // Rows with fewer blocks than count leave their tail unwritten: compare the written entries only.
    std::int64_t differ = 0;
    for (long long c = 0; c < cells; ++c) {
      const long long row = c % args.rows, written = std::min<long long>(args.count, row / args.block + 1);
      for (long long i = 0; i < written; ++i) differ += selected[static_cast<std::size_t>(c * args.count + i)] != sorted[static_cast<std::size_t>(c * args.count + i)];
    }
    same = same && differ == 0;
    std::printf("%-8lld %-9s %-10lld %-6d %-14.2f %-16.2f %-9.2f %-12.3e %.3f%s\n", static_cast<long long>(pass.rows),
                by_group ? "by group" : "by mass", cells, args.count, ms[0], ms[1], ms[1] / ms[0], static_cast<double>(cells) / (ms[0] * 1e-3),
                ms[0] / pass_ms, differ ? " ORDERS DIFFER" : "");
    std::printf("RESULT kind=ranking by=%s T=%lld count=%d ms=%.4f sort_whole_ms=%.4f pass_ms=%.4f\n", by_group ? "group" : "mass",
                static_cast<long long>(pass.rows), args.count, ms[0], ms[1], pass_ms);
    std::fflush(stdout);
    cudaFree(orders[0]);
    cudaFree(orders[1]);
  }
  return same;
}

// Through Backend::block_statistics (what the replay engine calls): query rows and statistics
// travel between host and device per 4096-row tile. One KV group; returns seconds.
double host_api_seconds(const Options& o, Precision precision, std::int64_t T, Normal& gen) {
  const std::int64_t G = o.q_heads / o.kv_heads, d = o.d;
  std::vector<float> q(static_cast<std::size_t>(G * T * d)), k(static_cast<std::size_t>(T * d));
  float* staging = device_alloc<float>(q.size(), "staging");
  gen.fill(staging, q.size());
  check(cudaMemcpy(q.data(), staging, q.size() * sizeof(float), cudaMemcpyDeviceToHost), "staging");
  gen.fill(staging, k.size());
  check(cudaMemcpy(k.data(), staging, k.size() * sizeof(float), cudaMemcpyDeviceToHost), "staging");
  cudaFree(staging);
  std::vector<std::int64_t> rows(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) rows[static_cast<std::size_t>(t)] = t;
  const auto backend = make_backend("cuda", precision);
  const std::int64_t tile = backend->preferred_tile_rows();
  StatsTile out;
  auto run = [&]() {
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
      req.block_size = o.block;
      req.layer = 0;
      req.kv_head = 0;
      req.tensors_id = 1;  // the same keys every tile: they stay on the device
      backend->block_statistics(req, out);
    }
  };
  run();  // warm-up: keys uploaded and cached, buffers sized
  const auto start = std::chrono::steady_clock::now();
  run();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--profile") {
      o.profile = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s needs a value\n", flag.c_str());
      return 2;
    }
    const std::string value = argv[++i];
    if (flag == "--seq-lens") o.seq_lens = parse_list(value);
    else if (flag == "--host-api-seq-lens") o.host_api_seq_lens = parse_list(value);
    else if (flag == "--ranking-seq-lens") o.ranking_seq_lens = parse_list(value);
    else if (flag == "--mass-rank-count") o.mass_rank_count = std::stoi(value);
    else if (flag == "--group-rank-count") o.group_rank_count = std::stoi(value);
    else if (flag == "--precisions") o.precisions = parse_words(value);
    else if (flag == "--tc-kernels") {
      o.tc_kernels = parse_words(value);
      for (const std::string& kernel : o.tc_kernels) {
        if (kernel != "auto" && kernel != "wgmma" && kernel != "mma" && kernel != "mma32") {
          std::fprintf(stderr, "--tc-kernels: '%s' (expected auto, wgmma, mma or mma32)\n", kernel.c_str());
          return 2;
        }
      }
    }
    else if (flag == "--head-dim") o.d = std::stoll(value);
    else if (flag == "--q-heads") o.q_heads = std::stoll(value);
    else if (flag == "--kv-heads") o.kv_heads = std::stoll(value);
    else if (flag == "--block") o.block = std::stoll(value);
    else if (flag == "--repeats") o.repeats = std::stoi(value);
    else if (flag == "--fp32-max-elements") o.fp32_max_elements = std::stod(value);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  // The rankings' kernels take 1 .. kSortWholeEntries (a prefix every device holds) and refuse others.
  for (const int count : {o.mass_rank_count, o.group_rank_count}) {
    if (count < 1 || count > 4096) {
      std::fprintf(stderr, "--mass-rank-count / --group-rank-count: %d (expected 1 to 4096)\n", count);
      return 2;
    }
  }
  const CudaStatus status = cuda_status();
  if (status.devices.empty()) {
    std::printf("no CUDA device: %s\n", status.why_none.c_str());
    return 1;
  }
  Normal gen;
  const std::int64_t G = o.q_heads / o.kv_heads;
  if (o.profile) {
    for (const std::string& kernel : o.tc_kernels) {
      if (kernel == "wgmma" && !cuda::wgmma_available()) continue;
      double gib = 0;
      const double ms = device_pass_ms(o, Precision::kBf16, o.seq_lens.front(), 1, 1, gen, &gib, kernel);
      std::printf("profile run: T=%lld, one KV group, bf16, %s: %.3f ms\n", static_cast<long long>(o.seq_lens.front()),
                  kernel.c_str(), ms);
    }
    return 0;
  }
  std::printf("device: %s\n", status.devices[0].c_str());
  const bool wgmma = cuda::wgmma_available();
  std::printf("tensor-core kernels: wgmma %s; * marks the backend's default\n",
              wgmma ? "available" : "not available (compute capability 9.0 only)");
  std::printf("shape: %lld query heads, %lld KV heads (groups of %lld), head_dim %lld, block %lld, all causal rows\n",
              static_cast<long long>(o.q_heads), static_cast<long long>(o.kv_heads), static_cast<long long>(G),
              static_cast<long long>(o.d), static_cast<long long>(o.block));
  const int d = static_cast<int>(o.d);
  const double score_gemm = cublas_bf16_gemm_flops(gen, 8192, 8192, d, true);
  const double score_gemm_elements = score_gemm / (2.0 * d);
  const double peak_gemm = cublas_bf16_gemm_flops(gen, 8192, 8192, 8192, false);
  const double peak_elements = peak_gemm / (2.0 * d);
  std::printf("cuBLAS bf16 GEMM 8192x8192x%d, fp32 scores out (the score product's shape): %.1f TFLOP/s = %.3e elements/s\n",
              d, score_gemm / 1e12, score_gemm_elements);
  std::printf("cuBLAS bf16 GEMM 8192x8192x8192, bf16 out (tensor-core bound):                 %.1f TFLOP/s = %.3e elements/s at 2 x %d flops each\n",
              peak_gemm / 1e12, peak_elements, d);
  std::printf("RESULT kind=cublas_scores elements_per_s=%.6e\nRESULT kind=cublas_peak elements_per_s=%.6e\n", score_gemm_elements,
              peak_elements);
  double fp32_gemm_elements = 0.0;
  if (std::find(o.precisions.begin(), o.precisions.end(), "fp32") != o.precisions.end()) {
    const double fp32_gemm = cublas_fp32_gemm_flops(gen, 8192, 8192, d);
    fp32_gemm_elements = fp32_gemm / (2.0 * d);
    std::printf("cuBLAS fp32 GEMM 8192x8192x%d on CUDA cores (pedantic: no TF32), fp32 out:         %.1f TFLOP/s = %.3e elements/s\n",
                d, fp32_gemm / 1e12, fp32_gemm_elements);
    std::printf("RESULT kind=cublas_fp32 elements_per_s=%.6e\n", fp32_gemm_elements);
  }

  std::printf("\n%-8s %-12s %-7s %-12s %-10s %-14s %-10s %-10s %s\n", "T", "prec", "groups", "elements", "ms", "elements/s",
              "vs scores", "vs peak", "GPU memory in use");
  for (std::int64_t T : o.seq_lens) {
    for (const std::string& name : o.precisions) {
      const Precision precision = parse_precision(name);
      std::int64_t groups = o.kv_heads;
      // The exact fp32 path is ~100x slower: time it on as many groups as fit the element cap.
      if (precision == Precision::kFp32) {
        groups = std::min<std::int64_t>(o.kv_heads, static_cast<std::int64_t>(o.fp32_max_elements / causal_elements(G, T)));
        if (groups == 0) {
          std::printf("%-8lld %-8s skipped: one KV group is %.2e elements, over --fp32-max-elements %.1e\n",
                      static_cast<long long>(T), name.c_str(), causal_elements(G, T), o.fp32_max_elements);
          continue;
        }
      }
      // The tensor-core kernels (bf16/fp16 only); fp32 runs the SIMT kernel once.
      // fp32: the default (tiled where it applies) and the basic SIMT kernel.
      const std::vector<std::string> variants = precision == Precision::kFp32 ? std::vector<std::string>{"auto", "simt"} : o.tc_kernels;
      for (const std::string& variant : variants) {
        if (variant == "wgmma" && !wgmma) continue;
        if (variant == "mma" && !wgmma && std::find(variants.begin(), variants.end(), "auto") != variants.end()) {
          continue;  // auto is mma.sync here: the same kernel
        }
        double gib = 0;
        const int repeats = precision == Precision::kFp32 ? 1 : o.repeats;
        std::string kernel;
        const double ms = device_pass_ms(o, precision, T, groups, repeats, gen, &gib, variant, &kernel);
        const double elements = causal_elements(G * groups, T);
        const double rate = elements / (ms * 1e-3);
        if (variant == "mma32") kernel += "32";
        const std::string label = name + "/" + kernel + (variant == "auto" && precision != Precision::kFp32 ? "*" : "");
        std::printf("%-8lld %-12s %-7lld %-12.3e %-10.2f %-14.3e %-10.3f %-10.3f %.2f GiB\n", static_cast<long long>(T),
                    label.c_str(), static_cast<long long>(groups), elements, ms, rate, rate / score_gemm_elements,
                    rate / peak_elements, gib);
        if (precision == Precision::kFp32) {
          std::printf("%-8s %-12s %.3f of cuBLAS's fp32 GEMM rate\n", "", "", rate / fp32_gemm_elements);
        }
        if (variant == "auto") {
          std::printf("RESULT kind=pass precision=%s T=%lld elements_per_s=%.6e\n", name.c_str(), static_cast<long long>(T), rate);
        }
        std::fflush(stdout);
      }
    }
  }

  std::printf("\nblock rankings of one KV group's statistics, every causal row (ms: median of %d; 'select' is the backend's):\n",
              o.repeats);
  std::printf("%-8s %-9s %-10s %-6s %-14s %-16s %-9s %-12s %s\n", "T", "ranking", "rows", "count", "ms, select", "ms, sort whole",
              "speedup", "rows/s", "vs the group's bf16 pass");
  bool rankings_agree = true;
  for (std::int64_t T : o.ranking_seq_lens) {
    double gib = 0;
    device_pass_ms(o, Precision::kBf16, T, 1, o.repeats, gen, &gib, "auto", nullptr, [&](const cuda::StatsPassArgs& a, double pass_ms) {
      rankings_agree = bench_rankings(o, a, pass_ms, o.repeats) && rankings_agree;
    });
  }
  if (!rankings_agree) {
    std::fprintf(stderr, "the rankings selected first and sorted whole differ\n");
    return 1;
  }

  std::printf("\nthrough Backend::block_statistics (one KV group, 4096-row tiles, statistics copied to the host):\n");
  for (std::int64_t T : o.host_api_seq_lens) {
    for (const std::string& name : o.precisions) {
      const Precision precision = parse_precision(name);
      if (precision == Precision::kFp32 && causal_elements(G, T) > o.fp32_max_elements) continue;
      const double seconds = host_api_seconds(o, precision, T, gen);
      const double rate = causal_elements(G, T) / seconds;
      std::printf("%-8lld %-5s %.3f s = %.3e elements/s (%.3f of the score-shape GEMM rate)\n", static_cast<long long>(T),
                  name.c_str(), seconds, rate, rate / score_gemm_elements);
      std::printf("RESULT kind=host_api precision=%s T=%lld elements_per_s=%.6e\n", name.c_str(), static_cast<long long>(T), rate);
      std::fflush(stdout);
    }
  }
  return 0;
}
