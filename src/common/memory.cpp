#include "common/memory.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <vector>

#include "common/error.hpp"

namespace hysparse {
namespace {

constexpr std::uint64_t kUnlimited = std::numeric_limits<std::uint64_t>::max();

// "512", "64K", "512M", "8G", "1T" (binary suffixes, either case); false on anything else or overflow.
bool parse_byte_count(const std::string& text, std::uint64_t& bytes) {
  if (text.empty()) return false;
  std::string digits = text;
  std::uint64_t scale = 1;
  switch (text.back()) {
    case 'k': case 'K': scale = 1ull << 10; break;
    case 'm': case 'M': scale = 1ull << 20; break;
    case 'g': case 'G': scale = 1ull << 30; break;
    case 't': case 'T': scale = 1ull << 40; break;
    default: break;
  }
  if (scale != 1) digits.pop_back();
  if (digits.empty() || digits.size() > 19) return false;
  std::uint64_t number = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
    number = number * 10 + static_cast<std::uint64_t>(c - '0');  // 19 digits fit in 64 bits
  }
  if (number != 0 && scale > kUnlimited / number) return false;
  bytes = number * scale;
  return true;
}

std::uint64_t meminfo_available() {
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line)) {
    std::istringstream fields(line);
    std::string key;
    std::uint64_t kib = 0;
    if (fields >> key >> kib && key == "MemAvailable:") return kib * 1024;
  }
  const long pages = sysconf(_SC_AVPHYS_PAGES);
  const long page_size = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page_size > 0) return static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page_size);
  return kUnlimited;
}

// A single number from a cgroup file; "max" (v2) and absurd v1 values mean no limit.
std::uint64_t read_cgroup_number(const std::string& path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word == "max") return kUnlimited;
  std::uint64_t value = 0;
  if (!parse_byte_count(word, value) || value >= (1ull << 62)) return kUnlimited;
  return value;
}

// The cgroup's limit minus its usage (v2 unified hierarchy, else v1 memory controller).
std::uint64_t cgroup_available() {
  std::string v2_path;
  std::ifstream cgroups("/proc/self/cgroup");
  std::string line;
  while (std::getline(cgroups, line)) {
    if (line.rfind("0::", 0) == 0) v2_path = line.substr(3);
  }
  std::vector<std::string> v2_dirs;
  if (!v2_path.empty() && v2_path != "/") v2_dirs.push_back("/sys/fs/cgroup" + v2_path);
  v2_dirs.emplace_back("/sys/fs/cgroup");  // inside a container the namespace root is its own cgroup
  for (const auto& dir : v2_dirs) {
    const std::uint64_t limit = read_cgroup_number(dir + "/memory.max");
    if (limit == kUnlimited) continue;
    const std::uint64_t used = read_cgroup_number(dir + "/memory.current");
    return used == kUnlimited || used >= limit ? 0 : limit - used;
  }
  const std::uint64_t v1_limit = read_cgroup_number("/sys/fs/cgroup/memory/memory.limit_in_bytes");
  if (v1_limit == kUnlimited) return kUnlimited;
  const std::uint64_t v1_used = read_cgroup_number("/sys/fs/cgroup/memory/memory.usage_in_bytes");
  return v1_used == kUnlimited || v1_used >= v1_limit ? 0 : v1_limit - v1_used;
}

// RLIMIT_AS (ulimit -v) minus the address space already mapped.
std::uint64_t address_space_available() {
  rlimit limit{};
  if (getrlimit(RLIMIT_AS, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return kUnlimited;
  std::ifstream status("/proc/self/status");
  std::string line;
  std::uint64_t vm_kib = 0;
  while (std::getline(status, line)) {
    if (line.rfind("VmSize:", 0) == 0) {
      std::istringstream fields(line.substr(7));
      fields >> vm_kib;
    }
  }
  const auto cap = static_cast<std::uint64_t>(limit.rlim_cur);
  return vm_kib * 1024 >= cap ? 0 : cap - vm_kib * 1024;
}

}  // namespace

MemoryBudget available_memory() {
  MemoryBudget budget{meminfo_available(), "MemAvailable"};
  auto consider = [&](std::uint64_t bytes, const char* source) {
    if (bytes < budget.bytes) budget = {bytes, source};
  };
  consider(cgroup_available(), "cgroup memory limit");
  consider(address_space_available(), "ulimit -v");
  if (const char* env = std::getenv("HYSPARSE_MEMORY_LIMIT"); env != nullptr && *env != '\0') {
    std::uint64_t limit = 0;
    if (!parse_byte_count(env, limit)) {
      fail(ErrorKind::kUsage, "HYSPARSE_MEMORY_LIMIT='{}': expected a byte count such as 536870912, 512M or 8G", env);
    }
    consider(limit, "HYSPARSE_MEMORY_LIMIT");
  }
  return budget;
}

std::uint64_t available_memory_bytes() { return available_memory().bytes; }

std::string format_bytes(std::uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 6) {
    value /= 1024.0;
    ++unit;
  }
  if (unit == 0) return fmt::format("{} B", bytes);
  return fmt::format("{:.2f} {} ({} bytes)", value, units[unit], bytes);
}

void require_memory(std::uint64_t bytes, const std::string& what) {
  const MemoryBudget budget = available_memory();
  if (bytes > budget.bytes) {
    fail(ErrorKind::kResource, "{} needs {} of memory but only {} is available (limited by {})", what,
         format_bytes(bytes), format_bytes(budget.bytes), budget.limited_by);
  }
}

std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) {
    fail(ErrorKind::kInput, "{} overflows 64 bits ({} x {})", what, a, b);
  }
  return a * b;
}

}  // namespace hysparse
