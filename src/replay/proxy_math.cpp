#include "replay/proxy_math.hpp"

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/error.hpp"
#include "common/random.hpp"

namespace hysparse::proxy {
namespace {
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kPi = 3.14159265358979323846;
}  // namespace

double dot(const float* a, const float* b, std::int64_t d) {
  double sum = 0.0;
  for (std::int64_t c = 0; c < d; ++c) sum = multiply_add(static_cast<double>(a[c]), static_cast<double>(b[c]), sum);
  return sum;
}

double dot(const float* a, const double* b, std::int64_t d) {
  double sum = 0.0;
  for (std::int64_t c = 0; c < d; ++c) sum = multiply_add(static_cast<double>(a[c]), b[c], sum);
  return sum;
}

void row_logits(const LayerContext& layer, std::int64_t h, std::int64_t t, std::int64_t n, std::vector<double>& z) {
  z.resize(static_cast<std::size_t>(n));
  if (!layer.has_qk) {
    const std::int64_t T = layer.seq_len();
    const float* p = layer.tensors->attn.data() + (h * T + t) * T;
    for (std::int64_t j = 0; j < n; ++j) z[static_cast<std::size_t>(j)] = p[j] > 0.0f ? std::log(static_cast<double>(p[j])) : kNegInf;
    return;
  }
  const std::int64_t d = layer.head_dim(), g = h / layer.header->group_size();
  const float* q = layer.q(h, t);
  const float* keys = layer.k(g, 0);
  dots(q, d, n, [&](std::int64_t j) { return keys + j * d; }, z.data());
  for (double& x : z) x *= layer.scale;
}

void attention_received(const ReceivedRequest& request, std::vector<double>& received) {
  const std::int64_t T = request.seq_len, d = request.head_dim, H = request.heads, G = H / request.kv_heads;
  const std::int64_t W = request.window;
  received.assign(static_cast<std::size_t>(H * T), 0.0);
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  // Keys of every KV head in double, once: logits come from blocked double GEMMs.
  std::vector<Eigen::MatrixXd> keys(static_cast<std::size_t>(request.kv_heads));
  for (std::int64_t g = 0; g < request.kv_heads; ++g) {
    keys[static_cast<std::size_t>(g)] = Eigen::Map<const RowMajor>(request.k + g * T * d, T, d).cast<double>();
  }
  constexpr std::int64_t kChunk = 64;
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t h = 0; h < H; ++h) {
    double* out = &received[static_cast<std::size_t>(h * T)];
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> Z;  // [rows][keys]
    const Eigen::MatrixXd& K = keys[static_cast<std::size_t>(h / G)];
    const bool has_sink = request.sink_logits != nullptr;
    const double sink = has_sink ? request.sink_logits[h] : 0.0;
    for (std::int64_t t0 = 0; t0 < T && W > 0; t0 += kChunk) {
      if (request.stop_requested && request.stop_requested()) break;  // O(T^2) a head: a signal must not wait for it
      const std::int64_t rows = std::min(kChunk, T - t0), width = t0 + rows;
      const Eigen::MatrixXd Q = Eigen::Map<const RowMajor>(request.q + (h * T + t0) * d, rows, d).cast<double>();
      // Row-major: each query's logits are contiguous for the passes over them below.
      Z.noalias() = Q * K.topRows(width).transpose();
      Z *= request.scale;
      for (std::int64_t i = 0; i < rows; ++i) {
        const std::int64_t t = t0 + i;
        double m = has_sink ? sink : -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j <= t; ++j) m = std::max(m, Z(i, j));
        double sum = has_sink ? std::exp(sink - m) : 0.0;
        for (std::int64_t j = 0; j <= t; ++j) sum += std::exp(Z(i, j) - m);
        const double lse = m + std::log(sum);
        for (std::int64_t j = std::max<std::int64_t>(0, t - W + 1); j <= t; ++j) out[j] += std::exp(Z(i, j) - lse);
      }
    }
  }
}

double log_partition(const double* z, std::int64_t n, bool has_sink, double sink) {
  double m = has_sink ? sink : kNegInf;
  for (std::int64_t j = 0; j < n; ++j) m = std::max(m, z[j]);
  if (m == kNegInf) return kNegInf;
  double sum = has_sink ? std::exp(sink - m) : 0.0;
  for (std::int64_t j = 0; j < n; ++j) sum += std::exp(z[j] - m);
  return m + std::log(sum);
}

std::uint64_t next_data_id() {
  static std::atomic<std::uint64_t> last{0};
  return ++last;
}

