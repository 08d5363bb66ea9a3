#include "kv/footprint.hpp"

#include <fmt/ranges.h>

#include "common/error.hpp"

namespace hysparse {
namespace {

using P = std::vector<KvParam>;

std::uint64_t u(std::int64_t v) { return static_cast<std::uint64_t>(v < 0 ? 0 : v); }
// Bits of an element: the parameter `bits` when set (> 0), else the KV dtype's.
std::uint64_t element_bits(std::int64_t dtype_bits, const P& p, const char* name) {
  const std::int64_t bits = param_value(p, name, 0);
  return u(bits > 0 ? bits : dtype_bits);
}
// Channels: the parameter `r` when set (> 0), else d / divisor.
std::uint64_t channels(std::int64_t d, const P& p, std::int64_t divisor) {
  const std::int64_t r = param_value(p, "r", 0);
  return u(r > 0 ? r : d / divisor);
}

std::vector<KvFootprint> build_table() {
  std::vector<KvFootprint> t;

  KvFootprint f;
  f.method = "full";
  f.title = "Full attention";
  f.residency = KvResidency::kAllFull;
  f.source = "every layer keeps K and V of every token (Vaswani et al., arXiv 1706.03762)";
  t.push_back(f);

  f = {};
  f.method = "native";
  f.title = "Model as configured";
  f.residency = KvResidency::kNative;
  f.sparse_prefill = true;
  f.source = "the model's own layer types: config.json layer_types / sliding_window / attention_chunk_size";
  f.note = "sliding layers keep min(window, T) tokens; chunked layers at most one chunk (the peak)";
  t.push_back(f);

  f = {};
  f.method = "swa";
  f.title = "Sliding window (all layers)";
  f.residency = KvResidency::kWindowAll;
  f.evicts = true;
  f.sparse_prefill = true;
  f.params = {{"window", 128, "recent tokens kept"}, {"sinks", 0, "initial tokens kept"}};
  f.source = "mit-han-lab/streaming-llm: streaming_llm/kv_cache.py (arXiv 2309.17453); sinks 0 is plain SWA";
  t.push_back(f);

  f = {};
  f.method = "streamingllm";
  f.title = "StreamingLLM";
  f.residency = KvResidency::kWindowAll;
  f.evicts = true;
  f.sparse_prefill = true;
  f.params = {{"window", 512, "recent tokens kept (recent_size)"}, {"sinks", 4, "attention-sink tokens (start_size)"}};
  f.source = "mit-han-lab/streaming-llm: streaming_llm/kv_cache.py StartRecentKVCache (arXiv 2309.17453)";
  t.push_back(f);

  f = {};
  f.method = "hybrid-swa";
  f.title = "Hybrid SWA";
  f.residency = KvResidency::kHybridWindow;
  f.evicts = true;
  f.sparse_prefill = true;
  f.params = {{"window", 128, "tokens kept by the window layers"}, {"sinks", 0, "initial tokens kept by the window layers"}};
  f.source = "HySparse (arXiv 2602.03560) Sec. 4: the Hybrid SWA baseline, same full:SWA ratio, final layer full, window 128";
  t.push_back(f);

  f = {};
  f.method = "hysparse";
  f.title = "HySparse";
  f.residency = KvResidency::kHybridSparse;
  f.sparse_prefill = true;
  f.params = {{"window", 128, "tokens of the sparse layers' own SWA branch"},
              {"topk", 1024, "tokens each KV group reads from the preceding full layer's cache"},
              {"block", 64, "selection block (topk is a multiple of it)"},
              {"sinks", 0, "initial tokens kept by the sparse layers"}};
  f.source = "HySparse (arXiv 2602.03560) Sec. 3, Table 1: sparse layers keep a 128-token window; their global branch "
             "gathers top-1024 tokens (16 blocks of 64) from the preceding full layer's KV cache";
  f.note = "block scores and top-k indices are transient (made by the full layer, used by the next sparse layers): "
           "no resident metadata";
  t.push_back(f);

  f = {};
  f.method = "duo";
  f.title = "DuoAttention";
  f.residency = KvResidency::kHeadSplit;
  f.evicts = true;
  f.sparse_prefill = true;
  f.params = {{"streaming", 50, "percent of KV heads that are streaming heads (sparsity)"},
              {"sinks", 128, "sink tokens of a streaming head"},
              {"window", 256, "recent tokens of a streaming head"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.fixed_bits = [](std::int64_t, std::int64_t, const P&) -> std::uint64_t { return 32; };
  f.metadata.formula = "one fp32 gate per KV head per layer";
  f.source = "mit-han-lab/duo-attention: duo_attn/utils.py, attn_patterns/*/config.json (arXiv 2410.10819)";
  t.push_back(f);

  f = {};
  f.method = "quest";
  f.title = "Quest";
  f.residency = KvResidency::kSelect;
  f.params = {{"page", 16, "tokens per page"}, {"budget", 1024, "tokens attended per decoded token"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.period_param = "page";
  f.metadata.bits_per_entry = [](std::int64_t d, std::int64_t bits, const P&) { return 2 * u(d) * u(bits); };
  f.metadata.formula = "2*d elements (per-channel key max and min) per page";
  f.source = "mit-han-lab/Quest: evaluation/quest_attention.py, quest/utils/controller.py (arXiv 2406.10774)";
  t.push_back(f);

  f = {};
  f.method = "arkvale";
  f.title = "ArkVale";
  f.residency = KvResidency::kSelect;
  f.params = {{"page", 32, "tokens per page"}, {"budget", 1024, "tokens attended per decoded token"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.period_param = "page";
  f.metadata.bits_per_entry = [](std::int64_t d, std::int64_t bits, const P&) { return 2 * u(d) * u(bits); };
  f.metadata.formula = "2*d elements (bounding box) per page";
  f.source = "pku-liang/ArkVale: source/arkvale/infer_state.py (NeurIPS 2024)";
  f.note = "full KV counted as resident; ArkVale keeps the pages beyond its GPU budget on the CPU";
  t.push_back(f);

  f = {};
  f.method = "moba";
  f.title = "MoBA";
  f.residency = KvResidency::kSelect;
  f.sparse_prefill = true;
  f.params = {{"block", 4096, "tokens per block (moba_chunk_size)"},
              {"budget", 49152, "tokens attended (moba_topk 12 x block)"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.period_param = "block";
  f.metadata.bits_per_entry = [](std::int64_t d, std::int64_t bits, const P&) { return u(d) * u(bits); };
  f.metadata.formula = "d elements (mean key) per block";
  f.source = "MoonshotAI/MoBA: moba/moba_naive.py (arXiv 2502.13189)";
  t.push_back(f);

  f = {};
  f.method = "nsa";
  f.title = "NSA (selection branch)";
  f.residency = KvResidency::kSelect;
  f.sparse_prefill = true;
  f.params = {{"stride", 16, "tokens per compressed key"},
              {"block", 64, "selection block"},
              {"budget", 1024, "selected tokens (16 blocks of 64)"},
              {"window", 512, "sliding-window tokens"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.period_param = "stride";
  f.metadata.bits_per_entry = [](std::int64_t d, std::int64_t bits, const P&) { return u(d) * u(bits); };
  f.metadata.formula = "d elements (compressed key) every stride tokens";
  f.source = "fla-org/native-sparse-attention: native_sparse_attention/ops/naive.py (arXiv 2502.11089)";
  f.note = "compressed keys only (what selection needs); NSA's compression branch also keeps compressed values (x2)";
  t.push_back(f);

  f = {};
  f.method = "infllm";
  f.title = "InfLLM";
  f.residency = KvResidency::kSelect;
  f.sparse_prefill = true;
  f.params = {{"block", 128, "tokens per memory block"},
              {"budget", 2048, "selected tokens (16 blocks of 128)"},
              {"sinks", 128, "initial tokens (n_init)"},
              {"window", 4096, "local tokens (n_local)"}};
  f.metadata.scope = KvMetaScope::kQueryHead;
  f.metadata.period_param = "block";
  f.metadata.bits_per_entry = [](std::int64_t d, std::int64_t bits, const P&) { return u(d) * u(bits); };
  f.metadata.formula = "d elements (representative key) per block per query head";
  f.source = "thunlp/InfLLM: inf_llm/attention/context_manager.py (arXiv 2402.04617)";
  f.note = "full KV counted as resident; InfLLM offloads memory blocks to the CPU";
  t.push_back(f);

  f = {};
  f.method = "dsa";
  f.title = "DeepSeek Sparse Attention";
  f.residency = KvResidency::kSelect;
  f.sparse_prefill = true;
  f.params = {{"budget", 2048, "tokens attended (index top-k)"}, {"index_dim", 128, "indexer key width"}};
  f.metadata.scope = KvMetaScope::kLayer;
  f.metadata.bits_per_entry = [](std::int64_t, std::int64_t, const P& p) {
    return u(param_value(p, "index_dim", 128)) * 8 + 32;
  };
  f.metadata.formula = "index_dim fp8 elements + one fp32 scale per token per layer";
  f.source = "deepseek-ai/DeepSeek-V3.2-Exp: inference/model.py (Indexer), inference/kernel.py";
  t.push_back(f);

  f = {};
  f.method = "seer";
  f.title = "SeerAttention-R";
  f.residency = KvResidency::kSelect;
  f.params = {{"block", 64, "tokens per gate block"}, {"budget", 4096, "tokens attended"},
              {"gate_dim", 128, "gate key width"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.period_param = "block";
  f.metadata.bits_per_entry = [](std::int64_t, std::int64_t bits, const P& p) {
    return u(param_value(p, "gate_dim", 128)) * u(bits);
  };
  f.metadata.formula = "gate_dim elements (compressed gate key) per block";
  f.source = "microsoft/SeerAttention: seer_attn/decode_sparse/attn_gate_inf.py (arXiv 2506.08889)";
  t.push_back(f);

  f = {};
  f.method = "h2o";
  f.title = "H2O";
  f.residency = KvResidency::kEvict;
  f.evicts = true;
  f.params = {{"keep", 20, "percent of the context kept (heavy 10% + recent 10%), when budget is 0"},
              {"budget", 0, "tokens kept (0: keep percent)"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.bits_per_entry = [](std::int64_t, std::int64_t, const P&) -> std::uint64_t { return 32; };
  f.metadata.formula = "one fp32 accumulated score per resident token";
  f.source = "FMInference/H2O: h2o_hf/utils_real_drop/modify_llama.py (arXiv 2306.14048)";
  f.note = "scores per KV head (the MHA reference keeps one per attention head)";
  t.push_back(f);

  f = {};
  f.method = "snapkv";
  f.title = "SnapKV";
  f.residency = KvResidency::kEvict;
  f.evicts = true;
  f.params = {{"budget", 2048, "tokens kept after prefill (max_capacity_prompt, incl. the 32-token window)"},
              {"keep", 0, "percent of the context kept, when budget is 0"}};
  f.source = "FasterDecoding/SnapKV: snapkv/monkeypatch/snapkv_utils.py (arXiv 2404.14469)";
  t.push_back(f);

  f = {};
  f.method = "tova";
  f.title = "TOVA";
  f.residency = KvResidency::kEvict;
  f.evicts = true;
  f.params = {{"budget", 2048, "tokens kept"}, {"keep", 0, "percent of the context kept, when budget is 0"}};
  f.source = "NVIDIA/kvpress: kvpress/presses/tova_press.py (arXiv 2401.06104)";
  t.push_back(f);

  f = {};
  f.method = "doublesparsity";
  f.title = "Double Sparsity";
  f.residency = KvResidency::kSelect;
  f.params = {{"r", 0, "label channels (0: d/8)"}, {"bits", 0, "bits per label element (0: the KV dtype)"},
              {"budget", 1024, "tokens attended (heavy_const)"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.bits_per_entry = [](std::int64_t d, std::int64_t bits, const P& p) {
    return channels(d, p, 8) * element_bits(bits, p, "bits");
  };
  f.metadata.formula = "r label channels (default d/8) per token";
  f.source = "andy-yang-1/DoubleSparse: config/offline_calibration.py, LongBench/modify_llama.py (arXiv 2408.07092)";
  t.push_back(f);

  f = {};
  f.method = "loki";
  f.title = "Loki";
  f.residency = KvResidency::kSelect;
  f.params = {{"r", 0, "principal components scored (0: d/4)"},
              {"keep", 25, "percent of the context attended, when budget is 0"},
              {"budget", 0, "tokens attended (0: keep percent)"}};
  f.scan_is_metadata = false;
  f.scan.scope = KvMetaScope::kKvHead;
  f.scan.bits_per_entry = [](std::int64_t d, std::int64_t bits, const P& p) { return channels(d, p, 4) * u(bits); };
  f.scan.formula = "r rotated key channels (default d/4) per token";
  f.source = "hpcgroup/loki: methods/pca_topk/utils.py (arXiv 2406.02542)";
  f.note = "no metadata: keys are stored in the PCA basis";
  t.push_back(f);

  f = {};
  f.method = "sparq";
  f.title = "SparQ";
  f.residency = KvResidency::kSelect;
  f.params = {{"r", 0, "query channels scored (0: d/8)"}, {"budget", 1024, "tokens attended"},
              {"copy", 1, "1: a second, column-major copy of K (the paper); 0: channels gathered from K"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.bits_per_entry = [](std::int64_t d, std::int64_t bits, const P& p) {
    return param_value(p, "copy", 1) != 0 ? u(d) * u(bits) : 0;
  };
  f.metadata.formula = "d elements (a second copy of K) per token, or 0 with copy=0";
  f.scan_is_metadata = false;
  f.scan.scope = KvMetaScope::kKvHead;
  f.scan.bits_per_entry = [](std::int64_t d, std::int64_t bits, const P& p) { return channels(d, p, 8) * u(bits); };
  f.scan.formula = "r key channels (default d/8) per token";
  f.source = "graphcore-research/llm-inference-research: llminference/methods/ann_attention.py (arXiv 2312.04985)";
  t.push_back(f);

  f = {};
  f.method = "magicpig";
  f.title = "MagicPIG";
  f.residency = KvResidency::kSelect;
  f.params = {{"tables", 150, "LSH tables (L)"}, {"bits", 10, "hash bits per table (K)"},
              {"budget", 1024, "expected sampled tokens"}, {"sinks", 4, "static initial tokens"},
              {"window", 64, "static recent tokens"}};
  f.metadata.scope = KvMetaScope::kKvHead;
  f.metadata.bits_per_entry = [](std::int64_t, std::int64_t, const P& p) {
    return u(param_value(p, "tables", 150)) * u(param_value(p, "bits", 10));
  };
  f.metadata.formula = "L*K hash bits per token";
  f.source = "Infini-AI-Lab/MagicPIG: evaluations/RULER/pred/cache_ref.py (arXiv 2410.16179)";
  f.note = "the reference stores each table's code as int16 (L*16 bits); full KV on the CPU";
  t.push_back(f);

  f = {};
  f.method = "tidaldecode";
  f.title = "TidalDecode";
  f.residency = KvResidency::kSelect;
  f.params = {{"budget", 4096, "tokens attended"}};
  f.source = "DerrickYLJ/TidalDecode: src/tidal_build/modify_llama.py (arXiv 2410.05076)";
  f.note = "no metadata: selection layers compute exact top-k, later layers reuse it";
  t.push_back(f);

  f = {};
  f.method = "oracle";
  f.title = "Oracle top-k";
  f.residency = KvResidency::kSelect;
  f.params = {{"budget", 1024, "tokens attended"}};
  f.source = "exact top-k of the true attention (an upper bound; needs every score)";
  t.push_back(f);

  return t;
}

}  // namespace

const char* to_string(KvResidency residency) {
  switch (residency) {
    case KvResidency::kAllFull: return "all layers full";
    case KvResidency::kNative: return "model layer types";
    case KvResidency::kWindowAll: return "sinks + window on every layer";
    case KvResidency::kHybridWindow: return "full layers all tokens, window layers a window";
    case KvResidency::kHybridSparse: return "full layers all tokens, sparse layers a window + top-k reads of the full layer";
    case KvResidency::kSelect: return "full KV, a budget attended per step";
    case KvResidency::kEvict: return "a token budget kept";
    case KvResidency::kHeadSplit: return "retrieval heads full, streaming heads sinks + recent";
  }
  return "?";
}

const char* to_string(KvMetaScope scope) {
  switch (scope) {
    case KvMetaScope::kNone: return "none";
    case KvMetaScope::kKvHead: return "per KV head";
    case KvMetaScope::kQueryHead: return "per query head";
    case KvMetaScope::kLayer: return "per layer";
  }
  return "?";
}

std::int64_t param_value(const std::vector<KvParam>& params, const std::string& name, std::int64_t fallback) {
  for (const auto& p : params) {
    if (p.name == name) return p.value;
  }
  return fallback;
}

bool has_param(const std::vector<KvParam>& params, const std::string& name) {
  for (const auto& p : params) {
    if (p.name == name) return true;
  }
  return false;
}

const std::vector<KvFootprint>& kv_footprints() {
  static const std::vector<KvFootprint> table = build_table();
  return table;
}

std::vector<std::string> footprint_names() {
  std::vector<std::string> names;
  for (const auto& f : kv_footprints()) names.push_back(f.method);
  return names;
}

const KvFootprint& find_footprint(const std::string& method) {
  for (const auto& f : kv_footprints()) {
    if (f.method == method) return f;
  }
  fail(ErrorKind::kUsage, "unknown method '{}' (expected one of: {})", method, fmt::join(footprint_names(), ", "));
}

std::uint64_t metadata_bits_per_entry(const KvMetadata& metadata, std::int64_t d, std::int64_t dtype_bits,
                                      const std::vector<KvParam>& params) {
  return metadata.bits_per_entry ? metadata.bits_per_entry(d, dtype_bits, params) : 0;
}

std::uint64_t metadata_fixed_bits(const KvMetadata& metadata, std::int64_t d, std::int64_t dtype_bits,
                                  const std::vector<KvParam>& params) {
  return metadata.fixed_bits ? metadata.fixed_bits(d, dtype_bits, params) : 0;
}

std::int64_t metadata_period(const KvMetadata& metadata, const std::vector<KvParam>& params) {
  if (metadata.period_param.empty()) return 1;
  const std::int64_t period = param_value(params, metadata.period_param, 1);
  return period < 1 ? 1 : period;
}

}  // namespace hysparse
