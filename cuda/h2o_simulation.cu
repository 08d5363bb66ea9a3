// H2O's cache simulation on the device (Backend::h2o_evictions; proxy::h2o_simulate is the definition).
// The simulation is sequential in the position, so one thread block runs one (budget, set)'s cache over
// every step, all of a layer's in one launch; its threads share the cached keys of a step: logits (the host's fma chain over channels, in
// double), the softmax's maximum and sum (block reductions: the summation order is not the host's), the
// scores, and the eviction (a block-wide minimum, ties to the later key). Evicted keys leave holes that
// are compacted once they are a quarter of the cache, keeping the cache in key order.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "block_reduce.cuh"
#include "common/error.hpp"
#include "device_statistics.hpp"

namespace hysparse::cuda {
namespace {

constexpr int kH2oThreads = 512;
constexpr int kH2oWarps = kH2oThreads / 32;
constexpr int kH2oHeadsAtOnce = 4;  // heads whose logits one pass over a key's channels forms
constexpr int kH2oKeysAtOnce = 4;   // slots whose logits a thread forms together
constexpr long long kStopPollSteps = 64;  // steps between reads of the host's stop flag (over PCIe)

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::kDevice, "CUDA {}: {}", what, cudaGetErrorString(status));
}

// Block-wide reductions; every thread gets the result. `scratch` holds kH2oWarps values.
__device__ __forceinline__ double block_max(double v, double* scratch) {
  return block_reduce<kH2oWarps>(v, scratch, [](double a, double b) { return fmax(a, b); });
}
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  return block_reduce<kH2oWarps>(v, scratch, [](double a, double b) { return a + b; });
}

// The eviction candidate: lowest score, ties to the later key; and the oldest cached key with its slot.
struct Candidate {
  double score;
  int key, slot;
  int oldest, oldest_slot;
};
__device__ void better_candidate(Candidate& a, const Candidate& b) {
  if (b.key >= 0 && (a.key < 0 || b.score < a.score || (b.score == a.score && b.key > a.key))) {
    a.score = b.score;
    a.key = b.key;
    a.slot = b.slot;
  }
  if (b.oldest >= 0 && (a.oldest < 0 || b.oldest < a.oldest)) {
    a.oldest = b.oldest;
    a.oldest_slot = b.oldest_slot;
  }
}
__device__ Candidate shuffle(const Candidate& c, int offset) {
  Candidate o;
  o.score = __shfl_xor_sync(0xffffffffu, c.score, offset);
  o.key = __shfl_xor_sync(0xffffffffu, c.key, offset);
  o.slot = __shfl_xor_sync(0xffffffffu, c.slot, offset);
  o.oldest = __shfl_xor_sync(0xffffffffu, c.oldest, offset);
  o.oldest_slot = __shfl_xor_sync(0xffffffffu, c.oldest_slot, offset);
  return o;
}

