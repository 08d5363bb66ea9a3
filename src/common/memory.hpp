#pragma once
// Refuse work that cannot fit before allocating it, instead of dying on bad_alloc.
#include <cstdint>
#include <string>

namespace hysparse {

// The memory this process may still allocate, and which limit set it.
struct MemoryBudget {
  std::uint64_t bytes = 0;
  std::string limited_by;  // e.g. "MemAvailable", "cgroup memory.max", "ulimit -v", "HYSPARSE_MEMORY_LIMIT"
};

// The least of: MemAvailable (/proc/meminfo, else free physical pages), the cgroup's memory limit minus
// its usage (containers, where MemAvailable shows the host), RLIMIT_AS minus the address space in use
// (ulimit -v), and the environment variable HYSPARSE_MEMORY_LIMIT (bytes; K, M, G, T binary suffixes),
// which caps the budget for tests and shared machines. A malformed HYSPARSE_MEMORY_LIMIT is Error(kUsage).
MemoryBudget available_memory();
std::uint64_t available_memory_bytes();  // available_memory().bytes

std::string format_bytes(std::uint64_t bytes);  // "1.50 GiB (1610612736 bytes)"

// Throws Error(kResource) naming `what`, the bytes needed and the budget when `bytes` does not fit.
void require_memory(std::uint64_t bytes, const std::string& what);

// a * b with an overflow check; `what` names the quantity in the error (kInput).
std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what);

}  // namespace hysparse
