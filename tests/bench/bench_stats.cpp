// Benchmark of the exact block-statistics pass (not a test): score elements per second
// of the CPU backend next to Eigen's own GEMM rate on the same machine, in one run, and
// the process's peak memory. One score element costs 2 x head_dim flops.
//
//   hysparse_bench_stats [--seq-len 8192] [--head-dim 128] [--q-heads 8] [--kv-heads 2]
//                        [--block 64] [--repeats 3]
#include <omp.h>
#include <sys/resource.h>

#include <Eigen/Core>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "common/random.hpp"

using namespace hysparse;
using Clock = std::chrono::steady_clock;
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

long peak_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

// The statistics pass exactly as the replay engine drives it: OpenMP over (KV group, row tile).
double run_pass(const Backend& backend, const std::vector<float>& q, const std::vector<float>& k, std::int64_t Hq,
                std::int64_t Hkv, std::int64_t T, std::int64_t d, std::int64_t block, std::int64_t tile_rows) {
  std::vector<std::int64_t> rows(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) rows[static_cast<std::size_t>(t)] = t;
  const std::int64_t G = Hq / Hkv, tiles = (T + tile_rows - 1) / tile_rows;
  const auto start = Clock::now();
#pragma omp parallel
  {
    StatsTile tile;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t item = 0; item < Hkv * tiles; ++item) {
      const std::int64_t g = item / tiles, i0 = (item % tiles) * tile_rows;
      StatsRequest request;
      request.q = q.data() + g * G * T * d;
      request.k = k.data() + g * T * d;
      request.heads = G;
      request.seq_len = T;
      request.head_dim = d;
      request.scale = 1.0 / std::sqrt(static_cast<double>(d));
      request.rows = rows.data() + i0;
      request.num_rows = std::min(tile_rows, T - i0);
      request.block_size = block;
      backend.block_statistics(request, tile);
    }
  }
  return seconds_since(start);
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t T = 8192, d = 128, Hq = 8, Hkv = 2, block = 64, repeats = 3, tile_rows = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const std::int64_t value = std::stoll(argv[i + 1]);
    if (flag == "--seq-len") T = value;
    else if (flag == "--head-dim") d = value;
    else if (flag == "--q-heads") Hq = value;
    else if (flag == "--kv-heads") Hkv = value;
    else if (flag == "--block") block = value;
    else if (flag == "--repeats") repeats = value;
    else if (flag == "--tile-rows") tile_rows = value;
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const int threads = omp_get_max_threads();
  Rng rng(7);
  std::vector<float> q(static_cast<std::size_t>(Hq * T * d)), k(static_cast<std::size_t>(Hkv * T * d));
  for (auto& x : q) x = static_cast<float>(rng.normal());
  for (auto& x : k) x = static_cast<float>(rng.normal());
  const long rss_inputs = peak_rss_kib();

  // Eigen's GEMM on the engine's tile shape and on one large product, same threads.
  const std::int64_t chunk = std::max<std::int64_t>(256, block);
  RowMatrix a = RowMatrix::Random(tile_rows, d), b = RowMatrix::Random(chunk, d), c(tile_rows, chunk);
  double tile_gemm_rate = 0;
  {
    const std::int64_t iterations = std::max<std::int64_t>(1, (std::int64_t{1} << 33) / (2 * tile_rows * chunk * d));
    const auto start = Clock::now();
#pragma omp parallel
    {
      RowMatrix local(tile_rows, chunk);
#pragma omp for
      for (std::int64_t i = 0; i < iterations; ++i) local.noalias() = a * b.transpose();
#pragma omp critical
      c += local;
    }
    tile_gemm_rate = static_cast<double>(2 * tile_rows * chunk * d * iterations) / seconds_since(start);
  }
  double large_gemm_rate = 0;
  {
    const std::int64_t n = std::min<std::int64_t>(T, 4096);
    RowMatrix x = RowMatrix::Random(n, d), y = RowMatrix::Random(n, d), z(n, n);
    z.noalias() = x * y.transpose();  // warm-up
    const auto start = Clock::now();
    for (int r = 0; r < 3; ++r) z.noalias() = x * y.transpose();
    large_gemm_rate = static_cast<double>(3 * 2 * n * n * d) / seconds_since(start);
  }

  const auto backend = make_cpu_backend();
  run_pass(*backend, q, k, Hq, Hkv, T, d, block, tile_rows);  // warm-up
  double best = 1e300;
  for (std::int64_t r = 0; r < repeats; ++r) best = std::min(best, run_pass(*backend, q, k, Hq, Hkv, T, d, block, tile_rows));
  const double elements = static_cast<double>(Hq) * static_cast<double>(T) * static_cast<double>(T + 1) / 2.0;
  const double rate = elements / best;
  const double gemm_bound = large_gemm_rate / static_cast<double>(2 * d);
  const double tile_bound = tile_gemm_rate / static_cast<double>(2 * d);
  const long rss = peak_rss_kib();
  const double dense_bytes = static_cast<double>(T) * static_cast<double>(T) * 4.0;

  std::printf("statistics pass: T=%lld head_dim=%lld q_heads=%lld kv_heads=%lld block=%lld threads=%d\n",
              static_cast<long long>(T), static_cast<long long>(d), static_cast<long long>(Hq),
              static_cast<long long>(Hkv), static_cast<long long>(block), threads);
  std::printf("  causal score elements      %.3e in %.3f s (best of %lld)\n", elements, best, static_cast<long long>(repeats));
  std::printf("  statistics pass            %.3e elements/s\n", rate);
  std::printf("  Eigen GEMM %lldx%lldx%lld      %.1f GFLOP/s = %.3e elements/s  -> ratio %.2f\n",
              static_cast<long long>(std::min<std::int64_t>(T, 4096)), static_cast<long long>(std::min<std::int64_t>(T, 4096)),
              static_cast<long long>(d), large_gemm_rate / 1e9, gemm_bound, rate / gemm_bound);
  std::printf("  Eigen GEMM tile %lldx%lldx%lld  %.1f GFLOP/s = %.3e elements/s  -> ratio %.2f\n",
              static_cast<long long>(tile_rows), static_cast<long long>(chunk), static_cast<long long>(d),
              tile_gemm_rate / 1e9, tile_bound, rate / tile_bound);
  std::printf("  peak RSS %.1f MiB (inputs %.1f MiB); one T x T fp32 matrix would be %.1f MiB\n", static_cast<double>(rss) / 1024.0,
              static_cast<double>(rss_inputs) / 1024.0, dense_bytes / (1024.0 * 1024.0));
  return 0;
}
