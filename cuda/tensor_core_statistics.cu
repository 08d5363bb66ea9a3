// Fused block statistics on tensor cores, FlashAttention-style: a thread block holds the
// query rows of one row tile for several heads of a KV group in registers (each warp 16 or 32
// rows of one head), streams the group's key tiles through shared memory once for all of those
// heads (cp.async, three stages), forms the scores with mma.sync m16n8k16 (bf16/fp16 in, fp32
// accumulate) and reduces them in registers to the per-block (max logit, sum of exp) pairs.
// No score leaves the registers; only the per-block pairs are written.
//
// Block sizes: 8, 16, 32 or 64 keys are whole n8 column groups of one key tile, reduced with
// two quad shuffles; a multiple of 64 spans several key tiles, kept as a running per-thread
// (max, sum) and combined across the quad when the block ends. Other sizes use the SIMT kernel.
#include <cuda_runtime.h>

#include <cstdint>
#include <numeric>

#include "common/error.hpp"
#include "score_tile.cuh"
#include "tensor_core_statistics.hpp"

namespace hysparse::cuda {
namespace {

using namespace tile;

constexpr int kStages = 3;
// 16 rows per warp: measured on an H100 as fast as 32 within noise (32 halves the shared-memory
// reads but spills a little and runs 12 warps per multiprocessor instead of 16; the kernel is
// latency-bound, not shared-memory-bound), and it needs no local memory.
constexpr int kDefaultRowsPerWarp = 16;
// Rows a flush loads before its first store (score_tile.cuh): four keep the 16-row layout free of local
// memory, where eight spilled 8 bytes at blocks of several tiles (ptxas, head_dim 128).
constexpr int kMmaFlushBatch = 4;

__device__ __forceinline__ void load_matrix_x4(unsigned address, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(address));
}

template <bool kFp16>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (kFp16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Offset of the 16-byte chunk `chunk` of key row `key` in a tile: chunks are XOR-swizzled by the
// key's low three bits, so the eight rows one ldmatrix phase reads land in eight bank groups.
template <int kDepth>
__device__ __forceinline__ unsigned tile_offset(int key, int chunk) {
  return static_cast<unsigned>(key * kDepth * 2 + ((chunk ^ (key & 7)) << 4));
}

// kSteps = depth / 16. kBlockN8 = n8 column groups per key block (1, 2, 4, 8), or 0 for blocks
// of several key tiles. kMTiles = 16-row mma tiles per warp: with 2, each key fragment read from
// shared memory feeds two mma instead of one (half the shared-memory traffic per score), at
// twice the registers, so thread blocks have 4 warps instead of 8 (always 128 rows). Depth 256
// holds 64 registers of query fragments per tile: one thread block of 8 warps per
// multiprocessor there (kMTiles 1 only), so nothing spills.
template <bool kFp16, int kSteps, int kBlockN8, int kMTiles>
__global__ void __launch_bounds__(kTensorCoreRowsPerBlock * 2 / kMTiles, kMTiles == 2 ? 3 : (kSteps > 8 ? 1 : 2))
    tensor_core_statistics_kernel(const TensorCoreLaunch p) {
  constexpr int kDepth = kSteps * 16;
  constexpr int kChunks = kDepth / 8;  // 16-byte chunks per key row
  constexpr int kTileBytes = kKeys * kDepth * 2;
  constexpr int kRowsPerThread = 2 * kMTiles;  // fragment rows `group` and `group + 8` of each mma tile
  extern __shared__ __align__(128) unsigned char key_tiles[];

  const TensorCoreWorkItem item = p.work[blockIdx.x];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int group = lane >> 2, thread_in_group = lane & 3;  // the mma fragment coordinates
  const int head = item.head_chunk * p.heads_per_cta + warp / p.row_subtiles;
  const int r0 = (item.row_tile * p.row_subtiles + warp % p.row_subtiles) * 16 * kMTiles;
  const bool active = warp < p.heads_per_cta * p.row_subtiles && head < p.heads && r0 < p.rows;
  // This thread's rows, and their positions (-1: no row, fully masked, never written). Positions
  // and keys fit in int (the backend refuses longer sequences): fewer registers than long long.
  auto row_of = [&](int ri) { return r0 + 16 * (ri >> 1) + 8 * (ri & 1) + group; };
  int pos[kRowsPerThread];
#pragma unroll
  for (int ri = 0; ri < kRowsPerThread; ++ri) {
    pos[ri] = active && row_of(ri) < p.rows ? static_cast<int>(p.positions[row_of(ri)]) : -1;
  }
  const int warp_first = active ? static_cast<int>(p.positions[r0]) : -1;
  const int warp_last = active ? static_cast<int>(p.positions[min(r0 + 16 * kMTiles - 1, p.rows - 1)]) : -1;
  const float log2_scale = p.score_scale * kLog2e;

  // The warp's query rows as A fragments, kept in registers for the whole key range.
  unsigned q_fragments[kMTiles][kSteps][4];
  {
    const auto* q = static_cast<const unsigned short*>(p.q) + static_cast<long long>(head) * p.rows * kDepth;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = row_of(2 * m + (i & 1));
          const int col = s * 16 + 2 * thread_in_group + ((i & 2) ? 8 : 0);
          q_fragments[m][s][i] = (active && r < p.rows)
                                     ? *reinterpret_cast<const unsigned*>(q + static_cast<long long>(r) * kDepth + col)
                                     : 0u;
        }
      }
    }
  }

  const unsigned tiles_base = shared_address(key_tiles);
  const auto* keys = static_cast<const unsigned char*>(p.k);
  auto load_tile = [&](int key0, int stage) {
    const unsigned char* source = keys + static_cast<long long>(key0) * kDepth * 2;
    const unsigned destination = tiles_base + static_cast<unsigned>(stage * kTileBytes);
    for (int c = static_cast<int>(threadIdx.x); c < kKeys * kChunks; c += static_cast<int>(blockDim.x)) {
      const int key = c / kChunks, chunk = c % kChunks;
      copy_async_16(destination + tile_offset<kDepth>(key, chunk), source + key * kDepth * 2 + chunk * 16);
    }
  };

  const int num_tiles = (item.key_end - item.key_begin) / kKeys;
  start_key_pipeline<kStages>(num_tiles, item.key_begin, load_tile);

  const int block = static_cast<int>(p.block);
  __shared__ StagedCells<kMTiles> staged[kTensorCoreRowsPerBlock * 2 / kMTiles / 32];  // each warp's pairs on their way out
  auto write_cell = [&](int ri, int b, float m, float l) { stage_block<kMTiles>(staged[warp], ri, group, b, m, l, p.score_scale); };
  // Blocks of several key tiles: this thread's running (max score, sum of exp) per row.
  float run_max[kRowsPerThread], run_sum[kRowsPerThread];
