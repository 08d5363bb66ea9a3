// Naive float64 reference for the proxy selectors. See naive_proxies.hpp.
#include "reference/naive_proxies.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <stdexcept>

#include "common/random.hpp"

namespace hysparse::reference {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::size_t idx(std::int64_t i) { return static_cast<std::size_t>(i); }
double dbl(std::int64_t i) { return static_cast<double>(i); }
[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("naive proxies: " + what); }

enum class Use { kNested, kPerBudget, kFree };

// What a proxy attends at one (layer, head, row, budget), before the metric definitions apply.
struct Selection {
  bool full = false;                // the layer attends everything
  bool scored = true;               // false: the row is left out of the metrics
  std::vector<bool> selected;       // keys of the chosen blocks (forced keys are added by the caller)
  std::vector<double> log_weight;   // per key, the output estimate's log importance weight (empty: none)
  std::int64_t blocks = 0;          // chosen blocks (the equal-size oracle of non-nested proxies)
  Use use = Use::kNested;
  double margin = kInf;             // threshold proxies: distance of the decisive sums from the threshold
};

struct Access {
  const Capture& c;
  std::int64_t T, d, G, Hkv;
  explicit Access(const Capture& capture)
      : c(capture), T(capture.header.seq_len), d(capture.header.head_dim), G(capture.header.group_size()),
        Hkv(capture.header.num_kv_heads) {}
  const LayerTensors& layer(std::int64_t l) const { return c.layers[idx(l)]; }
  double q(std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t e) const {
    return static_cast<double>(layer(l).q[idx((h * T + t) * d + e)]);
  }
  double k(std::int64_t l, std::int64_t g, std::int64_t j, std::int64_t e) const {
    return static_cast<double>(layer(l).k[idx((g * T + j) * d + e)]);
  }
  double v(std::int64_t l, std::int64_t g, std::int64_t j, std::int64_t e) const {
    return static_cast<double>(layer(l).v[idx((g * T + j) * d + e)]);
  }
  std::vector<double> qv(std::int64_t l, std::int64_t h, std::int64_t t) const {
    std::vector<double> out(idx(d));
    for (std::int64_t e = 0; e < d; ++e) out[idx(e)] = q(l, h, t, e);
    return out;
  }
  std::vector<double> kv(std::int64_t l, std::int64_t g, std::int64_t j) const {
    std::vector<double> out(idx(d));
    for (std::int64_t e = 0; e < d; ++e) out[idx(e)] = k(l, g, j, e);
    return out;
  }
};

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t e = 0; e < a.size(); ++e) s += a[e] * b[e];
  return s;
}

std::vector<bool> blocks_to_keys(const std::vector<std::int64_t>& chosen, std::int64_t B, std::int64_t t) {
  std::vector<bool> keys(idx(t + 1), false);
  for (std::int64_t b : chosen) {
    for (std::int64_t j = b * B; j < std::min((b + 1) * B, t + 1); ++j) keys[idx(j)] = true;
  }
  return keys;
}

// Takes the first n of a ranking (nested budgets).
Selection nested(const std::vector<std::int64_t>& ranking, std::int64_t n, std::int64_t B, std::int64_t t) {
  Selection s;
  const std::int64_t take = std::min<std::int64_t>(n, static_cast<std::int64_t>(ranking.size()));
  s.selected = blocks_to_keys(std::vector<std::int64_t>(ranking.begin(), ranking.begin() + take), B, t);
  s.blocks = take;
  return s;
}

// Ranking by score, higher first, ties to the lower index; +inf scores (forced blocks) first.
std::vector<std::int64_t> rank(const std::vector<double>& scores) { return naive_rank(scores); }

// o_A with importance weights: sum_{j in A} w_j e^{z_j} v_j / (e^{s} + sum_{j in A} w_j e^{z_j}).
std::vector<double> weighted_output(const Capture& c, std::int64_t l, std::int64_t h, std::int64_t t,
                                    const std::vector<bool>& A, const std::vector<double>& log_weight) {
  const Access a(c);
  const std::vector<double> z = naive_logits(c, l, h, t);
  const LayerTensors& L = a.layer(l);
  const bool sink = !L.sink_logits.empty();
  const double s = sink ? static_cast<double>(L.sink_logits[idx(h)]) : 0.0;
  double m = sink ? s : -kInf;
  for (std::int64_t j = 0; j <= t; ++j) {
    if (A[idx(j)]) m = std::max(m, z[idx(j)] + (log_weight.empty() ? 0.0 : log_weight[idx(j)]));
  }
  std::vector<double> o(idx(a.d), 0.0);
  if (m == -kInf) return o;
  double den = sink ? std::exp(s - m) : 0.0;
  const std::int64_t g = h / a.G;
  for (std::int64_t j = 0; j <= t; ++j) {
    if (!A[idx(j)]) continue;
    const double w = std::exp(z[idx(j)] + (log_weight.empty() ? 0.0 : log_weight[idx(j)]) - m);
    den += w;
    for (std::int64_t e = 0; e < a.d; ++e) o[idx(e)] += w * a.v(l, g, j, e);
  }
  for (double& x : o) x /= den;
  return o;
}

class Naive {
 public:
  Naive(const Capture& c, const RefProxy& p, const RefBudget& budget, std::uint64_t seed, std::vector<std::int64_t> rows)
      : a_(c), p_(p), budget_(budget), seed_(seed), rows_(std::move(rows)) {}

