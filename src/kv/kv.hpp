#pragma once
// KV-cache memory accounting: resident bytes, bytes read per decoded token and
// attention FLOPs for a model shape, a layer schedule and an attention method.
// Exact integer arithmetic: every byte count is uint64 with overflow checks
// (an overflow is an Error, never a wrap). FLOPs are doubles (they exceed 2^64
// for long prefills of large models; exact below 2^53).
//
// FLOP convention: 2 FLOPs per multiply-add; QK^T and PV only (no softmax, no
// projections, no selection scoring). A decoded token at context T attends T keys
// (itself included); a causal prefill of T tokens counts the lower triangle with the
// diagonal, T(T+1)/2 query-key pairs. MLA counts decode in the absorbed (MQA) form
// (keys kv_lora_rank + qk_rope_head_dim wide, values kv_lora_rank wide) and prefill
// in the expanded form (qk_nope_head_dim + qk_rope_head_dim, v_head_dim).
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kv/footprint.hpp"

namespace hysparse {

// ---- element types of the KV cache ----
enum class KvDtype { kFp8, kBf16, kFp16, kFp32 };
KvDtype parse_kv_dtype(const std::string& text);  // bf16|bfloat16, fp16|float16, fp32|float32, fp8|float8; Error(kUsage)
const char* to_string(KvDtype dtype);             // "bf16", ...
std::int64_t kv_dtype_bits(KvDtype dtype);

// ---- model ----
enum class KvLayerType { kFull, kSliding, kChunked };
const char* to_string(KvLayerType type);  // full_attention | sliding_attention | chunked_attention
// Accepts the Hugging Face / capture names above; Error(kInput) naming `where` otherwise.
KvLayerType parse_layer_type(const std::string& text, const std::string& where);

struct KvModel {
  std::string name;
  std::string source;                  // where the numbers come from
  std::int64_t num_layers = 0;
  std::int64_t num_q_heads = 0;
  std::int64_t num_kv_heads = 0;       // MLA: the config's value (informative; the cache holds one latent)
  std::int64_t head_dim = 0;           // query/key head dim (MLA: qk_nope_head_dim + qk_rope_head_dim)
  std::int64_t v_head_dim = 0;         // 0: same as head_dim
  // MLA (DeepSeek): kv_lora_rank > 0 caches one latent of kv_lora_rank plus a shared
  // rope key of qk_rope_head_dim per token per layer, for all heads.
  std::int64_t kv_lora_rank = 0;
  std::int64_t qk_rope_head_dim = 0;
  std::vector<KvLayerType> layer_types;  // the model's own; empty: every layer full
  std::int64_t sliding_window = 0;       // tokens of kSliding layers
  std::int64_t chunk_size = 0;           // tokens per chunk of kChunked layers
  // Hybrid (HySparse-style) defaults for the hybrid-swa and hysparse methods.
  std::string hybrid_schedule;         // a parse_schedule() spec; empty: none (give --schedule)
  std::int64_t hybrid_window = 128;
  std::int64_t hybrid_topk = 1024;
  std::int64_t hybrid_block = 64;

  bool is_mla() const { return kv_lora_rank > 0; }
  std::int64_t value_dim() const { return v_head_dim > 0 ? v_head_dim : head_dim; }
  std::int64_t cached_heads() const { return is_mla() ? 1 : num_kv_heads; }  // heads stored in the cache
  std::int64_t cached_key_dim() const { return is_mla() ? kv_lora_rank + qk_rope_head_dim : head_dim; }
  // Elements per token per cached head per layer: K + V, or the MLA latent + rope key.
  std::int64_t cached_elements_per_head() const {
    return is_mla() ? kv_lora_rank + qk_rope_head_dim : head_dim + value_dim();
  }
  KvLayerType layer_type(std::int64_t layer) const {
    return layer_types.empty() ? KvLayerType::kFull : layer_types[static_cast<std::size_t>(layer)];
  }
  bool has_non_full_layers() const;
  std::string attention_kind() const;  // MHA, GQA, MQA or MLA
};

// Throws Error(kInput) naming the model and the field.
void validate(const KvModel& model);

// Bytes of one token in one layer (all cached heads), and in the whole model with every layer full.
std::uint64_t kv_bytes_per_token_per_layer(const KvModel& model, KvDtype dtype);
std::uint64_t kv_bytes_per_token_full(const KvModel& model, KvDtype dtype);

// For the replay: a model from a capture's header. `layer_types` uses the capture
// names (may be empty); the window/chunk size is required when such layers exist.
KvModel kv_model_from_shape(const std::string& name, std::int64_t num_layers, std::int64_t num_q_heads,
                            std::int64_t num_kv_heads, std::int64_t head_dim,
                            const std::vector<std::string>& layer_types,
                            std::optional<std::int64_t> sliding_window,
                            std::optional<std::int64_t> chunk_size = std::nullopt);

// ---- method ----
struct KvMethod {
  std::string spec;               // as given, e.g. "quest:page=32"
  const KvFootprint* footprint = nullptr;
  std::vector<KvParam> params;    // resolved values
  std::vector<bool> schedule;     // hybrid methods: true = full layer
  std::string schedule_spec;

