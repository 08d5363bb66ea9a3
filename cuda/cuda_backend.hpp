#pragma once
// The CUDA side as seen from C++: no CUDA or Eigen types cross this header.
#include <memory>

#include "backend/backend.hpp"

namespace hysparse::cuda {

CudaStatus status();
// device_index < status().devices.size()
std::unique_ptr<Backend> make_backend(int device_index, Precision precision);

}  // namespace hysparse::cuda
