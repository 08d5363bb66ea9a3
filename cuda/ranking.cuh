#pragma once
// Ranking a row's entries on the device, as rank_top ranks them on the host: higher score first, ties to
// the lower index. One thread block of kRankingThreads ranks one row: a row that fits the block's shared
// memory is sorted whole (a bitonic network); a longer one has its top `count` selected first (a radix
// select over the keys, recomputed each pass), then sorted. Shared by the block-mass and Quest rankings
// (block_ranking.cu) and the token-score rankings (token_scores.cu).
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>

namespace hysparse::cuda {

constexpr int kRankingThreads = 256;

// A double as an unsigned integer in the same order (-0 as +0: the host's comparisons tie them).
__device__ __forceinline__ unsigned long long order_key(double x) {
  if (x == 0.0) x = 0.0;
  const auto bits = static_cast<unsigned long long>(__double_as_longlong(x));
  return (bits >> 63) ? ~bits : bits | 0x8000000000000000ull;
}

// Higher key first, then the lower index: rank_top's order.
__device__ __forceinline__ bool ranks_before(unsigned long long key_a, int index_a, unsigned long long key_b, int index_b) {
  return key_a > key_b || (key_a == key_b && index_a < index_b);
}

// Sorts the thread block's entries [0, padded) in shared memory by a bitonic network; padded is a power
// of two, its entries beyond the row (key 0, index INT_MAX) rank after every real one. Entries written
// before the call are visible to every thread (each stage starts with a barrier), and the sorted ones
// after it.
__device__ inline void bitonic_rank(unsigned long long* keys, int* indices, int padded) {
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = static_cast<int>(threadIdx.x); i < padded / 2; i += kRankingThreads) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const unsigned long long key_lo = keys[lo], key_hi = keys[hi];
        const int index_lo = indices[lo], index_hi = indices[hi];
        // Sub-sequences alternate direction until the last merge, which runs forward.
        const bool forward = (lo & size) == 0;
        const bool swap = forward ? ranks_before(key_hi, index_hi, key_lo, index_lo) : ranks_before(key_lo, index_lo, key_hi, index_hi);
        if (swap) {
          keys[lo] = key_hi;
          keys[hi] = key_lo;
          indices[lo] = index_hi;
          indices[hi] = index_lo;
        }
      }
    }
  }
  __syncthreads();
}

// The least power of two >= n (n below 2^62).
__host__ __device__ __forceinline__ long long padded_size(long long n) {
  long long padded = 1;
  while (padded < n) padded <<= 1;
  return padded;
}

// A row is sorted whole while it needs no more room than selecting its top count would, or this many
// entries; longer ones have their top count selected first.
constexpr long long kSortWholeEntries = 4096;

// Entries a row's ranking sorts: all its blocks, or its top count once selected.
__host__ __device__ __forceinline__ bool sorts_whole(long long blocks, long long count) {
  const long long whole = padded_size(blocks);
  return whole <= kSortWholeEntries || whole <= padded_size(count);
}

constexpr int kRadixBits = 8, kRadixBins = 1 << kRadixBits;

// The row's `count` best entries (key_at(i), i < entries) gathered into keys[0, count) and indices (in no
// particular order; sort them with bitonic_rank): the count-th highest key is found by a radix select
// (eight passes of eight bits, most significant first, key_at called again each pass), then the keys above
// it and the lowest-indexed ones equal to it are gathered. Returns count.
template <typename KeyAt>
__device__ int select_top(KeyAt key_at, int entries, int count, unsigned long long* keys, int* indices) {
  __shared__ unsigned histogram[kRadixBins];
  __shared__ unsigned long long prefix;
  __shared__ int wanted;  // of the keys under the prefix, the rank (from the top) of the count-th
  __shared__ int above;
  __shared__ int warp_ties[kRankingThreads / 32];
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  if (tid == 0) {
    prefix = 0;
    wanted = count;
    above = 0;
  }
  unsigned long long mask = 0;
  for (int shift = 64 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = tid; b < kRadixBins; b += kRankingThreads) histogram[b] = 0;
    __syncthreads();
    const unsigned long long under = prefix;
    for (int i = tid; i < entries; i += kRankingThreads) {
      const unsigned long long key = key_at(i);
      if ((key & mask) == under) atomicAdd(&histogram[(key >> shift) & (kRadixBins - 1)], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      int seen = 0, bin = kRadixBins - 1;
      while (bin > 0 && seen + static_cast<int>(histogram[bin]) < wanted) seen += static_cast<int>(histogram[bin--]);
      wanted -= seen;
      prefix = under | (static_cast<unsigned long long>(bin) << shift);
    }
    mask |= static_cast<unsigned long long>(kRadixBins - 1) << shift;
    __syncthreads();
  }
  const unsigned long long threshold = prefix;
  const int ties = wanted, first_tie = count - wanted;  // keys above the threshold fill [0, first_tie)
  // In index order, chunk by chunk, so that the ties taken are the lowest-indexed ones (tie_base: ties in
  // the chunks before, the same in every thread).
  int tie_base = 0;
  for (int start = 0; start < entries; start += kRankingThreads) {
    const int i = start + tid;
    const unsigned long long key = i < entries ? key_at(i) : 0;
    if (i < entries && key > threshold) {
      const int slot = atomicAdd(&above, 1);
      if (slot < first_tie) {  // always (the select counted them); a guard on shared memory all the same
        keys[slot] = key;
        indices[slot] = i;
      }
    }
    const bool tie = i < entries && key == threshold;
    const unsigned ballot = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    int rank = tie_base + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < kRankingThreads / 32; ++w) {
      if (w < warp) rank += warp_ties[w];
      tie_base += warp_ties[w];
    }
    if (tie && rank < ties) {
      keys[first_tie + rank] = key;
      indices[first_tie + rank] = i;
    }
    __syncthreads();  // warp_ties is read by every thread before the next chunk writes it
  }
  __syncthreads();
  return count;
}

// Shared memory for `capacity` entries (a key and an index each).
__host__ __device__ __forceinline__ std::size_t ranking_entry_bytes(int capacity) {
  return static_cast<std::size_t>(capacity) * (sizeof(unsigned long long) + sizeof(int));
}

}  // namespace hysparse::cuda
