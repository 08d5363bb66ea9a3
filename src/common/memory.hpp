#pragma once
// Refuse work that cannot fit before allocating it, instead of dying on bad_alloc.
#include <cstdint>
#include <string>

namespace hysparse {

std::uint64_t available_memory_bytes();  // MemAvailable from /proc/meminfo, or physical pages
std::string format_bytes(std::uint64_t bytes);  // "1.50 GiB (1610612736 bytes)"

// Throws Error(kResource) naming `what` when `bytes` exceeds the memory available.
void require_memory(std::uint64_t bytes, const std::string& what);

// a * b with an overflow check; `what` names the quantity in the error.
std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what);

}  // namespace hysparse