namespace {
void check_nsa_request(const NsaScoreRequest& request, const char* what) {
  if (request.num_rows <= 0 || request.stride < 1 || request.cmp < 1 || request.block < 1 ||
      request.block % request.stride != 0 || request.cmp % request.stride != 0 || request.compressed < 0 ||
      request.fused != kMultiplyAddFused) {
    throw Error(ErrorKind::kInternal, fmt::format("{}: {} rows, block {}, cmp {}, stride {}, {} compressed keys, fused {}", what,
                                                  request.num_rows, request.block, request.cmp, request.stride,
                                                  request.compressed, request.fused));
  }
}
}  // namespace

std::int64_t nsa_visible_keys(const NsaScoreRequest& request, std::int64_t t) {
  return t >= request.cmp - 1 ? std::min(request.compressed, (t - request.cmp + 1) / request.stride + 1) : 0;
}

void pooled_key_logits(const NsaScoreRequest& request, std::vector<double>& logits) {
  check_nsa_request(request, "pooled-key logits");
  const std::int64_t R = request.num_rows, d = request.head_dim, T = request.seq_len;
  const std::int64_t width = nsa_visible_keys(request, request.rows[R - 1]);
  logits.assign(static_cast<std::size_t>(request.heads * R * width), 0.0);
  for (std::int64_t h = 0; h < request.heads; ++h) {
    for (std::int64_t r = 0; r < R; ++r) {
      const std::int64_t t = request.rows[r];
      double* z = logits.data() + (h * R + r) * width;  // (data(): with no visible key the vector is empty)
      const std::int64_t visible = nsa_visible_keys(request, t);
      dots(request.q + (h * T + t) * d, d, visible, [&](std::int64_t i) { return request.keys + i * d; }, z);
      for (std::int64_t i = 0; i < visible; ++i) z[i] *= request.scale;
    }
  }
}

void nsa_block_scores(const NsaScoreRequest& request, std::vector<double>& scores) {
  check_nsa_request(request, "NSA scores");
  const std::int64_t R = request.num_rows, d = request.head_dim, T = request.seq_len;
  const std::int64_t blocks = request.rows[R - 1] / request.block + 1;
  const std::int64_t per_block = request.block / request.stride, per_window = request.cmp / request.stride;
  scores.assign(static_cast<std::size_t>(R * blocks), 0.0);
  std::vector<double> p;
  for (std::int64_t r = 0; r < R; ++r) {
    const std::int64_t t = request.rows[r], row_blocks = t / request.block + 1;
    // Compressed key i (keys [i*stride, i*stride + cmp)) is visible once all its keys are.
    const std::int64_t visible = nsa_visible_keys(request, t);
    double* row = &scores[static_cast<std::size_t>(r * blocks)];
    for (std::int64_t h = 0; h < request.heads && visible > 0; ++h) {
      const float* q = request.q + (h * T + t) * d;
      p.resize(static_cast<std::size_t>(visible));
      dots(q, d, visible, [&](std::int64_t i) { return request.keys + i * d; }, p.data());
      for (double& z : p) z *= request.scale;
      const double lse = log_partition(p.data(), visible, false, 0.0);
      // Each compressed key's probability, once (a key's window overlaps several blocks).
      for (double& z : p) z = std::exp(z - lse);
      // p_slc[b] = sum_{m < block/stride} sum_{n < cmp/stride} p_cmp[(block/stride) b + m - n]: compressed key i
      // counts once per stride-long piece of its window inside block b (summed in ascending i).
      for (std::int64_t b = 0; b < row_blocks; ++b) {
        double sum = 0.0;
        const std::int64_t first = std::max<std::int64_t>(0, per_block * b - (per_window - 1));
        const std::int64_t last = std::min(visible, per_block * (b + 1));
        for (std::int64_t i = first; i < last; ++i) {
          const std::int64_t pieces = std::min(i + per_window, per_block * (b + 1)) - std::max(i, per_block * b);
          sum += static_cast<double>(pieces) * p[static_cast<std::size_t>(i)];
        }
        row[b] += sum;
      }
    }
  }
}

void row_probabilities(const LayerContext& layer, std::int64_t h, std::int64_t t, std::vector<double>& p) {
  row_logits(layer, h, t, t + 1, p);
  if (!layer.has_qk) {  // dense layers store the probabilities themselves
    for (double& x : p) x = std::exp(x);
    return;
  }
  const double lse = log_partition(p.data(), t + 1, layer.has_sinks(), layer.has_sinks() ? layer.sink_logit(h) : 0.0);
  for (double& x : p) x = std::exp(x - lse);
}

