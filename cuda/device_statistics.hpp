#pragma once
// The statistics pass on device-resident data, for the CUDA backend and the GPU benchmark.
// Every pointer in these structs is a device pointer unless its name says host; nothing
// here copies between host and device except the small work plan.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "tensor_core_statistics.hpp"

struct cublasContext;  // cublas_v2.h's handle type (cublasHandle_t), declared here without cuBLAS's headers

namespace hysparse::cuda {

// The element type q and k are held in on the device.
enum class InputType { kFloat32, kBfloat16, kFloat16 };

// The fp32 statistics kernel. kAuto takes the tiled kernel wherever it applies (fp32 inputs, head_dim a
// multiple of 4 up to 256, blocks of 8, 16, 32 or a multiple of 64 keys), else the basic one, which
// takes every shape (and the bf16/fp16 block sizes the tensor-core kernels do not); tests and
// benchmarks compare the two.
enum class SimtKernel { kAuto, kTiled, kBasic };

// Row stride in elements of q and k in the kernels' layout: head_dim for fp32; for bf16/fp16
// head_dim padded with zeros to the tensor-core depth (64, 128 or 256; 0 when head_dim > 256).
int input_stride(InputType type, int head_dim);
std::size_t element_bytes(InputType type);

// dst[r][0..stride) = round(multiplier * src[r][0..head_dim)), zeros up to the stride, for
// `rows` rows of fp32 src (row stride head_dim). Sets *overflow to 1 when a finite value
// rounds to infinity (fp16 above 65504); overflow may be nullptr for fp32 and bf16.
void convert_rows(InputType type, const float* src, long long rows, int head_dim, float multiplier, void* dst,
                  int* overflow, cudaStream_t stream);

// Standard normal values (counter-based hash + Box-Muller), for benchmarks and tests that need
// random inputs of many gigabytes without generating them on the host.
void fill_normal(float* data, std::size_t count, std::uint64_t seed, cudaStream_t stream);

struct StatsPassArgs {
  InputType type = InputType::kFloat32;
  const void* q = nullptr;  // [heads][rows][stride]
  const void* k = nullptr;  // [keys][stride]; keys >= last position + 1, and for bf16/fp16 padded
                            // with zero rows to a multiple of kTensorCoreKeyTile
  const long long* positions = nullptr;       // [rows], ascending
  const long long* host_positions = nullptr;  // the same positions on the host (the work is planned there)
  int heads = 0, rows = 0, head_dim = 0;
  // logit = score_scale * (q . k). fp32 callers pre-scale q (as the CPU backend does) and pass
  // 1; bf16/fp16 callers fold the sign of the softmax scale into q and pass its magnitude.
  float score_scale = 1.0f;
  long long block = 64, num_blocks = 0;
  const float* sink_logits = nullptr;  // [heads] or nullptr
  float* block_max = nullptr;          // [heads][rows][num_blocks]: every cell is written
  float* block_sum = nullptr;
  double* lse_tokens = nullptr;        // [heads][rows]
  double* lse_all = nullptr;
  // The tensor-core kernel (tests and benchmarks compare them; the backend takes kAuto: wgmma on
  // compute capability 9.0, else mma.sync),
  // and the mma.sync kernel's rows per warp, 16 or 32 (0: its default).
  TensorCoreKernel tensor_core_kernel = TensorCoreKernel::kAuto;
  int tensor_core_rows_per_warp = 0;
  SimtKernel simt_kernel = SimtKernel::kAuto;
};

// Plans and enqueues one pass on `stream`: block statistics (tensor cores for bf16/fp16 when
// the block size allows it, else the SIMT kernel on the same rounded inputs), then the row
// log-sum-exps from the block pairs, in double, with the CPU backend's formula. Holds the
// work-plan buffers, so one object serves one stream at a time, on the device current when it
// was made.
class StatsPass {
 public:
  // On the device current when it is made; shared_limit > 0 caps the shared memory a block is counted
  // on below the device's own (a backend playing a smaller GPU).
  explicit StatsPass(int multiprocessors, std::size_t shared_limit = 0);
  StatsPass(const StatsPass&) = delete;
  StatsPass& operator=(const StatsPass&) = delete;
  ~StatsPass();
  // Returns which kernel formed the scores: "wgmma", "mma" (both on tensor cores), "simt-tiled" or
  // "simt". Error(kUsage) when args ask for wgmma, or the tiled SIMT kernel, where it does not apply.
  const char* run(const StatsPassArgs& args, cudaStream_t stream);
  bool wgmma() const { return wgmma_; }

