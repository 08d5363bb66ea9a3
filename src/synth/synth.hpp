#pragma once
// Deterministic synthetic captures with the structure of real attention:
// sinks, RoPE-like locality, heavy-hitter columns, retrieval heads, and a knob
// for how much adjacent layers agree on the important tokens.
#include <cstdint>
#include <functional>
#include <string>

#include "capture/capture.hpp"

namespace hysparse {

struct SynthOptions {
  std::int64_t num_layers = 8;
  std::int64_t num_q_heads = 8;
  std::int64_t num_kv_heads = 2;
  std::int64_t head_dim = 64;
  std::int64_t seq_len = 2048;
  std::uint64_t seed = 7;
  bool with_v = true;

  // Each strength is the logit (after the softmax scale) the structure adds.
  std::int64_t sink_tokens = 4;        // first tokens every query attends to
  double sink_strength = 6.0;
  double locality = 4.0;               // logit at distance 0 of the RoPE-like decay
  double heavy_fraction = 0.01;        // share of positions that are heavy hitters
  double heavy_strength = 4.0;
  double retrieval_heads = 0.25;       // share of query heads that retrieve far tokens
  double retrieval_strength = 6.0;
  std::int64_t retrieval_min_distance = 256;  // targets lie at least this far back
  double content_std = 4.0;            // std of the random content logits (sets how peaked rows are)
  double cross_layer = 0.9;            // 0: layers independent, 1: identical layers
};

// Validates options (Error kUsage on nonsense values and on shapes whose byte counts overflow).
void validate(const SynthOptions& options);

// Peak bytes generate_synthetic holds for one layer (checked arithmetic; Error kUsage on overflow).
std::uint64_t synth_layer_bytes(const SynthOptions& options);

CaptureHeader synth_header(const SynthOptions& options);

// Generates layer by layer and hands each to `sink`, so memory stays at two layers.
void generate_synthetic(const SynthOptions& options,
                        const std::function<void(std::int64_t layer, const LayerTensors&)>& sink);

Capture generate_synthetic_capture(const SynthOptions& options);  // all in memory (tests)

void write_synthetic_capture(const std::string& path, const SynthOptions& options,
                             const CaptureWriteOptions& write_options);

}  // namespace hysparse
