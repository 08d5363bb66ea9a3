// Per-row rankings of blocks by mass on the device (StatsTile::mass_order): the host would otherwise
// sort every (head, row) of every tile, which bounds the GPU path (README, Performance).
#include <cuda_runtime.h>
#include <math_constants.h>

#include <climits>

#include "common/error.hpp"
#include "device_statistics.hpp"

namespace hysparse::cuda {
namespace {

constexpr int kRankingThreads = 256;

// Higher mass first, then the lower block: rank_top's order. Non-negative doubles order as their
// bit patterns do, so masses are compared as 64-bit integers.
__device__ __forceinline__ bool ranks_before(unsigned long long key_a, int index_a, unsigned long long key_b, int index_b) {
  return key_a > key_b || (key_a == key_b && index_a < index_b);
}

// One thread block per (head, row): the row's causal blocks, padded to a power of two with entries
// that rank after every block (mass 0, index INT_MAX), are sorted by a bitonic network in shared
// memory; the first `count` are written.
__global__ void __launch_bounds__(kRankingThreads) block_ranking_kernel(BlockRankingArgs args, int capacity) {
  extern __shared__ unsigned long long ranking_keys[];  // [capacity], then int indices[capacity]
  int* indices = reinterpret_cast<int*>(ranking_keys + capacity);
  const long long cell = blockIdx.x;
  const int r = static_cast<int>(cell % args.rows);
  // Rows ascend, so no row has more blocks than the tile; the bound keeps a bad plan inside memory.
  const int causal = static_cast<int>(min(args.positions[r] / args.block + 1, args.num_blocks));
  int padded = 1;
  while (padded < causal) padded <<= 1;
  const double lse_tokens = args.lse_tokens[cell];
  const float* block_max = args.block_max + cell * args.num_blocks;
  const float* block_sum = args.block_sum + cell * args.num_blocks;
  for (int i = static_cast<int>(threadIdx.x); i < padded; i += kRankingThreads) {
    unsigned long long key = 0;
    int index = INT_MAX;
    if (i < causal) {
      const float m = block_max[i];
      // The engine's formula (build_view): an empty block has mass 0.
      const double mass = m == -CUDART_INF_F ? 0.0 : static_cast<double>(block_sum[i]) * exp(static_cast<double>(m) - lse_tokens);
      key = static_cast<unsigned long long>(__double_as_longlong(mass));
      index = i;
    }
    ranking_keys[i] = key;
    indices[i] = index;
  }
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = static_cast<int>(threadIdx.x); i < padded / 2; i += kRankingThreads) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const unsigned long long key_lo = ranking_keys[lo], key_hi = ranking_keys[hi];
        const int index_lo = indices[lo], index_hi = indices[hi];
        // Sub-sequences alternate direction until the last merge, which runs forward.
        const bool forward = (lo & size) == 0;
        const bool swap = forward ? ranks_before(key_hi, index_hi, key_lo, index_lo) : ranks_before(key_lo, index_lo, key_hi, index_hi);
        if (swap) {
          ranking_keys[lo] = key_hi;
          ranking_keys[hi] = key_lo;
          indices[lo] = index_hi;
          indices[hi] = index_lo;
        }
      }
    }
  }
  __syncthreads();
  const int written = min(args.count, causal);
  int* order = args.order + cell * args.count;
  for (int i = static_cast<int>(threadIdx.x); i < written; i += kRankingThreads) order[i] = indices[i];
}

}  // namespace

void launch_block_ranking(const BlockRankingArgs& args, cudaStream_t stream) {
  if (args.num_blocks > kMaxRankedBlocks || args.count < 1 || args.count > args.num_blocks) {
    fail(ErrorKind::kInternal, "block ranking of {} blocks, {} a row (at most {} blocks)", args.num_blocks, args.count,
         kMaxRankedBlocks);
  }
  const long long cells = static_cast<long long>(args.heads) * args.rows;
  if (cells == 0) return;
  int capacity = 1;
  while (capacity < args.num_blocks) capacity <<= 1;
  const std::size_t shared = static_cast<std::size_t>(capacity) * (sizeof(unsigned long long) + sizeof(int));
  block_ranking_kernel<<<static_cast<unsigned>(cells), kRankingThreads, shared, stream>>>(args, capacity);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA block ranking kernel launch: {}", cudaGetErrorString(status));
}

}  // namespace hysparse::cuda
