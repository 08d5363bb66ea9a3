// Naive float64 reference for the README section "Replay: definitions". See naive_replay.hpp.
#include "reference/naive_replay.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <stdexcept>

namespace hysparse::reference {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::size_t idx(std::int64_t i) { return static_cast<std::size_t>(i); }
double dbl(std::int64_t i) { return static_cast<double>(i); }

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("naive reference: " + what); }

// ---------------------------------------------------------------- capture access

const LayerTensors& layer_of(const Capture& c, std::int64_t layer) {
  if (layer < 0 || layer >= c.header.num_layers || idx(layer) >= c.layers.size()) bad("layer out of range");
  return c.layers[idx(layer)];
}

// A layer has logits when it has q and k; otherwise it must have dense post-softmax `attn`.
bool has_logits(const LayerTensors& L) { return !L.q.empty() && !L.k.empty(); }

void check_shapes(const Capture& c, std::int64_t layer) {
  const auto& h = c.header;
  const LayerTensors& L = layer_of(c, layer);
  if (h.num_q_heads <= 0 || h.num_kv_heads <= 0 || h.num_q_heads % h.num_kv_heads != 0) bad("bad head counts");
  const std::size_t q_size = idx(h.num_q_heads * h.seq_len * h.head_dim);
  const std::size_t kv_size = idx(h.num_kv_heads * h.seq_len * h.head_dim);
  if (has_logits(L)) {
    if (L.q.size() != q_size || L.k.size() != kv_size) bad("q/k size mismatch");
    if (!L.sink_logits.empty() && L.sink_logits.size() != idx(h.num_q_heads)) bad("sink_logits size mismatch");
  } else {
    if (L.attn.size() != idx(h.num_q_heads * h.seq_len * h.seq_len)) bad("layer has neither q/k nor a full attn");
  }
  if (!L.v.empty() && L.v.size() != kv_size) bad("v size mismatch");
}

void check_row(const Capture& c, std::int64_t head, std::int64_t t) {
  if (head < 0 || head >= c.header.num_q_heads) bad("head out of range");
  if (t < 0 || t >= c.header.seq_len) bad("row out of range");
}

// z_j = scale * q_t . k_j for j = 0..t (layers with q/k only).
std::vector<double> logits(const Capture& c, std::int64_t layer, std::int64_t head, std::int64_t t) {
  const auto& hd = c.header;
  const LayerTensors& L = layer_of(c, layer);
  const double scale = hd.effective_softmax_scale();
  const std::int64_t d = hd.head_dim, T = hd.seq_len, kv = hd.kv_head_of(head);
  std::vector<double> z(idx(t + 1));
  for (std::int64_t j = 0; j <= t; ++j) {
    double dot = 0;
    for (std::int64_t e = 0; e < d; ++e) {
      dot += static_cast<double>(L.q[idx((head * T + t) * d + e)]) * static_cast<double>(L.k[idx((kv * T + j) * d + e)]);
    }
    z[idx(j)] = scale * dot;
  }
  return z;
}

// o_A = sum_{j in A} exp(z_j) v_j / (exp(s_h) + sum_{j in A} exp(z_j)), the exp(s_h) term only with sinks.
// Stabilised by the maximum over A's logits and the sink. An empty A without a sink gives 0/0: we define
// o_A = 0 then (with a sink an empty A gives 0 by the formula anyway).
std::vector<double> masked_output(const Capture& c, std::int64_t layer, std::int64_t head, std::int64_t t,
                                  const std::vector<bool>& A) {
  const auto& hd = c.header;
  const LayerTensors& L = layer_of(c, layer);
  const std::int64_t d = hd.head_dim, T = hd.seq_len, kv = hd.kv_head_of(head);
  const std::vector<double> z = logits(c, layer, head, t);
  const bool sink = !L.sink_logits.empty();
  const double s = sink ? static_cast<double>(L.sink_logits[idx(head)]) : 0.0;
  double m = -std::numeric_limits<double>::infinity();
  if (sink) m = s;
  bool any = false;
  for (std::int64_t j = 0; j <= t; ++j) {
    if (A[idx(j)]) {
      m = std::max(m, z[idx(j)]);
      any = true;
    }
  }
  std::vector<double> o(idx(d), 0.0);
  if (!any) return o;
  double den = sink ? std::exp(s - m) : 0.0;
  for (std::int64_t j = 0; j <= t; ++j) {
    if (!A[idx(j)]) continue;
    const double w = std::exp(z[idx(j)] - m);
    den += w;
    for (std::int64_t e = 0; e < d; ++e) o[idx(e)] += w * static_cast<double>(L.v[idx((kv * T + j) * d + e)]);
  }
  for (double& x : o) x /= den;
  return o;
}

