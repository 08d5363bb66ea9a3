#pragma once
// Primitives shared by the proxy selectors (and exercised directly by the property tests).
// Every score is computed in double with a fixed summation order (channels ascending, keys
// ascending), so that rankings do not depend on vectorisation or thread count and near-ties
// resolve like the float64 reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "backend/backend.hpp"
#include "common/error.hpp"
#include "common/interrupt.hpp"
#include "replay/selector.hpp"

namespace hysparse::proxy {

// One step of a dot product: fused wherever the CPU has FMA, written out so that every form of a sum
// (dot, dots, scalar or vectorised by the compiler) rounds alike; left to itself the compiler fuses
// some forms and not others.
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
constexpr bool kMultiplyAddFused = true;
#else
constexpr bool kMultiplyAddFused = false;
#endif
inline double multiply_add(double x, double y, double sum) {
  if constexpr (kMultiplyAddFused) return std::fma(x, y, sum);
  return sum + x * y;
}

// sum_c a[c] * b[c] in double, c ascending.
double dot(const float* a, const float* b, std::int64_t d);
double dot(const float* a, const double* b, std::int64_t d);

// out[i] = dot(a, key(i), d) for i < n, each summed exactly as dot() sums it (channels ascending),
// eight keys at a time: eight independent sums keep the multiply-add units busy where one sum waits
// on its previous addition (8x faster on long rows, same bits).
template <typename KeyAt>
void dots(const float* a, std::int64_t d, std::int64_t n, KeyAt key, double* out) {
  constexpr std::int64_t kLanes = 8;
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    decltype(key(i)) k[kLanes];
    double sum[kLanes];
    for (std::int64_t u = 0; u < kLanes; ++u) {
      k[u] = key(i + u);
      sum[u] = 0.0;
    }
    for (std::int64_t c = 0; c < d; ++c) {
      const double x = static_cast<double>(a[c]);
      for (std::int64_t u = 0; u < kLanes; ++u) sum[u] = multiply_add(x, static_cast<double>(k[u][c]), sum[u]);
    }
    for (std::int64_t u = 0; u < kLanes; ++u) out[i + u] = sum[u];
  }
  for (; i < n; ++i) out[i] = dot(a, key(i), d);
}

// Logits z_j of query head h at row t for keys j in [0, n): scale * q.k in double on a q/k layer,
// log p_j on a dense attn layer (-inf for p_j = 0).
void row_logits(const LayerContext& layer, std::int64_t h, std::int64_t t, std::int64_t n, std::vector<double>& z);
// Backend::attention_received's definition (the host's computation, parallel over heads): logits from
// blocked double GEMMs of 64 query rows, each row's maximum and sum of exponentials in key order.
// Stops early, leaving partial sums, once request.stop_requested (where given) says so.
void attention_received(const ReceivedRequest& request, std::vector<double>& received);
// log(exp(sink) + sum_{j<n} exp(z_j)) (the sink term only when has_sink).
double log_partition(const double* z, std::int64_t n, bool has_sink, double sink);

// H2O's cache for one set of query heads and one budget (Backend::H2oRequest says what each step does):
// evicted[j] = the first step whose cache no longer holds key j, INT32_MAX if none, j < seq_len.
// capacity[t], t < seq_len - 1: the cache size of step t + 1, current key included. logits(h, t, cache, z)
// fills z[i] with the logit of the set's query head h at t for key cache[i]; sink_logits: [heads] or nullptr.
// A signal (common/interrupt.hpp) stops it early, evictions unfinished: the caller checks interrupted() after.
template <typename Logits>
void h2o_simulate(std::int64_t seq_len, std::int64_t heads, const std::int64_t* capacity, std::int64_t recent_percent,
                  const double* sink_logits, Logits logits, std::int32_t* evicted) {
  std::fill(evicted, evicted + seq_len, std::numeric_limits<std::int32_t>::max());
  std::vector<std::int64_t> cache;
  std::vector<double> score(static_cast<std::size_t>(seq_len), 0.0), z;
  for (std::int64_t t = 0; t < seq_len; ++t) {
    if (t % 256 == 0 && interrupted()) return;  // minutes at long contexts: a signal must not wait for them
    cache.push_back(t);
    for (std::int64_t h = 0; h < heads; ++h) {
      logits(h, t, cache, z);
      const double lse = log_partition(z.data(), static_cast<std::int64_t>(z.size()), sink_logits != nullptr,
                                       sink_logits ? sink_logits[h] : 0.0);
      for (std::size_t i = 0; i < cache.size(); ++i) score[static_cast<std::size_t>(cache[i])] += std::exp(z[i] - lse);
    }
    if (t + 1 == seq_len) break;
    const std::int64_t cap = capacity[t];
    const std::int64_t recent = cap * recent_percent / 100;
    const std::int64_t protected_from = t + 2 - recent;  // keys >= this stay (recent for step t+1)
    while (static_cast<std::int64_t>(cache.size()) > cap - 1) {
      std::size_t victim = cache.size();
      for (std::size_t i = 0; i < cache.size(); ++i) {
        if (cache[i] >= protected_from) continue;
        if (victim == cache.size() || score[static_cast<std::size_t>(cache[i])] <= score[static_cast<std::size_t>(cache[victim])]) victim = i;
      }
      if (victim == cache.size()) victim = 0;  // everything recent: the oldest goes
      evicted[cache[victim]] = static_cast<std::int32_t>(t + 1);
      cache.erase(cache.begin() + static_cast<std::ptrdiff_t>(victim));
    }
  }
}

