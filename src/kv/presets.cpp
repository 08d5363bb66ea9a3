#include "kv/presets.hpp"

#include <fmt/ranges.h>

#include <utility>

#include "common/error.hpp"
#include "kv/schedule.hpp"

namespace hysparse {
namespace {

KvModel gqa(const char* name, std::int64_t layers, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t head_dim,
            const char* source) {
  KvModel m;
  m.name = name;
  m.source = source;
  m.num_layers = layers;
  m.num_q_heads = q_heads;
  m.num_kv_heads = kv_heads;
  m.head_dim = head_dim;
  return m;
}

// Layer i is full when full(i), else sliding.
template <typename Full>
std::vector<KvLayerType> layer_pattern(std::int64_t layers, Full full) {
  std::vector<KvLayerType> types;
  for (std::int64_t i = 0; i < layers; ++i) types.push_back(full(i) ? KvLayerType::kFull : KvLayerType::kSliding);
  return types;
}

std::vector<KvModel> build_presets() {
  std::vector<KvModel> p;

  // ---- HySparse (arXiv 2602.03560), Table 1 and Sec. 3/4.
  const char* hys7 =
      "HySparse arXiv 2602.03560 Table 1 (7B dense): 36 layers, 32/8 heads, head_dim 128, full:sparse 1:3 with the "
      "final layer full (10 full layers), window 128, block 64, top-k 1024";
  const char* hys80 =
      "HySparse arXiv 2602.03560 Table 1 (80B-A3B MoE): 49 layers, 64/4 heads, head_dim 128, full:sparse 1:11, "
      "\"only 5 layers use full attention\" (0,12,24,36,48), window 128, block 64, top-k 1024";
  struct Hybrid {
    const char* name;
    std::int64_t layers, q, kv;
    const char* schedule;
    const char* source;
  };
  for (const Hybrid& h : {Hybrid{"hysparse-7b", 36, 32, 8, "hysparse-7b", hys7},
                          Hybrid{"hysparse-80b-a3b", 49, 64, 4, "hysparse-80b-a3b", hys80}}) {
    KvModel m = gqa(h.name, h.layers, h.q, h.kv, 128, h.source);
    m.hybrid_schedule = h.schedule;
    m.hybrid_window = 128;
    m.hybrid_topk = 1024;
    m.hybrid_block = 64;
    p.push_back(m);  // the backbone; methods full / hybrid-swa / hysparse give the paper's three architectures

    KvModel full = m;  // the paper's Full-Attn baseline
    full.name = std::string(h.name) + "-full-attn";
    full.source = std::string("Full-Attn baseline of ") + h.source;
    full.hybrid_schedule.clear();
    p.push_back(full);

    KvModel swa = m;  // the paper's Hybrid SWA baseline, as the model's own layer types
    swa.name = std::string(h.name) + "-hybrid-swa";
    swa.source = std::string("Hybrid SWA baseline (same ratio, SWA layers in place of sparse ones) of ") + h.source;
    const std::vector<bool> full_layers = parse_schedule(h.schedule, h.layers);
    swa.layer_types = layer_pattern(h.layers, [&](std::int64_t i) { return full_layers[static_cast<std::size_t>(i)]; });
    swa.sliding_window = 128;
    p.push_back(swa);
  }

  // ---- Published Hugging Face configs.
  p.push_back(gqa("llama-3.1-8b", 32, 32, 8, 128,
                  "meta-llama/Llama-3.1-8B config.json: num_hidden_layers 32, num_attention_heads 32, "
                  "num_key_value_heads 8, head_dim 128 (hidden_size 4096), no sliding window"));
  p.push_back(gqa("llama-3.1-70b", 80, 64, 8, 128,
                  "meta-llama/Llama-3.1-70B config.json: num_hidden_layers 80, num_attention_heads 64, "
                  "num_key_value_heads 8, head_dim 128 (hidden_size 8192), no sliding window"));
  p.push_back(gqa("qwen3-8b", 36, 32, 8, 128,
                  "Qwen/Qwen3-8B config.json: num_hidden_layers 36, num_attention_heads 32, num_key_value_heads 8, "
                  "head_dim 128, use_sliding_window false"));
  p.push_back(gqa("mistral-7b", 32, 32, 8, 128,
                  "mistralai/Mistral-7B-v0.3 config.json: num_hidden_layers 32, num_attention_heads 32, "
                  "num_key_value_heads 8, hidden_size 4096 (head_dim 128), sliding_window null"));
  {
    KvModel m = gqa("mistral-7b-v0.1", 32, 32, 8, 128,
                    "mistralai/Mistral-7B-v0.1 config.json: as mistral-7b but sliding_window 4096 on every layer");
    m.layer_types.assign(32, KvLayerType::kSliding);
    m.sliding_window = 4096;
    p.push_back(m);
  }
  using NamedLayers = std::pair<const char*, std::int64_t>;
  for (const auto& [name, layers] : {NamedLayers{"gpt-oss-120b", 36}, NamedLayers{"gpt-oss-20b", 24}}) {
    KvModel m = gqa(name, layers, 64, 8, 64,
                    layers == 36 ? "openai/gpt-oss-120b config.json: num_hidden_layers 36, num_attention_heads 64, "
                                   "num_key_value_heads 8, head_dim 64, layer_types alternate sliding_attention (even "
                                   "layers) / full_attention (odd), sliding_window 128"
                                 : "openai/gpt-oss-20b config.json: num_hidden_layers 24, num_attention_heads 64, "
                                   "num_key_value_heads 8, head_dim 64, layer_types alternate sliding_attention (even "
                                   "layers) / full_attention (odd), sliding_window 128");
    m.layer_types = layer_pattern(layers, [](std::int64_t i) { return i % 2 == 1; });
    m.sliding_window = 128;
    p.push_back(m);
  }
  {
    KvModel m = gqa("gemma-3-27b", 62, 32, 16, 128,
                    "google/gemma-3-27b-it config.json text_config: num_hidden_layers 62, num_attention_heads 32, "
                    "num_key_value_heads 16, head_dim 128, sliding_window 1024, sliding_window_pattern 6 (5 local : 1 "
                    "global; layer i global when (i+1) % 6 == 0)");
    m.layer_types = layer_pattern(62, [](std::int64_t i) { return (i + 1) % 6 == 0; });
    m.sliding_window = 1024;
    p.push_back(m);
  }
  {
    KvModel m = gqa("deepseek-v3", 61, 128, 128, 192,
                    "deepseek-ai/DeepSeek-V3 config.json: num_hidden_layers 61, num_attention_heads 128, MLA with "
                    "kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128 (cache: 512 + 64 "
                    "elements per token per layer)");
    m.v_head_dim = 128;
    m.kv_lora_rank = 512;
    m.qk_rope_head_dim = 64;
    p.push_back(m);
  }
  for (const auto& m : p) validate(m);
  return p;
}

}  // namespace

const std::vector<KvModel>& kv_presets() {
  static const std::vector<KvModel> presets = build_presets();
  return presets;
}

std::vector<std::string> kv_preset_names() {
  std::vector<std::string> names;
  for (const auto& m : kv_presets()) names.push_back(m.name);
  return names;
}

const KvModel& find_kv_preset(const std::string& name) {
  for (const auto& m : kv_presets()) {
    if (m.name == name) return m;
  }
  fail(ErrorKind::kUsage, "unknown preset '{}' (expected one of: {}; or give --config config.json)", name,
       fmt::join(kv_preset_names(), ", "));
}

}  // namespace hysparse