// ---------------------------------------------------------------- rows, blocks, selections

struct Row {
  std::vector<double> p;  // p_j, j = 0..t
  double mass = 0;        // sum_j p_j (the row's token mass, sink excluded)
};

Row make_row(const Capture& c, std::int64_t layer, std::int64_t head, std::int64_t t) {
  Row r;
  r.p = naive_probabilities(c, layer, head, t);
  for (double x : r.p) r.mass += x;
  return r;
}

std::int64_t block_begin(std::int64_t b, std::int64_t B) { return b * B; }
std::int64_t block_end(std::int64_t b, std::int64_t B, std::int64_t t) { return std::min((b + 1) * B, t + 1); }

// Per block: sum_{j in b, j not excluded} p_j / mass. With no exclusion this is M_b; with the forced keys
// excluded it is the residual mass M_b - (mass of b's forced keys).
std::vector<double> block_mass(const Row& r, std::int64_t B, std::int64_t t, const std::vector<bool>& excluded) {
  const std::int64_t nb = naive_num_blocks(t, B);
  std::vector<double> out(idx(nb), 0.0);
  for (std::int64_t b = 0; b < nb; ++b) {
    // Summed in ascending order, so blocks holding the same probabilities in another order tie exactly.
    std::vector<double> terms;
    for (std::int64_t j = block_begin(b, B); j < block_end(b, B, t); ++j) {
      if (!excluded[idx(j)]) terms.push_back(r.p[idx(j)]);
    }
    std::sort(terms.begin(), terms.end());
    double sum = 0;
    for (double term : terms) sum += term;
    out[idx(b)] = sum / r.mass;
  }
  return out;
}

// Per block: P_b = max_{j in b} p_j (the true probability).
std::vector<double> block_max(const Row& r, std::int64_t B, std::int64_t t) {
  const std::int64_t nb = naive_num_blocks(t, B);
  std::vector<double> out(idx(nb), 0.0);
  for (std::int64_t b = 0; b < nb; ++b) {
    double best = -std::numeric_limits<double>::infinity();
    for (std::int64_t j = block_begin(b, B); j < block_end(b, B, t); ++j) best = std::max(best, r.p[idx(j)]);
    out[idx(b)] = best;
  }
  return out;
}

// Mask over keys 0..t of the first n blocks of `ranking`.
std::vector<bool> keys_of_top(const std::vector<std::int64_t>& ranking, std::int64_t n, std::int64_t B, std::int64_t t) {
  std::vector<bool> keys(idx(t + 1), false);
  const std::int64_t take = std::min<std::int64_t>(n, static_cast<std::int64_t>(ranking.size()));
  for (std::int64_t i = 0; i < take; ++i) {
    const std::int64_t b = ranking[idx(i)];
    for (std::int64_t j = block_begin(b, B); j < block_end(b, B, t); ++j) keys[idx(j)] = true;
  }
  return keys;
}

std::vector<bool> union_of(const std::vector<bool>& a, const std::vector<bool>& b) {
  std::vector<bool> out(a.size());
  for (std::size_t j = 0; j < a.size(); ++j) out[j] = a[j] || b[j];
  return out;
}

std::int64_t count(const std::vector<bool>& m) { return static_cast<std::int64_t>(std::count(m.begin(), m.end(), true)); }

// Aggregate per-head block scores of one KV group: elementwise sum or max.
std::vector<double> aggregate(const std::vector<std::vector<double>>& per_head, const std::string& how) {
  std::vector<double> out = per_head.front();
  for (std::size_t h = 1; h < per_head.size(); ++h) {
    for (std::size_t b = 0; b < out.size(); ++b) {
      if (how == "sum") out[b] += per_head[h][b];
      else out[b] = std::max(out[b], per_head[h][b]);
    }
  }
  return out;
}

double rel_error(const std::vector<double>& approx, const std::vector<double>& exact) {
  double num = 0, den = 0;
  for (std::size_t e = 0; e < exact.size(); ++e) {
    num += (approx[e] - exact[e]) * (approx[e] - exact[e]);
    den += exact[e] * exact[e];
  }
  return std::sqrt(num) / std::sqrt(den);
}

