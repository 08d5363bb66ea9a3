#pragma once
// Random TokenScoreRequests that own their arrays, for the host and device tests of
// Backend::token_score_rankings: any number of sets, terms and channels, implicit or given channels,
// divisors or none, fp32 or double keys, and `ties` inputs drawn from {-1, 0, 1} so that many scores and
// block maxima tie exactly.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "common/random.hpp"

namespace hysparse::reference {

struct TokenScoreShape {
  std::int64_t seq_len = 50, width = 6, sets = 2, terms = 1, channels = 3;
  std::int64_t block = 1, local = 0;
  bool given_channels = true, divisors = false, double_keys = false, ties = false;
  std::int64_t row_step = 3;  // rows drawn with gaps of 1 .. row_step, from position 0
  std::int64_t count_cap = 0;  // > 0: counts at most this (else anywhere in 0 .. blocks of the row)
};

struct OwnedTokenScoreRequest {
  TokenScoreRequest request;
  std::vector<float> keys;
  std::vector<double> keys64, weight, divisor;
  std::vector<std::int32_t> channel;
  std::vector<std::int64_t> rows, counts;
  OwnedTokenScoreRequest() = default;
  OwnedTokenScoreRequest(const OwnedTokenScoreRequest&) = delete;  // the request points into the arrays
  OwnedTokenScoreRequest& operator=(const OwnedTokenScoreRequest&) = delete;
};

// Fills `out` (its request pointing into its arrays) for `shape`, drawn from `rng`; fused is the request's flag.
inline void random_token_score_request(const TokenScoreShape& shape, Rng& rng, bool fused, OwnedTokenScoreRequest& out) {
  auto draw = [&] { return shape.ties ? static_cast<double>(static_cast<std::int64_t>(rng.below(3)) - 1) : rng.normal(); };
  const std::int64_t T = shape.seq_len, W = shape.width;
  out.rows.clear();
  for (std::int64_t t = static_cast<std::int64_t>(rng.below(2)); t < T; t += 1 + static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(shape.row_step)))) {
    out.rows.push_back(t);
  }
  if (out.rows.empty()) out.rows.push_back(T - 1);
  const auto R = static_cast<std::int64_t>(out.rows.size());
  out.counts.resize(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) {
    const std::int64_t blocks = out.rows[static_cast<std::size_t>(r)] / shape.block + 1;
    const std::int64_t cap = shape.count_cap > 0 ? std::min(blocks, shape.count_cap) : blocks;
    // Every row ranks at least one block but the first (0 blocks must work too), and some rank all of theirs.
    std::int64_t count = r == 0 ? 0 : 1 + static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(cap)));
    if (r % 5 == 4) count = cap;
    out.counts[static_cast<std::size_t>(r)] = count;
  }
  out.keys.clear();
  out.keys64.clear();
  if (shape.double_keys) {
    out.keys64.resize(static_cast<std::size_t>(T * W));
    for (double& x : out.keys64) x = draw();
  } else {
    out.keys.resize(static_cast<std::size_t>(T * W));
    for (float& x : out.keys) x = static_cast<float>(draw());
  }
  const auto weights = static_cast<std::size_t>(shape.sets * R * shape.terms * shape.channels);
  out.weight.resize(weights);
  for (double& x : out.weight) x = shape.ties ? draw() : static_cast<double>(static_cast<float>(draw()));
  out.channel.clear();
  if (shape.given_channels) {
    out.channel.resize(weights);
    for (auto& c : out.channel) c = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(W)));
  }
  out.divisor.clear();
  if (shape.divisors) {
    out.divisor.resize(static_cast<std::size_t>(shape.sets * R * shape.terms));
    for (double& x : out.divisor) x = 0.5 + 2.0 * rng.uniform();
  }
  TokenScoreRequest& q = out.request;
  q = TokenScoreRequest{};
  q.keys = shape.double_keys ? nullptr : out.keys.data();
  q.keys64 = shape.double_keys ? out.keys64.data() : nullptr;
  q.seq_len = T;
  q.width = W;
  q.sets = shape.sets;
  q.terms = shape.terms;
  q.channels = shape.channels;
  q.channel = shape.given_channels ? out.channel.data() : nullptr;
  q.weight = out.weight.data();
  q.divisor = shape.divisors ? out.divisor.data() : nullptr;
  q.rows = out.rows.data();
  q.num_rows = R;
  q.counts = out.counts.data();
  q.local = shape.local;
  q.block = shape.block;
  q.fused = fused;
}

}  // namespace hysparse::reference
