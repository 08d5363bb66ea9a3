#pragma once
// The CUDA side as seen from C++: no CUDA or Eigen types cross this header.
#include <cstdint>
#include <memory>

#include "backend/backend.hpp"

namespace hysparse::cuda {

CudaStatus status();
// device_index < status().devices.size()
std::unique_ptr<Backend> make_backend(int device_index, Precision precision);
// NSA compressed-key uploads since the process started, all backends together: tests read it to see
// that a layer's keys stay resident across its requests.
std::uint64_t compressed_key_uploads();

}  // namespace hysparse::cuda