void validate(const Capture& c, const RefSelector& sel, const RefBudget& budget, const std::vector<std::int64_t>& rows) {
  const std::int64_t L = c.header.num_layers;
  if (L <= 0 || static_cast<std::int64_t>(c.layers.size()) != L) bad("layers do not match num_layers");
  for (std::int64_t l = 0; l < L; ++l) check_shapes(c, l);
  for (std::int64_t t : rows) check_row(c, 0, t);
  if (sel.block < 1) bad("block must be >= 1");
  if (sel.sinks < 0) bad("sinks must be >= 0");
  if (budget.is_sparsity) {
    if (!(budget.value >= 0 && budget.value < 1)) bad("sparsity must be in [0, 1)");
  } else {
    if (!std::isfinite(budget.value) || budget.value < static_cast<double>(sel.block)) bad("token budget < block");
  }
  if (sel.kind == "oracle") {
    if (sel.group != "none" && sel.group != "sum" && sel.group != "max") bad("oracle group must be none|sum|max");
    if (sel.window < 0) bad("oracle window must be >= 0");
  } else if (sel.kind == "swa") {
    if (sel.window < -1) bad("swa window must be >= 0, or -1 for the budget");
  } else if (sel.kind == "hysparse") {
    if (sel.group != "sum" && sel.group != "max") bad("hysparse group must be max|sum");
    if (sel.score != "max" && sel.score != "mass") bad("hysparse score must be max|mass");
    if (sel.window < 0) bad("hysparse window must be >= 0");
    if (static_cast<std::int64_t>(sel.full_layers.size()) != L) bad("full_layers must have num_layers entries");
    if (!sel.full_layers[0]) bad("layer 0 must be full");
  } else {
    bad("unknown selector kind '" + sel.kind + "'");
  }
}

}  // namespace

// ---------------------------------------------------------------- public building blocks

std::int64_t naive_num_blocks(std::int64_t t, std::int64_t block) { return t / block + 1; }

std::int64_t naive_budget_blocks(const RefBudget& budget, std::int64_t t, std::int64_t block) {
  if (budget.is_sparsity) {
    // The 1e-9 keeps decimal sparsities (0.7 of 10 keys = 3) from rounding up by binary error.
    const double n = std::ceil(((1.0 - budget.value) * dbl(t + 1)) / dbl(block) - 1e-9);
    return std::max<std::int64_t>(1, static_cast<std::int64_t>(n));
  }
  if (budget.value < dbl(block)) bad("token budget < block");
  return static_cast<std::int64_t>(std::floor(budget.value / dbl(block)));
}

std::vector<bool> naive_forced(std::int64_t t, std::int64_t sinks, std::int64_t window) {
  std::vector<bool> f(idx(t + 1), false);
  for (std::int64_t j = 0; j < std::min(sinks, t + 1); ++j) f[idx(j)] = true;
  for (std::int64_t j = std::max<std::int64_t>(0, t - window + 1); j <= t; ++j) f[idx(j)] = true;
  return f;
}

std::vector<std::int64_t> naive_rank(const std::vector<double>& scores) {
  std::vector<std::int64_t> order(scores.size());
  for (std::size_t b = 0; b < order.size(); ++b) order[b] = static_cast<std::int64_t>(b);
  std::sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    if (scores[idx(a)] != scores[idx(b)]) return scores[idx(a)] > scores[idx(b)];
    return a < b;
  });
  return order;
}

double naive_recall(const std::vector<double>& p, const std::vector<bool>& attended) {
  double kept = 0, total = 0;
  for (std::size_t j = 0; j < p.size(); ++j) {
    total += p[j];
    if (attended[j]) kept += p[j];
  }
  return kept / total;
}

std::vector<double> naive_probabilities(const Capture& c, std::int64_t layer, std::int64_t head, std::int64_t t) {
  check_shapes(c, layer);
  check_row(c, head, t);
  const LayerTensors& L = layer_of(c, layer);
  std::vector<double> p(idx(t + 1));
  if (!has_logits(L)) {  // dense post-softmax probabilities; keys j > t are ignored
    const std::int64_t T = c.header.seq_len;
    for (std::int64_t j = 0; j <= t; ++j) p[idx(j)] = static_cast<double>(L.attn[idx((head * T + t) * T + j)]);
    return p;
  }
  const std::vector<double> z = logits(c, layer, head, t);
  const bool sink = !L.sink_logits.empty();
  const double s = sink ? static_cast<double>(L.sink_logits[idx(head)]) : 0.0;
  double m = *std::max_element(z.begin(), z.end());
  if (sink) m = std::max(m, s);
  double den = sink ? std::exp(s - m) : 0.0;
  for (double x : z) den += std::exp(x - m);
  for (std::int64_t j = 0; j <= t; ++j) p[idx(j)] = std::exp(z[idx(j)] - m) / den;
  return p;
}

