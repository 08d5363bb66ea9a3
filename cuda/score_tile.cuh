#pragma once
// Device helpers shared by the two tensor-core statistics kernels (mma.sync in
// tensor_core_statistics.cu, wgmma in wgmma_statistics.cu). Both hold a tile of scores in the
// same register layout, the mma accumulator fragment: a warp owns 16 query rows per m-tile, and
// acc[m][n][e] is row `group` (+8 for e >= 2) of m-tile m and key key0 + 8n + 2 thread_in_group
// + (e & 1), where group = lane / 4 and thread_in_group = lane % 4. Everything after the product
// (causal mask, per-block max and sum of exponentials, blocks spanning key tiles) is written
// once, here, so the two kernels cannot disagree on it.
#include <cuda_runtime.h>

#include "tensor_core_statistics.hpp"

namespace hysparse::cuda::tile {

constexpr int kKeys = kTensorCoreKeyTile;
constexpr int kN8Tiles = kKeys / 8;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ unsigned shared_address(const void* pointer) {
  return static_cast<unsigned>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void copy_async_16(unsigned destination, const void* source) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(destination), "l"(source));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// The first kStages - 1 key tiles of a work item on their way into shared memory (one cp.async
// group each, empty groups past the last tile, so the per-tile wait counts stay fixed).
template <int kStages, typename LoadTile>
__device__ __forceinline__ void start_key_pipeline(int num_tiles, int key_begin, LoadTile&& load_tile) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(key_begin + s * kKeys, s);
    copy_async_commit();
  }
}

// 2^x on the special-function unit (relative error ~2^-22); 2^-inf = +0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Finished block pairs leave through shared memory, kStagedBlocks consecutive blocks of a row at a
// time. A row's cells lie num_blocks floats apart from the next row's, so a pair stored as it is
// finished is 4 bytes of a 32-byte sector each, and those stores bounded the kernels (README,
// Performance: a kernel without them ran 1.3x faster). Each warp stages the cells of its 16 rows per
// m-tile: staged[row of the warp][max, sum][block % kStagedBlocks].
constexpr int kStagedBlocks = 8;  // 32 bytes of a row's cells: one memory sector
template <int kMTiles>
using StagedCells = float[16 * kMTiles][2][kStagedBlocks];

// The pair of block b of the thread's row ri (row 8 ri + group of the warp): the largest logit
// (max_score times the score scale) and the block's sum.
template <int kMTiles>
__device__ __forceinline__ void stage_block(StagedCells<kMTiles>& staged, int ri, int group, int b, float max_score, float sum,
                                            float score_scale) {
  staged[8 * ri + group][0][b % kStagedBlocks] = max_score * score_scale;
  staged[8 * ri + group][1][b % kStagedBlocks] = sum;
}

// The last block a key tile finished (-1: none): blocks of at most a tile end with it; a longer block
// ends at a multiple of its size or at the work item's last tile.
// (Unsigned and, for blocks within a tile, by the compile-time size: a shift, where a division by the
// launch's block size cost ~30 instructions a tile.)
template <int kBlockN8>
__device__ __forceinline__ int finished_block(int key0, int block, bool last_tile) {
  const auto end = static_cast<unsigned>(key0 + kKeys);
  if constexpr (kBlockN8 > 0) return static_cast<int>(end / (8u * kBlockN8)) - 1;
  const auto size = static_cast<unsigned>(block);
  return end % size == 0 || last_tile ? static_cast<int>(static_cast<unsigned>(key0) / size) : -1;
}

// Whether the staged run of `finished` is to be written now: it is complete, or the item ends.
__device__ __forceinline__ bool run_complete(int finished, bool last_tile) {
  return finished >= 0 && ((static_cast<unsigned>(finished) + 1) % kStagedBlocks == 0 || last_tile);
}

