#pragma once
// SHA-256 of input files, remembered between runs: a capture of tens of gigabytes is hashed once,
// not at every replay or sweep (hashing runs at about 1-2 GB/s, and can outlast a GPU replay).
// A digest is reused only while the file's identity is exactly the one recorded with it: device,
// inode, size, and modification and status-change times to the nanosecond (the status-change time
// moves on every write, and no unprivileged writer can set it back), and only on local filesystems
// that keep both times to the nanosecond (digest_cache_covers). Elsewhere (NFS, FUSE mounts such as
// sshfs, which report ctime = mtime in seconds, FAT, cluster filesystems) every run hashes.
#include <string>

namespace hysparse {

// A file changed less than this before the hash started is hashed but not recorded: a write within
// the kernel's timestamp granularity of the hash could otherwise leave its times unchanged.
inline constexpr double kDigestCacheSettleSeconds = 1.0;

struct FileDigest {
  std::string sha256;       // lowercase hex
  bool from_cache = false;  // true: taken from the cache, the file unchanged since it was hashed
};

// Whether `path` lies on a filesystem whose times the cache trusts: ext2/3/4, xfs, btrfs, tmpfs,
// overlayfs, zfs, f2fs.
bool digest_cache_covers(const std::string& path);

// Where digests are kept: $HYSPARSE_SHA256_CACHE (a directory, or "off"), else
// $XDG_CACHE_HOME/hysparse/sha256, else $HOME/.cache/hysparse/sha256; "" when off.
std::string digest_cache_directory();

// sha256_of_file(path) through the cache. Cache trouble (unwritable, corrupt entries) only
// costs a hash: the digest returned is always the file's. Error(kInput) when unreadable.
FileDigest sha256_of_file_cached(const std::string& path);

}  // namespace hysparse