std::vector<double> naive_output(const Capture& c, std::int64_t layer, std::int64_t head, std::int64_t t) {
  check_shapes(c, layer);
  check_row(c, head, t);
  const LayerTensors& L = layer_of(c, layer);
  if (L.v.empty()) bad("layer has no v");
  if (has_logits(L)) return masked_output(c, layer, head, t, std::vector<bool>(idx(t + 1), true));
  // Dense attn layer with v: o = sum_j p_j v_j literally.
  const std::int64_t d = c.header.head_dim, T = c.header.seq_len, kv = c.header.kv_head_of(head);
  const std::vector<double> p = naive_probabilities(c, layer, head, t);
  std::vector<double> o(idx(d), 0.0);
  for (std::int64_t j = 0; j <= t; ++j) {
    for (std::int64_t e = 0; e < d; ++e) o[idx(e)] += p[idx(j)] * static_cast<double>(L.v[idx((kv * T + j) * d + e)]);
  }
  return o;
}

std::vector<double> naive_logits(const Capture& c, std::int64_t layer, std::int64_t head, std::int64_t t) {
  check_shapes(c, layer);
  check_row(c, head, t);
  return logits(c, layer, head, t);
}

std::vector<double> naive_block_mass(const std::vector<double>& p, std::int64_t block, std::int64_t t,
                                     const std::vector<bool>& excluded) {
  Row r;
  r.p = p;
  for (double x : p) r.mass += x;
  return block_mass(r, block, t, excluded);
}

std::vector<double> naive_block_max(const std::vector<double>& p, std::int64_t block, std::int64_t t) {
  Row r;
  r.p = p;
  return block_max(r, block, t);
}

std::vector<bool> naive_keys_of_top(const std::vector<std::int64_t>& ranking, std::int64_t n, std::int64_t block,
                                    std::int64_t t) {
  return keys_of_top(ranking, n, block, t);
}

std::vector<double> naive_aggregate(const std::vector<std::vector<double>>& per_head, const std::string& how) {
  return aggregate(per_head, how);
}

// ---------------------------------------------------------------- metrics