  Selection select(std::int64_t l, std::int64_t h, std::int64_t t) {
    const std::int64_t n = naive_budget_blocks(budget_, t, p_.block);
    if (p_.kind == "quest") return quest(l, h, t, n);
    if (p_.kind == "moba") return moba(l, h, t, n);
    if (p_.kind == "reuse") return reuse(l, h, t, n);
    if (p_.kind == "oracle_topp") return oracle_topp(l, h, t);
    if (p_.kind == "nsa") return nsa(l, h, t, n);
    if (p_.kind == "infllm") return infllm(l, h, t, n);
    if (p_.kind == "snapkv") return snapkv(l, h, t);
    if (p_.kind == "h2o") return h2o(l, h, t);
    if (p_.kind == "doublesparsity") return doublesparsity(l, h, t, n);
    if (p_.kind == "loki") return loki(l, h, t, n);
    if (p_.kind == "sparq") return sparq(l, h, t, n);
    if (p_.kind == "magicpig") return magicpig(l, h, t);
    if (p_.kind == "duo") return duo(l, h, t);
    bad("unknown proxy '" + p_.kind + "'");
  }

 private:
  // ------------------------------------------------------------ quest
  Selection quest(std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t n) {
    Selection s;
    if (l < p_.dense) {
      s.full = true;
      return s;
    }
    const std::int64_t B = p_.block, g = h / a_.G, last = t / B;
    const std::vector<double> q = a_.qv(l, h, t);
    std::vector<double> scores(idx(last + 1));
    for (std::int64_t b = 0; b < last; ++b) {
      std::vector<std::vector<double>> keys;
      for (std::int64_t j = b * B; j < (b + 1) * B; ++j) keys.push_back(a_.kv(l, g, j));
      scores[idx(b)] = naive_quest_bound(q, keys);
    }
    scores[idx(last)] = kInf;  // the query's own page
    return nested(rank(scores), n, B, t);
  }

  // ------------------------------------------------------------ moba
  Selection moba(std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t n) {
    const std::int64_t B = p_.block, g = h / a_.G, current = t / B;
    const std::vector<double> q = a_.qv(l, h, t);
    std::vector<double> scores(idx(current + 1));
    for (std::int64_t b = 0; b <= current; ++b) {
      const std::int64_t end = std::min((b + 1) * B, t + 1);
      std::vector<double> mean(idx(a_.d), 0.0);
      for (std::int64_t j = b * B; j < end; ++j) {
        for (std::int64_t e = 0; e < a_.d; ++e) mean[idx(e)] += a_.k(l, g, j, e);
      }
      for (double& x : mean) x /= dbl(end - b * B);
      scores[idx(b)] = dot(q, mean);
    }
    if (p_.current) scores[idx(current)] = kInf;
    return nested(rank(scores), n, B, t);
  }

  // ------------------------------------------------------------ reuse
  Selection reuse(std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t n) {
    Selection s;
    std::vector<std::int64_t> layers;
    for (auto x : p_.layers) {
      if (x < a_.c.header.num_layers) layers.push_back(x);
    }
    std::sort(layers.begin(), layers.end());
    if (layers.empty()) bad("reuse: no selection layer");
    const bool selection = std::find(layers.begin(), layers.end(), l) != layers.end();
    if (l < layers.front() || (selection && p_.anchor == "full")) {
      s.full = true;
      return s;
    }
    std::int64_t f = -1;  // the latest selection layer <= l
    for (auto x : layers) {
      if (x <= l) f = x;
    }
    const std::int64_t B = p_.block, g = h / a_.G;
    auto head_scores = [&](std::int64_t head) {
      const std::vector<double> p = naive_probabilities(a_.c, f, head, t);
      return p_.score == "mass" ? naive_block_mass(p, B, t, std::vector<bool>(idx(t + 1), false)) : naive_block_max(p, B, t);
    };
    std::vector<double> scores;
    if (p_.group == "none") {
      scores = head_scores(h);
    } else {
      std::vector<std::vector<double>> per_head;
      for (std::int64_t x = g * a_.G; x < (g + 1) * a_.G; ++x) per_head.push_back(head_scores(x));
      scores = naive_aggregate(per_head, p_.group);
    }
    return nested(rank(scores), n, B, t);
  }

  // ------------------------------------------------------------ oracle_topp
  Selection oracle_topp(std::int64_t l, std::int64_t h, std::int64_t t) {
    Selection s;
    s.use = Use::kFree;
    const std::int64_t B = p_.block;
    const std::vector<double> p = naive_probabilities(a_.c, l, h, t);
    double total = 0;
    for (double x : p) total += x;
    const std::vector<bool> forced = naive_forced(t, p_.sinks, p_.window);
    double cumulative = 0;
    for (std::int64_t j = 0; j <= t; ++j) cumulative += forced[idx(j)] ? p[idx(j)] / total : 0.0;
    const std::vector<double> residual = naive_block_mass(p, B, t, forced);
    const std::vector<std::int64_t> order = rank(residual);
    std::vector<std::int64_t> chosen;
    s.margin = std::abs(cumulative - p_.p);
    while (chosen.size() < order.size() && cumulative < p_.p) {
      chosen.push_back(order[chosen.size()]);
      cumulative += residual[idx(chosen.back())];
      s.margin = std::min(s.margin, std::abs(cumulative - p_.p));
    }
    s.selected = blocks_to_keys(chosen, B, t);
    s.blocks = static_cast<std::int64_t>(chosen.size());
    return s;
  }