// grid: one block per (budget, set), item = budget * sets + set. Dynamic shared memory: heads * head_dim
// doubles (the step's queries).
__global__ void __launch_bounds__(kH2oThreads) h2o_kernel(H2oSimulationArgs a) {
  extern __shared__ double q_step[];  // [heads][head_dim]
  __shared__ double scratch[kH2oWarps];
  __shared__ Candidate candidates[kH2oWarps];
  __shared__ int chunk_alive[kH2oThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const long long item = blockIdx.x, budget = item / a.sets, set = item % a.sets;
  const long long T = a.seq_len;
  const int d = a.head_dim, heads = a.heads;
  const float* q = a.q + set * heads * T * d;
  const float* keys_t = a.keys_t + set * a.kv_heads / a.sets * d * T;
  const double* sink_logits = a.sink_logits ? a.sink_logits + set * heads : nullptr;
  int* cache = a.cache + item * 2 * T;
  int* spare = cache + T;
  double* score = a.score + item * T;
  double* z = a.logits + item * heads * T;  // [heads][slot]
  int* evicted = a.evicted + item * T;
  const long long* capacity = a.capacity + budget * (T - 1);
  for (long long j = tid; j < T; j += kH2oThreads) {
    score[j] = 0.0;
    evicted[j] = INT_MAX;
  }
  __shared__ int stopping;
  int slots = 0, alive = 0;  // uniform: slots in use (holes included) and keys cached
  for (long long t = 0; t < T; ++t) {
    if (a.stop && t % kStopPollSteps == 0) {
      // The host asks every simulation to end (a signal): what is left unwritten is discarded.
      __syncthreads();
      if (tid == 0) stopping = *a.stop;
      __syncthreads();
      if (stopping) return;
    }
    if (tid == 0) cache[slots] = static_cast<int>(t);
    ++slots;
    ++alive;
    for (int i = tid; i < heads * d; i += kH2oThreads) {
      const int h = i / d, c = i % d;
      q_step[i] = static_cast<double>(q[(static_cast<long long>(h) * T + t) * d + c]);
    }
    __syncthreads();
    // Each thread forms the logits of kH2oKeysAtOnce slots at a time (their loads in flight together: the
    // pass is bound by the latency of these gathers), each key's channels read once for up to
    // kH2oHeadsAtOnce heads; every logit is the host's chain of fmas over channels in ascending order.
    for (int i0 = tid; i0 < slots; i0 += kH2oThreads * kH2oKeysAtOnce) {
      int key[kH2oKeysAtOnce];
#pragma unroll
      for (int u = 0; u < kH2oKeysAtOnce; ++u) {
        const int i = i0 + u * kH2oThreads;
        key[u] = i < slots ? cache[i] : -1;
      }
      for (int h0 = 0; h0 < heads; h0 += kH2oHeadsAtOnce) {
        const int count = min(kH2oHeadsAtOnce, heads - h0);
        double sum[kH2oKeysAtOnce][kH2oHeadsAtOnce];
#pragma unroll
        for (int u = 0; u < kH2oKeysAtOnce; ++u) {
#pragma unroll
          for (int v = 0; v < kH2oHeadsAtOnce; ++v) sum[u][v] = 0.0;
        }
#pragma unroll 2
        for (int c = 0; c < d; ++c) {
          double k[kH2oKeysAtOnce];
#pragma unroll
          for (int u = 0; u < kH2oKeysAtOnce; ++u) k[u] = key[u] >= 0 ? static_cast<double>(keys_t[c * T + key[u]]) : 0.0;
#pragma unroll
          for (int v = 0; v < kH2oHeadsAtOnce; ++v) {
            if (v >= count) break;
            const double q = q_step[(h0 + v) * d + c];
#pragma unroll
            for (int u = 0; u < kH2oKeysAtOnce; ++u) sum[u][v] = fma(q, k[u], sum[u][v]);
          }
        }
#pragma unroll
        for (int u = 0; u < kH2oKeysAtOnce; ++u) {
          if (key[u] < 0) continue;
#pragma unroll
          for (int v = 0; v < kH2oHeadsAtOnce; ++v) {
            if (v < count) z[(h0 + v) * T + i0 + u * kH2oThreads] = sum[u][v] * a.scale;
          }
        }
      }
    }
    for (int h = 0; h < heads; ++h) {
      const double sink = sink_logits ? sink_logits[h] : -INFINITY;
      double m = sink;
      for (int i = tid; i < slots; i += kH2oThreads) {
        if (cache[i] >= 0) m = fmax(m, z[h * T + i]);
      }
      m = block_max(m, scratch);
      double sum = 0.0;
      for (int i = tid; i < slots; i += kH2oThreads) {
        if (cache[i] >= 0) sum += exp(z[h * T + i] - m);
      }
      sum = block_sum(sum, scratch) + (sink_logits ? exp(sink - m) : 0.0);
      const double lse = m + log(sum);
      for (int i = tid; i < slots; i += kH2oThreads) {
        const int key = cache[i];
        if (key >= 0) score[key] += exp(z[h * T + i] - lse);
      }
    }
    if (t + 1 == T) break;
    const long long cap = capacity[t];
    const long long recent = cap * a.recent_percent / 100;
    const long long protected_from = t + 2 - recent;  // keys >= this stay (recent for step t+1)
    while (alive > cap - 1) {
      __syncthreads();  // scores and the previous eviction's hole are visible
      Candidate best{0.0, -1, -1, -1, -1};
      for (int i = tid; i < slots; i += kH2oThreads) {
        const int key = cache[i];
        if (key < 0) continue;
        Candidate c{score[key], key < protected_from ? key : -1, i, key, i};
        better_candidate(best, c);
      }
      for (int offset = 16; offset > 0; offset /= 2) better_candidate(best, shuffle(best, offset));
      if (tid % 32 == 0) candidates[tid / 32] = best;
      __syncthreads();
      if (tid == 0) {
        for (int w = 1; w < kH2oWarps; ++w) better_candidate(best, candidates[w]);
        const int slot = best.key >= 0 ? best.slot : best.oldest_slot;  // everything recent: the oldest goes
        evicted[cache[slot]] = static_cast<int>(t + 1);
        cache[slot] = -1;
      }
      --alive;
    }
    __syncthreads();
    // Compaction, keys kept in order: each thread moves one contiguous chunk of slots.
    if (slots - alive > max(64, slots / 4)) {
      const int chunk = (slots + kH2oThreads - 1) / kH2oThreads, lo = min(slots, tid * chunk), hi = min(slots, lo + chunk);
      int count = 0;
      for (int i = lo; i < hi; ++i) count += cache[i] >= 0;
      chunk_alive[tid] = count;
      __syncthreads();
      if (tid == 0) {
        int total = 0;
        for (int w = 0; w < kH2oThreads; ++w) {
          const int c = chunk_alive[w];
          chunk_alive[w] = total;
          total += c;
        }
      }
      __syncthreads();
      int out = chunk_alive[tid];
      for (int i = lo; i < hi; ++i) {
        if (cache[i] >= 0) spare[out++] = cache[i];
      }
      int* swap = cache;
      cache = spare;
      spare = swap;
      slots = alive;
      __syncthreads();
    }
  }
}

// keys [heads][rows][d] -> keys_t [heads][d][rows].
__global__ void transpose_keys_kernel(const float* __restrict__ keys, int heads, long long rows, int d, float* __restrict__ keys_t) {
  const long long per_head = rows * d;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < heads * per_head;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long g = i / per_head, j = i % per_head / d, c = i % d;
    keys_t[g * per_head + c * rows + j] = keys[i];
  }
}

}  // namespace

