// Per-row rankings on the device: blocks by mass (StatsTile::mass_order) or by their largest probability
// over a KV group (group_max_order), and Quest's pages by their
// bound (Backend::page_bound_rankings). The host would otherwise score and sort every (head, row) of
// every tile, which bounds the GPU path (README, Performance).
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "common/error.hpp"
#include "common/portable_exp.hpp"
#include "cuda_backend.hpp"
#include "device_statistics.hpp"
#include "ranking.cuh"

namespace hysparse::cuda {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA {}: {}", what, cudaGetErrorString(status));
}

// The ranking key of ranked block i of a row (tile blocks [i factor, (i + 1) factor) up to the row's
// tile_blocks): its mass by the engine's formulas (build_block_view) and its exponential (portable_exp: the
// host's bits), an empty block's 0. The rounding is
// spelled out (the fused form nvcc chose before): the radix select recomputes the key in every pass
// and needs the same bits each time.
__device__ __forceinline__ unsigned long long mass_key(const BlockRankingArgs& args, const float* block_max, const float* block_sum,
                                                       double lse_tokens, long long tile_blocks, int i) {
  double mass = 0.0;
  if (args.factor == 1) {
    const float m = block_max[i];
    if (m != -CUDART_INF_F) mass = __dmul_rn(static_cast<double>(block_sum[i]), portable_exp(static_cast<double>(m) - lse_tokens));
  } else {
    const long long first = static_cast<long long>(i) * args.factor, last = min(first + args.factor, tile_blocks);
    double m = -CUDART_INF;
    for (long long j = first; j < last; ++j) m = fmax(m, static_cast<double>(block_max[j]));
    if (m != -CUDART_INF) {
      double l = 0.0;
      for (long long j = first; j < last; ++j) {
        const double mj = block_max[j];
        if (mj != -CUDART_INF) l = __fma_rn(static_cast<double>(block_sum[j]), portable_exp(mj - m), l);
      }
      mass = __dmul_rn(l, portable_exp(m - lse_tokens));
    }
  }
  return order_key(mass);
}

// The ranking key of ranked block i of row r by group: max over the heads of the block's largest probability
// P_b (build_block_view's formulas: at factor 1, exp(m - lse_tokens) x exp(lse_tokens - lse_all), the first factor
// shared with the mass; coarser, exp(m - lse_all) with m the largest tile-block max), an empty block's 0.
__device__ __forceinline__ unsigned long long group_max_key(const BlockRankingArgs& args, int r, long long tile_blocks, int i) {
  double best = 0.0;  // probabilities are >= 0: the host's std::max from 0 gives the same
  for (int h = 0; h < args.heads; ++h) {
    const long long cell = static_cast<long long>(h) * args.rows + r;
    const float* block_max = args.block_max + cell * args.num_blocks;
    const double lse_tokens = args.lse_tokens[cell], lse_all = args.lse_all[cell];
    double p = 0.0;
    if (args.factor == 1) {
      const float m = block_max[i];
      if (m != -CUDART_INF_F) {
        p = __dmul_rn(portable_exp(static_cast<double>(m) - lse_tokens), portable_exp(lse_tokens - lse_all));
      }
    } else {
      const long long first = static_cast<long long>(i) * args.factor, last = min(first + args.factor, tile_blocks);
      double m = -CUDART_INF;
      for (long long j = first; j < last; ++j) m = fmax(m, static_cast<double>(block_max[j]));
      if (m != -CUDART_INF) p = portable_exp(m - lse_all);
    }
    best = fmax(best, p);
  }
  return order_key(best);
}

// One thread block per (head, row), or per row by group (rank_row: a row of at most `capacity` ranked blocks
// is held in shared memory; a longer one (count <= capacity) has its top count selected first).
__global__ void __launch_bounds__(kRankingThreads) block_ranking_kernel(BlockRankingArgs args, int capacity) {
  extern __shared__ unsigned long long ranking_keys[];  // [capacity], then int indices[capacity]
  int* indices = reinterpret_cast<int*>(ranking_keys + capacity);
  const long long cell = blockIdx.x;
  const int r = static_cast<int>(cell % args.rows);
  // Rows ascend, so no row has more blocks than the tile; the bound keeps a bad plan inside memory.
  const long long tile_blocks = min(args.positions[r] / args.block + 1, args.num_blocks);
  const int causal = static_cast<int>((tile_blocks + args.factor - 1) / args.factor);
  const double lse_tokens = args.by_group_max ? 0.0 : args.lse_tokens[cell];
  const float* block_max = args.block_max + cell * args.num_blocks;
  const float* block_sum = args.block_sum + cell * args.num_blocks;
  auto key_at = [&](int i) {
    return args.by_group_max ? group_max_key(args, r, tile_blocks, i) : mass_key(args, block_max, block_sum, lse_tokens, tile_blocks, i);
  };
  const int written = rank_row(key_at, causal, args.count, capacity, ranking_keys, indices, args.select_in_shared);
  int* order = args.order + cell * args.count;
  for (int i = static_cast<int>(threadIdx.x); i < written; i += kRankingThreads) order[i] = indices[i];
}

