// The token scores of the channel-restricted and low-rank proxies on the device (Backend::
// token_score_rankings: selectors doublesparsity, loki, sparq; proxy::token_score_rankings is the
// definition). A row at position t scores t + 1 keys with terms x channels multiply-adds in double each,
// then ranks its blocks: T^2 / 2 rows x keys a head over every row, the largest host cost of these selectors.
// Two kernels: scores (a thread block serves up to kMaxScoreRows rows of one set, so that each key chunk is
// read once for all of them; each block's largest score kept in a workspace), then one thread block per
// (set, row) ranks its blocks (ranking.cuh).
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>

#include "common/error.hpp"
#include "device_statistics.hpp"
#include "ranking.cuh"

namespace hysparse::cuda {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kKeyChunk = 32;                          // keys staged at once: one per lane
constexpr int kMaxScoreRows = kScoreThreads / 32 * 4;  // rows a score block serves: four a warp
// Shared memory for the rows' weights, channels and divisors; fewer rows a block where a row's take more.
constexpr int kRowStagingBytes = 48 * 1024;
// A score block's most shared memory (wide keys), within the device's limit (TokenScoreArgs::shared_bytes).
constexpr std::size_t kMaxScoreSharedBytes = 160 * 1024;
std::size_t score_shared_limit(std::size_t device_bytes) { return std::min(kMaxScoreSharedBytes, device_bytes); }

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA {}: {}", what, cudaGetErrorString(status));
}

// Odd, so that the lanes of a warp (consecutive keys) read a channel from distinct banks.
__host__ __device__ __forceinline__ int key_pitch(int width) { return width | 1; }

// Shared memory of a score block: the key chunk, then per row its tokens, terms (weights, channels,
// divisors) and position.
std::size_t score_shared_bytes(const TokenScoreArgs& a, int rows_per_block) {
  const auto rows = static_cast<std::size_t>(rows_per_block), terms = static_cast<std::size_t>(a.terms);
  const std::size_t per_row = kKeyChunk * sizeof(double) + terms * static_cast<std::size_t>(a.channels) * (sizeof(double) + sizeof(int)) +
                              terms * sizeof(double) + sizeof(long long);
  return static_cast<std::size_t>(kKeyChunk) * key_pitch(a.width) * sizeof(double) + rows * per_row;
}

// Rows a score block serves: up to kMaxScoreRows, fewer where their terms would take more than
// kRowStagingBytes; 0 where not even one row fits the shared memory (the kernel declares none statically).
int rows_per_score_block(const TokenScoreArgs& a) {
  const std::size_t limit = score_shared_limit(a.shared_bytes);
  if (score_shared_bytes(a, 1) > limit) return 0;
  int rows = kMaxScoreRows;
  while (rows > 1 && (score_shared_bytes(a, rows) - score_shared_bytes(a, 0) > static_cast<std::size_t>(kRowStagingBytes) ||
                      score_shared_bytes(a, rows) > limit)) {
    --rows;
  }
  return rows;
}