  const std::string& name() const { return footprint->method; }
  std::int64_t param(const std::string& key, std::int64_t fallback = 0) const {
    return param_value(params, key, fallback);
  }
  std::string describe() const;  // "quest:page=16,budget=1024" with every resolved parameter
};

// Global values from the command line (--window, --topk, --block, --budget, --sinks):
// each applies to every method that has a parameter of that name.
struct KvOverrides {
  std::vector<std::pair<std::string, std::int64_t>> values;
  std::string schedule;  // --schedule; empty: the model's hybrid schedule
};

// "name" or "name:key=value,key=value". Precedence: spec keys > overrides > the
// model's hybrid defaults (hybrid methods) > the method's defaults. Error(kUsage).
KvMethod resolve_method(const std::string& spec, const KvModel& model, const KvOverrides& overrides = {});

// Splits "full,quest:page=32,budget=512,h2o" into specs: an item with '=' but no ':'
// continues the previous spec ("quest:page=32,budget=512"). "all" expands to every
// method that applies to `model` (hybrid methods need a schedule, duo per-head KV).
std::vector<std::string> split_method_list(const std::string& list, const KvModel& model,
                                           const KvOverrides& overrides);

// full; native when the model has non-full layers; hybrid-swa and hysparse when a
// hybrid schedule is known (the model's or --schedule).
std::vector<std::string> default_method_specs(const KvModel& model, const KvOverrides& overrides);

// ---- contexts ----
// "4K,32K,128K,1M": binary suffixes K = 2^10, M = 2^20, G = 2^30 (either case), plain integers too.
std::vector<std::uint64_t> parse_contexts(const std::string& list);
std::string format_context(std::uint64_t tokens);  // 16384 -> "16K", 1000 -> "1000"

// ---- accounting ----
// One layer of one sequence.
struct KvLayerAccount {
  std::uint64_t kv_bytes = 0;        // resident K/V
  std::uint64_t metadata_bytes = 0;  // resident metadata
  std::uint64_t read_bytes = 0;      // read by one decoded token (K/V + scanned metadata)
  double decode_flops = 0;           // one decoded token
  double prefill_flops = 0;          // a prefill of the whole context
  std::string role;                  // "full", "window", "sparse", "select", "evict", "duo"
};

struct KvAccounting {
  std::string method;             // spec as resolved (describe())
  std::uint64_t context = 0;      // T, tokens per sequence
  std::uint64_t batch = 1;
  // Resident, whole batch.
  std::uint64_t resident_bytes = 0;        // K/V + metadata
  std::uint64_t kv_bytes = 0;              // K/V only
  std::uint64_t metadata_bytes = 0;
  std::uint64_t full_layer_bytes = 0;      // K/V in layers (or heads) that keep every token
  std::uint64_t window_layer_bytes = 0;    // K/V in window, chunk and sparse layers (or streaming heads)
  std::uint64_t budget_layer_bytes = 0;    // K/V kept by evicting budgets
  std::uint64_t full_attention_bytes = 0;  // the same model with every layer full, no metadata, whole batch
  double ratio_to_full = 0;                // full_attention_bytes / resident_bytes
  // Per sequence.
  double bytes_per_token = 0;              // resident / (batch * T), amortised
  double marginal_bytes_per_token = 0;     // growth of one sequence's cache per extra token at T (paged metadata spread over its page)
  std::uint64_t read_bytes_per_decoded_token = 0;
  double decode_flops_per_token = 0;
  double prefill_flops = 0;                // one sequence's prefill of T tokens
  std::vector<KvLayerAccount> layers;      // per sequence
};

// The pure accounting function the CLI and the replay share. Error(kUsage) on a
// context or batch of 0, and when a byte count overflows 64 bits (naming the context).
KvAccounting account(const KvModel& model, const KvMethod& method, KvDtype dtype, std::uint64_t batch,
                     std::uint64_t context);

}  // namespace hysparse
