#include "backend/backend.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <system_error>
#include <thread>

#include "common/error.hpp"
#include "common/key_share.hpp"

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

void OutputWalks::clear() {
  walks.clear();
  steps.clear();
  factors.clear();
  checkpoints = 0;
}

void OutputWalks::begin_walk(std::int64_t head, std::int64_t row) {
  OutputWalk walk;
  walk.head = static_cast<std::int32_t>(head);
  walk.row = static_cast<std::int32_t>(row);
  walk.first_step = static_cast<std::int64_t>(steps.size());
  walks.push_back(walk);
}

void OutputWalks::add(std::int64_t begin, std::int64_t end, double factor) {
  if (end <= begin) return;
  if (factor != 1.0 && factors.empty()) factors.assign(steps.size(), 1.0);
  steps.push_back({static_cast<std::int32_t>(begin), static_cast<std::int32_t>(end)});
  if (!factors.empty()) factors.push_back(factor);
  ++walks.back().num_steps;
}

std::int64_t OutputWalks::checkpoint() {
  steps.push_back({-1, static_cast<std::int32_t>(checkpoints)});
  if (!factors.empty()) factors.push_back(1.0);
  ++walks.back().num_steps;
  return checkpoints++;
}

void check_output_request(const StatsRequest& request, const StatsTile& tile, const OutputWalks& walks) {
  auto broken = [](const std::string& what) { throw Error(ErrorKind::kInternal, "output_errors: " + what); };
  if (!request.q || !request.k || !request.v || request.attn) broken("needs the q, k and v of a q/k layer");
  if (tile.heads != request.heads || tile.rows != request.num_rows || tile.head_dim != request.head_dim ||
      tile.output.size() != static_cast<std::size_t>(tile.heads * tile.rows * tile.head_dim)) {
    broken("the tile does not match the request or holds no output");
  }
  if (!walks.factors.empty() && walks.factors.size() != walks.steps.size()) broken("factors do not match the steps");
  std::int64_t next = 0;
  for (const OutputWalk& walk : walks.walks) {
    if (walk.head < 0 || walk.head >= request.heads || walk.row < 0 || walk.row >= request.num_rows) {
      broken("a walk names a head or row outside the tile");
    }
    if (walk.first_step != next || walk.num_steps < 0 ||
        walk.first_step + walk.num_steps > static_cast<std::int64_t>(walks.steps.size())) {
      broken("walks do not partition the steps in order");
    }
    next = walk.first_step + walk.num_steps;
    const std::int64_t keys = request.rows[walk.row] + 1;
    for (std::int64_t i = walk.first_step; i < next; ++i) {
      const OutputStep& step = walks.steps[static_cast<std::size_t>(i)];
      const bool valid = step.begin < 0 ? step.end >= 0 && step.end < walks.checkpoints
                                        : step.begin < step.end && step.end <= keys;
      if (!valid) broken(fmt::format("step {} [{}, {}) is outside row {} (keys 0..{})", i, step.begin, step.end, walk.row, keys - 1));
    }
  }
  if (next != static_cast<std::int64_t>(walks.steps.size())) broken("steps outside every walk");
}

void check_key_runs(const StatsRequest& request, const StatsTile& tile, const std::vector<KeyRun>& runs) {
  auto broken = [](const std::string& what) { throw Error(ErrorKind::kInternal, "key_run_shares: " + what); };
  if (request.attn ? request.q || request.k : !request.q || !request.k) broken("needs the q and k of a q/k layer, or a dense one");
  if (tile.heads != request.heads || tile.rows != request.num_rows ||
      tile.lse_tokens.size() != static_cast<std::size_t>(tile.heads * tile.rows)) {
    broken("the tile does not match the request");
  }
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const KeyRun& run = runs[i];
    const bool inside = run.head >= 0 && run.head < request.heads && run.row >= 0 && run.row < request.num_rows &&
                        run.begin >= 0 && run.begin <= run.end && run.end <= request.rows[run.row] + 1 &&
                        (run.ascending == 0 || run.ascending == 1);
    if (!inside) {
      broken(fmt::format("run {} (head {}, row {}, keys [{}, {}), ascending {}) is outside a tile of {} heads x {} rows", i,
                         run.head, run.row, run.begin, run.end, run.ascending, request.heads, request.num_rows));
    }
  }
}