std::size_t h2o_shared_bytes(int heads, int head_dim) {
  cudaFuncAttributes attributes{};
  check(cudaFuncGetAttributes(&attributes, h2o_kernel), "H2O kernel attributes");
  return attributes.sharedSizeBytes + static_cast<std::size_t>(heads) * head_dim * sizeof(double);
}

void launch_h2o_simulation(const H2oSimulationArgs& args, const float* keys, cudaStream_t stream) {
  const long long n = args.kv_heads * args.seq_len * args.head_dim;
  const auto blocks = static_cast<unsigned>(std::min<long long>(4096, (n + 255) / 256));
  transpose_keys_kernel<<<blocks, 256, 0, stream>>>(keys, args.kv_heads, args.seq_len, args.head_dim, args.keys_t);
  check(cudaGetLastError(), "key transpose launch");
  const std::size_t shared = static_cast<std::size_t>(args.heads) * args.head_dim * sizeof(double);
  // The device's whole allowance, not this launch's need: a value set per launch could lower the limit under
  // another lane's launch between its own set and launch.
  int device = 0, optin = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "shared memory limit");
  const std::size_t allowance = static_cast<std::size_t>(optin) - std::min(static_cast<std::size_t>(optin), h2o_shared_bytes(0, 0));
  check(cudaFuncSetAttribute(h2o_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(allowance)),
        "H2O kernel shared memory");
  h2o_kernel<<<static_cast<unsigned>(args.budgets * args.sets), kH2oThreads, shared, stream>>>(args);
  check(cudaGetLastError(), "H2O kernel launch");
}

}  // namespace hysparse::cuda