template <bool kFused>
__global__ void __launch_bounds__(kScoreThreads) token_score_kernel(const TokenScoreArgs a, int rows_per_block) {
  extern __shared__ double shared[];
  const int pitch = key_pitch(a.width), per_row = a.terms * a.channels;
  double* keys = shared;                                      // [kKeyChunk][pitch]
  double* tokens = keys + kKeyChunk * pitch;                  // [rows_per_block][kKeyChunk]
  double* weight = tokens + rows_per_block * kKeyChunk;       // [rows_per_block][terms][channels]
  double* divisor = weight + rows_per_block * per_row;        // [rows_per_block][terms]
  long long* position = reinterpret_cast<long long*>(divisor + rows_per_block * a.terms);  // [rows_per_block]
  int* channel = reinterpret_cast<int*>(position + rows_per_block);                     // [rows_per_block][terms][channels]
  const int set = static_cast<int>(blockIdx.y), tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int first = a.row_begin + static_cast<int>(blockIdx.x) * rows_per_block;  // of the request
  const int rows = min(rows_per_block, a.row_begin + a.rows - first);
  const long long source = (static_cast<long long>(set) * a.total_rows + first) * per_row;
  for (int i = tid; i < rows * per_row; i += kScoreThreads) {
    weight[i] = a.weight[source + i];
    channel[i] = a.channel[source + i];
  }
  for (int i = tid; i < rows * a.terms; i += kScoreThreads) {
    divisor[i] = a.divisor ? a.divisor[(static_cast<long long>(set) * a.total_rows + first) * a.terms + i] : 1.0;
  }
  for (int i = tid; i < rows; i += kScoreThreads) position[i] = a.positions[first + i];
  __syncthreads();
  const long long last = position[rows - 1], block = a.block;
  // The workspace's rows: [set][row - row_begin][num_blocks].
  double* row_scores = a.scores + (static_cast<long long>(set) * a.rows + (first - a.row_begin)) * a.num_blocks;
  for (long long c0 = 0; c0 <= last; c0 += kKeyChunk) {
    for (int i = tid; i < kKeyChunk * a.width; i += kScoreThreads) {
      const int key = i / a.width, c = i % a.width;
      const long long at = (c0 + key) * a.width + c;
      keys[key * pitch + c] = c0 + key > last ? 0.0 : a.keys32 ? static_cast<double>(a.keys32[at]) : a.keys[at];
    }
    __syncthreads();
    const long long j = c0 + lane;
    for (int r = warp; r < rows; r += kScoreThreads / 32) {
      const long long t = position[r];
      if (j > t) continue;
      const double* w = weight + r * per_row;
      const int* ch = channel + r * per_row;
      const double* key = keys + lane * pitch;
      double score = 0.0;
      for (int u = 0; u < a.terms; ++u) {
        double dot = 0.0;
        for (int i = 0; i < a.channels; ++i) {
          const double x = w[u * a.channels + i], k = key[ch[u * a.channels + i]];
          dot = kFused ? __fma_rn(x, k, dot) : __dadd_rn(dot, __dmul_rn(x, k));
        }
        const double value = a.divisor ? __ddiv_rn(dot, divisor[r * a.terms + u]) : dot;
        score = u == 0 ? value : __dadd_rn(score, value);
      }
      tokens[r * kKeyChunk + lane] = j > t - a.local ? CUDART_INF : score;
    }
    __syncthreads();
    // Each block the chunk reaches: its keys here in order after what earlier chunks kept (max_over_blocks's
    // order: the first larger score replaces, ties keep the earlier).
    const long long first_block = c0 / block, spans = (c0 + kKeyChunk - 1) / block - first_block + 1;
    for (long long p = tid; p < rows * spans; p += kScoreThreads) {
      const int r = static_cast<int>(p / spans);
      const long long b = first_block + p % spans, t = position[r];
      if (c0 > t || b > min(c0 + kKeyChunk - 1, t) / block) continue;
      const long long begin = max(b * block, c0), end = min(min((b + 1) * block, c0 + kKeyChunk), t + 1);
      double* cell = row_scores + static_cast<long long>(r) * a.num_blocks + b;
      double best = b * block >= c0 ? -CUDART_INF : *cell;
      for (long long k = begin; k < end; ++k) {
        const double x = tokens[r * kKeyChunk + (k - c0)];
        best = best < x ? x : best;
      }
      *cell = best;
    }
    __syncthreads();  // the next chunk overwrites keys and tokens, and reads the cells written here
  }
}

__global__ void __launch_bounds__(kRankingThreads) token_ranking_kernel(const TokenScoreArgs a, int capacity) {
  extern __shared__ unsigned long long ranking_keys[];  // [capacity], then int indices[capacity]
  int* indices = reinterpret_cast<int*>(ranking_keys + capacity);
  const int set = static_cast<int>(blockIdx.x) / a.rows, r = static_cast<int>(blockIdx.x) % a.rows;
  const int row = a.row_begin + r;
  const long long blocks = a.positions[row] / a.block + 1, count = a.counts[row];
  if (count == 0) return;
  const double* scores = a.scores + (static_cast<long long>(set) * a.rows + r) * a.num_blocks;
  auto key_at = [&](int i) { return order_key(scores[i]); };
  rank_row(key_at, static_cast<int>(blocks), static_cast<int>(count), capacity, ranking_keys, indices, true);
  int* order = a.order + (static_cast<long long>(set) * a.total_rows + row) * a.stride;
  for (int i = static_cast<int>(threadIdx.x); i < count; i += kRankingThreads) order[i] = indices[i];
}

}  // namespace