void key_run_shares_on_host(const StatsRequest& request, const StatsTile& tile, const std::vector<KeyRun>& runs,
                            std::vector<double>& sums) {
  check_key_runs(request, tile, runs);
  sums.resize(runs.size());
  const std::int64_t T = request.seq_len, d = request.head_dim;
  thread_local std::vector<double> shares;
  thread_local std::vector<float> dots;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const KeyRun& run = runs[i];
    const std::int64_t t = request.rows[run.row];
    const double lse_tokens = tile.lse_tokens[static_cast<std::size_t>(run.head * request.num_rows + run.row)];
    shares.resize(static_cast<std::size_t>(run.end - run.begin));
    if (request.attn) {
      const float* p = request.attn + (run.head * T + t) * T;
      for (std::int64_t j = run.begin; j < run.end; ++j) {
        const double z = p[j] > 0.0f ? std::log(static_cast<double>(p[j])) : -std::numeric_limits<double>::infinity();
        shares[static_cast<std::size_t>(j - run.begin)] = std::exp(z - lse_tokens);
      }
    } else {
      // key_share in two passes (the same operations): the dots, then the exponentials in a loop the
      // compiler vectorises.
      const float* q = request.q + (run.head * T + t) * d;
      dots.resize(shares.size());
      for (std::int64_t j = run.begin; j < run.end; ++j) dots[static_cast<std::size_t>(j - run.begin)] = key_dot(q, request.k + j * d, d);
      const double scale = request.scale;
      for (std::size_t j = 0; j < shares.size(); ++j) shares[j] = portable_exp(std::fma(scale, static_cast<double>(dots[j]), -lse_tokens));
    }
    if (run.ascending) std::sort(shares.begin(), shares.end());
    double sum = 0.0;
    for (double share : shares) sum += share;
    sums[i] = sum;
  }
}