// A new id for data a selector hands to a backend (NsaScoreRequest::keys_id): never 0, never reused in
// this process. Thread-safe.
std::uint64_t next_data_id();

// Backend::nsa_block_scores's definition (NsaScoreRequest says what it computes; request.fused must be
// kMultiplyAddFused), row by row on the calling thread.
void nsa_block_scores(const NsaScoreRequest& request, std::vector<double>& scores);
// The compressed keys a row at position t sees (NsaScoreRequest: each once all its keys are <= t).
std::int64_t nsa_visible_keys(const NsaScoreRequest& request, std::int64_t t);
// Backend::pooled_key_logits's definition (request.fused must be kMultiplyAddFused), row by row.
void pooled_key_logits(const NsaScoreRequest& request, std::vector<double>& logits);
// The pooled-key logits of `request`'s rows in consecutive chunks of rows, each of at most max_logits
// logits (at least one row), from `backend` where it offers them (Backend::pooled_key_logits), else from
// pooled_key_logits: visit(first_row, rows, width, logits) sees logits[(h * rows + r) * width + i] of
// request rows first_row .. first_row + rows - 1. Error(kInternal) naming `who` when a backend's answer
// has the wrong size.
template <typename Visit>
void pooled_key_logits_in_chunks(const Backend* backend, const NsaScoreRequest& request, std::int64_t max_logits,
                                 const char* who, Visit&& visit) {
  const std::int64_t R = request.num_rows;
  if (R <= 0) return;
  const std::int64_t widest = std::max<std::int64_t>(1, nsa_visible_keys(request, request.rows[R - 1]));
  const std::int64_t chunk = std::max<std::int64_t>(1, max_logits / (std::max<std::int64_t>(1, request.heads) * widest));
  NsaScoreRequest part = request;
  std::vector<double> logits;
  for (std::int64_t r0 = 0; r0 < R; r0 += chunk) {
    part.rows = request.rows + r0;
    part.num_rows = std::min(chunk, R - r0);
    if (!backend || !backend->pooled_key_logits(part, logits)) pooled_key_logits(part, logits);
    const std::int64_t width = nsa_visible_keys(part, part.rows[part.num_rows - 1]);
    if (logits.size() != static_cast<std::size_t>(part.heads * part.num_rows * width)) {
      throw Error(ErrorKind::kInternal, fmt::format("{}: {} pooled-key logits for {} heads x {} rows of up to {} keys", who,
                                                    logits.size(), part.heads, part.num_rows, width));
    }
    visit(r0, part.num_rows, width, static_cast<const std::vector<double>&>(logits));
  }
}

// Backend::token_score_rankings's definition (TokenScoreRequest says what it ranks; request.fused must be
// kMultiplyAddFused): order resized to sets * num_rows * token_score_stride(request). Error(kInternal) on a
// request that breaks TokenScoreRequest's contract.
void token_score_rankings(const TokenScoreRequest& request, std::vector<std::int32_t>& order);
// A request for the rows of a selector's tile: rows, counts (each row's ranking length capped at its causal
// blocks of `block` keys, written into `counts`), block, KV head and this build's multiply-add; the caller gives
// the keys and the rows' terms.
TokenScoreRequest tile_token_score_request(const RankContext& context, std::int64_t block, std::vector<std::int64_t>& counts);
// The row stride of token_score_rankings's order: the largest count (0 without rows).
std::int64_t token_score_stride(const TokenScoreRequest& request);
// `request`'s rankings from `backend` where it offers them (Backend::token_score_rankings), else from
// token_score_rankings, into out (reset to request.sets x num_rows x stride, each row's length its count).
// Error(kInternal) naming `who` when a backend's answer has the wrong size.
void token_score_rankings(const Backend* backend, const TokenScoreRequest& request, std::int64_t stride, const char* who,
                          Rankings& out);

