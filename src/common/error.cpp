#include "common/error.hpp"

namespace hysparse {

int exit_code(ErrorKind kind) { return static_cast<int>(kind); }

const char* to_string(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInternal: return "internal error";
    case ErrorKind::kUsage: return "usage error";
    case ErrorKind::kInput: return "input error";
    case ErrorKind::kOutput: return "output error";
    case ErrorKind::kResource: return "resource error";
    case ErrorKind::kDevice: return "device error";
    case ErrorKind::kInterrupted: return "interrupted";
  }
  return "error";
}

}  // namespace hysparse