// Writes the staged pairs of blocks [first block of b_end's run, b_end] that the work item made: at or
// after its first block, causal for their row. Every lane of the warp calls it; 8 lanes side by side
// write one row's run (a sector) of one array. r0: the warp's first row of the launch; active: whether
// the warp has rows (each row's position is read again here: fewer registers than passing them).
template <int kMTiles, int kBatch>
__device__ __forceinline__ void flush_staged(StagedCells<kMTiles>& staged, const TensorCoreLaunch& p, int head, int r0,
                                             bool active, int lane, int first_block, int b_end) {
  __syncwarp();
  const int run_first = b_end / kStagedBlocks * kStagedBlocks;
  const int first = max(run_first, first_block);
  const int c = lane % kStagedBlocks, array = (lane / kStagedBlocks) % 2, b = run_first + c;
  if (active && b >= first && b <= b_end) {
    // kBatch rows' staged cells and positions are loaded before their first store, so that the loads'
    // latencies overlap (the flush took 12% of the wgmma kernel's warp time, ncu, mostly a ~30-cycle wait on
    // a position or a staged cell after each row's store; eight at a time removed it). The registers a
    // batch holds are a kernel's to spare: the mma.sync kernel's are not (kMmaFlushBatch).
    static_assert((8 * kMTiles) % kBatch == 0, "whole batches of the warp's row pairs");
    const long long first_key = static_cast<long long>(b) * p.block;
    // The lane's cell in its first row, then two rows on per step (a pointer step, not a 64-bit
    // index product per row).
    float* out = (array == 0 ? p.block_max : p.block_sum) + (static_cast<long long>(head) * p.rows + r0 + lane / 16) * p.num_blocks + b;
    const long long row_step = 2 * p.num_blocks;
#pragma unroll 1
    for (int i0 = 0; i0 < 8 * kMTiles; i0 += kBatch) {
      float cell[kBatch];
      bool causal[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int row_in_warp = 2 * (i0 + i) + lane / 16, row = r0 + row_in_warp;
        causal[i] = row < p.rows && first_key <= __ldg(p.positions + min(row, p.rows - 1));
        cell[i] = staged[row_in_warp][array][c];
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i, out += row_step) {
        if (causal[i]) *out = cell[i];
      }
    }
  }
  __syncwarp();
}

// Scores of keys beyond a row's position (pos[ri], -1 for no row) become -inf. ri indexes the
// thread's rows: m-tile ri / 2, fragment row group + 8 (ri % 2).
template <int kMTiles>
__device__ __forceinline__ void mask_causal(float (&acc)[kMTiles][kN8Tiles][4], int key0, const int (&pos)[2 * kMTiles],
                                            int thread_in_group) {
#pragma unroll
  for (int ri = 0; ri < 2 * kMTiles; ++ri) {
#pragma unroll
    for (int n = 0; n < kN8Tiles; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = key0 + 8 * n + 2 * thread_in_group + e;
        if (key > pos[ri]) acc[ri >> 1][n][2 * (ri & 1) + e] = -INFINITY;
      }
    }
  }
}

// Pairwise reductions of N values (N a power of two): depth log2 N instead of a chain of N - 1
// dependent instructions, so that a warp's reduction does not wait on each step's latency.
// (Recursion, not a loop over halving widths: every index must be a compile-time constant, or
// the array goes to local memory.)
template <int N, typename Combine>
__device__ __forceinline__ float tree_reduce(const float (&v)[N], Combine combine) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    float half[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) half[i] = combine(v[i], v[i + N / 2]);
    return tree_reduce(half, combine);
  }
}
template <int N>
__device__ __forceinline__ float tree_max(const float (&v)[N]) {
  return tree_reduce(v, [](float a, float b) { return fmaxf(a, b); });
}
template <int N>
__device__ __forceinline__ float tree_sum(const float (&v)[N]) {
  return tree_reduce(v, [](float a, float b) { return a + b; });
}

// The 2 kN8 scores of row ri (m-tile ri / 2, fragment row group + 8 (ri % 2)) in n8 column groups
// [n0, n0 + kN8) that this thread holds.
template <int kN8, int kMTiles>
__device__ __forceinline__ void row_scores(const float (&acc)[kMTiles][kN8Tiles][4], int ri, int n0, float (&v)[2 * kN8]) {
#pragma unroll
  for (int n = 0; n < kN8; ++n) {
    v[2 * n] = acc[ri >> 1][n0 + n][2 * (ri & 1)];
    v[2 * n + 1] = acc[ri >> 1][n0 + n][2 * (ri & 1) + 1];
  }
}

