#pragma once
// Random and adversarial in-memory captures for the parity tests (shared by the replay and proxy tests).
#include <cstdint>
#include <string>
#include <vector>

#include "capture/capture.hpp"

namespace hysparse::reference {

struct Shape {
  std::int64_t layers = 2, q_heads = 4, kv_heads = 2, head_dim = 16, seq_len = 100;
  bool with_v = true, sinks = false;
  std::vector<std::int64_t> dense_layers;  // layers stored as `attn` probabilities
  enum class Values { kGaussian, kTies, kIdentical } values = Values::kGaussian;
  double logit_scale = 2.0;  // multiplies q: larger = peakier attention
  // Layer l's keys are mixed with layer l-1's (0: independent layers), so selections carry over.
  double layer_correlation = 0.0;
};

Capture random_capture(const Shape& shape, std::uint64_t seed);

// One layer of the given heads, head_dim and length (Gaussian values, v captured), sink logits where asked.
inline Shape one_layer(std::int64_t q_heads, std::int64_t kv_heads, std::int64_t head_dim, std::int64_t seq_len, bool sinks) {
  Shape shape;
  shape.layers = 1;
  shape.q_heads = q_heads;
  shape.kv_heads = kv_heads;
  shape.head_dim = head_dim;
  shape.seq_len = seq_len;
  shape.sinks = sinks;
  return shape;
}

}  // namespace hysparse::reference