// True probabilities p_j, j = 0..t, of query head h at t (sink logit in the denominator).
void row_probabilities(const LayerContext& layer, std::int64_t h, std::int64_t t, std::vector<double>& p);

// out[b] = max over the causal tokens [bB, min((b+1)B, tokens)) of token[j].
void max_over_blocks(const double* token, std::int64_t tokens, std::int64_t block, double* out);

// 1-D pooling with stride 1 and padding kernel/2 (max, or average over the kernel with zero padding
// as torch's avg_pool1d with count_include_pad).
std::vector<double> pool1d(const std::vector<double>& scores, std::int64_t kernel, bool max);

// Quest's bound sum_i max(q_i * hi_i, q_i * lo_i) for a page with per-channel key minima lo and maxima hi:
// at least q . k for every key k of the page.
double quest_bound(const float* q, const double* lo, const double* hi, std::int64_t d);

// Per-channel min and max of `count` keys starting at `keys` (row-major, d channels).
void channel_bounds(const float* keys, std::int64_t count, std::int64_t d, double* lo, double* hi);
// Mean of `count` keys starting at `keys`.
void mean_key(const float* keys, std::int64_t count, std::int64_t d, double* out);

// The r largest of `stat` (ties to the lower index), returned in ascending channel order.
std::vector<std::int64_t> top_channels(const std::vector<double>& stat, std::int64_t r);

// Top-r principal directions of the rows (keys) given, as columns of a d x r row-major matrix:
// eigenvectors of the centred covariance with the largest eigenvalues. Keys are not centred
// when projected (Loki).
std::vector<double> principal_components(const std::vector<const float*>& keys, std::int64_t d, std::int64_t r);

// MagicPIG's SimHash collision probability: with u = 1 - arccos(cos)/pi, the probability that
// K bits agree in at least 2 of L tables: 1 - (1 - u^K)^L - L u^K (1 - u^K)^(L-1).
double simhash_sample_probability(double cosine, std::int64_t bits, std::int64_t tables);
// The SimHash codes of n vectors (x_t: [d][n], channel-major) in one table into codes[0, n): bit b (b < 32) of a
// code set when hyperplane (table*K + b) . x > 0, each sum in channel order, each step multiply_add; the vectors'
// sums side by side, which the compiler vectorises.
void simhash_codes(const double* x_t, std::int64_t n, const std::vector<double>& planes, std::int64_t d, std::int64_t table,
                   std::int64_t bits, std::uint32_t* codes);
// Gaussian hyperplanes [K*L][d] for one KV head (deterministic in seed and KV head).
std::vector<double> simhash_planes(std::uint64_t seed, std::int64_t kv_head, std::int64_t d, std::int64_t count);

// Rankings recorded at one layer and reused by later layers (HySparse's block reuse and the
// token-level reuse selector share this): per set and evaluated row, the ranked blocks.
// Sets are KV groups (shared selection) or query heads (per-head selection).
class CrossLayerStore {
 public:
  enum class Score { kMax, kMass };       // block max probability P_b, or block mass M_b
  enum class Group { kMax, kSum, kNone };  // over a KV group's heads; kNone: one ranking per query head
  // `max_block`: blocks of the longest row (ranked block indices are below it; checkpoints are checked).
  void reset(std::int64_t num_sets, std::int64_t rows, std::int64_t stride, std::int64_t max_block);
  // Ranks the causal blocks of every row of the tile by the view's statistics and stores the
  // first ranking_length[r] of them.
  void record(const RankContext& context, Score score, Group group);
  // The stored rankings of the tile's rows (one set per KV group, or the group's query heads).
  void recall(const RankContext& context, Group group, Rankings& out) const;
  // Checkpoints: lengths then rankings, as one array; restore() takes it back after reset().
  std::vector<std::int32_t> state() const;
  void restore(const std::vector<std::int32_t>& state);

 private:
  std::int64_t rows_ = 0, stride_ = 1, max_block_ = 0;
  std::vector<std::int32_t> stored_, length_;  // [set][row][stride]
};

}  // namespace hysparse::proxy