// Blocks of kBlockN8 n8 column groups (8, 16, 32 or 64 keys) lie whole inside the tile: each is
// reduced in registers to (max score, sum of 2^((score - max) log2_scale)) and handed to
// write(ri, block_index, max_score, sum) by one lane of the quad. In a block of a whole tile (16
// scores a row in each thread) each thread sums its exponentials against its own maximum, so that
// they need not wait for the quad's shuffles, and the quad then combines the (max, sum) pairs: one
// more exp2 per 16 (README, Performance: faster at 8K tokens, the same at 32K and 128K). Smaller
// blocks take the quad's maximum first (one more per 2 to 8 would cost more than the wait). Every
// row of the thread goes through each phase before the next, so the rows' latencies overlap.
template <int kMTiles, int kBlockN8, typename Write>
__device__ __forceinline__ void reduce_whole_blocks(const float (&acc)[kMTiles][kN8Tiles][4], int key0,
                                                    const int (&pos)[2 * kMTiles], float log2_scale, int thread_in_group,
                                                    Write&& write) {
  constexpr int kRowsPerThread = 2 * kMTiles;
  constexpr int kBlocksPerTile = kN8Tiles / kBlockN8;
  constexpr int kBlock = 8 * kBlockN8;
  constexpr bool kOwnMaximumFirst = kBlockN8 == kN8Tiles;
#pragma unroll
  for (int bi = 0; bi < kBlocksPerTile; ++bi) {
    const int b = static_cast<int>(static_cast<unsigned>(key0) / kBlock) + bi;
    float own_max[kRowsPerThread], m[kRowsPerThread], l[kRowsPerThread];
#pragma unroll
    for (int ri = 0; ri < kRowsPerThread; ++ri) {
      float v[2 * kBlockN8];
      row_scores<kBlockN8>(acc, ri, bi * kBlockN8, v);
      own_max[ri] = tree_max(v);
    }
    if constexpr (!kOwnMaximumFirst) {
#pragma unroll
      for (int ri = 0; ri < kRowsPerThread; ++ri) m[ri] = own_max[ri] = quad_max(own_max[ri]);
    }
#pragma unroll
    for (int ri = 0; ri < kRowsPerThread; ++ri) {
      const float shift = own_max[ri] == -INFINITY ? 0.0f : own_max[ri] * log2_scale;  // no causal score: the sum is 0
      float v[2 * kBlockN8];
      row_scores<kBlockN8>(acc, ri, bi * kBlockN8, v);
#pragma unroll
      for (int i = 0; i < 2 * kBlockN8; ++i) v[i] = exp2_approx(fmaf(v[i], log2_scale, -shift));
      l[ri] = tree_sum(v);
    }
    if constexpr (kOwnMaximumFirst) {
#pragma unroll
      for (int ri = 0; ri < kRowsPerThread; ++ri) m[ri] = quad_max(own_max[ri]);
#pragma unroll
      for (int ri = 0; ri < kRowsPerThread; ++ri) {
        const float shift = m[ri] == -INFINITY ? 0.0f : m[ri] * log2_scale;
        l[ri] = own_max[ri] == -INFINITY ? 0.0f : l[ri] * exp2_approx(fmaf(own_max[ri], log2_scale, -shift));
      }
    }
#pragma unroll
    for (int ri = 0; ri < kRowsPerThread; ++ri) l[ri] = quad_sum(l[ri]);
    // The quad holds the results in all four lanes: each lane writes a quarter of them.
#pragma unroll
    for (int ri = 0; ri < kRowsPerThread; ++ri) {
      if (((bi * kRowsPerThread + ri) & 3) == thread_in_group && b * kBlock <= pos[ri]) write(ri, b, m[ri], l[ri]);
    }
  }
}

// Part of a block that spans several key tiles: the tile is folded into this thread's running
// (max score, sum) per row.
template <int kMTiles>
__device__ __forceinline__ void fold_into_running(const float (&acc)[kMTiles][kN8Tiles][4], float (&run_max)[2 * kMTiles],
                                                  float (&run_sum)[2 * kMTiles], float log2_scale) {
#pragma unroll
  for (int ri = 0; ri < 2 * kMTiles; ++ri) {
    float v[2 * kN8Tiles];
    row_scores<kN8Tiles>(acc, ri, 0, v);
    const float m = fmaxf(run_max[ri], tree_max(v));
    const float shift = m == -INFINITY ? 0.0f : m * log2_scale;
    const float carried = run_max[ri] == -INFINITY ? 0.0f : run_sum[ri] * exp2_approx(fmaf(run_max[ri], log2_scale, -shift));
    row_scores<kN8Tiles>(acc, ri, 0, v);
#pragma unroll
    for (int i = 0; i < 2 * kN8Tiles; ++i) v[i] = exp2_approx(fmaf(v[i], log2_scale, -shift));
    run_max[ri] = m;
    run_sum[ri] = carried + tree_sum(v);
  }
}

// The running pairs of block b are complete: combined across the quad, written, and reset.
template <int kMTiles, typename Write>
__device__ __forceinline__ void finish_running_block(float (&run_max)[2 * kMTiles], float (&run_sum)[2 * kMTiles], int b,
                                                     int block, const int (&pos)[2 * kMTiles], float log2_scale,
                                                     int thread_in_group, Write&& write) {
#pragma unroll
  for (int ri = 0; ri < 2 * kMTiles; ++ri) {
    const float m = quad_max(run_max[ri]);
    const float shift = m == -INFINITY ? 0.0f : m * log2_scale;
    float l = run_max[ri] == -INFINITY ? 0.0f : run_sum[ri] * exp2_approx(fmaf(run_max[ri], log2_scale, -shift));
    l = quad_sum(l);
    if ((ri & 3) == thread_in_group && b * block <= pos[ri]) write(ri, b, m, l);
    run_max[ri] = -INFINITY;
    run_sum[ri] = 0.0f;
  }
}

}  // namespace hysparse::cuda::tile