// One thread block per (head, row); a thread scores whole pages, channel by channel in the host's order
// and roundings (no contraction into fused multiply-adds).
__global__ void __launch_bounds__(kRankingThreads) page_bound_ranking_kernel(PageBoundRankingArgs args, int capacity) {
  extern __shared__ unsigned long long ranking_keys[];  // [capacity], int indices[capacity], float q[head_dim]
  int* indices = reinterpret_cast<int*>(ranking_keys + capacity);
  float* q = reinterpret_cast<float*>(indices + capacity);
  const long long cell = blockIdx.x;
  const int r = static_cast<int>(cell % args.rows);
  const int pages = static_cast<int>(min(args.positions[r] / args.page + 1, args.pages));
  const int padded = static_cast<int>(padded_size(pages));
  for (int c = static_cast<int>(threadIdx.x); c < args.head_dim; c += kRankingThreads) q[c] = args.q[cell * args.head_dim + c];
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < padded; i += kRankingThreads) {
    unsigned long long key = 0;
    int index = INT_MAX;
    if (i < pages) {
      double bound = CUDART_INF;  // the row's own page comes first
      if (i + 1 < pages) {
        bound = 0.0;
        for (int c = 0; c < args.head_dim; ++c) {
          const double qc = static_cast<double>(q[c]);
          const double with_hi = __dmul_rn(qc, static_cast<double>(args.hi[static_cast<long long>(c) * args.pages + i]));
          const double with_lo = __dmul_rn(qc, static_cast<double>(args.lo[static_cast<long long>(c) * args.pages + i]));
          bound = __dadd_rn(bound, with_hi < with_lo ? with_lo : with_hi);  // std::max's choice
        }
      }
      key = order_key(bound);
      index = i;
    }
    ranking_keys[i] = key;
    indices[i] = index;
  }
  bitonic_rank(ranking_keys, indices, padded);
  const int written = min(args.count, pages);
  int* order = args.order + cell * args.count;
  for (int i = static_cast<int>(threadIdx.x); i < written; i += kRankingThreads) order[i] = indices[i];
}

// rank_rows_on_device: one thread block per row of `entries[r]` scores at scores + offsets[r].
__global__ void __launch_bounds__(kRankingThreads) score_ranking_kernel(const double* scores, const long long* offsets,
                                                                        const int* entries, int count, int capacity, bool select,
                                                                        int* order) {
  extern __shared__ unsigned long long ranking_keys[];
  int* indices = reinterpret_cast<int*>(ranking_keys + capacity);
  const double* row = scores + offsets[blockIdx.x];
  const int written = rank_row([&](int i) { return order_key(row[i]); }, entries[blockIdx.x], count, capacity, ranking_keys, indices, select);
  for (int i = static_cast<int>(threadIdx.x); i < written; i += kRankingThreads) order[static_cast<long long>(blockIdx.x) * count + i] = indices[i];
}

__global__ void portable_exp_kernel(const double* __restrict__ x, double* __restrict__ out, long long n) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = portable_exp(x[i]);
}

}  // namespace

std::vector<double> portable_exp_on_device(const std::vector<double>& x) {
  std::vector<double> out(x.size());
  if (x.empty()) return out;
  const std::size_t bytes = x.size() * sizeof(double);
  double* device = nullptr;
  check(cudaMalloc(&device, 2 * bytes), "cudaMalloc (portable_exp test)");
  cudaError_t status = cudaMemcpy(device, x.data(), bytes, cudaMemcpyHostToDevice);
  if (status == cudaSuccess) {
    const auto n = static_cast<long long>(x.size());
    portable_exp_kernel<<<static_cast<unsigned>((n + 255) / 256), 256>>>(device, device + x.size(), n);
    status = cudaGetLastError();
  }
  if (status == cudaSuccess) status = cudaMemcpy(out.data(), device + x.size(), bytes, cudaMemcpyDeviceToHost);
  cudaFree(device);
  check(status, "portable_exp test");
  return out;
}

