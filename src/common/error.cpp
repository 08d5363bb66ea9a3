#include "common/error.hpp"

namespace hysparse {

std::string one_line(const std::string& message) {
  std::string out;
  out.reserve(message.size());
  for (char c : message) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (byte < 0x20 || byte == 0x7f) out += fmt::format("\\x{:02x}", byte);
    else out += c;
  }
  return out;
}

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