std::vector<std::vector<std::vector<RefRowMetrics>>> naive_metrics(const Capture& capture, const RefSelector& selector,
                                                                   const RefBudget& budget,
                                                                   const std::vector<std::int64_t>& rows) {
  validate(capture, selector, budget, rows);
  const std::int64_t num_layers = capture.header.num_layers;
  const std::int64_t Hq = capture.header.num_q_heads;
  const std::int64_t Hkv = capture.header.num_kv_heads;
  const std::int64_t G = capture.header.group_size();
  const std::int64_t B = selector.block;
  const bool is_oracle = selector.kind == "oracle", is_swa = selector.kind == "swa",
             is_hysparse = selector.kind == "hysparse";

  std::vector<std::vector<std::vector<RefRowMetrics>>> result(
      idx(num_layers), std::vector<std::vector<RefRowMetrics>>(idx(Hq), std::vector<RefRowMetrics>(rows.size())));

  for (std::int64_t l = 0; l < num_layers; ++l) {
    const LayerTensors& layer = capture.layers[idx(l)];
    const bool output_defined = has_logits(layer) && !layer.v.empty();
    const bool full = is_hysparse && selector.full_layers[idx(l)];
    std::int64_t f = -1;  // hysparse: the nearest full layer before l
    if (is_hysparse && !full) {
      for (std::int64_t c = l - 1; c >= 0; --c) {
        if (selector.full_layers[idx(c)]) {
          f = c;
          break;
        }
      }
    }

    for (std::size_t i = 0; i < rows.size(); ++i) {
      const std::int64_t t = rows[i];
      const std::int64_t nb = naive_num_blocks(t, B);
      const std::int64_t n = naive_budget_blocks(budget, t, B);
      const bool saturated = n >= nb;

      if (full) {
        for (std::int64_t h = 0; h < Hq; ++h) {
          RefRowMetrics& m = result[idx(l)][idx(h)][i];
          m.full_layer = true;
          m.saturated = saturated;
          m.mass_recall = m.oracle_recall = m.topk_overlap = 1.0;
          m.attended = dbl(t + 1);
          m.output_rel_error = output_defined ? 0.0 : kNaN;
        }
        continue;
      }

      const std::int64_t window = (is_swa && selector.window == -1) ? n * B : selector.window;
      const std::vector<bool> forced = naive_forced(t, selector.sinks, window);
      const std::vector<bool> nothing(idx(t + 1), false);

      std::vector<Row> own(idx(Hq));
      for (std::int64_t h = 0; h < Hq; ++h) own[idx(h)] = make_row(capture, l, h, t);

      // The selected keys (before adding the forced keys) of every query head.
      std::vector<std::vector<bool>> selected(idx(Hq), nothing);
      for (std::int64_t g = 0; g < Hkv; ++g) {
        if (is_swa) break;  // forced keys only
        std::vector<std::vector<double>> scores;  // per head of the group
        for (std::int64_t h = g * G; h < (g + 1) * G; ++h) {
          if (is_oracle) {
            scores.push_back(block_mass(own[idx(h)], B, t, forced));  // residual mass
          } else {
            const Row full_row = make_row(capture, f, h, t);
            scores.push_back(selector.score == "max" ? block_max(full_row, B, t) : block_mass(full_row, B, t, nothing));
          }
        }
        if (is_oracle && selector.group == "none") {
          for (std::int64_t h = g * G; h < (g + 1) * G; ++h) {
            selected[idx(h)] = keys_of_top(naive_rank(scores[idx(h - g * G)]), n, B, t);
          }
        } else {
          const std::vector<bool> keys = keys_of_top(naive_rank(aggregate(scores, selector.group)), n, B, t);
          for (std::int64_t h = g * G; h < (g + 1) * G; ++h) selected[idx(h)] = keys;
        }
      }

      for (std::int64_t h = 0; h < Hq; ++h) {
        const Row& r = own[idx(h)];
        RefRowMetrics& m = result[idx(l)][idx(h)][i];
        const std::vector<bool> A = union_of(forced, selected[idx(h)]);
        m.saturated = saturated;
        m.mass_recall = naive_recall(r.p, A);
        m.attended = dbl(count(A));

        // Per-head oracle at the same block size, budget and fixed forced keys (a window that is
        // the budget itself is not a fixed forced key: the oracle spends that budget on blocks).
        const std::vector<bool> oracle_forced =
            (is_swa && selector.window == -1) ? naive_forced(t, selector.sinks, 0) : forced;
        const std::vector<bool> A_star =
            union_of(oracle_forced, keys_of_top(naive_rank(block_mass(r, B, t, oracle_forced)), n, B, t));
        m.oracle_recall = naive_recall(r.p, A_star);

        // O: the top-n blocks by plain M_b, no forced keys.
        const std::vector<bool> O = keys_of_top(naive_rank(block_mass(r, B, t, nothing)), n, B, t);
        std::int64_t in_both = 0;
        for (std::int64_t j = 0; j <= t; ++j) in_both += (O[idx(j)] && A[idx(j)]) ? 1 : 0;
        m.topk_overlap = dbl(in_both) / dbl(count(O));

        if (output_defined) {
          const std::vector<double> o = masked_output(capture, l, h, t, std::vector<bool>(idx(t + 1), true));
          m.output_rel_error = rel_error(masked_output(capture, l, h, t, A), o);
        }
      }
    }
  }
  return result;
}

std::vector<std::vector<double>> naive_reuse_matrix(const Capture& capture, std::int64_t block,
                                                    std::int64_t budget_tokens, const std::vector<std::int64_t>& rows) {
  const std::int64_t L = capture.header.num_layers;
  if (L <= 0 || static_cast<std::int64_t>(capture.layers.size()) != L) bad("layers do not match num_layers");
  for (std::int64_t l = 0; l < L; ++l) check_shapes(capture, l);
  for (std::int64_t t : rows) check_row(capture, 0, t);
  if (block < 1) bad("block must be >= 1");
  if (budget_tokens < block) bad("reuse budget < block");
  const std::int64_t Hkv = capture.header.num_kv_heads, G = capture.header.group_size();
  const std::int64_t n = budget_tokens / block;  // floor(budget/block) blocks

  std::vector<std::vector<double>> reuse(idx(L), std::vector<double>(idx(L), kNaN));
  for (std::int64_t f = 0; f < L; ++f) {
    for (std::int64_t l = f; l < L; ++l) {
      double sum = 0;
      std::int64_t count_rows = 0;  // (head, row) pairs
      for (std::int64_t t : rows) {
        for (std::int64_t g = 0; g < Hkv; ++g) {
          std::vector<std::vector<double>> scores;
          for (std::int64_t h = g * G; h < (g + 1) * G; ++h) scores.push_back(block_max(make_row(capture, f, h, t), block, t));
          const std::vector<bool> A = keys_of_top(naive_rank(aggregate(scores, "max")), n, block, t);
          for (std::int64_t h = g * G; h < (g + 1) * G; ++h) {
            sum += naive_recall(naive_probabilities(capture, l, h, t), A);
            ++count_rows;
          }
        }
      }
      reuse[idx(f)][idx(l)] = sum / dbl(count_rows);
    }
  }
  return reuse;
}

}  // namespace hysparse::reference
