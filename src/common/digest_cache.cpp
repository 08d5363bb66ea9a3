#include "common/digest_cache.hpp"

#include <sys/statfs.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <thread>

#include <fmt/format.h>

#include "common/atomic_file.hpp"
#include "common/sha256.hpp"

namespace hysparse {
namespace {

constexpr const char* kEntryTag = "hysparse-sha256-v1";

std::string entry_path(const std::string& directory, const FileIdentity& id) {
  return fmt::format("{}/{:x}-{:x}", directory, static_cast<unsigned long long>(id.device),
                     static_cast<unsigned long long>(id.inode));
}

std::string entry_text(const FileIdentity& id, const std::string& digest) {
  return fmt::format("{} {} {} {} {} {} {}\n", kEntryTag, static_cast<long long>(id.size),
                     static_cast<long long>(id.modified.tv_sec), static_cast<long long>(id.modified.tv_nsec),
                     static_cast<long long>(id.status_changed.tv_sec), static_cast<long long>(id.status_changed.tv_nsec),
                     digest);
}

bool is_hex_digest(const std::string& text) {
  if (text.size() != 64) return false;
  for (char c : text) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

// The recorded digest when the entry describes exactly this identity, else "".
std::string lookup(const std::string& directory, const FileIdentity& id) {
  std::ifstream in(entry_path(directory, id));
  std::string line;
  if (!in || !std::getline(in, line)) return "";
  std::istringstream fields(line);
  std::string tag, digest;
  long long size = 0, m_sec = 0, m_nsec = 0, c_sec = 0, c_nsec = 0;
  if (!(fields >> tag >> size >> m_sec >> m_nsec >> c_sec >> c_nsec >> digest) || tag != kEntryTag) return "";
  if (size != static_cast<long long>(id.size) || m_sec != static_cast<long long>(id.modified.tv_sec) ||
      m_nsec != static_cast<long long>(id.modified.tv_nsec) || c_sec != static_cast<long long>(id.status_changed.tv_sec) ||
      c_nsec != static_cast<long long>(id.status_changed.tv_nsec) || !is_hex_digest(digest)) {
    return "";
  }
  return digest;
}

timespec now() {
  timespec t{};
  clock_gettime(CLOCK_REALTIME, &t);
  return t;
}

double seconds_between(const timespec& earlier, const timespec& later) {
  return static_cast<double>(later.tv_sec - earlier.tv_sec) + 1e-9 * static_cast<double>(later.tv_nsec - earlier.tv_nsec);
}

// Written whole under a temporary name, then renamed: a reader never sees half an entry.
void record(const std::string& directory, const FileIdentity& id, const std::string& digest) {
  std::error_code ignored;
  if (std::filesystem::create_directories(directory, ignored)) {
    std::filesystem::permissions(directory, std::filesystem::perms::owner_all, ignored);  // digests of this user only
  }
  const std::string path = entry_path(directory, id);
  const std::string temporary =
      fmt::format("{}.tmp-{}-{:x}", path, static_cast<long long>(getpid()), std::hash<std::thread::id>{}(std::this_thread::get_id()));
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << entry_text(id, digest);
    if (!out.flush()) {
      std::filesystem::remove(temporary, ignored);
      return;
    }
  }
  std::filesystem::rename(temporary, path, ignored);
  if (ignored) std::filesystem::remove(temporary, ignored);
}

}  // namespace

bool digest_cache_covers(const std::string& path) {
  struct statfs fs {};
  if (statfs(path.c_str(), &fs) != 0) return false;
  switch (static_cast<unsigned long>(fs.f_type)) {
    case 0xEF53:      // ext2/3/4
    case 0x58465342:  // xfs
    case 0x9123683E:  // btrfs
    case 0x01021994:  // tmpfs
    case 0x794C7630:  // overlayfs
    case 0x2FC12FC1:  // zfs
    case 0xF2F52010:  // f2fs
      return true;
    default:
      return false;
  }
}

std::string digest_cache_directory() {
  if (const char* chosen = std::getenv("HYSPARSE_SHA256_CACHE"); chosen && *chosen) {
    return std::string(chosen) == "off" ? "" : chosen;
  }
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return std::string(xdg) + "/hysparse/sha256";
  if (const char* home = std::getenv("HOME"); home && *home) return std::string(home) + "/.cache/hysparse/sha256";
  return "";
}

FileDigest sha256_of_file_cached(const std::string& path) {
  const std::string directory = digest_cache_directory();
  const timespec started = now();  // before the first look at the file: the settle time counts from here
  const FileIdentity before = identify(path);
  if (directory.empty() || !before.exists || !digest_cache_covers(path)) return {sha256_of_file(path), false};
  if (std::string digest = lookup(directory, before); !digest.empty()) return {digest, true};
  FileDigest result{sha256_of_file(path), false};
  const FileIdentity after = identify(path);
  const bool settled = seconds_between(before.modified, started) > kDigestCacheSettleSeconds &&
                       seconds_between(before.status_changed, started) > kDigestCacheSettleSeconds;
  if (after == before && settled) record(directory, before, result.sha256);
  return result;
}

}  // namespace hysparse