#pragma unroll
  for (int ri = 0; ri < kRowsPerThread; ++ri) {
    run_max[ri] = -INFINITY;
    run_sum[ri] = 0.0f;
  }

  for (int t = 0; t < num_tiles; ++t) {
    copy_async_wait<kStages - 2>();
    __syncthreads();  // tile t is in shared memory; every warp is done with tile t - 1
    if (t + kStages - 1 < num_tiles) load_tile(item.key_begin + (t + kStages - 1) * kKeys, (t + kStages - 1) % kStages);
    copy_async_commit();
    const int key0 = item.key_begin + t * kKeys;

    if (active && key0 <= warp_last) {
      // acc[m][n][e]: row group (+8 for e >= 2) of mma tile m, keys key0 + 8n + 2 thread_in_group + (e & 1).
      float acc[kMTiles][kN8Tiles][4];
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int n = 0; n < kN8Tiles; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.0f;
      }
      const unsigned stage_base = tiles_base + static_cast<unsigned>((t % kStages) * kTileBytes);
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
#pragma unroll
        for (int pair = 0; pair < kN8Tiles / 2; ++pair) {
          // Four 8x8 matrices: keys +0..7 and +8..15 of this pair, depth halves 2s and 2s+1.
          const int key = pair * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int chunk = 2 * s + ((lane >> 3) & 1);
          unsigned b0, b1, b2, b3;
          load_matrix_x4(stage_base + tile_offset<kDepth>(key, chunk), b0, b1, b2, b3);
#pragma unroll
          for (int m = 0; m < kMTiles; ++m) {
            mma_16x8x16<kFp16>(acc[m][2 * pair], q_fragments[m][s], b0, b1);
            mma_16x8x16<kFp16>(acc[m][2 * pair + 1], q_fragments[m][s], b2, b3);
          }
        }
      }
      // Causal mask, only on tiles that reach past some row of the warp.
      if (key0 + kKeys - 1 > warp_first) mask_causal<kMTiles>(acc, key0, pos, thread_in_group);

      if constexpr (kBlockN8 > 0) {
        reduce_whole_blocks<kMTiles, kBlockN8>(acc, key0, pos, log2_scale, thread_in_group, write_cell);
      } else {
        fold_into_running<kMTiles>(acc, run_max, run_sum, log2_scale);
      }
    }

    if constexpr (kBlockN8 == 0) {
      // A block ends at a multiple of its size or where this item's key range ends.
      if (active && ((key0 + kKeys) % block == 0 || t == num_tiles - 1)) {
        finish_running_block<kMTiles>(run_max, run_sum, key0 / block, block, pos, log2_scale, thread_in_group, write_cell);
      }
    }
    const int finished = finished_block<kBlockN8>(key0, block, t == num_tiles - 1);
    if (run_complete(finished, t == num_tiles - 1)) flush_staged<kMTiles, kMmaFlushBatch>(staged[warp], p, head, r0, active, lane, item.key_begin / block, finished);
  }
  copy_async_wait<0>();  // leave no copy in flight into shared memory at exit
}

