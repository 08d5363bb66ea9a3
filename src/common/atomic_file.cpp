#include "common/atomic_file.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>

#include "common/error.hpp"

namespace hysparse {

AtomicOutput::AtomicOutput(std::string destination) : destination_(std::move(destination)) {
  if (destination_.empty()) fail(ErrorKind::kUsage, "empty output path");
  const auto slash = destination_.rfind('/');
  const std::string directory = slash == std::string::npos ? "." : (slash == 0 ? "/" : destination_.substr(0, slash));
  struct stat directory_status {};
  if (stat(directory.c_str(), &directory_status) != 0) {
    fail(ErrorKind::kOutput, "{}: cannot write: directory {} {}", destination_, directory,
         errno == ENOENT ? "does not exist" : std::strerror(errno));
  }
  if (!S_ISDIR(directory_status.st_mode)) {
    fail(ErrorKind::kOutput, "{}: cannot write: {} is not a directory", destination_, directory);
  }
  if (access(directory.c_str(), W_OK) != 0) {
    fail(ErrorKind::kOutput, "{}: cannot write: directory {} is not writable", destination_, directory);
  }
  struct stat existing {};
  if (stat(destination_.c_str(), &existing) == 0 && S_ISDIR(existing.st_mode)) {
    fail(ErrorKind::kOutput, "{}: cannot write: it is a directory (expected a file name)", destination_);
  }
  temporary_ = destination_ + ".tmp-" + std::to_string(getpid());
}

AtomicOutput::~AtomicOutput() {
  if (!committed_) std::remove(temporary_.c_str());
}

void AtomicOutput::commit() {
  check_inputs_unchanged();
  if (std::rename(temporary_.c_str(), destination_.c_str()) != 0) {
    fail(ErrorKind::kOutput, "{}: cannot move the finished file into place: {}", destination_, std::strerror(errno));
  }
  committed_ = true;
}

bool FileIdentity::operator==(const FileIdentity& o) const {
  return exists == o.exists && device == o.device && inode == o.inode && size == o.size &&
         modified.tv_sec == o.modified.tv_sec && modified.tv_nsec == o.modified.tv_nsec &&
         status_changed.tv_sec == o.status_changed.tv_sec && status_changed.tv_nsec == o.status_changed.tv_nsec;
}

FileIdentity identify(const std::string& path) {
  FileIdentity id;
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return id;
  id.exists = true;
  id.device = st.st_dev;
  id.inode = st.st_ino;
  id.size = st.st_size;
  id.modified = st.st_mtim;
  id.status_changed = st.st_ctim;
  return id;
}

namespace {

struct InputWatch {
  std::mutex mutex;
  bool enabled = false;
  std::map<std::string, FileIdentity> inputs;
};

InputWatch& input_watch() {
  static InputWatch watch;
  return watch;
}

std::string describe_change(const FileIdentity& before, const FileIdentity& now) {
  if (!now.exists) return "it was removed";
  if (now.device != before.device || now.inode != before.inode) return "it was replaced by another file";
  if (now.size != before.size) return fmt::format("its size went from {} to {} bytes", before.size, now.size);
  return "it was written to (modification or status-change time moved)";
}

[[noreturn]] void fail_changed(const std::string& path, const FileIdentity& before, const FileIdentity& now) {
  fail(ErrorKind::kInput, "{}: changed while it was read: {} (expected the input to stay unchanged until the output "
       "is written); no output was written", path, describe_change(before, now));
}

}  // namespace

void enable_input_watch(bool enabled) {
  std::lock_guard<std::mutex> lock(input_watch().mutex);
  input_watch().enabled = enabled;
  input_watch().inputs.clear();
}

void watch_input(const std::string& path) {
  InputWatch& watch = input_watch();
  std::lock_guard<std::mutex> lock(watch.mutex);
  if (!watch.enabled) return;
  const FileIdentity now = identify(path);
  const auto [entry, inserted] = watch.inputs.emplace(path, now);
  if (!inserted && !(entry->second == now)) fail_changed(path, entry->second, now);
}

void unwatch_input(const std::string& path) {
  InputWatch& watch = input_watch();
  std::lock_guard<std::mutex> lock(watch.mutex);
  watch.inputs.erase(path);
}

bool input_changed(const std::string& path) {
  InputWatch& watch = input_watch();
  std::lock_guard<std::mutex> lock(watch.mutex);
  const auto entry = watch.inputs.find(path);
  return entry != watch.inputs.end() && !(entry->second == identify(path));
}

void check_inputs_unchanged() {
  InputWatch& watch = input_watch();
  std::lock_guard<std::mutex> lock(watch.mutex);
  for (const auto& [path, recorded] : watch.inputs) {
    const FileIdentity now = identify(path);
    if (!(recorded == now)) fail_changed(path, recorded, now);
  }
}

}  // namespace hysparse
