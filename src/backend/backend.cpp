#include "backend/backend.hpp"

#include <algorithm>

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

namespace {

// Several devices as one backend: each request goes to the device of its KV head (kv_head mod N),
// so the engine's OpenMP threads keep every device busy and a device keeps the keys of its groups.
class MultiDeviceBackend final : public Backend {
 public:
  explicit MultiDeviceBackend(std::vector<std::unique_ptr<Backend>> devices) : devices_(std::move(devices)) {}
  std::string name() const override {
    for (const auto& d : devices_) {
      if (d->name() != devices_.front()->name()) return "multi";
    }
    return devices_.front()->name();
  }
  std::string device() const override {
    std::string text = std::to_string(devices_.size()) + " devices (KV heads spread round-robin): ";
    for (std::size_t i = 0; i < devices_.size(); ++i) text += (i ? "; " : "") + devices_[i]->device();
    return text;
  }
  std::int64_t preferred_tile_rows() const override {
    std::int64_t rows = devices_.front()->preferred_tile_rows();
    for (const auto& d : devices_) rows = std::min(rows, d->preferred_tile_rows());
    return rows;
  }
  void block_statistics(const StatsRequest& request, StatsTile& out) const override {
    const auto n = static_cast<std::int64_t>(devices_.size());
    const std::int64_t index = request.kv_head >= 0 ? request.kv_head % n : 0;
    devices_[static_cast<std::size_t>(index)]->block_statistics(request, out);
  }

 private:
  std::vector<std::unique_ptr<Backend>> devices_;
};

}  // namespace

std::vector<std::string> split_device_list(const std::string& devices) {
  std::vector<std::string> items;
  std::size_t begin = 0;
  while (begin <= devices.size()) {
    const std::size_t comma = std::min(devices.find(',', begin), devices.size());
    items.push_back(devices.substr(begin, comma - begin));
    if (items.back().empty()) fail(ErrorKind::kUsage, "--device {}: an empty entry (expected e.g. cuda:0,cuda:1)", devices);
    begin = comma + 1;
  }
  return items;
}

std::string gpu_device_list(const std::string& gpus) {
  std::string devices;
  for (const auto& index : split_device_list(gpus)) {
    if (index.find_first_not_of("0123456789") != std::string::npos) {
      fail(ErrorKind::kUsage, "--gpus {}: expected GPU indices separated by commas, e.g. 0,1", gpus);
    }
    devices += (devices.empty() ? "cuda:" : ",cuda:") + index;
  }
  return devices;
}

std::unique_ptr<Backend> make_backend(const std::string& device, Precision precision) {
  if (device.find(',') != std::string::npos) {
    std::vector<std::unique_ptr<Backend>> devices;
    for (const auto& one : split_device_list(device)) devices.push_back(make_backend(one, precision));
    return std::make_unique<MultiDeviceBackend>(std::move(devices));
  }
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