bool token_scores_fit(const TokenScoreArgs& args) { return rows_per_score_block(args) > 0; }

void configure_token_score_kernels(std::size_t shared_bytes) {
  for (const void* kernel : {reinterpret_cast<const void*>(token_score_kernel<true>), reinterpret_cast<const void*>(token_score_kernel<false>)}) {
    cudaFuncAttributes attributes{};
    check(cudaFuncGetAttributes(&attributes, kernel), "token score kernel attributes");
    if (attributes.sharedSizeBytes != 0) {
      fail(ErrorKind::kInternal, "the token score kernel declares {} bytes of static shared memory; its launches assume none",
           attributes.sharedSizeBytes);
    }
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(score_shared_limit(shared_bytes))),
          "token score shared memory");
  }
  cudaFuncAttributes attributes{};
  check(cudaFuncGetAttributes(&attributes, token_ranking_kernel), "token ranking kernel attributes");
  if (attributes.sharedSizeBytes > kRankingStaticBytes) {
    fail(ErrorKind::kInternal, "the token ranking kernel declares {} bytes of static shared memory, more than the {} its launches leave",
         attributes.sharedSizeBytes, kRankingStaticBytes);
  }
  check(cudaFuncSetAttribute(token_ranking_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(ranking_entry_bytes(static_cast<int>(ranked_prefix_limit(shared_bytes))))),
        "token ranking shared memory");
}

void launch_token_score_rankings(const TokenScoreArgs& args, const long long* host_positions, const long long* host_counts,
                                 cudaStream_t stream) {
  const int rows_per_block = rows_per_score_block(args);
  const std::size_t shared = score_shared_bytes(args, std::max(rows_per_block, 1));
  long long capacity = 1;
  bool valid = rows_per_block > 0 && (args.keys == nullptr) != (args.keys32 == nullptr) && args.rows > 0 && args.row_begin >= 0 && args.row_begin + args.rows <= args.total_rows && args.sets > 0 &&
               args.terms > 0 && args.channels > 0 && args.width > 0 && args.block > 0 && args.local >= 0 &&
               shared <= score_shared_limit(args.shared_bytes) && args.prefix_limit <= kMaxRankedPrefix;
  for (int r = args.row_begin; valid && r < args.row_begin + args.rows; ++r) {
    const long long blocks = host_positions[r] / args.block + 1, count = host_counts[r];
    valid = blocks <= args.num_blocks && count >= 0 && count <= blocks && count <= args.prefix_limit && count <= args.stride;
    if (valid && count > 0) capacity = std::max(capacity, sorts_whole(blocks, count) ? padded_size(blocks) : padded_size(count));
  }
  if (!valid) {
    fail(ErrorKind::kInternal, "token-score rankings of rows [{}, {}) of {}, {} sets x {} terms x {} channels of {}, block {}, "
         "{} blocks a row, stride {}, {} bytes of shared memory", args.row_begin, args.row_begin + args.rows, args.total_rows,
         args.sets, args.terms, args.channels, args.width, args.block, args.num_blocks, args.stride, shared);
  }
  const dim3 score_grid(static_cast<unsigned>((args.rows + rows_per_block - 1) / rows_per_block), static_cast<unsigned>(args.sets));
  if (args.fused) {
    token_score_kernel<true><<<score_grid, kScoreThreads, shared, stream>>>(args, rows_per_block);
  } else {
    token_score_kernel<false><<<score_grid, kScoreThreads, shared, stream>>>(args, rows_per_block);
  }
  check(cudaGetLastError(), "token score kernel launch");
  const auto cells = static_cast<unsigned>(static_cast<long long>(args.sets) * args.rows);
  token_ranking_kernel<<<cells, kRankingThreads, ranking_entry_bytes(static_cast<int>(capacity)), stream>>>(args, static_cast<int>(capacity));
  check(cudaGetLastError(), "token ranking kernel launch");
}

}  // namespace hysparse::cuda
