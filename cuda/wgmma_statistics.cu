// Fused block statistics on Hopper's warpgroup MMA (wgmma, sm_90a): the same work items, inputs
// and outputs as the mma.sync kernel (tensor_core_statistics.cu), with the product formed by
// wgmma.mma_async m64n64k16 (bf16/fp16 in, fp32 accumulate). A warpgroup (4 warps) holds 64 query
// rows of one head as A fragments in registers and reads each key tile's B operand from shared
// memory once for all 64 rows, where the mma.sync kernel reads it once per warp of 16 rows: the
// shared-memory traffic that bounded that kernel falls fourfold. The scores land in the mma
// accumulator layout (warp w of the warpgroup: rows 16w..16w+15), so the causal mask and the
// per-block reduction are score_tile.cuh's, shared with the mma.sync kernel.
//
// Key tiles are stored in the canonical K-major layout with the 128-byte swizzle that wgmma's
// shared-memory descriptor describes: per 64-element (128-byte) slice of the depth, 64 key rows
// of 128 bytes, 16-byte chunk c of key row n at chunk position c ^ (n % 8), in 1024-byte atoms of
// 8 rows; the k16 step s of a slice starts 32 s bytes into it.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/error.hpp"
#include "score_tile.cuh"
#include "tensor_core_statistics.hpp"

namespace hysparse::cuda {
namespace {

using namespace tile;

constexpr int kSliceBytes = kKeys * 128;  // one 64-element depth slice of a key tile
constexpr int kStages = 3;
constexpr int kThreads = kWgmmaWarpgroups * 128;

// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format" of wgmma): start address,
// leading-dimension byte offset (unused by swizzled K-major layouts; 1 by convention), stride
// byte offset 1024 (from one 8-row atom to the next), 128-byte swizzle; all >> 4. The high word
// (stride, swizzle) is the same for every tile; the low word holds the address and is built here.
constexpr std::uint64_t kDescriptorHigh = (std::uint64_t{1024 >> 4} << 32) | (std::uint64_t{1} << 62);
__device__ __forceinline__ unsigned smem_descriptor_low(unsigned address) { return ((address & 0x3FFFF) >> 4) | (1u << 16); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Until at most kPending committed groups of this warpgroup's products are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Pins the accumulators in place around the asynchronous product: the compiler must not move
// their reads above the wait nor their writes below the issue.
__device__ __forceinline__ void fence_accumulators(float (&acc)[1][kN8Tiles][4]) {
#pragma unroll
  for (int n = 0; n < kN8Tiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(acc[0][n][e])::"memory");
  }
}

// acc (+)= A (64 x 16, registers) * B (16 x 64 keys, shared memory, descriptor's low word b_low;
// the constant high word is joined inside, so that advancing the address is one 32-bit add where a
// 64-bit descriptor took a carry chain per product); accumulate = 0 overwrites.
template <bool kFp16>
__device__ __forceinline__ void wgmma_64x64x16(float (&acc)[1][kN8Tiles][4], const unsigned (&a)[4], unsigned b_low,
                                               int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  float(&d)[kN8Tiles][4] = acc[0];
#define HYSPARSE_WGMMA(TYPE)                                                                                              \
  asm volatile(                                                                                                           \
      "{\n.reg .pred p;\n.reg .b64 desc;\n"                                                                               \
      "cvt.u64.u32 desc, %36;\nor.b64 desc, desc, %37;\nsetp.ne.b32 p, %38, 0;\n"                                         \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                                                     \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                          \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                                \
      "{%32, %33, %34, %35}, desc, p, 1, 1, 0;\n}\n"                                                                      \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),       \
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),         \
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),         \
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),         \
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])                                                       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b_low), "n"(kDescriptorHigh), "r"(accumulate))
  if constexpr (kFp16) {
    HYSPARSE_WGMMA("f16");
  } else {
    HYSPARSE_WGMMA("bf16");
  }
#undef HYSPARSE_WGMMA
#else
  (void)acc, (void)a, (void)b_low, (void)accumulate;
  __trap();  // never launched: wgmma_available() is false without sm_90a code
#endif
}