 private:
  int multiprocessors_;
  int shared_optin_ = 0;  // bytes of shared memory a block may opt in to
  bool wgmma_;
  std::vector<TensorCoreWorkItem> plan_;
  TensorCoreWorkItem* device_plan_ = nullptr;
  std::size_t device_plan_capacity_ = 0;
};

// How the output pass splits the keys of a tile: segments of segment_keys keys, each summed by its
// own thread blocks into a workspace of workspace_floats floats, then added in segment order (one
// segment: straight into the output, no workspace). Depends on the shape only, never on the device.
struct OutputSegments {
  long long segment_keys = 0;
  int segments = 1;
  std::size_t workspace_floats = 0;
};
OutputSegments output_segments(int heads, int rows, int head_dim, long long keys);  // keys: last position + 1

// output[h][r][:] = sum_{j <= positions[r]} exp(score_scale * q.k_j - lse_all[h][r]) v_j, in fp32,
// from q/k in `type` (the rounded values for bf16/fp16) and fp32 v [keys][head_dim], split as
// `split` (from output_segments) with `workspace` of split.workspace_floats floats.
void launch_output_pass(InputType type, const void* q, const void* k, const float* v, const long long* positions,
                        const double* lse_all, int heads, int rows, int head_dim, float score_scale,
                        const OutputSegments& split, float* output, float* workspace, cudaStream_t stream);

// The output-error walks of backend.hpp on device-resident data: errors[slot] of every checkpoint.
// Weights exp(scale * (q . k_j) - lse_all) * factor, the product in fp32 from fp32 q and k, the rest
// in double, as on the host.
struct OutputWalkArgs {
  const float* q = nullptr;            // [heads][rows][head_dim]: the tile's query rows, unscaled
  const float* k = nullptr;            // [keys][head_dim]
  const float* v = nullptr;            // [keys][head_dim]
  const double* lse_all = nullptr;     // [heads][rows]
  const double* sink_weight = nullptr; // [heads][rows]: exp(sink - lse_all), 0 without sinks
  const float* exact = nullptr;        // [heads][rows][head_dim]: the exact output
  const OutputWalk* walks = nullptr;
  const OutputStep* steps = nullptr;
  const double* factors = nullptr;     // parallel to steps, or nullptr (every factor 1)
  long long num_walks = 0;
  int rows = 0, head_dim = 0;          // head_dim <= 256
  double scale = 1.0;
  double* errors = nullptr;            // [checkpoints]
};
void launch_output_walks(const OutputWalkArgs& args, cudaStream_t stream);

// StatsTile::mass_order on device-resident statistics: order[c][0..min(count, causal blocks)) of every
// (head, row) cell c = h * rows + r (row stride `count`), the row's causal blocks of `factor` tile blocks
// by mass (StatsTile's formula, in double), higher first, ties to the lower block. One thread block
// ranks one row: a row of at most kSortWholeEntries blocks, or of no more than the shared memory the
// tile's longest row needs holds, is held in shared memory (sorted whole, or its top count selected first
// where that is a small part of it: ranking.cuh's rank_row), a longer one after a radix select of its top
// count; count at most the args' prefix_limit.
// The longest prefix any device ranks (block and token-score rankings) in one thread block's shared memory,
// a key and an index each: 192 KiB, which Hopper's 227 KiB a block holds. A device ranks up to
// ranked_prefix_limit(its shared memory): 8,192 on an A100 (163 KiB) or an sm_86/89 card (99 KiB); callers
// rank longer prefixes on the host.
constexpr long long kMaxRankedPrefix = 16384;
// Static shared memory the ranking kernels may declare beside their entries (select_top's histogram and
// counters: 1,112 bytes); configure_ranking_kernels checks it against the compiled kernels.
constexpr std::size_t kRankingStaticBytes = 2048;
// The longest power-of-two prefix, up to kMaxRankedPrefix, whose entries fit `shared_bytes` a block beside
// kRankingStaticBytes; 0 where not even kSortWholeEntries fit (the backend refuses such a device).
long long ranked_prefix_limit(std::size_t shared_bytes);
// by_group_max: StatsTile::group_max_order instead, one ranking per row (cell c = r) by the largest
// probability of a block, max over the heads (StatsTile's formula, portable_exp's bits), into order[r].
struct BlockRankingArgs {
  const float* block_max = nullptr;     // [heads][rows][num_blocks]
  const float* block_sum = nullptr;
  const double* lse_tokens = nullptr;   // [heads][rows]
  const double* lse_all = nullptr;      // [heads][rows]: by_group_max only
  const long long* positions = nullptr; // [rows]
  int heads = 0, rows = 0;
  long long block = 64, num_blocks = 0; // the tile's blocks
  int factor = 1;                       // tile blocks per ranked block
  int count = 0;                        // 1..ranked blocks of the last row
  int* order = nullptr;                 // [heads][rows][count], or [rows][count] by_group_max
  long long prefix_limit = 0;           // the device's ranked_prefix_limit
  bool by_group_max = false;
  // false: rows held in shared memory are sorted whole, never selected first (rank_row; benchmarks and tests
  // compare the two, which rank alike).
  bool select_in_shared = true;
};
void launch_block_ranking(const BlockRankingArgs& args, cudaStream_t stream);

// Backend::page_bound_rankings on device-resident data: per (head, row) cell c = h * rows + r, the row's
// own page first, then its earlier pages by Quest's bound (in double, channel by channel, no fused
// multiply-adds: the host's bits), higher first, ties to the lower page; order[c][0..min(count, pages of
// the row)). At most kMaxRankedPages pages (sorted whole) and kMaxBoundHeadDim channels.
constexpr long long kMaxRankedPages = 4096;
constexpr int kMaxBoundHeadDim = 256;
// The page ranking's most dynamic shared memory: 49 KiB.
constexpr std::size_t kPageRankingBytes = (kMaxRankedPages * (sizeof(unsigned long long) + sizeof(int))) + kMaxBoundHeadDim * sizeof(float);
// The shared memory a block must be able to take for the rankings (pages, and rows of kSortWholeEntries
// blocks sorted whole): every GPU of compute capability 7.0 or newer has it.
constexpr std::size_t kMinRankingSharedBytes = kPageRankingBytes + kRankingStaticBytes;
struct PageBoundRankingArgs {
  const float* q = nullptr;              // [heads][rows][head_dim], unscaled
  const float* lo = nullptr;             // [head_dim][pages]: per-channel key minima (exact in fp32)
  const float* hi = nullptr;             // [head_dim][pages]: maxima
  const long long* positions = nullptr;  // [rows]
  int heads = 0, rows = 0, head_dim = 0;
  long long page = 16, pages = 0;
  int count = 0;                         // 1..pages
  int* order = nullptr;                  // [heads][rows][count]
};
void launch_page_bound_ranking(const PageBoundRankingArgs& args, cudaStream_t stream);
// Whether this build holds code the current device runs (CMAKE_CUDA_ARCHITECTURES names its architecture,
// or an older one whose PTX it compiles).
bool has_kernels_for_current_device();
// Once per device, before the first ranking: lets the ranking kernels take the shared memory of the
// longest prefix that fits `shared_bytes` a block (the device's opt-in limit, at least
// kMinRankingSharedBytes). Error(kInternal) if the kernels' static shared memory exceeds kRankingStaticBytes.
void configure_ranking_kernels(std::size_t shared_bytes);

// Backend::nsa_block_scores (and pooled_key_logits) on device-resident data (nsa_scores.cu): scores[r][b] of the tile's rows,
// logits with the host's bits (channels ascending, each step fused or not as `fused` says), the softmax
// and the mapping onto blocks in double.
struct NsaScoreArgs {
  const float* q = nullptr;              // [heads][rows][head_dim]: the tile's rows, unscaled
  const double* keys_t = nullptr;        // [head_dim][compressed]: compressed keys, channel-major
  const long long* positions = nullptr;  // [rows]
  int heads = 0, rows = 0, head_dim = 0;
  long long compressed = 0, cmp = 32, stride = 16, block = 64;
  long long width = 0;                   // compressed keys the last row sees: the logits' row stride
  long long blocks = 0;                  // blocks of the last row: the scores' row stride
  double scale = 1.0;
  bool fused = true;
  double* logits = nullptr;              // workspace [heads][rows][width]
  double* scores = nullptr;              // [rows][blocks]
};
long long nsa_visible_keys(const NsaScoreArgs& args, long long position);  // args' cmp, stride, compressed
void launch_nsa_scores(const NsaScoreArgs& args, cudaStream_t stream);
// Only the logits of launch_nsa_scores (its first kernel; needs width > 0): scale * q . c_i where row r sees
// key i, the rest of `logits` left as it was.
void launch_nsa_logits(const NsaScoreArgs& args, cudaStream_t stream);

// Backend::token_score_rankings on device data (token_scores.cu; proxy::token_score_rankings is the
// definition): every (set, row) of rows [row_begin, row_begin + rows) of a request of total_rows rows
// scored against the keys (the host's bits: channels ascending, each step fused or not as `fused` says, the
// division and the terms' sum correctly rounded), each block's largest score into `scores`, then the row's
// first count blocks ranked into order[(s * total_rows + row) * stride + i] (rank_top's order; the rest of a
// row is left as it was). Counts up to prefix_limit (callers rank longer prefixes on the host).
struct TokenScoreArgs {
  const double* keys = nullptr;          // [seq_len][width], or
  const float* keys32 = nullptr;         // [seq_len][width] (widened on the device: exact)
  int width = 0;
  int sets = 1, terms = 1, channels = 1;
  const int* channel = nullptr;          // [sets][total_rows][terms][channels], each < width
  const double* weight = nullptr;        // [sets][total_rows][terms][channels]
  const double* divisor = nullptr;       // [sets][total_rows][terms], or nullptr
  const long long* positions = nullptr;  // [total_rows]
  const long long* counts = nullptr;     // [total_rows]: 0 .. t / block + 1, at most prefix_limit
  int total_rows = 0, row_begin = 0, rows = 0;
  long long local = 0, block = 1;
  long long num_blocks = 0;              // blocks of the request's last row: the workspace's row stride
  bool fused = true;
  double* scores = nullptr;              // workspace [sets][rows][num_blocks]
  int stride = 0;                        // order's row stride (the largest count)
  int* order = nullptr;                  // [sets][total_rows][stride]
  long long prefix_limit = 0;            // the device's ranked_prefix_limit
  std::size_t shared_bytes = 0;          // shared memory a block may take on the device (its opt-in limit)
};
// Enqueues the two kernels; host_positions and host_counts (the whole request's, on the host) size the
// ranking's shared memory.
void launch_token_score_rankings(const TokenScoreArgs& args, const long long* host_positions, const long long* host_counts,
                                 cudaStream_t stream);
// Whether a score block has the shared memory for one row of `args`'s width, terms and channels (the caller
// ranks on the host where not).
bool token_scores_fit(const TokenScoreArgs& args);
// Once per device, before the first launch: lets the kernels take what they may need of `shared_bytes` a
// block (the device's opt-in limit).
void configure_token_score_kernels(std::size_t shared_bytes);

// Backend::h2o_evictions on device data, every (budget, set) of a layer in one launch (a thread block
// each). Workspace per (budget, set): cache 2 x seq_len ints, score seq_len doubles, logits heads x seq_len
// doubles; keys_t: [kv_heads][head_dim][seq_len] floats, filled from `keys` ([kv_heads][seq_len][head_dim])
// by the launch.
struct H2oSimulationArgs {
  const float* q = nullptr;              // [sets * heads][seq_len][head_dim]
  float* keys_t = nullptr;
  long long seq_len = 0, sets = 1, kv_heads = 1;
  int heads = 1, head_dim = 0;
  double scale = 1.0;
  const double* sink_logits = nullptr;   // [sets * heads] or nullptr
  long long recent_percent = 50;
  int budgets = 0;
  const long long* capacity = nullptr;   // [budgets][seq_len - 1]
  int* cache = nullptr;
  double* score = nullptr;
  double* logits = nullptr;
  int* evicted = nullptr;                // [budgets][sets][seq_len]
  const volatile int* stop = nullptr;    // host memory the device reads: nonzero ends every simulation early
};
// Shared memory the kernel needs: its own and the step's query rows in double (the caller declines beyond
// the device's limit).
std::size_t h2o_shared_bytes(int heads, int head_dim);
void launch_h2o_simulation(const H2oSimulationArgs& args, const float* keys, cudaStream_t stream);

// Backend::attention_received for one head (attention_received.cu): q, k widened to double on the
// device (launch_widen); logits workspace rows_per_pass x seq_len doubles, lse rows_per_pass doubles.
struct ReceivedHeadArgs {
  const double* q = nullptr;  // [seq_len][head_dim]
  const double* k = nullptr;  // [seq_len][head_dim], the head's KV head
  long long seq_len = 0, head_dim = 0, window = 0, rows_per_pass = 64;
  double scale = 1.0;
  bool has_sink = false;
  double sink = 0.0;
  double* logits = nullptr;
  double* lse = nullptr;
  double* received = nullptr;  // [seq_len], written
};
void launch_widen(const float* source, long long count, double* target, cudaStream_t stream);
// Enqueues the head's passes on `stream` (blas: a cuBLAS handle; its stream is set to `stream`).
void received_for_head(cublasContext* blas, const ReceivedHeadArgs& args, cudaStream_t stream);

}  // namespace hysparse::cuda
