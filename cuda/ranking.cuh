#pragma once
// Ranking a row's entries on the device, as rank_top ranks them on the host: higher score first, ties to
// the lower index. One thread block of kRankingThreads ranks one row (rank_row): a row that fits the block's
// shared memory is held there, and sorted whole (a bitonic network) unless its top `count` is a small part of
// it, which is selected first (a radix select) and sorted; a longer row has its top count selected with its
// keys recomputed each pass. Shared by the block-mass and Quest rankings
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
// entries; longer ones have their top count selected first (recomputing their keys: they do not fit).
constexpr long long kSortWholeEntries = 4096;

// Entries a row's ranking holds in shared memory: all its blocks, or its top count once selected.
__host__ __device__ __forceinline__ bool sorts_whole(long long blocks, long long count) {
  const long long whole = padded_size(blocks);
  return whole <= kSortWholeEntries || whole <= padded_size(count);
}

// A row held whole in shared memory still has its top count selected before the sort where the count's
// padded length is at most 1/kSelectFraction of the row's: a select costs a few passes over the row, the
// sort log2(n)^2 / 2 of them (a 2,048-block row of 128K tokens ranked for a budget of 36 blocks: 8 radix
// passes and a sort of 64 entries instead of a sort of 2,048).
constexpr long long kSelectFraction = 4;
__host__ __device__ __forceinline__ bool selects_in_shared(long long entries, long long count) {
  return padded_size(count) * kSelectFraction <= padded_size(entries);
}

constexpr int kRadixBits = 8, kRadixBins = 1 << kRadixBits;
constexpr int kRankingWarps = kRankingThreads / 32;

// select_top's shared state (one per kernel: a kernel that selects two ways shares it).
struct SelectState {
  unsigned histogram[kRadixBins];
  unsigned long long prefix, mask;
  int wanted;   // of the keys beginning with prefix, how many are taken (the lowest-indexed)
  int settled;  // every key beginning with prefix is taken: no further pass needed
  int warp_above[kRankingWarps], warp_ties[kRankingWarps];
};

// The row's `count` best entries (key_at(i), i < entries; count <= entries) gathered into keys[0, count) and
// indices in index order (sort them with bitonic_rank). A radix select, most significant bits first, finds the
// bits the count-th highest key begins with (it stops once every key beginning so is taken); the keys above
// them and the lowest-indexed keys beginning with them are gathered. key_at is called again each pass and may
// read keys itself (a row held in shared memory): every chunk of the gather is read before any of it is
// written, and an entry goes to a slot no later than its own. Returns count.
template <typename KeyAt>
__device__ int select_top(KeyAt key_at, int entries, int count, unsigned long long* keys, int* indices, SelectState& state) {
  static_assert(kRadixBins == 32 * 8, "one warp scans the bins, eight a lane");
  unsigned* histogram = state.histogram;
  unsigned long long &prefix = state.prefix, &mask = state.mask;
  int &wanted = state.wanted, &settled = state.settled;
  int *warp_above = state.warp_above, *warp_ties = state.warp_ties;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  for (int b = tid; b < kRadixBins; b += kRankingThreads) histogram[b] = 0;
  if (tid == 0) {
    prefix = 0;
    mask = 0;
    wanted = count;
    settled = 0;
  }
  for (int shift = 64 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    __syncthreads();  // publishes the cleared bins, prefix, mask and settled
    if (settled) break;
    const unsigned long long under = prefix, under_mask = mask;
    // A warp's keys of one digit are counted by one atomic: the first passes see most keys in a bin or two.
    for (int start = 0; start < entries; start += kRankingThreads) {
      const int i = start + tid;
      const unsigned long long key = i < entries ? key_at(i) : 0;
      const bool counted = i < entries && (key & under_mask) == under;
      const unsigned digit = counted ? static_cast<unsigned>(key >> shift) & (kRadixBins - 1) : kRadixBins + lane;
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (counted && lane == __ffs(peers) - 1) atomicAdd(&histogram[digit], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l holds bins 255 - 8l down to 248 - 8l (lanes in order: the bins from the highest), reads
      // only those, and clears them for the next pass.
      const auto need = static_cast<unsigned>(wanted);
      unsigned bins[8], mine = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        bins[j] = histogram[kRadixBins - 1 - 8 * lane - j];
        histogram[kRadixBins - 1 - 8 * lane - j] = 0;
        mine += bins[j];
      }
      unsigned before = mine;  // inclusive scan over lanes, then made exclusive
      for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned other = __shfl_up_sync(0xffffffffu, before, offset);
        if (lane >= offset) before += other;
      }
      before -= mine;
      __syncwarp();  // every lane has read `wanted` before one writes it
      if (before < need && need <= before + mine) {  // exactly one lane: the count-th key's bins
        unsigned seen = before, chosen_count = 0;
        int chosen = -1;
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // unrolled: bins stay in registers
          if (chosen < 0) {
            if (seen + bins[j] >= need) {
              chosen = j;
              chosen_count = bins[j];
            } else {
              seen += bins[j];
            }
          }
        }
        wanted = static_cast<int>(need - seen);
        settled = chosen_count == need - seen;
        prefix = under | (static_cast<unsigned long long>(kRadixBins - 1 - 8 * lane - chosen) << shift);
        mask = under_mask | (static_cast<unsigned long long>(kRadixBins - 1) << shift);
      }
    }
  }
  __syncthreads();
  const unsigned long long threshold = prefix, threshold_mask = mask;
  const int ties = wanted;
  // In index order, chunk by chunk: an entry's slot counts the entries taken before it (above, and the
  // lowest-indexed ties up to `ties`); the bases are the same in every thread.
  int above_base = 0, tie_base = 0;
  for (int start = 0; start < entries; start += kRankingThreads) {
    const int i = start + tid;
    const unsigned long long key = i < entries ? key_at(i) : 0;
    const unsigned long long head = key & threshold_mask;
    const bool above = i < entries && head > threshold, tie = i < entries && head == threshold;
    const unsigned above_ballot = __ballot_sync(0xffffffffu, above), tie_ballot = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) {
      warp_above[warp] = __popc(above_ballot);
      warp_ties[warp] = __popc(tie_ballot);
    }
    __syncthreads();  // the chunk's keys are read: its slots may be written
    const unsigned lower_lanes = (1u << lane) - 1u;
    int above_rank = above_base + __popc(above_ballot & lower_lanes), tie_rank = tie_base + __popc(tie_ballot & lower_lanes);
    for (int w = 0; w < kRankingWarps; ++w) {
      if (w < warp) {
        above_rank += warp_above[w];
        tie_rank += warp_ties[w];
      }
      above_base += warp_above[w];
      tie_base += warp_ties[w];
    }
    if (above || (tie && tie_rank < ties)) {
      const int slot = above_rank + min(tie_rank, ties);
      keys[slot] = key;
      indices[slot] = i;
    }
    __syncthreads();  // the warp counts are read, and the slots written, before the next chunk
  }
  return count;
}