namespace {

// Several devices as one backend: each request goes to the device of its KV head (kv_head mod N),
// so the engine's OpenMP threads keep every device busy and a device keeps the keys of its groups;
// a layer's H2O simulations and received attention are split by KV heads over every device.
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
    device_of(request).block_statistics(request, out);
  }
  void output_errors(const StatsRequest& request, const StatsTile& tile, const OutputWalks& walks,
                     std::vector<double>& errors) const override {
    device_of(request).output_errors(request, tile, walks, errors);
  }
  void prepare_keys(const StatsRequest& request) const override { device_of(request.kv_head).prepare_keys(request); }
  bool key_run_shares(const StatsRequest& request, const StatsTile& tile, const std::vector<KeyRun>& runs,
                      std::vector<double>& sums) const override {
    return device_of(request).key_run_shares(request, tile, runs, sums);
  }

  bool h2o_evictions(const H2oRequest& request, std::vector<std::int32_t>& evicted) const override {
    const std::int64_t sets_per_kv_head = request.kv_heads > 0 ? request.sets / request.kv_heads : 0;
    if (sets_per_kv_head < 1 || request.sets % request.kv_heads != 0) return devices_.front()->h2o_evictions(request, evicted);
    const std::int64_t T = request.seq_len, d = request.head_dim, S = request.sets;
    return split_over_kv_heads(
        request.kv_heads, static_cast<std::size_t>(request.budgets * S * T), evicted,
        [&](const Backend& device, std::int64_t g0, std::int64_t g1, std::vector<std::int32_t>& part) {
          H2oRequest sub = request;
          const std::int64_t s0 = g0 * sets_per_kv_head;
          sub.sets = (g1 - g0) * sets_per_kv_head;
          sub.kv_heads = g1 - g0;
          sub.q = request.q + s0 * request.heads * T * d;
          sub.k = request.k + g0 * T * d;
          if (request.sink_logits) sub.sink_logits = request.sink_logits + s0 * request.heads;
          if (!device.h2o_evictions(sub, part)) return false;
          expect_part_size("H2O evictions", part.size(), static_cast<std::size_t>(request.budgets * sub.sets * T));
          for (std::int64_t b = 0; b < request.budgets; ++b) {
            std::copy_n(part.begin() + b * sub.sets * T, sub.sets * T, evicted.begin() + (b * S + s0) * T);
          }
          return true;
        });
  }
  bool page_bound_rankings(const PageBoundRequest& request, std::vector<std::int32_t>& order) const override {
    return device_of(request.kv_head).page_bound_rankings(request, order);
  }
  bool nsa_block_scores(const NsaScoreRequest& request, std::vector<double>& scores) const override {
    return device_of(request.kv_head).nsa_block_scores(request, scores);
  }
  bool pooled_key_logits(const NsaScoreRequest& request, std::vector<double>& logits) const override {
    return device_of(request.kv_head).pooled_key_logits(request, logits);
  }
  bool token_score_rankings(const TokenScoreRequest& request, std::vector<std::int32_t>& order) const override {
    return device_of(request.kv_head).token_score_rankings(request, order);
  }
  bool attention_received(const ReceivedRequest& request, std::vector<double>& received) const override {
    if (request.kv_heads < 1 || request.heads % request.kv_heads != 0) return devices_.front()->attention_received(request, received);
    const std::int64_t T = request.seq_len, d = request.head_dim, G = request.heads / request.kv_heads;
    return split_over_kv_heads(
        request.kv_heads, static_cast<std::size_t>(request.heads * T), received,
        [&](const Backend& device, std::int64_t g0, std::int64_t g1, std::vector<double>& part) {
          ReceivedRequest sub = request;
          sub.heads = (g1 - g0) * G;
          sub.kv_heads = g1 - g0;
          sub.q = request.q + g0 * G * T * d;
          sub.k = request.k + g0 * T * d;
          if (request.sink_logits) sub.sink_logits = request.sink_logits + g0 * G;
          if (!device.attention_received(sub, part)) return false;
          expect_part_size("received attention", part.size(), static_cast<std::size_t>(sub.heads * T));
          std::copy(part.begin(), part.end(), received.begin() + g0 * G * T);
          return true;
        });
  }

 private:
  static void expect_part_size(const char* what, std::size_t got, std::size_t expected) {
    if (got != expected) fail(ErrorKind::kInternal, "{}: a device returned {} values for its KV heads, expected {}", what, got, expected);
  }

  // Layer-long work whose KV heads are independent (H2O's sets, InfLLM's heads): a contiguous run of
  // KV heads per device, all devices at once, each part copied into `whole` (sized `size`) by
  // run_part(device, first KV head, end, scratch) -> false where that device declines. Every head is
  // computed alone on any device, so the parts are the single device's bits. False when any device
  // declines (the caller then computes the whole); the first device's error is rethrown.
  template <typename Value, typename RunPart>
  bool split_over_kv_heads(std::int64_t kv_heads, std::size_t size, std::vector<Value>& whole, RunPart&& run_part) const {
    const auto parts = static_cast<std::int64_t>(std::min<std::size_t>(devices_.size(), static_cast<std::size_t>(kv_heads)));
    whole.assign(size, Value{});
    std::vector<std::vector<Value>> scratch(static_cast<std::size_t>(parts));
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(parts));
    std::vector<char> served(static_cast<std::size_t>(parts), 0);
    auto run = [&](std::int64_t i) {
      try {
        const std::int64_t g0 = i * kv_heads / parts, g1 = (i + 1) * kv_heads / parts;
        served[static_cast<std::size_t>(i)] = run_part(*devices_[static_cast<std::size_t>(i)], g0, g1, scratch[static_cast<std::size_t>(i)]);
      } catch (...) {
        errors[static_cast<std::size_t>(i)] = std::current_exception();
      }
    };
    std::vector<std::thread> others;
    for (std::int64_t i = 1; i < parts; ++i) {
      try {
        others.emplace_back(run, i);
      } catch (const std::system_error&) {
        run(i);  // no thread to be had: this part runs here, before the others finish
      }
    }
    run(0);
    for (auto& thread : others) thread.join();
    for (const auto& error : errors) {
      if (error) std::rethrow_exception(error);
    }
    return std::all_of(served.begin(), served.end(), [](char s) { return s != 0; });
  }

  const Backend& device_of(const StatsRequest& request) const { return device_of(request.kv_head); }
  const Backend& device_of(std::int64_t kv_head) const {
    const auto n = static_cast<std::int64_t>(devices_.size());
    const std::int64_t index = kv_head >= 0 ? kv_head % n : 0;
    return *devices_[static_cast<std::size_t>(index)];
  }

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

std::unique_ptr<Backend> make_multi_device_backend(std::vector<std::unique_ptr<Backend>> devices) {
  if (devices.empty()) fail(ErrorKind::kInternal, "a device list without devices");
  return std::make_unique<MultiDeviceBackend>(std::move(devices));
}

std::unique_ptr<Backend> make_backend(const std::string& device, Precision precision) {
  if (device.find(',') != std::string::npos) {
    std::vector<std::unique_ptr<Backend>> devices;
    for (const auto& one : split_device_list(device)) devices.push_back(make_backend(one, precision));
    return make_multi_device_backend(std::move(devices));
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
