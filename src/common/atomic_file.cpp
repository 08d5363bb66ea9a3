#include "common/atomic_file.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/error.hpp"

namespace hysparse {

AtomicOutput::AtomicOutput(std::string destination) : destination_(std::move(destination)) {
  if (destination_.empty()) fail(ErrorKind::kUsage, "empty output path");
  const auto slash = destination_.rfind('/');
  const std::string directory = slash == std::string::npos ? "." : (slash == 0 ? "/" : destination_.substr(0, slash));
  if (access(directory.c_str(), W_OK) != 0) {
    fail(ErrorKind::kOutput, "{}: cannot write: directory {} {}", destination_, directory,
         errno == ENOENT ? "does not exist" : "is not writable");
  }
  temporary_ = destination_ + ".tmp-" + std::to_string(getpid());
}

AtomicOutput::~AtomicOutput() {
  if (!committed_) std::remove(temporary_.c_str());
}

void AtomicOutput::commit() {
  if (std::rename(temporary_.c_str(), destination_.c_str()) != 0) {
    fail(ErrorKind::kOutput, "{}: cannot move the finished file into place: {}", destination_, std::strerror(errno));
  }
  committed_ = true;
}

}  // namespace hysparse