  // ------------------------------------------------------------ nsa
  Selection nsa(std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t n) {
    const std::int64_t B = p_.block, len = p_.cmp, stride = p_.stride, g = h / a_.G, nb = t / B + 1;
    const double scale = a_.c.header.effective_softmax_scale();
    // Compressed keys: the mean of keys [i*stride, i*stride + len), visible once its last key is (<= t).
    std::vector<std::vector<double>> compressed;
    for (std::int64_t i = 0; i * stride + len - 1 <= t; ++i) {
      std::vector<double> mean(idx(a_.d), 0.0);
      for (std::int64_t j = i * stride; j < i * stride + len; ++j) {
        for (std::int64_t e = 0; e < a_.d; ++e) mean[idx(e)] += a_.k(l, g, j, e);
      }
      for (double& x : mean) x /= dbl(len);
      compressed.push_back(mean);
    }
    std::vector<double> scores(idx(nb), 0.0);
    for (std::int64_t x = g * a_.G; x < (g + 1) * a_.G && !compressed.empty(); ++x) {
      const std::vector<double> q = a_.qv(l, x, t);
      std::vector<double> z;
      double m = -kInf;
      for (const auto& key : compressed) {
        z.push_back(scale * dot(q, key));
        m = std::max(m, z.back());
      }
      double den = 0;
      for (double v : z) den += std::exp(v - m);
      // Each stride-long piece of compressed window i counts in the selection block holding it.
      for (std::int64_t b = 0; b < nb; ++b) {
        double sum = 0;
        for (std::size_t i = 0; i < compressed.size(); ++i) {
          std::int64_t pieces = 0;
          for (std::int64_t piece = 0; piece < len / stride; ++piece) {
            const std::int64_t start = (static_cast<std::int64_t>(i) + piece) * stride;
            pieces += start >= b * B && start < (b + 1) * B ? 1 : 0;
          }
          if (pieces > 0) sum += dbl(pieces) * (std::exp(z[i] - m) / den);
        }
        scores[idx(b)] += sum;
      }
    }
    for (std::int64_t b = 0; b < nb; ++b) {
      if (b < p_.initial || b >= nb - p_.local) scores[idx(b)] = kInf;
    }
    return nested(rank(scores), n, B, t);
  }

  // ------------------------------------------------------------ infllm
  // received[h][j]: attention key j gets from queries j .. j + window - 1.
  const std::vector<std::vector<double>>& infllm_received(std::int64_t l) {
    auto& cached = received_[l];
    if (!cached.empty()) return cached;
    const std::int64_t Hq = a_.c.header.num_q_heads;
    cached.assign(idx(Hq), std::vector<double>(idx(a_.T), 0.0));
    for (std::int64_t h = 0; h < Hq; ++h) {
      std::vector<std::vector<double>> rows;
      for (std::int64_t t = 0; t < a_.T; ++t) rows.push_back(naive_probabilities(a_.c, l, h, t));
      for (std::int64_t j = 0; j < a_.T; ++j) {
        for (std::int64_t t = j; t < std::min(a_.T, j + p_.window); ++t) cached[idx(h)][idx(j)] += rows[idx(t)][idx(j)];
      }
    }
    return cached;
  }

  Selection infllm(std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t n) {
    (void)h;  // one selection for every head of the layer
    const std::int64_t B = p_.block, Hq = a_.c.header.num_q_heads, memory = t / B;
    const auto& received = infllm_received(l);
    std::vector<double> scores(idx(memory), 0.0);
    for (std::int64_t b = 0; b < memory; ++b) {
      double score = 0;
      for (std::int64_t x = 0; x < Hq; ++x) {
        // The representative: mean of the repr keys of the block that received the most attention.
        std::vector<double> r(received[idx(x)].begin() + b * B, received[idx(x)].begin() + (b + 1) * B);
        std::vector<std::int64_t> top = naive_rank(r);
        top.resize(idx(std::min(p_.repr, B)));
        std::sort(top.begin(), top.end());
        std::vector<double> mean(idx(a_.d), 0.0);
        for (std::int64_t j : top) {
          for (std::int64_t e = 0; e < a_.d; ++e) mean[idx(e)] += a_.k(l, x / a_.G, b * B + j, e);
        }
        for (double& v : mean) v /= dbl(static_cast<std::int64_t>(top.size()));
        score += dot(a_.qv(l, x, t), mean);
      }
      scores[idx(b)] = score;
    }
    return nested(rank(scores), n, B, t);
  }

  // ------------------------------------------------------------ snapkv
  std::int64_t prompt_end() const {
    if (p_.prompt > 0) return std::min(p_.prompt, a_.T);
    return rows_.front() > 0 ? rows_.front() : a_.T / 2;
  }

