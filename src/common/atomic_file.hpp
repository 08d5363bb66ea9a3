#pragma once
// Output files appear whole or not at all: write to a temporary name in the
// destination directory, then rename() over the destination. And only when the
// inputs they were computed from did not change while they were read.
#include <sys/stat.h>
#include <sys/types.h>

#include <ctime>
#include <string>

namespace hysparse {

// What identifies a file's contents without reading them. ctime cannot be set back by an
// unprivileged writer, so any write (even one that restores size and mtime) changes it.
struct FileIdentity {
  bool exists = false;
  dev_t device = 0;
  ino_t inode = 0;
  off_t size = 0;
  timespec modified{}, status_changed{};
  bool operator==(const FileIdentity& o) const;
};
FileIdentity identify(const std::string& path);  // exists = false when stat() fails

class AtomicOutput {
 public:
  // Checks, before any work, that the destination can be created: its directory exists and is
  // writable, and the destination is not a directory. Throws Error(kOutput).
  explicit AtomicOutput(std::string destination);
  AtomicOutput(const AtomicOutput&) = delete;
  AtomicOutput& operator=(const AtomicOutput&) = delete;
  ~AtomicOutput();  // removes the temporary file unless commit() succeeded

  const std::string& temporary_path() const { return temporary_; }
  const std::string& destination() const { return destination_; }
  // Checks every watched input (check_inputs_unchanged), then renames into place.
  // Throws Error(kInput) for a changed input, Error(kOutput) when the rename fails.
  void commit();

 private:
  std::string destination_, temporary_;
  bool committed_ = false;
};

// ---- inputs that must not change while a command reads them ----
// Off by default (unit tests rewrite files between reads); the CLI turns it on in main(). Either call
// forgets the inputs recorded so far.
void enable_input_watch(bool enabled = true);
// Records the file's identity (device, inode), size, modification and status-change times the first
// time a path is seen; a later call for the same path checks it is unchanged. Error(kInput) when it changed.
void watch_input(const std::string& path);
// Stops watching `path`: a command that reads its own output file before replacing it (sweep --resume).
void unwatch_input(const std::string& path);
// Error(kInput) "FILE: changed while it was read (...)" for the first watched input that changed.
void check_inputs_unchanged();
// The same check for one path: true when it is watched and changed (callers turn a read failure into
// "changed while it was read").
bool input_changed(const std::string& path);

}  // namespace hysparse
