#pragma once
// Built-in model shapes for `hysparse kv --preset NAME`; each cites its source.
#include <string>
#include <vector>

#include "kv/kv.hpp"

namespace hysparse {

const std::vector<KvModel>& kv_presets();
// Throws Error(kUsage) listing the preset names.
const KvModel& find_kv_preset(const std::string& name);
std::vector<std::string> kv_preset_names();

}  // namespace hysparse