// Ranks a row of `entries` keys (key_at(i)) in the thread block's shared memory of `capacity` entries:
// afterwards keys/indices [0, min(count, entries)) hold its first entries in rank_top's order. A row of at
// most `capacity` entries is held whole (its keys computed once), and has its top count selected first
// where selects_in_shared says so and `select` allows (tests and benchmarks compare both); a longer one
// (count <= capacity) has it selected with its keys recomputed each pass. Returns min(count, entries).
template <typename KeyAt>
__device__ int rank_row(KeyAt key_at, int entries, int count, int capacity, unsigned long long* keys, int* indices, bool select) {
  __shared__ SelectState state;
  const int written = min(count, entries);
  int filled = 0, padded = 0;
  if (entries <= capacity) {
    const bool select_first = select && written < entries && selects_in_shared(entries, written);
    for (int i = static_cast<int>(threadIdx.x); i < entries; i += kRankingThreads) {
      keys[i] = key_at(i);
      if (!select_first) indices[i] = i;
    }
    if (select_first) {  // select_top's first barrier publishes the keys
      filled = select_top([&](int i) { return keys[i]; }, entries, written, keys, indices, state);
      padded = static_cast<int>(padded_size(written));
    } else {
      filled = entries;
      padded = static_cast<int>(padded_size(entries));
    }
  } else {
    filled = select_top(key_at, entries, written, keys, indices, state);
    padded = static_cast<int>(padded_size(written));
  }
  // Entries past the row's (key 0, index INT_MAX) rank after every real one.
  for (int i = filled + static_cast<int>(threadIdx.x); i < padded; i += kRankingThreads) {
    keys[i] = 0;
    indices[i] = INT_MAX;
  }
  bitonic_rank(keys, indices, padded);
  return written;
}

// Shared memory for `capacity` entries (a key and an index each).
__host__ __device__ __forceinline__ std::size_t ranking_entry_bytes(int capacity) {
  return static_cast<std::size_t>(capacity) * (sizeof(unsigned long long) + sizeof(int));
}

}  // namespace hysparse::cuda
