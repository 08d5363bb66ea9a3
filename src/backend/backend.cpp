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

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
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
    return cuda::make_backend(index);
#endif
  }
  fail(ErrorKind::kUsage, "--device {}: unknown device (expected cpu, cuda or cuda:N)", device);
}

}  // namespace hysparse