  Selection snapkv(std::int64_t l, std::int64_t h, std::int64_t t) {
    Selection s;
    s.use = Use::kPerBudget;
    const std::int64_t P = prompt_end();
    if (t < P) {
      s.scored = false;
      return s;
    }
    const std::int64_t w = std::min(p_.observe, P), prefix = P - w;
    std::vector<std::int64_t> heads;
    if (p_.group == "none") heads = {h};
    for (std::int64_t x = (h / a_.G) * a_.G; p_.group != "none" && x < (h / a_.G + 1) * a_.G; ++x) heads.push_back(x);
    std::vector<double> votes(idx(prefix), 0.0);
    for (std::int64_t x : heads) {
      for (std::int64_t q = P - w; q < P; ++q) {
        const std::vector<double> p = naive_probabilities(a_.c, l, x, q);
        for (std::int64_t j = 0; j < prefix; ++j) votes[idx(j)] += p[idx(j)];
      }
    }
    std::vector<double> pooled(idx(prefix));
    for (std::int64_t j = 0; j < prefix; ++j) {
      double acc = p_.pool == "max" ? -kInf : 0.0;
      for (std::int64_t i = j - p_.kernel / 2; i < j - p_.kernel / 2 + p_.kernel; ++i) {
        if (i < 0 || i >= prefix) continue;
        acc = p_.pool == "max" ? std::max(acc, votes[idx(i)]) : acc + votes[idx(i)];
      }
      pooled[idx(j)] = p_.pool == "max" ? acc : acc / dbl(p_.kernel);
    }
    const std::int64_t capacity = naive_budget_blocks(budget_, std::max<std::int64_t>(0, P - 1), 1);
    const std::int64_t kept = std::min(prefix, std::max<std::int64_t>(0, capacity - w));
    const std::vector<std::int64_t> order = naive_rank(pooled);
    s.selected.assign(idx(t + 1), false);
    for (std::int64_t i = 0; i < kept; ++i) s.selected[idx(order[idx(i)])] = true;
    for (std::int64_t j = P - w; j <= t; ++j) s.selected[idx(j)] = true;
    s.blocks = static_cast<std::int64_t>(std::count(s.selected.begin(), s.selected.end(), true));
    return s;
  }

  // ------------------------------------------------------------ h2o
  // Every step's cache for one set of heads (a KV group, or one query head), explicitly.
  const std::vector<std::vector<bool>>& h2o_caches(std::int64_t l, std::int64_t first_head, std::int64_t heads) {
    auto& caches = h2o_[{l, first_head}];
    if (!caches.empty()) return caches;
    const LayerTensors& layer = a_.layer(l);
    std::vector<bool> alive(idx(a_.T), false);
    std::vector<double> score(idx(a_.T), 0.0);
    for (std::int64_t t = 0; t < a_.T; ++t) {
      alive[idx(t)] = true;
      caches.push_back(std::vector<bool>(alive.begin(), alive.begin() + t + 1));
      for (std::int64_t x = first_head; x < first_head + heads; ++x) {
        const std::vector<double> z = naive_logits(a_.c, l, x, t);
        const bool sink = !layer.sink_logits.empty();
        const double sl = sink ? static_cast<double>(layer.sink_logits[idx(x)]) : 0.0;
        double m = sink ? sl : -kInf;
        for (std::int64_t j = 0; j <= t; ++j) {
          if (alive[idx(j)]) m = std::max(m, z[idx(j)]);
        }
        double den = sink ? std::exp(sl - m) : 0.0;
        for (std::int64_t j = 0; j <= t; ++j) den += alive[idx(j)] ? std::exp(z[idx(j)] - m) : 0.0;
        for (std::int64_t j = 0; j <= t; ++j) {
          if (alive[idx(j)]) score[idx(j)] += std::exp(z[idx(j)] - m) / den;
        }
      }
      if (t + 1 == a_.T) break;
      // Room for the next step: its capacity less the key it adds; its recent keys stay.
      const std::int64_t capacity = std::min(naive_budget_blocks(budget_, t + 1, 1), t + 2);
      const std::int64_t recent = capacity * p_.recent / 100;
      for (;;) {
        std::int64_t size = 0, victim = -1, oldest = -1;
        for (std::int64_t j = 0; j <= t; ++j) {
          if (!alive[idx(j)]) continue;
          ++size;
          if (oldest < 0) oldest = j;
          const bool is_recent = j > t + 1 - recent;
          if (!is_recent && (victim < 0 || score[idx(j)] <= score[idx(victim)])) victim = j;
        }
        if (size <= capacity - 1) break;
        alive[idx(victim >= 0 ? victim : oldest)] = false;
      }
    }
    return caches;
  }

  Selection h2o(std::int64_t l, std::int64_t h, std::int64_t t) {
    Selection s;
    s.use = Use::kPerBudget;
    const bool per_head = p_.group == "none";
    s.selected = h2o_caches(l, per_head ? h : (h / a_.G) * a_.G, per_head ? 1 : a_.G)[idx(t)];
    s.blocks = static_cast<std::int64_t>(std::count(s.selected.begin(), s.selected.end(), true));
    return s;
  }

  // ------------------------------------------------------------ token scores -> ranked blocks
  Selection by_token_scores(const std::vector<double>& token, std::int64_t t, std::int64_t n) const {
    const std::int64_t B = p_.block, nb = t / B + 1;
    std::vector<double> scores(idx(nb), -kInf);
    for (std::int64_t j = 0; j <= t; ++j) scores[idx(j / B)] = std::max(scores[idx(j / B)], token[idx(j)]);
    return nested(rank(scores), n, B, t);
  }

