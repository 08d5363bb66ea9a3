#pragma once
// A block-wide reduction for kernels whose threads all need the result (H2O's softmax, the received
// attention's log-sum-exp): the same tree whatever the data, so the same bits on every run.
#include <cuda_runtime.h>

namespace hysparse::cuda {

// Every thread of a block of kWarps warps gets combine() of v over all of them: butterfly shuffles
// within each warp, then the warps' results in warp order. `scratch` holds kWarps values; a barrier
// first lets the previous reduction's readers finish with it.
template <int kWarps, typename Combine>
__device__ __forceinline__ double block_reduce(double v, double* scratch, Combine combine) {
  for (int offset = 16; offset > 0; offset /= 2) v = combine(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kWarps; ++w) v = combine(v, scratch[w]);
  return v;
}

}  // namespace hysparse::cuda
