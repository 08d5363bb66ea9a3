// CUDA backend: device discovery today; the statistics kernels come with the
// CUDA replay issue. Only plain C++ crosses cuda_backend.hpp.
#include <cuda_runtime.h>

#include <string>

#include "common/error.hpp"
#include "cuda_backend.hpp"

namespace hysparse::cuda {

CudaStatus status() {
  CudaStatus result;
  result.compiled = true;
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    result.why_none = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(rc);
    return result;
  }
  if (count == 0) {
    result.why_none = "the CUDA runtime reports no devices";
    return result;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    result.devices.push_back(fmt::format("cuda:{} {} (sm_{}{}, {} SMs, {:.1f} GiB)", i, prop.name, prop.major,
                                         prop.minor, prop.multiProcessorCount,
                                         static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0)));
  }
  if (result.devices.empty()) result.why_none = "no device answered cudaGetDeviceProperties";
  return result;
}

std::unique_ptr<Backend> make_backend(int device_index) {
  fail(ErrorKind::kDevice,
       "cuda:{}: the GPU replay kernels are not part of hysparse {} yet; run with --device cpu", device_index,
       HYSPARSE_VERSION);
}

}  // namespace hysparse::cuda