// kSteps = depth / 16; kBlockN8 as in the mma.sync kernel (n8 column groups per block, 0 for
// blocks of several key tiles). Two thread blocks per multiprocessor up to head_dim 128 (measured
// against one block of four warpgroups and three of two: README, Performance).
template <bool kFp16, int kSteps, int kBlockN8>
__global__ void __launch_bounds__(kThreads, kSteps > 8 ? 1 : 2) wgmma_statistics_kernel(const TensorCoreLaunch p) {
  constexpr int kDepth = kSteps * 16;
  constexpr int kSlices = kDepth / 64;
  constexpr int kChunks = kDepth / 8;  // 16-byte chunks per key row
  constexpr int kTileBytes = kSlices * kSliceBytes;
  extern __shared__ __align__(128) unsigned char shared_raw[];

  const TensorCoreWorkItem item = p.work[blockIdx.x];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int warpgroup = warp / 4, warp_in_group = warp % 4;
  const int group = lane >> 2, thread_in_group = lane & 3;
  const int head = item.head_chunk * p.heads_per_cta + warpgroup / p.row_subtiles;
  const int group_r0 = (item.row_tile * p.row_subtiles + warpgroup % p.row_subtiles) * kWgmmaRowsPerWarpgroup;
  // wgmma is collective over the warpgroup: whether it runs is decided per warpgroup; a warp whose
  // rows are all past the end joins in with zero fragments and masked rows.
  const bool active = warpgroup < p.heads_per_cta * p.row_subtiles && head < p.heads && group_r0 < p.rows;
  const int r0 = group_r0 + 16 * warp_in_group;
  auto row_of = [&](int ri) { return r0 + 8 * ri + group; };
  int pos[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) pos[ri] = active && row_of(ri) < p.rows ? static_cast<int>(p.positions[row_of(ri)]) : -1;
  const int warp_first = active && r0 < p.rows ? static_cast<int>(p.positions[r0]) : -1;
  const int group_last =
      active ? static_cast<int>(p.positions[min(group_r0 + kWgmmaRowsPerWarpgroup - 1, p.rows - 1)]) : -1;
  const float log2_scale = p.score_scale * kLog2e;

  unsigned q_fragments[kSteps][4];
  {
    const auto* q = static_cast<const unsigned short*>(p.q) + static_cast<long long>(head) * p.rows * kDepth;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = row_of(i & 1);
        const int col = s * 16 + 2 * thread_in_group + ((i & 2) ? 8 : 0);
        q_fragments[s][i] =
            (active && r < p.rows) ? *reinterpret_cast<const unsigned*>(q + static_cast<long long>(r) * kDepth + col) : 0u;
      }
    }
  }

  // 128-byte swizzle atoms must start on 1024-byte boundaries (the launch adds the slack).
  // (Held in a register: ptxas otherwise recomputes it from the CTA's shared window in every tile.)
  unsigned tiles_base = (shared_address(shared_raw) + 1023u) & ~1023u;
  asm volatile("" : "+r"(tiles_base));
  const auto* keys = static_cast<const unsigned char*>(p.k);
  // Each thread copies the same kCopies chunks of every key tile: chunk `chunk` of key rows
  // first_key + kKeyStride i. Their offsets are worked out once here; a tile adds only its base.
  constexpr int kKeyStride = kThreads / kChunks;
  constexpr int kCopies = kKeys / kKeyStride;
  static_assert(kThreads % kChunks == 0 && kKeyStride % 8 == 0 && kKeys % kKeyStride == 0,
                "a thread's key rows keep their swizzle phase (key % 8)");
  const unsigned first_key = threadIdx.x / kChunks, chunk = threadIdx.x % kChunks;
  const unsigned shared_offset = (chunk / 8) * kSliceBytes + first_key * 128 + (((chunk % 8) ^ (first_key % 8)) << 4);
  const unsigned global_offset = first_key * kDepth * 2 + chunk * 16;
  auto load_tile = [&](int key0, int stage) {
    const unsigned char* source = keys + static_cast<long long>(key0) * kDepth * 2 + global_offset;
    const unsigned destination = tiles_base + static_cast<unsigned>(stage * kTileBytes) + shared_offset;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) copy_async_16(destination + i * kKeyStride * 128, source + i * kKeyStride * kDepth * 2);
  };

  const int num_tiles = (item.key_end - item.key_begin) / kKeys;
  start_key_pipeline<kStages>(num_tiles, item.key_begin, load_tile);

  const int block = static_cast<int>(p.block);
  const int first_block = item.key_begin / block;
  __shared__ StagedCells<1> staged[kThreads / 32];  // each warp's finished pairs on their way out
  auto write_cell = [&](int ri, int b, float m, float l) { stage_block<1>(staged[warp], ri, group, b, m, l, p.score_scale); };
  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.0f, 0.0f};
  // Whether this warpgroup forms tile t's scores (uniform over the warpgroup: wgmma is collective).
  auto scored = [&](int t) { return active && item.key_begin + t * kKeys <= group_last; };
  // Tile t is in shared memory and every warpgroup is done reading the stage the next load reuses
  // (load_stage: the one tile t - 1 used).
  auto next_tile_ready = [&](int t, int load_stage) {
    copy_async_wait<kStages - 2>();
    // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    if (t + kStages - 1 < num_tiles) load_tile(item.key_begin + (t + kStages - 1) * kKeys, load_stage);
    copy_async_commit();
  };
  // Descriptors of addresses inside the tiles differ from the first tile's only in the start
  // address field (bits 0-13 of the low word, address / 16; shared memory stays below 2^18 bytes,
  // so no carry leaves it).
  const unsigned tiles_descriptor = smem_descriptor_low(tiles_base);
  auto issue = [&](int stage, float(&acc)[1][kN8Tiles][4]) {
    const unsigned stage_descriptor = tiles_descriptor + static_cast<unsigned>(stage) * (kTileBytes >> 4);
    fence_accumulators(acc);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const unsigned step = ((s / 4) * kSliceBytes + (s % 4) * 32) >> 4;
      wgmma_64x64x16<kFp16>(acc, q_fragments[s], stage_descriptor + step, s > 0 ? 1 : 0);
    }
    wgmma_commit();
  };
  auto reduce = [&](int t, float(&acc)[1][kN8Tiles][4]) {
    const int key0 = item.key_begin + t * kKeys;
    if (scored(t)) {
      if (key0 + kKeys - 1 > warp_first) mask_causal<1>(acc, key0, pos, thread_in_group);
      if constexpr (kBlockN8 > 0) {
        reduce_whole_blocks<1, kBlockN8>(acc, key0, pos, log2_scale, thread_in_group, write_cell);
      } else {
        fold_into_running<1>(acc, run_max, run_sum, log2_scale);
      }
    }
    if constexpr (kBlockN8 == 0) {
      if (active && ((key0 + kKeys) % block == 0 || t == num_tiles - 1)) {
        finish_running_block<1>(run_max, run_sum, key0 / block, block, pos, log2_scale, thread_in_group, write_cell);
      }
    }
  };

  float acc[1][kN8Tiles][4];