void max_over_blocks(const double* token, std::int64_t tokens, std::int64_t block, double* out) {
  const std::int64_t blocks = (tokens + block - 1) / block;
  for (std::int64_t b = 0; b < blocks; ++b) {
    double best = kNegInf;
    for (std::int64_t j = b * block; j < std::min((b + 1) * block, tokens); ++j) best = std::max(best, token[j]);
    out[b] = best;
  }
}


TokenScoreRequest tile_token_score_request(const RankContext& context, std::int64_t block, std::vector<std::int64_t>& counts) {
  counts.resize(static_cast<std::size_t>(context.rows));
  for (std::int64_t r = 0; r < context.rows; ++r) {
    counts[static_cast<std::size_t>(r)] = std::min(context.ranking_length[r], context.view->causal_blocks(r));
  }
  TokenScoreRequest request;
  request.rows = context.positions;
  request.num_rows = context.rows;
  request.counts = counts.data();
  request.block = block;
  request.kv_head = context.kv_group;
  request.fused = kMultiplyAddFused;
  return request;
}

std::int64_t token_score_stride(const TokenScoreRequest& request) {
  std::int64_t stride = 0;
  for (std::int64_t r = 0; r < request.num_rows; ++r) stride = std::max(stride, request.counts[r]);
  return stride;
}

void token_score_rankings(const TokenScoreRequest& request, std::vector<std::int32_t>& order) {
  check_token_score_request(request);
  if (request.fused != kMultiplyAddFused) {
    throw Error(ErrorKind::kInternal, fmt::format("token-score rankings: the host sums with fused multiply-adds {}, the request asks {}",
                                                  kMultiplyAddFused ? "on" : "off", request.fused ? "on" : "off"));
  }
  const TokenScoreRequest& q = request;
  const std::int64_t R = q.num_rows, W = q.width, n_ch = q.channels, stride = token_score_stride(q);
  order.assign(static_cast<std::size_t>(q.sets * R * stride), 0);
  // The channels the request reads of the keys every row reads, channel-major (fp32 keys kept as fp32, widened
  // exactly at use): each channel's multiply-adds then run over consecutive keys, which the compiler vectorises
  // (every key's sum still steps through its channels in order).
  const std::int64_t keys_read = q.rows[R - 1] + 1;
  std::vector<std::int64_t> slot(static_cast<std::size_t>(W), -1);  // channel -> its row in the copy
  std::int64_t used = 0;
  const std::int64_t listed = q.sets * R * q.terms * n_ch;
  for (std::int64_t i = 0; i < (q.channel ? listed : n_ch); ++i) {
    std::int64_t& at = slot[static_cast<std::size_t>(q.channel ? q.channel[i] : i)];
    if (at < 0) at = used++;
  }
  std::vector<float> keys32_t(q.keys ? static_cast<std::size_t>(used * keys_read) : 0);
  std::vector<double> keys64_t(q.keys ? 0 : static_cast<std::size_t>(used * keys_read));
  for (std::int64_t j = 0; j < keys_read; ++j) {
    for (std::int64_t c = 0; c < W; ++c) {
      const std::int64_t at = slot[static_cast<std::size_t>(c)];
      if (at < 0) continue;
      const auto to = static_cast<std::size_t>(at * keys_read + j);
      if (q.keys) {
        keys32_t[to] = q.keys[j * W + c];
      } else {
        keys64_t[to] = q.keys64[j * W + c];
      }
    }
  }
  auto multiply_add_over_keys = [&](double x, std::int64_t channel, std::int64_t keys, double* sum) {
    const auto row = static_cast<std::size_t>(slot[static_cast<std::size_t>(channel)] * keys_read);
    if (q.keys) {
      const float* k = keys32_t.data() + row;
      for (std::int64_t j = 0; j < keys; ++j) sum[j] = multiply_add(x, static_cast<double>(k[j]), sum[j]);
    } else {
      const double* k = keys64_t.data() + row;
      for (std::int64_t j = 0; j < keys; ++j) sum[j] = multiply_add(x, k[j], sum[j]);
    }
  };
  std::vector<double> token, dot, scores;
  for (std::int64_t s = 0; s < q.sets; ++s) {
    for (std::int64_t r = 0; r < R; ++r) {
      const std::int64_t t = q.rows[r], keys = t + 1, cell = s * R + r;
      token.assign(static_cast<std::size_t>(keys), 0.0);
      for (std::int64_t u = 0; u < q.terms; ++u) {
        const std::int64_t term = cell * q.terms + u;
        const double* w = q.weight + term * n_ch;
        const std::int32_t* ch = q.channel ? q.channel + term * n_ch : nullptr;
        dot.assign(static_cast<std::size_t>(keys), 0.0);
        double* sum = dot.data();
        for (std::int64_t i = 0; i < n_ch; ++i) multiply_add_over_keys(w[i], ch ? ch[i] : i, keys, sum);
        double* score = token.data();
        if (q.divisor) {
          const double divisor = q.divisor[term];
          for (std::int64_t j = 0; j < keys; ++j) sum[j] /= divisor;
        }
        if (u == 0) {
          std::copy_n(sum, keys, score);
        } else {
          for (std::int64_t j = 0; j < keys; ++j) score[j] += sum[j];
        }
      }
      for (std::int64_t j = std::max<std::int64_t>(0, t - q.local + 1); j <= t; ++j) {
        token[static_cast<std::size_t>(j)] = std::numeric_limits<double>::infinity();
      }
      const std::int64_t blocks = t / q.block + 1;
      scores.resize(static_cast<std::size_t>(blocks));
      max_over_blocks(token.data(), keys, q.block, scores.data());
      rank_top(scores.data(), blocks, q.counts[r], order.data() + cell * stride);
    }
  }
}