// Dynamic shared memory: the key stages of kSteps 16-channel bf16/fp16 slices.
constexpr int key_stage_bytes(int steps) { return kStages * kKeys * steps * 16 * 2; }

template <bool kFp16, int kSteps, int kBlockN8, int kMTiles>
void launch_with(const TensorCoreLaunch& p, cudaStream_t stream) {
  constexpr int kSharedBytes = key_stage_bytes(kSteps);
  constexpr int kThreads = kTensorCoreRowsPerBlock * 2 / kMTiles;
  auto* kernel = tensor_core_statistics_kernel<kFp16, kSteps, kBlockN8, kMTiles>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA tensor-core kernel shared memory: {}", cudaGetErrorString(status));
  // Grid dimension x allows 2^31 - 1 items: far beyond any row count that fits in memory.
  kernel<<<static_cast<unsigned>(p.num_items), kThreads, kSharedBytes, stream>>>(p);
  status = cudaGetLastError();
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA tensor-core statistics kernel launch: {}", cudaGetErrorString(status));
}

template <bool kFp16, int kSteps, int kMTiles>
void launch_block(const TensorCoreLaunch& p, cudaStream_t stream) {
  switch (p.block) {
    case 8: return launch_with<kFp16, kSteps, 1, kMTiles>(p, stream);
    case 16: return launch_with<kFp16, kSteps, 2, kMTiles>(p, stream);
    case 32: return launch_with<kFp16, kSteps, 4, kMTiles>(p, stream);
    case 64: return launch_with<kFp16, kSteps, 8, kMTiles>(p, stream);
    default: return launch_with<kFp16, kSteps, 0, kMTiles>(p, stream);
  }
}

template <bool kFp16>
void launch_type(const TensorCoreLaunch& p, cudaStream_t stream) {
  const bool two = p.rows_per_warp == 32;
  switch (p.depth) {
    case 64: return two ? launch_block<kFp16, 4, 2>(p, stream) : launch_block<kFp16, 4, 1>(p, stream);
    case 128: return two ? launch_block<kFp16, 8, 2>(p, stream) : launch_block<kFp16, 8, 1>(p, stream);
    case 256: return launch_block<kFp16, 16, 1>(p, stream);
    default: fail(ErrorKind::kInternal, "tensor-core statistics: unsupported depth {}", p.depth);
  }
}

}  // namespace

int tensor_core_rows_per_warp(int depth, int requested) {
  if (depth > 128) return 16;  // 32 rows of depth-256 query fragments would not fit in registers
  return requested == 16 || requested == 32 ? requested : kDefaultRowsPerWarp;
}

std::size_t mma_shared_bytes(int depth) {
  // The staged cells (static) are the same whatever the rows per warp: a warp's rows x kStagedBlocks x (max, sum).
  constexpr std::size_t staged = sizeof(StagedCells<1>) * (kTensorCoreRowsPerBlock * 2 / 32);
  static_assert(sizeof(StagedCells<2>) * (kTensorCoreRowsPerBlock * 2 / 2 / 32) == staged, "staged cells per block");
  return static_cast<std::size_t>(key_stage_bytes(depth / 16)) + staged;
}

bool tensor_core_supports(long long block, int depth) {
  const bool depth_ok = depth == 64 || depth == 128 || depth == 256;
  const bool block_ok = block == 8 || block == 16 || block == 32 || (block > 0 && block % kKeys == 0);
  return depth_ok && block_ok;
}

long long tensor_core_key_unit(long long block) { return std::lcm(static_cast<long long>(kKeys), block); }

void launch_tensor_core_statistics(const TensorCoreLaunch& launch, cudaStream_t stream) {
  if (launch.num_items == 0) return;
  if (!tensor_core_supports(launch.block, launch.depth)) {
    fail(ErrorKind::kInternal, "tensor-core statistics: block {} / depth {} not supported", launch.block, launch.depth);
  }
  if (launch.rows_per_warp != tensor_core_rows_per_warp(launch.depth, launch.rows_per_warp)) {
    fail(ErrorKind::kInternal, "tensor-core statistics: {} rows per warp at depth {}", launch.rows_per_warp, launch.depth);
  }
  if (launch.fp16) launch_type<true>(launch, stream);
  else launch_type<false>(launch, stream);
}

}  // namespace hysparse::cuda