std::vector<std::vector<int>> rank_rows_on_device(const std::vector<std::vector<double>>& rows, int count, int capacity,
                                                  bool select_in_shared) {
  std::vector<std::vector<int>> out(rows.size());
  if (rows.empty()) return out;
  std::vector<double> scores;
  std::vector<long long> offsets;
  std::vector<int> entries;
  long long longest = 1;
  for (const auto& row : rows) {
    if (row.empty()) fail(ErrorKind::kInternal, "rank_rows_on_device: an empty row");
    offsets.push_back(static_cast<long long>(scores.size()));
    entries.push_back(static_cast<int>(row.size()));
    scores.insert(scores.end(), row.begin(), row.end());
    longest = std::max(longest, static_cast<long long>(row.size()));
  }
  if (capacity == 0) capacity = static_cast<int>(padded_size(longest));
  if (count < 1 || capacity < padded_size(count) || padded_size(capacity) != capacity ||
      ranking_entry_bytes(capacity) + kRankingStaticBytes > kMinRankingSharedBytes) {
    fail(ErrorKind::kInternal, "rank_rows_on_device: count {}, capacity {}", count, capacity);
  }
  double* device_scores = nullptr;
  long long* device_offsets = nullptr;
  int* device_entries = nullptr;
  int* device_order = nullptr;
  const std::size_t order_entries = rows.size() * static_cast<std::size_t>(count);
  cudaError_t status = cudaMalloc(&device_scores, scores.size() * sizeof(double));
  if (status == cudaSuccess) status = cudaMalloc(&device_offsets, offsets.size() * sizeof(long long));
  if (status == cudaSuccess) status = cudaMalloc(&device_entries, entries.size() * sizeof(int));
  if (status == cudaSuccess) status = cudaMalloc(&device_order, order_entries * sizeof(int));
  if (status == cudaSuccess) status = cudaMemcpy(device_scores, scores.data(), scores.size() * sizeof(double), cudaMemcpyHostToDevice);
  if (status == cudaSuccess) status = cudaMemcpy(device_offsets, offsets.data(), offsets.size() * sizeof(long long), cudaMemcpyHostToDevice);
  if (status == cudaSuccess) status = cudaMemcpy(device_entries, entries.data(), entries.size() * sizeof(int), cudaMemcpyHostToDevice);
  if (status == cudaSuccess) status = cudaFuncSetAttribute(score_ranking_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                           static_cast<int>(ranking_entry_bytes(capacity)));
  if (status == cudaSuccess) {
    score_ranking_kernel<<<static_cast<unsigned>(rows.size()), kRankingThreads, ranking_entry_bytes(capacity)>>>(
        device_scores, device_offsets, device_entries, count, capacity, select_in_shared, device_order);
    status = cudaGetLastError();
  }
  std::vector<int> order(order_entries);
  if (status == cudaSuccess) status = cudaMemcpy(order.data(), device_order, order_entries * sizeof(int), cudaMemcpyDeviceToHost);
  for (void* p : {static_cast<void*>(device_scores), static_cast<void*>(device_offsets), static_cast<void*>(device_entries),
                  static_cast<void*>(device_order)}) {
    cudaFree(p);
  }
  check(status, "rank_rows_on_device");
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const auto written = std::min<std::size_t>(static_cast<std::size_t>(count), rows[r].size());
    out[r].assign(order.begin() + static_cast<std::ptrdiff_t>(r * static_cast<std::size_t>(count)),
                  order.begin() + static_cast<std::ptrdiff_t>(r * static_cast<std::size_t>(count) + written));
  }
  return out;
}

static_assert(kMinRankingSharedBytes >= kSortWholeEntries * (sizeof(unsigned long long) + sizeof(int)) + kRankingStaticBytes,
              "a device that holds the page rankings sorts rows of kSortWholeEntries blocks whole");