void token_score_rankings(const Backend* backend, const TokenScoreRequest& request, std::int64_t stride, const char* who,
                          Rankings& out) {
  out.reset(request.sets, request.num_rows, stride);
  if (request.num_rows <= 0) return;
  std::vector<std::int32_t> order;
  if (!backend || !backend->token_score_rankings(request, order)) token_score_rankings(request, order);
  const std::int64_t R = request.num_rows, width = token_score_stride(request);
  if (order.size() != static_cast<std::size_t>(request.sets * R * width) || width > stride) {
    throw Error(ErrorKind::kInternal, fmt::format("{}: {} token-score rankings for {} sets x {} rows of up to {} blocks (room for {})",
                                                  who, order.size(), request.sets, R, width, stride));
  }
  for (std::int64_t s = 0; s < request.sets; ++s) {
    for (std::int64_t r = 0; r < R; ++r) {
      const std::int64_t count = request.counts[r];
      std::copy_n(order.data() + (s * R + r) * width, count, out.row(s, r));
      out.size(s, r) = static_cast<std::int32_t>(count);
    }
  }
}

std::vector<double> pool1d(const std::vector<double>& scores, std::int64_t kernel, bool max) {
  const auto n = static_cast<std::int64_t>(scores.size());
  const std::int64_t half = kernel / 2;
  std::vector<double> out(scores.size());
  for (std::int64_t j = 0; j < n; ++j) {
    // Window [j - half, j - half + kernel): centred for odd kernels, as torch's padding kernel//2.
    const std::int64_t lo = std::max<std::int64_t>(0, j - half), hi = std::min(n, j - half + kernel);
    double acc = max ? kNegInf : 0.0;
    for (std::int64_t i = lo; i < hi; ++i) acc = max ? std::max(acc, scores[static_cast<std::size_t>(i)]) : acc + scores[static_cast<std::size_t>(i)];
    out[static_cast<std::size_t>(j)] = max ? acc : acc / static_cast<double>(kernel);
  }
  return out;
}

double quest_bound(const float* q, const double* lo, const double* hi, std::int64_t d) {
  double sum = 0.0;
  for (std::int64_t c = 0; c < d; ++c) {
    const double qc = static_cast<double>(q[c]);
    sum += std::max(qc * hi[c], qc * lo[c]);
  }
  return sum;
}

void channel_bounds(const float* keys, std::int64_t count, std::int64_t d, double* lo, double* hi) {
  for (std::int64_t c = 0; c < d; ++c) {
    lo[c] = std::numeric_limits<double>::infinity();
    hi[c] = -std::numeric_limits<double>::infinity();
  }
  for (std::int64_t j = 0; j < count; ++j) {
    for (std::int64_t c = 0; c < d; ++c) {
      const double x = static_cast<double>(keys[j * d + c]);
      lo[c] = std::min(lo[c], x);
      hi[c] = std::max(hi[c], x);
    }
  }
}

