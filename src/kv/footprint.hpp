#pragma once
// What each attention method keeps resident, besides K and V: the one table that
// `hysparse kv` and the selector registry share (one source of truth). The numbers
// come from the reference implementations and papers cited in each entry's `source`
// (see also the Mem column of the proxy survey).
//
// Metadata is a formula of the cached key width d (head_dim; kv_lora_rank +
// qk_rope_head_dim for MLA), the KV element width in bits and the method's
// parameters (page/block size, channels, hash tables, ...). It is counted in bits
// per entry, with one entry every `period` resident tokens (a partial page still has
// an entry), per scope unit (a KV head, a query head, or the layer), per layer.
#include <cstdint>
#include <string>
#include <vector>

namespace hysparse {

// How a method decides which K/V stay resident.
enum class KvResidency {
  kAllFull,       // every layer keeps every token (full attention)
  kNative,        // the model's own layer types (full, sliding window, chunked)
  kWindowAll,     // every layer keeps sinks + a recent window; the rest is evicted (SWA, StreamingLLM)
  kHybridWindow,  // schedule: full layers keep everything, the others a window (hybrid SWA)
  kHybridSparse,  // schedule: as kHybridWindow, and sparse layers also read top-k tokens of the preceding full layer (HySparse)
  kSelect,        // full KV kept (maybe offloaded); each decoded token attends a selected budget
  kEvict,         // a token budget per KV head stays, the rest is evicted for good
  kHeadSplit,     // some KV heads keep everything, the others sinks + recent (DuoAttention)
};
const char* to_string(KvResidency residency);

// One tunable of a method, with its default.
struct KvParam {
  std::string name;
  std::int64_t value = 0;
  std::string meaning;
};
// The value of `name` in `params`, or `fallback` when absent.
std::int64_t param_value(const std::vector<KvParam>& params, const std::string& name, std::int64_t fallback = 0);
bool has_param(const std::vector<KvParam>& params, const std::string& name);

enum class KvMetaScope { kNone, kKvHead, kQueryHead, kLayer };
const char* to_string(KvMetaScope scope);

// bits = f(cached key width d, KV element bits, resolved parameters)
using KvBitsFormula = std::uint64_t (*)(std::int64_t d, std::int64_t dtype_bits, const std::vector<KvParam>& params);

struct KvMetadata {
  KvMetaScope scope = KvMetaScope::kNone;
  std::string period_param;               // tokens per entry ("page"); empty: one entry per token
  KvBitsFormula bits_per_entry = nullptr;  // null: none
  KvBitsFormula fixed_bits = nullptr;      // per scope unit and layer, independent of the context (gates)
  std::string formula;                     // human-readable, e.g. "2*d elements per page"
  bool empty() const { return bits_per_entry == nullptr && fixed_bits == nullptr; }
};

struct KvFootprint {
  std::string method;  // registry name, e.g. "quest"
  std::string title;   // e.g. "Quest"
  KvResidency residency = KvResidency::kAllFull;
  bool evicts = false;          // tokens leave the cache for good (no later step can attend them)
  bool sparse_prefill = false;  // prefill attends the same reduced set; otherwise prefill is dense
  std::vector<KvParam> params;  // defaults; `budget`/`keep`/`sinks`/`window` set the attended or kept tokens
  KvMetadata metadata;          // resident, in addition to K and V
  KvMetadata scan;              // read by every decoded token to score candidates
  bool scan_is_metadata = true; // the scan reads all of the metadata (then `scan` is unused)
  std::string source;           // where the numbers come from
  std::string note;             // caveats
};

// The built-in table, in a fixed order.
const std::vector<KvFootprint>& kv_footprints();
// Throws Error(kUsage) listing the known names.
const KvFootprint& find_footprint(const std::string& method);
std::vector<std::string> footprint_names();

// Evaluations of a metadata formula (0 when the formula is empty).
std::uint64_t metadata_bits_per_entry(const KvMetadata& metadata, std::int64_t d, std::int64_t dtype_bits,
                                      const std::vector<KvParam>& params);
std::uint64_t metadata_fixed_bits(const KvMetadata& metadata, std::int64_t d, std::int64_t dtype_bits,
                                  const std::vector<KvParam>& params);
std::int64_t metadata_period(const KvMetadata& metadata, const std::vector<KvParam>& params);  // >= 1

}  // namespace hysparse