  // The r largest of stat (ties to the lower channel), ascending.
  static std::vector<std::int64_t> largest(const std::vector<double>& stat, std::int64_t r) {
    std::vector<std::int64_t> order = naive_rank(stat);
    order.resize(idx(r));
    std::sort(order.begin(), order.end());
    return order;
  }

  // ------------------------------------------------------------ doublesparsity
  Selection doublesparsity(std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t n) {
    const auto [positions, first] = naive_calibration(a_.T, rows_);
    Selection s;
    if (t < first) {
      s.scored = false;
      return s;
    }
    const std::int64_t g = h / a_.G, r = std::min(a_.d, p_.r > 0 ? p_.r : std::max<std::int64_t>(1, a_.d / 8));
    std::vector<double> stat(idx(a_.d), 0.0);
    for (std::int64_t x : positions) {
      for (std::int64_t e = 0; e < a_.d; ++e) {
        const double q = a_.q(l, h, x, e), k = a_.k(l, g, x, e);
        stat[idx(e)] += std::abs(p_.channel == "qk" ? q * k : p_.channel == "q" ? q : k);
      }
    }
    const std::vector<std::int64_t> channels = largest(stat, r);
    std::vector<double> token(idx(t + 1), 0.0);
    for (std::int64_t j = 0; j <= t; ++j) {
      for (std::int64_t e : channels) token[idx(j)] += a_.q(l, h, t, e) * a_.k(l, g, j, e);
    }
    return by_token_scores(token, t, n);
  }

  // ------------------------------------------------------------ loki
  Selection loki(std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t n) {
    const auto [positions, first] = naive_calibration(a_.T, rows_);
    Selection s;
    if (t < first) {
      s.scored = false;
      return s;
    }
    const std::int64_t g = h / a_.G, r = std::min(a_.d, p_.r > 0 ? p_.r : std::max<std::int64_t>(1, a_.d / 4));
    auto& components = loki_[{l, g}];
    if (components.empty()) {
      std::vector<double> mean(idx(a_.d), 0.0);
      for (std::int64_t x : positions) {
        for (std::int64_t e = 0; e < a_.d; ++e) mean[idx(e)] += a_.k(l, g, x, e) / dbl(static_cast<std::int64_t>(positions.size()));
      }
      std::vector<std::vector<double>> cov(idx(a_.d), std::vector<double>(idx(a_.d), 0.0));
      for (std::int64_t x : positions) {
        for (std::int64_t e = 0; e < a_.d; ++e) {
          for (std::int64_t f = 0; f < a_.d; ++f) {
            cov[idx(e)][idx(f)] += (a_.k(l, g, x, e) - mean[idx(e)]) * (a_.k(l, g, x, f) - mean[idx(f)]) /
                                   dbl(static_cast<std::int64_t>(positions.size()));
          }
        }
      }
      std::vector<double> values;
      naive_symmetric_eigen(cov, values, components);
    }
    const std::vector<double> q = a_.qv(l, h, t);
    std::vector<double> token(idx(t + 1), 0.0);
    for (std::int64_t j = 0; j <= t; ++j) {
      const std::vector<double> k = a_.kv(l, g, j);
      for (std::int64_t i = 0; i < r; ++i) {
        std::vector<double> direction(idx(a_.d));
        for (std::int64_t e = 0; e < a_.d; ++e) direction[idx(e)] = components[idx(e)][idx(i)];
        token[idx(j)] += dot(q, direction) * dot(k, direction);
      }
    }
    return by_token_scores(token, t, n);
  }

  // ------------------------------------------------------------ sparq
  Selection sparq(std::int64_t l, std::int64_t h, std::int64_t t, std::int64_t n) {
    const std::int64_t g = h / a_.G, r = std::min(a_.d, p_.r > 0 ? p_.r : std::max<std::int64_t>(1, a_.d / 8));
    std::vector<double> magnitude(idx(a_.d), 0.0);
    for (std::int64_t x = g * a_.G; x < (g + 1) * a_.G; ++x) {
      for (std::int64_t e = 0; e < a_.d; ++e) magnitude[idx(e)] += std::abs(a_.q(l, x, t, e));
    }
    const std::vector<std::int64_t> channels = largest(magnitude, r);
    std::vector<double> token(idx(t + 1), 0.0);
    for (std::int64_t x = g * a_.G; x < (g + 1) * a_.G; ++x) {
      double all = 0, kept = 0;
      for (std::int64_t e = 0; e < a_.d; ++e) all += std::abs(a_.q(l, x, t, e));
      for (std::int64_t e : channels) kept += std::abs(a_.q(l, x, t, e));
      const double temperature = kept > 0 ? std::sqrt(dbl(a_.d) * kept / all) : 1.0;
      for (std::int64_t j = 0; j <= t; ++j) {
        double approx = 0;
        for (std::int64_t e : channels) approx += a_.q(l, x, t, e) * a_.k(l, g, j, e);
        token[idx(j)] += approx / temperature;
      }
    }
    for (std::int64_t j = std::max<std::int64_t>(0, t - p_.sparq_local + 1); j <= t; ++j) token[idx(j)] = kInf;
    return by_token_scores(token, t, n);
  }