void mean_key(const float* keys, std::int64_t count, std::int64_t d, double* out) {
  for (std::int64_t c = 0; c < d; ++c) out[c] = 0.0;
  for (std::int64_t j = 0; j < count; ++j) {
    for (std::int64_t c = 0; c < d; ++c) out[c] += static_cast<double>(keys[j * d + c]);
  }
  for (std::int64_t c = 0; c < d; ++c) out[c] /= static_cast<double>(count);
}

std::vector<std::int64_t> top_channels(const std::vector<double>& stat, std::int64_t r) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(r));
  rank_top(stat.data(), static_cast<std::int64_t>(stat.size()), r, order.data());
  std::vector<std::int64_t> channels(order.begin(), order.end());
  std::sort(channels.begin(), channels.end());
  return channels;
}

std::vector<double> principal_components(const std::vector<const float*>& keys, std::int64_t d, std::int64_t r) {
  const auto n = static_cast<std::int64_t>(keys.size());
  Eigen::VectorXd mean = Eigen::VectorXd::Zero(d);
  for (const float* k : keys) {
    for (std::int64_t c = 0; c < d; ++c) mean[c] += static_cast<double>(k[c]);
  }
  if (n > 0) mean /= static_cast<double>(n);
  Eigen::MatrixXd cov = Eigen::MatrixXd::Zero(d, d);
  Eigen::VectorXd x(d);
  for (const float* k : keys) {
    for (std::int64_t c = 0; c < d; ++c) x[c] = static_cast<double>(k[c]) - mean[c];
    cov.selfadjointView<Eigen::Lower>().rankUpdate(x);
  }
  cov = cov.selfadjointView<Eigen::Lower>();
  if (n > 0) cov /= static_cast<double>(n);
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(cov);
  // Eigenvalues ascend: the last r columns are the principal directions, largest first.
  std::vector<double> out(static_cast<std::size_t>(d * r));
  for (std::int64_t i = 0; i < r; ++i) {
    const Eigen::Index column = d - 1 - i;
    for (std::int64_t c = 0; c < d; ++c) out[static_cast<std::size_t>(c * r + i)] = solver.eigenvectors()(c, column);
  }
  return out;
}

double simhash_sample_probability(double cosine, std::int64_t bits, std::int64_t tables) {
  const double theta = std::acos(std::clamp(cosine, -1.0, 1.0));
  const double u = 1.0 - theta / kPi;
  const double hit = std::pow(u, static_cast<double>(bits));
  const double L = static_cast<double>(tables);
  return 1.0 - std::pow(1.0 - hit, L) - L * hit * std::pow(1.0 - hit, L - 1.0);
}

void simhash_codes(const double* x_t, std::int64_t n, const std::vector<double>& planes, std::int64_t d, std::int64_t table,
                   std::int64_t bits, std::uint32_t* codes) {
  if (bits < 1 || bits > 32) throw Error(ErrorKind::kInternal, fmt::format("SimHash codes of {} bits (1 to 32)", bits));
  std::fill(codes, codes + n, 0u);
  std::vector<double> sum(static_cast<std::size_t>(n));
  for (std::int64_t b = 0; b < bits; ++b) {
    std::fill(sum.begin(), sum.end(), 0.0);
    const double* w = &planes[static_cast<std::size_t>((table * bits + b) * d)];
    for (std::int64_t c = 0; c < d; ++c) {
      const double wc = w[c];
      const double* x = x_t + c * n;
      for (std::int64_t i = 0; i < n; ++i) sum[static_cast<std::size_t>(i)] = multiply_add(wc, x[i], sum[static_cast<std::size_t>(i)]);
    }
    for (std::int64_t i = 0; i < n; ++i) {
      if (sum[static_cast<std::size_t>(i)] > 0.0) codes[i] |= std::uint32_t{1} << b;
    }
  }
}

std::vector<double> simhash_planes(std::uint64_t seed, std::int64_t kv_head, std::int64_t d, std::int64_t count) {
  Rng rng(mix_seed(seed, 0x9167, static_cast<std::uint64_t>(kv_head)));
  std::vector<double> planes(static_cast<std::size_t>(count * d));
  for (double& w : planes) w = rng.normal();
  return planes;
}

void CrossLayerStore::reset(std::int64_t num_sets, std::int64_t rows, std::int64_t stride, std::int64_t max_block) {
  rows_ = rows;
  max_block_ = max_block;
  stride_ = std::max<std::int64_t>(1, stride);
  stored_.assign(static_cast<std::size_t>(num_sets * rows_ * stride_), 0);
  length_.assign(static_cast<std::size_t>(num_sets * rows_), 0);
}

