#include "backend/backend.hpp"

#include "common/error.hpp"

#ifdef HYSPARSE_HAVE_CUDA
#include "cuda_backend.hpp"
#endif

namespace hysparse {

CudaStatus cuda_status() {
#ifdef HYSPARSE_HAVE_CUDA
  return cuda::status();
#else
  CudaStatus status;
  status.compiled = false;
  status.why_none = "this build has no CUDA backend (nvcc was not found when it was configured)";
  return status;
#endif
}

Precision parse_precision(const std::string& text) {
  if (text == "fp32") return Precision::kFp32;
  if (text == "bf16") return Precision::kBf16;
  if (text == "fp16") return Precision::kFp16;
  fail(ErrorKind::kUsage, "--precision {}: unknown precision (expected fp32, bf16 or fp16)", text);
}

const char* to_string(Precision precision) {
  switch (precision) {
    case Precision::kFp32: return "fp32";
    case Precision::kBf16: return "bf16";
    case Precision::kFp16: return "fp16";
  }
  return "?";
}

std::unique_ptr<Backend> make_backend(const std::string& device, const std::string& precision) {
  return make_backend(device, parse_precision(precision));
}

std::unique_ptr<Backend> make_backend(const std::string& device, Precision precision) {
  if (device == "cpu") {
    if (precision != Precision::kFp32) {
      fail(ErrorKind::kUsage, "--precision {}: the cpu device computes in fp32 only (use --device cuda for bf16/fp16)",
           to_string(precision));
    }
    return make_cpu_backend();
  }
  if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
    int index = 0;
    if (device.size() > 5) {
      try {
        std::size_t used = 0;
        index = std::stoi(device.substr(5), &used);
        if (used != device.size() - 5 || index < 0) throw std::invalid_argument("index");
      } catch (const std::exception&) {
        fail(ErrorKind::kUsage, "--device {}: expected cuda or cuda:N with N a GPU index", device);
      }
    }
    const CudaStatus status = cuda_status();
    if (!status.compiled) fail(ErrorKind::kDevice, "--device {}: {}", device, status.why_none);
    if (status.devices.empty()) fail(ErrorKind::kDevice, "--device {}: no usable CUDA GPU: {}", device, status.why_none);
    if (index >= static_cast<int>(status.devices.size())) {
      fail(ErrorKind::kDevice, "--device {}: only {} CUDA GPU(s) visible", device, status.devices.size());
    }
#ifdef HYSPARSE_HAVE_CUDA
    return cuda::make_backend(index, precision);
#endif
  }
  fail(ErrorKind::kUsage, "--device {}: unknown device (expected cpu, cuda or cuda:N)", device);
}

}  // namespace hysparse