  // ------------------------------------------------------------ magicpig
  Selection magicpig(std::int64_t l, std::int64_t h, std::int64_t t) {
    Selection s;
    s.use = Use::kFree;
    const std::int64_t g = h / a_.G, K = p_.bits, Lt = p_.tables;
    // Hyperplanes: N(0,1) from xoshiro256** seeded mix_seed(seed, 0x9167, kv head), [table*K + bit][d].
    Rng rng(mix_seed(seed_, 0x9167, static_cast<std::uint64_t>(g)));
    std::vector<std::vector<double>> planes(idx(K * Lt), std::vector<double>(idx(a_.d)));
    for (auto& w : planes) {
      for (double& x : w) x = rng.normal();
    }
    // Each bit's sum in channel order, each step one fused multiply-add where the build has them (the
    // definition's), so that a sum near 0 falls on the same side as the selector's.
    auto hash = [&](const std::vector<double>& x, std::int64_t table) {
      std::uint32_t code = 0;
      for (std::int64_t b = 0; b < K; ++b) {
        const std::vector<double>& w = planes[idx(table * K + b)];
        double sum = 0.0;
        for (std::size_t e = 0; e < x.size(); ++e) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
          sum = std::fma(w[e], x[e], sum);
#else
          volatile double product = w[e] * x[e];
          sum = sum + product;
#endif
        }
        if (sum > 0) code |= std::uint32_t{1} << b;
      }
      return code;
    };
    std::vector<double> mean(idx(a_.d), 0.0);
    for (std::int64_t j = 0; j < a_.T; ++j) {
      for (std::int64_t e = 0; e < a_.d; ++e) mean[idx(e)] += a_.k(l, g, j, e);
    }
    for (double& x : mean) x /= dbl(a_.T);
    const std::vector<double> q = a_.qv(l, h, t);
    const std::vector<bool> fixed = naive_forced(t, p_.sinks, p_.window);
    s.selected.assign(idx(t + 1), false);
    s.log_weight.assign(idx(t + 1), 0.0);
    for (std::int64_t j = 0; j <= t; ++j) {
      if (fixed[idx(j)]) continue;
      std::vector<double> k = a_.kv(l, g, j);
      for (std::int64_t e = 0; e < a_.d; ++e) k[idx(e)] -= mean[idx(e)];
      std::int64_t hits = 0;
      for (std::int64_t table = 0; table < Lt; ++table) hits += hash(q, table) == hash(k, table) ? 1 : 0;
      if (hits < p_.collisions) continue;
      const double nq = std::sqrt(dot(q, q)), nk = std::sqrt(dot(k, k));
      const double cosine = nq > 0 && nk > 0 ? dot(q, k) / (nq * nk) : 0.0;
      const double u = 1.0 - std::acos(std::min(1.0, std::max(-1.0, cosine))) / 3.14159265358979323846;
      const double hit = std::pow(u, dbl(K));
      const double probability = 1.0 - std::pow(1.0 - hit, dbl(Lt)) - dbl(Lt) * hit * std::pow(1.0 - hit, dbl(Lt) - 1.0);
      s.selected[idx(j)] = true;
      s.log_weight[idx(j)] = -std::log(probability + 1e-4);
      ++s.blocks;
    }
    return s;
  }

  // ------------------------------------------------------------ duo
  Selection duo(std::int64_t l, std::int64_t h, std::int64_t t) {
    const auto [positions, first] = naive_calibration(a_.T, rows_);
    Selection s;
    s.use = Use::kFree;
    if (t < first) {
      s.scored = false;
      return s;
    }
    auto streams = [&](std::int64_t j, std::int64_t row) { return j < p_.sink || j > row - p_.recent; };
    if (duo_streaming_.empty()) {
      const std::int64_t L = a_.c.header.num_layers;
      std::vector<double> errors;
      for (std::int64_t layer = 0; layer < L; ++layer) {
        for (std::int64_t g = 0; g < a_.Hkv; ++g) {
          double sum = 0;
          std::int64_t count = 0;
          for (std::int64_t x = g * a_.G; x < (g + 1) * a_.G; ++x) {
            for (std::int64_t row : positions) {
              const std::vector<double> p = naive_probabilities(a_.c, layer, x, row);
              std::vector<bool> S(idx(row + 1));
              for (std::int64_t j = 0; j <= row; ++j) S[idx(j)] = streams(j, row);
              if (p_.error == "mass") {
                sum += 1.0 - naive_recall(p, S);
              } else {
                const std::vector<double> o = weighted_output(a_.c, layer, x, row, std::vector<bool>(idx(row + 1), true), {});
                const std::vector<double> os = weighted_output(a_.c, layer, x, row, S, {});
                double num = 0, den = 0;
                for (std::size_t e = 0; e < o.size(); ++e) {
                  num += (os[e] - o[e]) * (os[e] - o[e]);
                  den += o[e] * o[e];
                }
                sum += den > 0 ? num / den : 0.0;
              }
              ++count;
            }
          }
          errors.push_back(count ? sum / dbl(count) : 0.0);
        }
      }
      // The lowest errors stream; ties to the earlier (layer, head).
      std::vector<std::size_t> order(errors.size());
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) { return errors[x] < errors[y]; });
      duo_streaming_.assign(errors.size(), false);
      const auto streaming = static_cast<std::size_t>(static_cast<std::int64_t>(errors.size()) * p_.streaming / 100);
      for (std::size_t i = 0; i < streaming; ++i) duo_streaming_[order[i]] = true;
    }
    const bool streaming = duo_streaming_[idx(l * a_.Hkv + h / a_.G)];
    s.selected.assign(idx(t + 1), false);
    for (std::int64_t j = 0; j <= t; ++j) s.selected[idx(j)] = !streaming || streams(j, t);
    s.blocks = static_cast<std::int64_t>(std::count(s.selected.begin(), s.selected.end(), true));
    return s;
  }

  Access a_;
  const RefProxy& p_;
  RefBudget budget_;
  std::uint64_t seed_;
  std::vector<std::int64_t> rows_;
  std::map<std::int64_t, std::vector<std::vector<double>>> received_;                     // infllm, per layer
  std::map<std::pair<std::int64_t, std::int64_t>, std::vector<std::vector<bool>>> h2o_;  // (layer, first head)
  std::map<std::pair<std::int64_t, std::int64_t>, std::vector<std::vector<double>>> loki_;  // (layer, kv head): eigenvectors
  std::vector<bool> duo_streaming_;                                                     // [layer][kv head]
};

}  // namespace

