#pragma once
// The fused block-statistics kernels on tensor cores (bf16 or fp16 inputs, fp32 accumulation):
// mma.sync m16n8k16 (tensor_core_statistics.cu, any GPU the build targets) and Hopper's
// warpgroup MMA (wgmma_statistics.cu, sm_90a code, compute capability 9.0 only). Internal to
// the CUDA backend: statistics_pass.cu plans the work and launches them through this header.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hysparse::cuda {

// Keys per shared-memory tile; the key buffer is padded with zero rows to a multiple of it.
constexpr int kTensorCoreKeyTile = 64;
// Query rows per thread block of the mma.sync kernel: warps of 16 rows (8 warps) or 32 rows (4
// warps), each warp's rows from one head.
constexpr int kTensorCoreRowsPerBlock = 128;
// The wgmma kernel: thread blocks of kWgmmaWarpgroups warpgroups (4 warps each), each warpgroup
// kWgmmaRowsPerWarpgroup query rows of one head sharing every key fragment it reads.
constexpr int kWgmmaWarpgroups = 2;
constexpr int kWgmmaRowsPerWarpgroup = 64;

// Which kernel forms the scores. kAuto is wgmma where it runs (compute capability 9.0: the same
// statistics as mma.sync, 1.2x its rate on an H200; README, Performance), mma.sync elsewhere.
enum class TensorCoreKernel { kAuto, kMma, kWgmma };

// One thread block's work: query-row tile, head chunk, and a key range [key_begin, key_end)
// that starts on a block boundary and ends on one (or at the tile's last causal key tile).
struct TensorCoreWorkItem {
  int row_tile, head_chunk, key_begin, key_end;
};

struct TensorCoreLaunch {
  bool fp16 = false;                         // false: bf16
  const void* q = nullptr;                   // [heads][rows][depth], rounded, sign of the scale folded in
  const void* k = nullptr;                   // [keys padded to kTensorCoreKeyTile][depth]
  const long long* positions = nullptr;      // [rows], ascending
  const TensorCoreWorkItem* work = nullptr;  // [num_items]
  long long num_items = 0;
  int heads = 0, rows = 0, depth = 0;        // depth: padded head_dim, 64, 128 or 256
  int rows_per_warp = 16;                    // mma.sync: 16 or 32 (tensor_core_rows_per_warp)
  // Row groups (warps for mma.sync, warpgroups for wgmma) used = heads_per_cta * row_subtiles,
  // at most 128 / rows_per_warp warps, or kWgmmaWarpgroups warpgroups.
  int heads_per_cta = 1, row_subtiles = 1;
  long long block = 64, num_blocks = 0;
  float score_scale = 1.0f;                  // logit = score_scale * (q . k), > 0
  float* block_max = nullptr;                // [heads][rows][num_blocks]
  float* block_sum = nullptr;
};

// Whether the tensor-core kernel handles this block size and padded depth: blocks of 8, 16,
// 32 or 64 keys (several per key tile) or any multiple of 64 (several key tiles per block).
bool tensor_core_supports(long long block, int depth);
// Shared memory a block of the mma.sync kernel takes at this padded depth (key stages and staged cells):
// 104 KiB at 256, more than compute capability 8.6/8.9 GPUs give a block (99 KiB).
std::size_t mma_shared_bytes(int depth);
// Rows per warp the kernel runs at this depth: `requested` (16 or 32) where it fits, else the
// default (0 asks for the default).
int tensor_core_rows_per_warp(int depth, int requested);
// Key ranges of work items must be multiples of this (whole blocks and whole key tiles).
long long tensor_core_key_unit(long long block);
void launch_tensor_core_statistics(const TensorCoreLaunch& launch, cudaStream_t stream);
// Whether the current device runs the wgmma kernel: compute capability 9.0 (sm_90a code runs
// nowhere else) and the kernel's image loads. The same block sizes and depths as mma.sync.
bool wgmma_available();
void launch_wgmma_statistics(const TensorCoreLaunch& launch, cudaStream_t stream);

}  // namespace hysparse::cuda
