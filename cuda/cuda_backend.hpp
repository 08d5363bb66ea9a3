#pragma once
// The CUDA side as seen from C++: no CUDA or Eigen types cross this header.
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.hpp"

namespace hysparse::cuda {

CudaStatus status();
// device_index < status().devices.size()
std::unique_ptr<Backend> make_backend(int device_index, Precision precision);
// Uploads of arrays selectors name by an id (NSA's compressed keys, the token-score proxies' keys) since
// the process started, all backends together: tests read it to see that they stay resident across requests.
std::uint64_t resident_array_uploads();
// The bytes of block scores Backend::token_score_rankings holds at once (it ranks a request's rows in chunks
// that fit); bytes <= 0 restores the default. Returns the previous value. For tests of the chunking.
std::int64_t set_token_score_workspace_bytes(std::int64_t bytes);
// The shared memory a thread block may take on CUDA backends made from now on, where less than the device's
// own: a test plays a GPU with less (A100: 166,912 bytes; compute capability 8.6/8.9: 101,376), whose rankings
// leave longer prefixes to the host. bytes <= 0 restores the device's. Returns the previous value (0: none).
std::int64_t set_shared_memory_limit(std::int64_t bytes);
// portable_exp of every x, evaluated on the current device: tests compare it with the host's bits.
std::vector<double> portable_exp_on_device(const std::vector<double>& x);
// The device's ranking of rows of scores (ranking.cuh's rank_row, as the block and token-score rankings run
// it): rows[i]'s first min(count, size) indices, higher first, ties to the lower index. `capacity` (a power of
// two >= the padded count; 0: the longest row's padded size) is the entries a thread block holds in shared memory:
// longer rows select with their keys recomputed. select_in_shared false sorts held rows whole. For tests.
std::vector<std::vector<int>> rank_rows_on_device(const std::vector<std::vector<double>>& rows, int count, int capacity,
                                                  bool select_in_shared);

}  // namespace hysparse::cuda