std::pair<std::vector<std::int64_t>, std::int64_t> naive_calibration(std::int64_t seq_len, const std::vector<std::int64_t>& rows) {
  std::vector<std::int64_t> outside;
  for (std::int64_t t = 0; t < seq_len; ++t) {
    if (!std::binary_search(rows.begin(), rows.end(), t)) outside.push_back(t);
  }
  if (!outside.empty()) return {outside, 0};
  std::vector<std::int64_t> half;
  for (std::int64_t t = 0; t < seq_len / 2; ++t) half.push_back(t);
  return {half, seq_len / 2};
}

void naive_symmetric_eigen(std::vector<std::vector<double>> a, std::vector<double>& values,
                           std::vector<std::vector<double>>& vectors) {
  const std::size_t n = a.size();
  std::vector<std::vector<double>> v(n, std::vector<double>(n, 0.0));
  for (std::size_t i = 0; i < n; ++i) v[i][i] = 1.0;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0, norm = 0;
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t j = 0; j < n; ++j) {
        norm += a[i][j] * a[i][j];
        if (i != j) off += a[i][j] * a[i][j];
      }
    }
    if (off <= 1e-30 * norm || off == 0) break;
    for (std::size_t p = 0; p < n; ++p) {
      for (std::size_t q = p + 1; q < n; ++q) {
        if (a[p][q] == 0) continue;
        // Rotation zeroing a[p][q] (Golub & Van Loan, the symmetric Schur decomposition).
        const double tau = (a[q][q] - a[p][p]) / (2 * a[p][q]);
        const double t = (tau >= 0 ? 1.0 : -1.0) / (std::abs(tau) + std::sqrt(1 + tau * tau));
        const double c = 1 / std::sqrt(1 + t * t), s = t * c;
        for (std::size_t k = 0; k < n; ++k) {
          const double akp = a[k][p], akq = a[k][q];
          a[k][p] = c * akp - s * akq;
          a[k][q] = s * akp + c * akq;
        }
        for (std::size_t k = 0; k < n; ++k) {
          const double apk = a[p][k], aqk = a[q][k];
          a[p][k] = c * apk - s * aqk;
          a[q][k] = s * apk + c * aqk;
        }
        for (std::size_t k = 0; k < n; ++k) {
          const double vkp = v[k][p], vkq = v[k][q];
          v[k][p] = c * vkp - s * vkq;
          v[k][q] = s * vkp + c * vkq;
        }
      }
    }
  }
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) { return a[x][x] > a[y][y]; });
  values.assign(n, 0.0);
  vectors.assign(n, std::vector<double>(n, 0.0));
  for (std::size_t i = 0; i < n; ++i) {
    values[i] = a[order[i]][order[i]];
    for (std::size_t k = 0; k < n; ++k) vectors[k][i] = v[k][order[i]];
  }
}

double naive_quest_bound(const std::vector<double>& q, const std::vector<std::vector<double>>& keys) {
  double bound = 0;
  for (std::size_t i = 0; i < q.size(); ++i) {
    double hi = -kInf, lo = kInf;
    for (const auto& k : keys) {
      hi = std::max(hi, k[i]);
      lo = std::min(lo, k[i]);
    }
    bound += std::max(q[i] * hi, q[i] * lo);
  }
  return bound;
}