bool has_kernels_for_current_device() {
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, block_ranking_kernel);
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    cudaGetLastError();  // not sticky: clear it
    return false;
  }
  // Only PTX for this GPU, and the driver cannot compile it: say how to avoid the compilation.
  if (status == cudaErrorUnsupportedPtxVersion || status == cudaErrorInvalidPtx || status == cudaErrorJitCompilerNotFound) {
    cudaGetLastError();
    fail(ErrorKind::kDevice, "CUDA cannot compile this build's PTX for the GPU ({}): update the driver, or build for the GPU's "
         "own architecture (-DCMAKE_CUDA_ARCHITECTURES=<its compute capability, e.g. 90>) so that nothing is compiled at run time",
         cudaGetErrorString(status));
  }
  check(status, "kernel attributes");
  return true;
}

long long ranked_prefix_limit(std::size_t shared_bytes) {
  for (long long prefix = kMaxRankedPrefix; prefix >= kSortWholeEntries; prefix /= 2) {
    if (ranking_entry_bytes(static_cast<int>(prefix)) + kRankingStaticBytes <= shared_bytes) return prefix;
  }
  return 0;
}

void configure_ranking_kernels(std::size_t shared_bytes) {
  for (const void* kernel : {reinterpret_cast<const void*>(block_ranking_kernel), reinterpret_cast<const void*>(page_bound_ranking_kernel)}) {
    cudaFuncAttributes attributes{};
    check(cudaFuncGetAttributes(&attributes, kernel), "ranking kernel attributes");
    if (attributes.sharedSizeBytes > kRankingStaticBytes) {
      fail(ErrorKind::kInternal, "a ranking kernel declares {} bytes of static shared memory, more than the {} its launches leave",
           attributes.sharedSizeBytes, kRankingStaticBytes);
    }
  }
  check(cudaFuncSetAttribute(page_bound_ranking_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kPageRankingBytes)),
        "page ranking shared memory");
  check(cudaFuncSetAttribute(block_ranking_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(ranking_entry_bytes(static_cast<int>(ranked_prefix_limit(shared_bytes))))),
        "block ranking shared memory");
}

void launch_block_ranking(const BlockRankingArgs& args, cudaStream_t stream) {
  const long long ranked_blocks = args.factor >= 1 ? (args.num_blocks + args.factor - 1) / args.factor : 0;
  if (args.factor < 1 || args.count < 1 || args.count > ranked_blocks || args.count > args.prefix_limit ||
      args.prefix_limit > kMaxRankedPrefix || ranked_blocks > INT_MAX) {
    fail(ErrorKind::kInternal, "block ranking of {} blocks of {} tile blocks, {} a row (at most {} a row on this device)",
         ranked_blocks, args.factor, args.count, args.prefix_limit);
  }
  if (args.by_group_max && !args.lse_all) fail(ErrorKind::kInternal, "a block ranking by group without log-sum-exps");
  const long long cells = args.by_group_max ? args.rows : static_cast<long long>(args.heads) * args.rows;
  if (cells == 0) return;
  // The entries the longest row sorts (sorts_whole; ascending rows: the last is the longest), and at
  // least kSortWholeEntries where rows reach it: rows up to the capacity are sorted whole, longer ones
  // select their top count first.
  const long long longest = sorts_whole(ranked_blocks, args.count) ? padded_size(ranked_blocks) : padded_size(args.count);
  const int capacity = static_cast<int>(std::max(longest, std::min(padded_size(ranked_blocks), kSortWholeEntries)));
  block_ranking_kernel<<<static_cast<unsigned>(cells), kRankingThreads, ranking_entry_bytes(capacity), stream>>>(args, capacity);
  check(cudaGetLastError(), "block ranking kernel launch");
}

void launch_page_bound_ranking(const PageBoundRankingArgs& args, cudaStream_t stream) {
  if (args.pages > kMaxRankedPages || args.count < 1 || args.count > args.pages || args.head_dim < 1 ||
      args.head_dim > kMaxBoundHeadDim) {
    fail(ErrorKind::kInternal, "page ranking of {} pages, {} a row, head_dim {} (at most {} pages, head_dim {})", args.pages,
         args.count, args.head_dim, kMaxRankedPages, kMaxBoundHeadDim);
  }
  const long long cells = static_cast<long long>(args.heads) * args.rows;
  if (cells == 0) return;
  const int capacity = static_cast<int>(padded_size(args.pages));
  const std::size_t shared = ranking_entry_bytes(capacity) + static_cast<std::size_t>(args.head_dim) * sizeof(float);
  page_bound_ranking_kernel<<<static_cast<unsigned>(cells), kRankingThreads, shared, stream>>>(args, capacity);
  check(cudaGetLastError(), "page ranking kernel launch");
}

}  // namespace hysparse::cuda