#pragma unroll
  for (int n = 0; n < kN8Tiles; ++n) acc[0][n][0] = acc[0][n][1] = acc[0][n][2] = acc[0][n][3] = 0.0f;
  // Stages by counters, not t % kStages: tile t reads `stage`; the load made while it is formed fills
  // the stage tile t - 1 read.
  auto product_and_reduce = [&](int t, int stage) {
    if (scored(t)) {
      issue(stage, acc);
      wgmma_wait<0>();
      fence_accumulators(acc);
    }
    reduce(t, acc);
    const int finished = finished_block<kBlockN8>(item.key_begin + t * kKeys, block, t == num_tiles - 1);
    if (run_complete(finished, t == num_tiles - 1)) {
      flush_staged<1, 8>(staged[warp], p, head, r0, active, lane, first_block, finished);
    }
  };
  for (int t = 0, stage = 0; t < num_tiles; ++t, stage = stage == kStages - 1 ? 0 : stage + 1) {
    next_tile_ready(t, stage == 0 ? kStages - 1 : stage - 1);
    product_and_reduce(t, stage);
  }
  copy_async_wait<0>();
}

template <bool kFp16, int kSteps, int kBlockN8>
void launch_with(const TensorCoreLaunch& p, cudaStream_t stream) {
  constexpr int kSharedBytes = kStages * (kSteps / 4) * kSliceBytes + 1024;  // + alignment slack
  auto* kernel = wgmma_statistics_kernel<kFp16, kSteps, kBlockN8>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA wgmma kernel shared memory: {}", cudaGetErrorString(status));
  kernel<<<static_cast<unsigned>(p.num_items), kThreads, kSharedBytes, stream>>>(p);
  status = cudaGetLastError();
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA wgmma statistics kernel launch: {}", cudaGetErrorString(status));
}

template <bool kFp16, int kSteps>
void launch_block(const TensorCoreLaunch& p, cudaStream_t stream) {
  switch (p.block) {
    case 8: return launch_with<kFp16, kSteps, 1>(p, stream);
    case 16: return launch_with<kFp16, kSteps, 2>(p, stream);
    case 32: return launch_with<kFp16, kSteps, 4>(p, stream);
    case 64: return launch_with<kFp16, kSteps, 8>(p, stream);
    default: return launch_with<kFp16, kSteps, 0>(p, stream);
  }
}

template <bool kFp16>
void launch_type(const TensorCoreLaunch& p, cudaStream_t stream) {
  switch (p.depth) {
    case 64: return launch_block<kFp16, 4>(p, stream);
    case 128: return launch_block<kFp16, 8>(p, stream);
    case 256: return launch_block<kFp16, 16>(p, stream);
    default: fail(ErrorKind::kInternal, "wgmma statistics: unsupported depth {}", p.depth);
  }
}

}  // namespace

bool wgmma_available() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  if (major != 9 || minor != 0) return false;
  cudaFuncAttributes attributes{};
  const bool loads = cudaFuncGetAttributes(&attributes, wgmma_statistics_kernel<false, 8, 8>) == cudaSuccess;
  (void)cudaGetLastError();  // a failed lookup must not linger as the sticky last error
  return loads;
}

void launch_wgmma_statistics(const TensorCoreLaunch& launch, cudaStream_t stream) {
  if (launch.num_items == 0) return;
  if (!tensor_core_supports(launch.block, launch.depth)) {
    fail(ErrorKind::kInternal, "wgmma statistics: block {} / depth {} not supported", launch.block, launch.depth);
  }
  if (launch.fp16) launch_type<true>(launch, stream);
  else launch_type<false>(launch, stream);
}

}  // namespace hysparse::cuda