std::vector<std::vector<std::vector<RefRowMetrics>>> naive_proxy_metrics(const Capture& capture, const RefProxy& proxy,
                                                                         const RefBudget& budget,
                                                                         const std::vector<std::int64_t>& rows,
                                                                         std::uint64_t seed) {
  const std::int64_t L = capture.header.num_layers, Hq = capture.header.num_q_heads, B = proxy.block;
  if (proxy.block < 1) bad("block must be >= 1");
  Naive naive(capture, proxy, budget, seed, rows);
  std::vector<std::vector<std::vector<RefRowMetrics>>> result(
      idx(L), std::vector<std::vector<RefRowMetrics>>(idx(Hq), std::vector<RefRowMetrics>(rows.size())));
  for (std::int64_t l = 0; l < L; ++l) {
    const LayerTensors& layer = capture.layers[idx(l)];
    const bool output_defined = !layer.q.empty() && !layer.v.empty();
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const std::int64_t t = rows[i], nb = naive_num_blocks(t, B);
      const std::int64_t n = naive_budget_blocks(budget, t, B);
      for (std::int64_t h = 0; h < Hq; ++h) {
        RefRowMetrics& m = result[idx(l)][idx(h)][i];
        const Selection s = naive.select(l, h, t);
        if (!s.scored) {
          m.scored = false;
          continue;
        }
        if (s.full) {
          m.full_layer = true;
          m.saturated = n >= nb;
          m.mass_recall = m.oracle_recall = m.topk_overlap = 1.0;
          m.attended = dbl(t + 1);
          m.output_rel_error = output_defined ? 0.0 : kNaN;
          continue;
        }
        const std::vector<double> p = naive_probabilities(capture, l, h, t);
        const std::vector<bool> forced = naive_forced(t, proxy.sinks, proxy.window);
        std::vector<bool> A(idx(t + 1));
        std::int64_t attended = 0;
        for (std::int64_t j = 0; j <= t; ++j) {
          A[idx(j)] = forced[idx(j)] || s.selected[idx(j)];
          attended += A[idx(j)] ? 1 : 0;
        }
        m.threshold_margin = s.margin;
        m.mass_recall = naive_recall(p, A);
        m.attended = dbl(attended);
        m.saturated = s.use == Use::kFree ? attended == t + 1 : n >= nb;
        // The oracle and the top-by-mass reference: at the budget (nested), or as many blocks as the
        // selection holds (eviction, adaptive: the equal-size oracle).
        const std::int64_t compared = std::min(nb, s.use == Use::kNested ? n : s.blocks);
        const std::vector<bool> nothing(idx(t + 1), false);
        std::vector<bool> A_star = naive_keys_of_top(naive_rank(naive_block_mass(p, B, t, forced)), compared, B, t);
        for (std::int64_t j = 0; j <= t; ++j) A_star[idx(j)] = A_star[idx(j)] || forced[idx(j)];
        m.oracle_recall = naive_recall(p, A_star);
        const std::vector<bool> O = naive_keys_of_top(naive_rank(naive_block_mass(p, B, t, nothing)), compared, B, t);
        std::int64_t in_both = 0, in_O = 0;
        for (std::int64_t j = 0; j <= t; ++j) {
          in_O += O[idx(j)] ? 1 : 0;
          in_both += O[idx(j)] && A[idx(j)] ? 1 : 0;
        }
        m.topk_overlap = in_O > 0 ? dbl(in_both) / dbl(in_O) : 1.0;
        if (output_defined) {
          const std::vector<double> o = weighted_output(capture, l, h, t, std::vector<bool>(idx(t + 1), true), {});
          const std::vector<double> approx = weighted_output(capture, l, h, t, A, s.log_weight);
          double num = 0, den = 0;
          for (std::size_t e = 0; e < o.size(); ++e) {
            num += (approx[e] - o[e]) * (approx[e] - o[e]);
            den += o[e] * o[e];
          }
          m.output_rel_error = std::sqrt(num) / std::sqrt(den);
        }
      }
    }
  }
  return result;
}

std::vector<std::int32_t> naive_token_score_rankings(const TokenScoreRequest& request, bool fused) {
  const TokenScoreRequest& q = request;
  std::int64_t stride = 0;
  for (std::int64_t r = 0; r < q.num_rows; ++r) stride = std::max(stride, q.counts[r]);
  std::vector<std::int32_t> order(static_cast<std::size_t>(q.sets * q.num_rows * stride), 0);
  for (std::int64_t s = 0; s < q.sets; ++s) {
    for (std::int64_t r = 0; r < q.num_rows; ++r) {
      const std::int64_t t = q.rows[r], blocks = t / q.block + 1;
      std::vector<double> best(static_cast<std::size_t>(blocks), -std::numeric_limits<double>::infinity());
      for (std::int64_t j = 0; j <= t; ++j) {
        double score = 0.0;
        for (std::int64_t u = 0; u < q.terms; ++u) {
          const std::int64_t term = (s * q.num_rows + r) * q.terms + u;
          double dot = 0.0;
          for (std::int64_t i = 0; i < q.channels; ++i) {
            const std::int64_t c = q.channel ? q.channel[term * q.channels + i] : i;
            const double w = q.weight[term * q.channels + i];
            const double k = q.keys ? static_cast<double>(q.keys[j * q.width + c]) : q.keys64[j * q.width + c];
            if (fused) {
              dot = std::fma(w, k, dot);
            } else {
              volatile double product = w * k;  // rounded on its own: the compiler may not fuse it into the sum
              dot = dot + product;
            }
          }
          const double value = q.divisor ? dot / q.divisor[term] : dot;
          score = u == 0 ? value : score + value;
        }
        if (j > t - q.local) score = std::numeric_limits<double>::infinity();
        double& block_best = best[static_cast<std::size_t>(j / q.block)];
        if (score > block_best) block_best = score;
      }
      std::vector<std::int32_t> blocks_by_score(static_cast<std::size_t>(blocks));
      for (std::int64_t b = 0; b < blocks; ++b) blocks_by_score[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(b);
      std::stable_sort(blocks_by_score.begin(), blocks_by_score.end(), [&](std::int32_t a, std::int32_t b) {
        return best[static_cast<std::size_t>(a)] > best[static_cast<std::size_t>(b)];
      });
      std::copy_n(blocks_by_score.begin(), q.counts[r], order.begin() + (s * q.num_rows + r) * stride);
    }
  }
  return order;
}

}  // namespace hysparse::reference
