#pragma once
// Full/sparse layer schedules, one syntax for `hysparse kv` and the replay:
//   FSSS          a pattern of F (full) and S (sparse or window) repeated over the layers
//   1:3           blocks of one full then three sparse layers; the last layer is forced full
//   full=0,4,8    an explicit list of the full layers
//   hysparse-7b   the paper's 7B schedule (36 layers, 1:3, last full: 10 full layers)
//   hysparse-80b-a3b  the paper's 80B-A3B schedule (49 layers, full layers 0,12,24,36,48)
// The first layer must be full (a sparse layer reads the preceding full layer).
// Every malformed spec is an Error(kUsage) that names the spec and what is wrong.
#include <cstdint>
#include <string>
#include <vector>

namespace hysparse {

// One entry per layer, true = full. Throws Error(kUsage).
std::vector<bool> parse_schedule(const std::string& spec, std::int64_t num_layers);

// The schedule presets' names, for help texts.
std::vector<std::string> schedule_preset_names();

// Indices of the full layers.
std::vector<std::int64_t> full_layer_indices(const std::vector<bool>& full);

// "FSSSFSSS...": one letter per layer.
std::string schedule_pattern(const std::vector<bool>& full);

// A short description: "10 full + 26 sparse layers, full = 0,4,...,35".
std::string describe_schedule(const std::vector<bool>& full);

}  // namespace hysparse
