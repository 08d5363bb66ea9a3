#include "reference/random_capture.hpp"

#include <algorithm>
#include <cmath>

#include "common/random.hpp"

namespace hysparse::reference {

Capture random_capture(const Shape& s, std::uint64_t seed) {
  Capture c;
  c.header.model = "parity-test";
  c.header.source = "tests";
  c.header.num_layers = s.layers;
  c.header.num_q_heads = s.q_heads;
  c.header.num_kv_heads = s.kv_heads;
  c.header.head_dim = s.head_dim;
  c.header.seq_len = s.seq_len;
  Rng rng(seed);
  auto draw = [&]() -> float {
    switch (s.values) {
      case Shape::Values::kTies: return static_cast<float>(static_cast<int>(rng.below(3)) - 1);  // {-1, 0, 1}
      case Shape::Values::kIdentical: return 0.5f;
      default: return static_cast<float>(rng.normal());
    }
  };
  const auto T = s.seq_len, d = s.head_dim;
  std::vector<float> previous_k;
  for (std::int64_t l = 0; l < s.layers; ++l) {
    LayerTensors t;
    const bool dense = std::find(s.dense_layers.begin(), s.dense_layers.end(), l) != s.dense_layers.end();
    std::vector<float> q(static_cast<std::size_t>(s.q_heads * T * d)), k(static_cast<std::size_t>(s.kv_heads * T * d));
    for (auto& x : q) x = static_cast<float>(s.logit_scale) * draw();
    for (auto& x : k) x = draw();
    if (s.layer_correlation > 0 && !previous_k.empty()) {
      const double a = s.layer_correlation, b = std::sqrt(1.0 - a * a);
      for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>(a * previous_k[i] + b * k[i]);
    }
    previous_k = k;
    std::vector<float> sinks;
    if (s.sinks) {
      for (std::int64_t h = 0; h < s.q_heads; ++h) sinks.push_back(static_cast<float>(2.0 * rng.normal() + 1.0));
    }
    if (dense) {
      // Probabilities of the same construction, computed in double: rows sum to one (less the sink).
      const double scale = 1.0 / std::sqrt(static_cast<double>(d));
      t.attn.assign(static_cast<std::size_t>(s.q_heads * T * T), 0.0f);
      for (std::int64_t h = 0; h < s.q_heads; ++h) {
        const std::int64_t g = h / (s.q_heads / s.kv_heads);
        for (std::int64_t row = 0; row < T; ++row) {
          std::vector<double> z(static_cast<std::size_t>(row + 1));
          double m = s.sinks ? sinks[static_cast<std::size_t>(h)] : -1e300;
          for (std::int64_t j = 0; j <= row; ++j) {
            double dot = 0;
            for (std::int64_t c2 = 0; c2 < d; ++c2) {
              dot += static_cast<double>(q[static_cast<std::size_t>((h * T + row) * d + c2)]) * k[static_cast<std::size_t>((g * T + j) * d + c2)];
            }
            z[static_cast<std::size_t>(j)] = dot * scale;
            m = std::max(m, z[static_cast<std::size_t>(j)]);
          }
          double total = s.sinks ? std::exp(sinks[static_cast<std::size_t>(h)] - m) : 0.0;
          for (double v : z) total += std::exp(v - m);
          for (std::int64_t j = 0; j <= row; ++j) {
            t.attn[static_cast<std::size_t>((h * T + row) * T + j)] = static_cast<float>(std::exp(z[static_cast<std::size_t>(j)] - m) / total);
          }
        }
      }
    } else {
      t.q = q;
      t.k = k;
      if (s.with_v) {
        t.v.resize(k.size());
        for (auto& x : t.v) x = static_cast<float>(rng.normal());
      }
    }
    if (s.sinks) t.sink_logits = sinks;
    c.layers.push_back(std::move(t));
  }
  return c;
}

}  // namespace hysparse::reference