void CrossLayerStore::record(const RankContext& c, Score score, Group group) {
  const BlockView& v = *c.view;
  if (score == Score::kMax && group == Group::kMax && c.top_by_group_max) {
    // The engine's shared ranking (the device's where it ranked them): the same order as below.
    for (std::int64_t r = 0; r < c.rows; ++r) {
      const std::int64_t count = std::min(c.ranking_length[r], v.causal_blocks(r));
      const std::int32_t* top = c.top_by_group_max(r, count);
      const auto slot = static_cast<std::size_t>(c.kv_group * rows_ + c.row_begin + r);
      std::copy(top, top + count, &stored_[slot * static_cast<std::size_t>(stride_)]);
      length_[slot] = static_cast<std::int32_t>(count);
    }
    return;
  }
  const std::vector<double>& source = score == Score::kMax ? v.max_prob : v.mass;
  if (source.size() != v.mass.size()) {
    throw Error(ErrorKind::kInternal, "a cross-layer selection reads block maxima that its view does not hold (Selector::reads_block_max)");
  }
  std::vector<double> scores(static_cast<std::size_t>(v.num_blocks));
  const std::int64_t sets = group == Group::kNone ? c.group_size : 1;
  for (std::int64_t r = 0; r < c.rows; ++r) {
    const std::int64_t blocks = v.causal_blocks(r);
    const std::int64_t count = std::min(c.ranking_length[r], blocks);
    for (std::int64_t s = 0; s < sets; ++s) {
      for (std::int64_t b = 0; b < blocks; ++b) {
        double value;
        if (group == Group::kNone) {
          value = source[v.at(s, r, b)];
        } else {
          value = group == Group::kSum ? 0.0 : -1.0;
          for (std::int64_t h = 0; h < c.group_size; ++h) {
            const double x = source[v.at(h, r, b)];
            value = group == Group::kSum ? value + x : std::max(value, x);
          }
        }
        scores[static_cast<std::size_t>(b)] = value;
      }
      const std::int64_t set = c.kv_group * sets + s;
      const auto slot = static_cast<std::size_t>(set * rows_ + c.row_begin + r);
      rank_top(scores.data(), blocks, count, &stored_[slot * static_cast<std::size_t>(stride_)]);
      length_[slot] = static_cast<std::int32_t>(count);
    }
  }
}

std::vector<std::int32_t> CrossLayerStore::state() const {
  std::vector<std::int32_t> out(length_);
  out.insert(out.end(), stored_.begin(), stored_.end());
  return out;
}

void CrossLayerStore::restore(const std::vector<std::int32_t>& state) {
  if (state.size() != length_.size() + stored_.size()) {
    fail(ErrorKind::kInput, "replay checkpoint: a cross-layer selection store of {} entries (expected {})", state.size(),
         length_.size() + stored_.size());
  }
  // Lengths within the stride and block indices within the rows: a damaged checkpoint is refused,
  // never read past its arrays.
  for (std::size_t i = 0; i < length_.size(); ++i) {
    if (state[i] < 0 || state[i] > stride_) {
      fail(ErrorKind::kInput, "replay checkpoint: a stored ranking of {} blocks (expected at most {})", state[i], stride_);
    }
  }
  for (std::size_t i = length_.size(); i < state.size(); ++i) {
    if (state[i] < 0 || state[i] >= std::max<std::int64_t>(1, max_block_)) {
      fail(ErrorKind::kInput, "replay checkpoint: stored block index {} (expected below {})", state[i], max_block_);
    }
  }
  std::copy_n(state.begin(), length_.size(), length_.begin());
  std::copy(state.begin() + static_cast<std::ptrdiff_t>(length_.size()), state.end(), stored_.begin());
}

void CrossLayerStore::recall(const RankContext& c, Group group, Rankings& out) const {
  const std::int64_t sets = group == Group::kNone ? c.group_size : 1;
  out.reset(sets, c.rows, stride_);
  for (std::int64_t s = 0; s < sets; ++s) {
    for (std::int64_t r = 0; r < c.rows; ++r) {
      const auto slot = static_cast<std::size_t>((c.kv_group * sets + s) * rows_ + c.row_begin + r);
      const std::int32_t count = length_[slot];
      std::copy_n(&stored_[slot * static_cast<std::size_t>(stride_)], count, out.row(s, r));
      out.size(s, r) = count;
    }
  }
}

}  // namespace hysparse::proxy
