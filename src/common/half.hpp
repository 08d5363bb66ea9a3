#pragma once
// IEEE binary16 and bfloat16 <-> float32, bit-exact and independent of the
// compiler's _Float16 support.
#include <cstdint>

namespace hysparse {

float half_to_float(std::uint16_t bits);
std::uint16_t float_to_half(float value);  // round to nearest even
float bfloat16_to_float(std::uint16_t bits);
std::uint16_t float_to_bfloat16(float value);  // round to nearest even, NaN kept NaN

}  // namespace hysparse
