#pragma once
// KV accounting over methods x contexts, and its three renderings: a text table,
// JSON, and HDF5 datasets (for `hysparse kv -o` and for replay reports).
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/h5.hpp"
#include "kv/kv.hpp"

namespace hysparse {

inline constexpr const char* kKvReportFormat = "hysparse-kv-report";
inline constexpr std::int64_t kKvReportFormatVersion = 1;

struct KvTable {
  KvModel model;
  KvDtype dtype = KvDtype::kBf16;
  std::uint64_t batch = 1;
  std::vector<KvMethod> methods;
  std::vector<std::uint64_t> contexts;
  std::vector<std::vector<KvAccounting>> results;  // [method][context]
};

KvTable compute_kv_table(const KvModel& model, const std::vector<KvMethod>& methods, KvDtype dtype,
                         std::uint64_t batch, const std::vector<std::uint64_t>& contexts);

// "hysparse-80b-a3b: 49 layers, 64 q / 4 kv heads (GQA), head_dim 128"
std::string describe_model(const KvModel& model);
// The FLOP convention, one sentence (also written into reports).
const char* kv_flop_convention();

// Human-readable: a header (model, dtype, schedule), the main table, the
// breakdown by layer type, and the methods' parameters and sources.
std::string format_kv_text(const KvTable& table);
nlohmann::json kv_table_json(const KvTable& table);

// Datasets [method, context] (and [method, context, layer]) with dimension scales
// `method`, `context`, `layer`, `units`/`long_name` on every dataset, and the model,
// dtype, batch and schedules as attributes of `group` ("/" or e.g. "/kv").
void write_kv_table(const h5::File& file, const std::string& group, const KvTable& table);

// Thousands separators: 100352 -> "100,352".
std::string group_digits(std::uint64_t value);

}  // namespace hysparse
