#include "synth/synth.hpp"

#include <algorithm>
#include <cmath>
#include <future>
#include <system_error>
#include <limits>
#include <vector>

#include "common/error.hpp"
#include "common/interrupt.hpp"
#include "common/memory.hpp"
#include "common/random.hpp"

namespace hysparse {
namespace {

// Channel layout of every q/k vector: [sink | heavy | RoPE pairs | content].
struct Channels {
  std::int64_t sink = 0, heavy = 1, rope_begin = 2, rope_pairs = 1, content_begin = 4, content = 0;
  explicit Channels(std::int64_t d) {
    rope_pairs = std::max<std::int64_t>(1, d / 8);
    content_begin = rope_begin + 2 * rope_pairs;
    content = d - content_begin;
  }
};

enum Stream : std::uint64_t { kQContent = 1, kKContent, kValues, kHeavy, kRetrievalHeads, kTargets, kHeadScales };

// Everything that persists from one layer to the next (the AR(1) state).
struct LayerState {
  std::vector<float> q_content, k_content, values;  // [Hq,T,dc], [Hkv,T,dc], [Hkv,T,d]
  std::vector<std::int64_t> heavy_positions;
  std::vector<char> is_retrieval_head;
  std::vector<std::int64_t> targets;  // [Hq, T], -1 when the query retrieves nothing
  std::vector<double> sink_scale, locality_scale, heavy_scale;  // per query head
};

void blend_gaussian(std::vector<float>& values, std::size_t count, double rho, bool first, Rng& rng) {
  if (first) {
    values.resize(count);
    for (auto& v : values) v = static_cast<float>(rng.normal());
    return;
  }
  const double fresh = std::sqrt(std::max(0.0, 1.0 - rho * rho));
  for (auto& v : values) v = static_cast<float>(rho * v + fresh * rng.normal());
}

}  // namespace

void validate(const SynthOptions& o) {
  auto positive = [](std::int64_t v, const char* name) {
    if (v <= 0) fail(ErrorKind::kUsage, "synth: --{} is {} (expected a positive integer)", name, v);
  };
  positive(o.num_layers, "layers");
  positive(o.num_q_heads, "q-heads");
  positive(o.num_kv_heads, "kv-heads");
  positive(o.seq_len, "seq-len");
  if (o.head_dim < 8) fail(ErrorKind::kUsage, "synth: --head-dim is {} (expected at least 8)", o.head_dim);
  if (o.num_q_heads % o.num_kv_heads != 0) {
    fail(ErrorKind::kUsage, "synth: --q-heads {} is not a multiple of --kv-heads {}", o.num_q_heads, o.num_kv_heads);
  }
  auto fraction = [](double v, const char* name) {
    if (!(v >= 0.0 && v <= 1.0)) fail(ErrorKind::kUsage, "synth: --{} is {} (expected a value in [0, 1])", name, v);
  };
  fraction(o.heavy_fraction, "heavy-fraction");
  fraction(o.retrieval_heads, "retrieval-heads");
  fraction(o.cross_layer, "cross-layer");
  if (o.sink_tokens < 0) fail(ErrorKind::kUsage, "synth: --sink-tokens is {} (expected >= 0)", o.sink_tokens);
  if (o.retrieval_min_distance < 1) fail(ErrorKind::kUsage, "synth: --retrieval-min-distance must be >= 1");
  for (double v : {o.sink_strength, o.locality, o.heavy_strength, o.retrieval_strength, o.content_std}) {
    if (!std::isfinite(v) || v < 0) fail(ErrorKind::kUsage, "synth: strengths must be finite and >= 0 (got {})", v);
  }
  (void)synth_layer_bytes(o);  // a shape whose byte counts overflow is refused here, before any work
}

std::uint64_t synth_layer_bytes(const SynthOptions& o) {
  // Every sum and product is checked: the options come from the command line.
  constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
  auto overflow = [&]() {
    fail(ErrorKind::kUsage, "synth: --q-heads {} --kv-heads {} --head-dim {} --seq-len {}: a layer's size overflows "
         "64 bits (expected a shape whose bytes fit in memory)", o.num_q_heads, o.num_kv_heads, o.head_dim, o.seq_len);
  };
  auto mul = [&](std::uint64_t a, std::uint64_t b) {
    if (a != 0 && b > kMax / a) overflow();
    return a * b;
  };
  auto add = [&](std::uint64_t a, std::uint64_t b) {
    if (b > kMax - a) overflow();
    return a + b;
  };
  const auto Hq = static_cast<std::uint64_t>(o.num_q_heads), Hkv = static_cast<std::uint64_t>(o.num_kv_heads);
  const auto T = static_cast<std::uint64_t>(o.seq_len), d = static_cast<std::uint64_t>(o.head_dim);
  const std::uint64_t q = mul(mul(mul(Hq, T), d), sizeof(float));
  const std::uint64_t k = mul(mul(mul(Hkv, T), d), sizeof(float));
  // Kept across layers: q/k content (at most d channels each), values, retrieval targets; per layer:
  // q, k and the copy of v handed to the writer, plus the writer's 16-bit staging buffer of one tensor.
  std::uint64_t bytes = add(q, k);                                  // q_content, k_content
  bytes = add(bytes, mul(mul(Hq, T), sizeof(std::int64_t)));        // targets
  bytes = add(bytes, add(q, k));                                    // the layer's q and k
  if (o.with_v) bytes = add(bytes, mul(k, 2));                      // values and the layer's v
  bytes = add(bytes, q / 2);                                        // float16/bfloat16 staging
  return bytes;
}

CaptureHeader synth_header(const SynthOptions& o) {
  CaptureHeader header;
  header.model = "synthetic";
  header.source = fmt::format(
      "hysparse synth seed={} layers={} q_heads={} kv_heads={} head_dim={} seq_len={} sink_tokens={} "
      "sink_strength={} locality={} heavy_fraction={} heavy_strength={} retrieval_heads={} "
      "retrieval_strength={} retrieval_min_distance={} content_std={} cross_layer={}",
      o.seed, o.num_layers, o.num_q_heads, o.num_kv_heads, o.head_dim, o.seq_len, o.sink_tokens, o.sink_strength,
      o.locality, o.heavy_fraction, o.heavy_strength, o.retrieval_heads, o.retrieval_strength,
      o.retrieval_min_distance, o.content_std, o.cross_layer);
  header.num_layers = o.num_layers;
  header.num_q_heads = o.num_q_heads;
  header.num_kv_heads = o.num_kv_heads;
  header.head_dim = o.head_dim;
  header.seq_len = o.seq_len;
  header.softmax_scale = 1.0 / std::sqrt(static_cast<double>(o.head_dim));
  return header;
}

void generate_synthetic(const SynthOptions& o,
                        const std::function<void(std::int64_t layer, const LayerTensors&)>& sink) {
  validate(o);
  require_memory(synth_layer_bytes(o), fmt::format("synth: a layer of {} q heads, {} kv heads, head_dim {}, seq_len {}",
                                                   o.num_q_heads, o.num_kv_heads, o.head_dim, o.seq_len));
  const std::int64_t Hq = o.num_q_heads, Hkv = o.num_kv_heads, T = o.seq_len, d = o.head_dim;
  const std::int64_t group = Hq / Hkv;
  const Channels ch(d);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const double rho = o.cross_layer;
  const auto dc = static_cast<std::size_t>(ch.content);

  // RoPE-like frequencies, log-spaced from 1 rad/token down to one turn over the sequence.
  std::vector<double> omega(static_cast<std::size_t>(ch.rope_pairs));
  const double omega_min = std::min(1.0, 6.283185307179586 / static_cast<double>(std::max<std::int64_t>(T, 2)));
  for (std::size_t f = 0; f < omega.size(); ++f) {
    const double frac = omega.size() == 1 ? 0.5 : static_cast<double>(f) / static_cast<double>(omega.size() - 1);
    omega[f] = std::exp(std::log(omega_min) * frac);
  }
  const std::int64_t heavy_count =
      o.heavy_fraction > 0 ? std::max<std::int64_t>(1, std::llround(o.heavy_fraction * static_cast<double>(T))) : 0;
  const std::int64_t retrieval_count = std::llround(o.retrieval_heads * static_cast<double>(Hq));
  // Content entries are scaled so that the content logit has std content_std.
  const double content_amplitude =
      dc > 0 ? std::sqrt(o.content_std * std::sqrt(static_cast<double>(d) / static_cast<double>(dc))) : 0.0;

  LayerState state;
  for (std::int64_t layer = 0; layer < o.num_layers; ++layer) {
    check_interrupted();
    const bool first = layer == 0;
    auto rng_for = [&](Stream s) { return Rng(mix_seed(o.seed, static_cast<std::uint64_t>(layer), s)); };

    // Three independent streams: drawn side by side on three threads where threads can be had (the
    // same values as one after another; a stream without a thread is drawn here afterwards).
    Rng q_rng = rng_for(kQContent), k_rng = rng_for(kKContent), v_rng = rng_for(kValues);
    auto draw_k = [&] { blend_gaussian(state.k_content, static_cast<std::size_t>(Hkv * T) * dc, rho, first, k_rng); };
    auto draw_v = [&] {
      if (o.with_v) blend_gaussian(state.values, static_cast<std::size_t>(Hkv * T * d), rho, first, v_rng);
    };
    auto start = [](auto& draw) {
      try {
        return std::async(std::launch::async, draw);
      } catch (const std::system_error&) {
        return std::future<void>();
      }
    };
    auto k_draws = start(draw_k);
    auto v_draws = start(draw_v);
    blend_gaussian(state.q_content, static_cast<std::size_t>(Hq * T) * dc, rho, first, q_rng);
    if (k_draws.valid()) k_draws.get();
    else draw_k();
    if (v_draws.valid()) v_draws.get();
    else draw_v();

    // Per-head strengths vary in [0.5, 1.5]; each is kept from the previous layer with probability rho.
    Rng scale_rng = rng_for(kHeadScales);
    for (auto* scales : {&state.sink_scale, &state.locality_scale, &state.heavy_scale}) {
      scales->resize(static_cast<std::size_t>(Hq));
      for (auto& s : *scales) {
        const double u = scale_rng.uniform(), fresh = 0.5 + scale_rng.uniform();
        if (first || u >= rho) s = fresh;
      }
    }
    Rng heavy_rng = rng_for(kHeavy);
    state.heavy_positions.resize(static_cast<std::size_t>(heavy_count));
    const std::int64_t heavy_lo = std::min(o.sink_tokens, T - 1);
    for (auto& p : state.heavy_positions) {
      const double u = heavy_rng.uniform();
      const auto fresh = heavy_lo + static_cast<std::int64_t>(heavy_rng.below(static_cast<std::uint64_t>(T - heavy_lo)));
      if (first || u >= rho) p = fresh;
    }
    Rng head_rng = rng_for(kRetrievalHeads);
    if (first || head_rng.uniform() >= rho) {
      std::vector<std::int64_t> order(static_cast<std::size_t>(Hq));
      for (std::int64_t h = 0; h < Hq; ++h) order[static_cast<std::size_t>(h)] = h;
      for (std::int64_t i = Hq - 1; i > 0; --i) {  // Fisher-Yates with our own generator
        std::swap(order[static_cast<std::size_t>(i)],
                  order[static_cast<std::size_t>(head_rng.below(static_cast<std::uint64_t>(i + 1)))]);
      }
      state.is_retrieval_head.assign(static_cast<std::size_t>(Hq), 0);
      for (std::int64_t i = 0; i < retrieval_count; ++i) state.is_retrieval_head[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] = 1;
    }
    Rng target_rng = rng_for(kTargets);
    state.targets.resize(static_cast<std::size_t>(Hq * T), -1);
    for (std::int64_t h = 0; h < Hq; ++h) {
      for (std::int64_t t = 0; t < T; ++t) {
        auto& target = state.targets[static_cast<std::size_t>(h * T + t)];
        const double u = target_rng.uniform();
        const std::int64_t reach = t - o.retrieval_min_distance;  // targets in [0, reach]
        const std::int64_t fresh =
            reach >= 0 ? static_cast<std::int64_t>(target_rng.below(static_cast<std::uint64_t>(reach + 1))) : -1;
        if (!state.is_retrieval_head[static_cast<std::size_t>(h)] || reach < 0) target = -1;
        else if (first || u >= rho || target < 0 || target > reach) target = fresh;
      }
    }

    LayerTensors tensors;
    tensors.q.assign(static_cast<std::size_t>(Hq * T * d), 0.0f);
    tensors.k.assign(static_cast<std::size_t>(Hkv * T * d), 0.0f);
    std::vector<char> is_heavy(static_cast<std::size_t>(T), 0);
    for (auto p : state.heavy_positions) is_heavy[static_cast<std::size_t>(p)] = 1;

    // Every position's tensors depend only on the state: positions are filled in parallel, each
    // one's RoPE angles computed once for all heads.
#pragma omp parallel
    {
      std::vector<double> cosine(static_cast<std::size_t>(ch.rope_pairs)), sine(cosine.size());
      auto angles = [&](std::int64_t position) {
        for (std::int64_t f = 0; f < ch.rope_pairs; ++f) {
          const double angle = omega[static_cast<std::size_t>(f)] * static_cast<double>(position);
          cosine[static_cast<std::size_t>(f)] = std::cos(angle);
          sine[static_cast<std::size_t>(f)] = std::sin(angle);
        }
      };
#pragma omp for schedule(static)
      for (std::int64_t j = 0; j < T; ++j) {
        angles(j);
        for (std::int64_t g = 0; g < Hkv; ++g) {
          float* k = &tensors.k[static_cast<std::size_t>((g * T + j) * d)];
          k[ch.sink] = j < o.sink_tokens ? 1.0f : 0.0f;
          k[ch.heavy] = is_heavy[static_cast<std::size_t>(j)] ? 1.0f : 0.0f;
          for (std::int64_t f = 0; f < ch.rope_pairs; ++f) {
            k[ch.rope_begin + 2 * f] = static_cast<float>(cosine[static_cast<std::size_t>(f)]);
            k[ch.rope_begin + 2 * f + 1] = static_cast<float>(sine[static_cast<std::size_t>(f)]);
          }
          const float* content = &state.k_content[static_cast<std::size_t>(g * T + j) * dc];
          for (std::size_t c = 0; c < dc; ++c) k[ch.content_begin + static_cast<std::int64_t>(c)] = static_cast<float>(content_amplitude * content[c]);
        }
      }
      // (the implicit barrier of the loop above: every key is written before a query reads its target's)
#pragma omp for schedule(static)
      for (std::int64_t t = 0; t < T; ++t) {
        angles(t);
        for (std::int64_t h = 0; h < Hq; ++h) {
          const std::int64_t g = h / group;
          const auto hs = static_cast<std::size_t>(h);
          const double sink_q = o.sink_strength * state.sink_scale[hs] / scale;
          const double heavy_q = o.heavy_strength * state.heavy_scale[hs] / scale;
          const double rope_q = o.locality * state.locality_scale[hs] / (scale * static_cast<double>(ch.rope_pairs));
          float* q = &tensors.q[static_cast<std::size_t>((h * T + t) * d)];
          q[ch.sink] = static_cast<float>(sink_q);
          q[ch.heavy] = static_cast<float>(heavy_q);
          for (std::int64_t f = 0; f < ch.rope_pairs; ++f) {
            q[ch.rope_begin + 2 * f] = static_cast<float>(rope_q * cosine[static_cast<std::size_t>(f)]);
            q[ch.rope_begin + 2 * f + 1] = static_cast<float>(rope_q * sine[static_cast<std::size_t>(f)]);
          }
          const float* content = &state.q_content[static_cast<std::size_t>(h * T + t) * dc];
          for (std::size_t c = 0; c < dc; ++c) q[ch.content_begin + static_cast<std::int64_t>(c)] = static_cast<float>(content_amplitude * content[c]);
          const std::int64_t target = state.targets[static_cast<std::size_t>(h * T + t)];
          if (target >= 0 && dc > 0) {
            // Add a multiple of the target key's content so its logit rises by retrieval_strength.
            const float* key = &tensors.k[static_cast<std::size_t>((g * T + target) * d + ch.content_begin)];
            double norm2 = 0;
            for (std::size_t c = 0; c < dc; ++c) norm2 += static_cast<double>(key[c]) * key[c];
            if (norm2 > 0) {
              const double gain = o.retrieval_strength / (scale * norm2);
              for (std::size_t c = 0; c < dc; ++c) q[ch.content_begin + static_cast<std::int64_t>(c)] += static_cast<float>(gain * key[c]);
            }
          }
        }
      }
    }
    if (o.with_v) tensors.v = state.values;
    sink(layer, tensors);
  }
}

Capture generate_synthetic_capture(const SynthOptions& options) {
  Capture capture;
  capture.header = synth_header(options);
  generate_synthetic(options, [&](std::int64_t, const LayerTensors& t) { capture.layers.push_back(t); });
  return capture;
}

void write_synthetic_capture(const std::string& path, const SynthOptions& options,
                             const CaptureWriteOptions& write_options) {
  validate(options);
  CaptureWriter writer(path, synth_header(options), write_options);
  generate_synthetic(options, [&](std::int64_t layer, const LayerTensors& t) { writer.write_layer(layer, t); });
  writer.close();
}

}  // namespace hysparse
