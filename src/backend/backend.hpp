#pragma once
// The operations that differ between compute devices. The replay engine is
// written once against this interface; `cpu` and `cuda` implement it.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hysparse {

// Exact softmax statistics of the query rows of the heads that share one KV head.
// Inputs are float32; logits z_j = scale * q . k_j for keys j <= t (causal).
struct StatsRequest {
  const float* q = nullptr;       // [heads][seq_len][head_dim] (the group's heads, consecutive)
  const float* k = nullptr;       // [seq_len][head_dim]
  const float* v = nullptr;       // [seq_len][head_dim] or nullptr (no output wanted)
  const float* sink_logits = nullptr;  // [heads] or nullptr
  const float* attn = nullptr;    // dense layer instead of q/k: [heads][seq_len][seq_len] probabilities
  std::int64_t heads = 1, seq_len = 0, head_dim = 0;
  double scale = 1.0;
  const std::int64_t* rows = nullptr;  // query positions, ascending
  std::int64_t num_rows = 0;
  std::int64_t block_size = 64;
  // Identify the layer and KV head, so a device backend can keep their keys resident
  // across tiles; -1 means "unknown" (nothing is cached). `tensors_id` names the layer's
  // tensors in this process (never reused, unlike addresses; 0: unknown).
  std::int64_t layer = -1, kv_head = -1;
  std::uint64_t tensors_id = 0;
  // > 0: the caller also wants every (head, row)'s causal blocks of rank_block keys (a multiple of
  // block_size; 0: block_size) ranked by mass (StatsTile::mass_order), the first min(rank_blocks, causal
  // blocks) of each. A backend may decline (StatsTile::ranked = 0): the CPU one does, as its caller
  // ranks on the same cores; a device backend ranks where the statistics are, so that the host does not
  // sort every row.
  std::int64_t rank_blocks = 0, rank_block = 0;
  // > 0: the caller also wants every row's causal blocks of group_rank_block keys (a multiple of block_size)
  // ranked by their largest probability over the request's heads (StatsTile::group_max_order), the first
  // min(group_rank_blocks, causal blocks) of each; a backend may decline as above.
  std::int64_t group_rank_blocks = 0, group_rank_block = 0;
  // > 0: the caller also wants the block view of view_block keys (a multiple of block_size) built beside the
  // statistics (StatsTile::view_mass, by build_block_view's formulas and bits), and with view_max_prob its blocks'
  // largest probabilities too. A backend may decline (view_blocks = 0): the CPU one does, as its caller builds
  // views on the same cores. A backend that builds it (a device, where the statistics are) also gives the
  // largest probabilities where it declines a ranking by group of the same blocks that the request asks. With
  // statistics_needed false, a backend that built the view may leave block_max and block_sum empty.
  std::int64_t view_block = 0;
  bool view_max_prob = false;
  bool statistics_needed = true;
};

// Per (head, row, block): m = max logit in the block, l = sum exp(z - m) over the
// block's causal keys (m = -inf, l = 0 for an empty block). Per (head, row):
// lse_tokens = log sum_j exp(z_j), lse_all = log(exp(sink) + sum_j exp(z_j)).
// A dense layer uses z_j = log p_j, so lse_all = 0 when rows sum to one.
// output (when v is given) = sum_j exp(z_j - lse_all) v_j, the exact attention output.
struct StatsTile {
  std::int64_t heads = 0, rows = 0, num_blocks = 0, head_dim = 0;
  std::vector<float> block_max;   // [heads][rows][num_blocks]
  std::vector<float> block_sum;   // [heads][rows][num_blocks]
  std::vector<double> lse_tokens, lse_all;  // [heads][rows]
  std::vector<float> output;      // [heads][rows][head_dim] or empty
  // When ranked > 0: [heads][rows][ranked], the blocks of rank_block keys of each (head, row) by mass,
  // in double as the replay engine computes it from the tile (a block of f tile blocks: m = their largest
  // max, l = sum of block_sum * exp(block_max - m), mass = l * exp(m - lse_tokens); f = 1: block_sum *
  // exp(block_max - lse_tokens)), higher first, ties to the lower block (rank_top's rule); row r holds
  // min(ranked, causal blocks of r). The exponentials are portable_exp's and the sums fused, so a device
  // ranks the host's bits.
  std::int64_t ranked = 0;
  std::vector<std::int32_t> mass_order;
  // When group_ranked > 0: [rows][group_ranked], the blocks of group_rank_block keys of each row by
  // max over the heads h of P_b(h), the block's largest probability as the replay engine computes it
  // (build_block_view's max_prob), higher first, ties to the lower block; row r holds min(group_ranked, causal
  // blocks of r). HySparse's selection (score max, group max) and the cross-layer reuse matrix rank this way.
  std::int64_t group_ranked = 0;
  std::vector<std::int32_t> group_max_order;
  // When view_blocks > 0 (StatsRequest::view_block): [heads][rows][view_blocks], view_blocks = the last row's
  // position / view_block + 1, BlockView's arrays as build_block_view makes them (0 past a row's causal
  // blocks); view_max_prob empty unless asked (or needed by a declined ranking by group).
  std::int64_t view_blocks = 0;
  std::vector<double> view_mass, view_max_prob;
  std::size_t at(std::int64_t h, std::int64_t r, std::int64_t b) const {
    return static_cast<std::size_t>((h * rows + r) * num_blocks + b);
  }
};

// The output-error metric of attended sets, each built by a walk over key ranges of one (head,
// row) of a tile. A step adds the keys [begin, end) with weights w_j = exp(z_j - lse_all) * factor;
// a checkpoint reports the error of the keys added so far,
//   || sum_j w_j v_j / (w_sink + sum_j w_j) - o || / || o ||,
// o the exact output of the tile (NaN where o = 0), w_sink = exp(sink - lse_all) (0 without sinks).
// Walks are built by the replay engine and evaluated where the keys and values live.
struct OutputStep {
  std::int32_t begin = 0, end = 0;  // keys [begin, end); begin < 0: a checkpoint whose error goes to slot `end`
};
struct OutputWalk {
  std::int32_t head = 0, row = 0;  // of the tile (head within the KV group, tile row)
  std::int64_t first_step = 0, num_steps = 0;
};
struct OutputWalks {
  std::vector<OutputWalk> walks;
  std::vector<OutputStep> steps;
  std::vector<double> factors;  // parallel to steps once any factor is not 1; empty: every factor is 1
  std::int64_t checkpoints = 0;
  void clear();
  void begin_walk(std::int64_t head, std::int64_t row);
  void add(std::int64_t begin, std::int64_t end, double factor = 1.0);  // empty ranges are skipped
  std::int64_t checkpoint();  // the slot of the error
};

// Error(kInternal) unless `walks` fits `request` and `tile` (q, k, v given; heads and rows of the tile;
// every step within its row's causal keys; checkpoint slots below walks.checkpoints): the engine's
// contract, checked by every backend before it reads a key.
void check_output_request(const StatsRequest& request, const StatsTile& tile, const OutputWalks& walks);

// Shares of runs of keys of a tile's (head, row)s, for the keys the replay takes one by one (forced sinks and
// windows, and the keys of blocks they cut). A run's sum is, from 0, sum_j share_j over keys j in [begin,
// end) in key order, or in ascending order of the shares where `ascending` (equal multisets of shares then
// sum alike), each addition rounded in double;
//   share_j = exp(z_j - lse_tokens): key_share's bits for a q/k layer (fp32 q and k whatever the precision),
//             exp(log p_j - lse_tokens) for a dense one (std::log and std::exp; the host's).
struct KeyRun {
  std::int32_t head = 0, row = 0;   // of the tile (head within the KV group, tile row)
  std::int32_t begin = 0, end = 0;  // keys, 0 <= begin <= end <= the row's position + 1
  std::int32_t ascending = 0;       // 1: summed in ascending order of the shares
};
// Error(kInternal) unless every run lies inside `request`'s rows and heads and `tile` matches the request.
void check_key_runs(const StatsRequest& request, const StatsTile& tile, const std::vector<KeyRun>& runs);
// The definition, on the host: sums[i] of runs[i] (resized to runs.size()).
void key_run_shares_on_host(const StatsRequest& request, const StatsTile& tile, const std::vector<KeyRun>& runs,
                            std::vector<double>& sums);

// Quest's ranking of the pages of one KV head for query rows of its heads (a proxy's scores, computed
// where the device is). Per (head, row): the row's own (last, partial) page first, then its earlier pages
// by the bound sum_c max(q_c hi_c, q_c lo_c) (proxy::quest_bound: in double, channel by channel, in that
// order), higher first, ties to the lower page; the first min(count, pages of the row) of them.
struct PageBoundRequest {
  const float* q = nullptr;   // [heads][seq_len][head_dim]: the KV group's query heads
  const double* lo = nullptr; // [pages][head_dim]: per-channel minima of each page's keys
  const double* hi = nullptr; // [pages][head_dim]: maxima
  std::int64_t heads = 1, seq_len = 0, head_dim = 0, page = 16, pages = 0;
  const std::int64_t* rows = nullptr;  // query positions, ascending
  std::int64_t num_rows = 0;
  std::int64_t count = 0;              // 1..pages: pages ranked a row (fewer where the row has fewer)
  std::int64_t kv_head = -1;           // which device of several serves it
};

// H2O's caches (selector h2o) for every set of query heads of a layer (a KV group's, attention summed, or
// one head each) and every budget, simulated step by step over all positions (proxy::h2o_simulate is the
// definition, per set and budget): step t
// appends key t, each head attends over the cache (logits scale * q . k in double, softmax with the sink
// logit in the denominator) and adds the probabilities to the keys' scores; then the cache shrinks to
// capacity[t] - 1 keys, protecting its recent_percent% most recent (of capacity[t]) and evicting the lowest
// score (ties: the later key; nothing unprotected: the oldest).
struct H2oRequest {
  const float* q = nullptr;              // [sets * heads][seq_len][head_dim]: set s's heads are s * heads + 0 .. heads - 1
  const float* k = nullptr;              // [kv_heads][seq_len][head_dim]; set s attends KV head s * kv_heads / sets
  std::int64_t sets = 1, heads = 1, kv_heads = 1, seq_len = 0, head_dim = 0;
  double scale = 1.0;
  const double* sink_logits = nullptr;   // [sets * heads], or nullptr
  std::int64_t recent_percent = 50;
  std::int64_t budgets = 0;
  const std::int64_t* capacity = nullptr;  // [budgets][seq_len - 1]: the cache size of step t + 1, current key included
  // Polled while the simulations run where not null: true stops them early, and the backend declines
  // (the caller then checks for the signal). The replay passes hysparse::interrupted.
  bool (*stop_requested)() = nullptr;
};

// The attention each key receives from the `window` queries that follow it (InfLLM's representative
// scores, selector infllm), for every query head of a layer:
//   received[h][j] = sum over t in [j, min(T, j + window) - 1], t ascending, of p_t(j),
//   p_t(j) = exp(z_tj - lse_t), z_tj = scale * q_t . k_j in double, lse_t = log(exp(sink_h) + sum_{j<=t} exp(z_tj)).
// proxy::attention_received is the definition; each row's log-sum-exp needs every causal logit, so it
// is O(T^2 d) a head.
struct ReceivedRequest {
  const float* q = nullptr;             // [heads][seq_len][head_dim]; head h attends KV head h / (heads / kv_heads)
  const float* k = nullptr;             // [kv_heads][seq_len][head_dim]
  std::int64_t heads = 1, kv_heads = 1, seq_len = 0, head_dim = 0;
  double scale = 1.0;
  const double* sink_logits = nullptr;  // [heads], or nullptr
  std::int64_t window = 0;
  std::int64_t rows_per_pass = 0;       // > 0: the query rows a device forms logits for at once (tests); 0: its choice
  // Polled while the work runs where not null (between heads, or query slabs on the host): true stops it
  // early, and a backend declines (the caller then checks for the signal). The replay passes
  // hysparse::interrupted.
  bool (*stop_requested)() = nullptr;
};

// NSA's selection scores (selector nsa) of query rows of one KV group, proxy::nsa_block_scores being the
// definition: per row t, each head's logits z_i = scale * q_t . c_i (in double, channels ascending, each
// step proxy::multiply_add) over the compressed keys c_i it sees (i < visible(t) = (t - cmp + 1) / stride
// + 1 for t >= cmp - 1, at most `compressed`; none before), their softmax p_i = exp(z_i - lse), mapped onto
// the selection blocks b <= t / block by counting key i once per stride-long piece of its window
// [i stride, i stride + cmp) inside block b (summed in ascending i), and summed over the group's heads in
// order. scores[r * blocks + b], blocks = rows[num_rows - 1] / block + 1; a row's blocks past its own are 0.
struct NsaScoreRequest {
  const float* q = nullptr;        // [heads][seq_len][head_dim]: the KV group's query heads
  const double* keys = nullptr;    // [compressed][head_dim]: the group's compressed keys (means of cmp keys)
  // Names the contents of `keys` in this process, never reused (0: unknown), so that a device keeps them
  // across requests; the caller gives a new id whenever they change.
  std::uint64_t keys_id = 0;
  std::int64_t heads = 1, seq_len = 0, head_dim = 0, compressed = 0;
  std::int64_t cmp = 32, stride = 16, block = 64;  // block and cmp multiples of stride
  double scale = 1.0;
  const std::int64_t* rows = nullptr;  // query positions, ascending
  std::int64_t num_rows = 0;
  std::int64_t kv_head = -1;           // which KV group (and which device of several)
  bool fused = true;                   // whether proxy::multiply_add fuses on this build (each step one rounding)
};

// The token scores of a channel-restricted or low-rank proxy (selectors doublesparsity, loki, sparq), ranked
// by block; proxy::token_score_rankings is the definition. Per set s (a query head, or a KV group's heads
// together) and row r at position t, for each key j <= t:
//   score_j = sum over terms u (the first assigned, each next one added) of dot_u(j) / divisor[s][r][u]
//             (no division without divisors),
//   dot_u(j) = sum over i < channels, ascending, of weight[s][r][u][i] * key_j[channel[s][r][u][i]] in double,
//             each step one fused multiply-add where `fused`, else a rounded product and a rounded sum (the
//             host computes only its own mode, proxy::kMultiplyAddFused; a device either),
// keys j > t - local score +infinity; a block's score is the largest of its keys' (proxy::max_over_blocks);
// order[(s * num_rows + r) * stride + i], i < counts[r], are the row's first counts[r] of its t / block + 1
// blocks by score, higher first, ties to the lower block (rank_top), stride the largest count; the rest 0.
struct TokenScoreRequest {
  const float* keys = nullptr;     // [seq_len][width]: the KV head's keys, or
  const double* keys64 = nullptr;  // [seq_len][width]: keys in double (e.g. projected onto principal directions)
  // Names the keys' contents in this process, never reused (proxy::next_data_id; 0: unknown), so that a
  // device keeps them across requests; the caller gives a new id whenever they change.
  std::uint64_t keys_id = 0;
  std::int64_t seq_len = 0, width = 0;
  std::int64_t sets = 1, terms = 1, channels = 1;
  const std::int32_t* channel = nullptr;  // [sets][num_rows][terms][channels], each < width; nullptr: channel i is i
  const double* weight = nullptr;         // [sets][num_rows][terms][channels]
  const double* divisor = nullptr;        // [sets][num_rows][terms], or nullptr (no division)
  const std::int64_t* rows = nullptr;     // query positions, ascending
  std::int64_t num_rows = 0;
  const std::int64_t* counts = nullptr;   // [num_rows]: blocks ranked a row, 0 .. t / block + 1
  std::int64_t local = 0, block = 1;
  std::int64_t kv_head = -1;              // which KV head's keys (and which device of several)
  bool fused = true;                      // whether proxy::multiply_add fuses on this build
};
// Error(kInternal) unless `request` keeps TokenScoreRequest's contract (rows ascending inside the keys, counts
// within each row's blocks, channels inside the width, one kind of keys): checked by every backend before it
// reads a key. Inline: the host path (replay/) and the CUDA backend each link it without the other.
inline void check_token_score_request(const TokenScoreRequest& request) {
  const TokenScoreRequest& q = request;
  const bool shape = q.num_rows > 0 && q.rows && q.counts && q.weight && (q.keys == nullptr) != (q.keys64 == nullptr) &&
                     q.seq_len > 0 && q.width > 0 && q.sets > 0 && q.terms > 0 && q.channels > 0 && q.block > 0 && q.local >= 0;
  bool valid = shape;
  for (std::int64_t r = 0; valid && r < q.num_rows; ++r) {
    const std::int64_t t = q.rows[r];
    valid = t >= 0 && t < q.seq_len && (r == 0 || t > q.rows[r - 1]) && q.counts[r] >= 0 && q.counts[r] <= t / q.block + 1;
  }
  if (valid && q.channel) {
    const std::int64_t n = q.sets * q.num_rows * q.terms * q.channels;
    for (std::int64_t i = 0; valid && i < n; ++i) valid = q.channel[i] >= 0 && q.channel[i] < q.width;
  } else if (valid) {
    valid = q.channels <= q.width;
  }
  if (!valid) {
    fail(ErrorKind::kInternal,
         "token-score rankings: {} rows of {} keys x {} channels, {} sets x {} terms x {} channels, block {}, local {}: rows "
         "must ascend inside the keys, counts lie within each row's blocks, channels index the keys' width, and one of "
         "keys and keys64 be given",
         q.num_rows, q.seq_len, q.width, q.sets, q.terms, q.channels, q.block, q.local);
  }
}

// What the logits are computed from. kFp32 is exact fp32 arithmetic on the captured values
// (every backend). kBf16 / kFp16 round q and k once to that type on the device and form the
// products on tensor cores with fp32 accumulation (CUDA only); on captures stored in that
// type the rounding is exact and only the summation order differs from kFp32.
enum class Precision { kFp32, kBf16, kFp16 };
Precision parse_precision(const std::string& text);  // "fp32", "bf16", "fp16"; else Error(kUsage)
const char* to_string(Precision precision);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;    // "cpu" or "cuda"
  virtual std::string device() const = 0;  // e.g. "x86_64 CPU, 2 OpenMP threads"
  virtual Precision precision() const { return Precision::kFp32; }
  // Rows per request that use the device well (the engine may send fewer).
  virtual std::int64_t preferred_tile_rows() const { return 64; }
  // Thread-safe: the engine calls it from several OpenMP threads at once.
  virtual void block_statistics(const StatsRequest& request, StatsTile& out) const = 0;
  // errors[slot] of every checkpoint of `walks` (resized to walks.checkpoints), for the rows of a q/k
  // `request` with v whose statistics are `tile`. Logits come from fp32 q and k whatever the
  // precision (like every key the host computes one by one). Thread-safe.
  virtual void output_errors(const StatsRequest& request, const StatsTile& tile, const OutputWalks& walks,
                             std::vector<double>& errors) const = 0;
  // `runs`' sums (KeyRun) into sums, or false where the backend leaves them to the caller
  // (key_run_shares_on_host): the CPU backend does (the same cores); a device backend may sum a q/k layer's
  // runs where its keys are, with key_share's bits. Thread-safe.
  virtual bool key_run_shares(const StatsRequest& request, const StatsTile& tile, const std::vector<KeyRun>& runs,
                              std::vector<double>& sums) const {
    (void)request;
    (void)tile;
    (void)runs;
    (void)sums;
    return false;
  }
  // A hint that requests for `request`'s layer and KV head (k, v when given, tensors_id, rows: the rows
  // that will be asked for; q unused) come soon: a device backend copies the keys while other work runs.
  // Thread-safe. Results never depend on it: a backend may decline (the CUDA one does without room to
  // spare on the device) or throw an Error; the copy is then made by the first request that needs it.
  virtual void prepare_keys(const StatsRequest& request) const { (void)request; }
  // `request`'s ranking into order[(h * num_rows + r) * count + i] (resized to heads * num_rows * count),
  // or false when the backend leaves it to the caller: the CPU backend does (the selector ranks on the
  // same cores, and its loop is the reference); the CUDA one computes the bounds and ranks on the device,
  // with the same bits. Thread-safe.
  virtual bool page_bound_rankings(const PageBoundRequest& request, std::vector<std::int32_t>& order) const {
    (void)request;
    (void)order;
    return false;
  }
  // `request`'s evictions into evicted[(b * sets + s) * seq_len + j]: the first step whose cache (budget b,
  // set s) no longer holds key j, INT32_MAX if none (resized to budgets * sets * seq_len); or false when the backend leaves it to
  // the caller (the CPU backend: proxy::h2o_simulate on the same cores is the reference). The CUDA one
  // simulates on the device (one launch for its sets; several devices split the KV heads): the same
  // logits, its own exp, log and summation order, so a decision between two scores within rounding may
  // differ. Thread-safe.
  virtual bool h2o_evictions(const H2oRequest& request, std::vector<std::int32_t>& evicted) const {
    (void)request;
    (void)evicted;
    return false;
  }
  // `request`'s received attention into received[h * seq_len + j] (resized to heads * seq_len), or false
  // where the backend leaves it to the caller (the CPU backend: proxy::attention_received on the same cores
  // is the reference). The CUDA one computes it on the device (several devices split the KV heads): logits
  // by a double GEMM in its own summation order and its own exp and log, so a received sum may differ in
  // the last bits. Thread-safe.
  virtual bool attention_received(const ReceivedRequest& request, std::vector<double>& received) const {
    (void)request;
    (void)received;
    return false;
  }
  // `request`'s scores into scores (resized to num_rows * blocks), or false where the backend leaves them to
  // the caller (the CPU backend: proxy::nsa_block_scores on the same cores is the reference). The CUDA one
  // computes them on the device with the host's logits, bit for bit, and its own exp, log and order of the
  // softmax's sum, so a score may differ in the last bits. Thread-safe.
  virtual bool nsa_block_scores(const NsaScoreRequest& request, std::vector<double>& scores) const {
    (void)request;
    (void)scores;
    return false;
  }
  // NSA's logits alone, before their softmax: logits[(h * num_rows + r) * width + i] = scale * q . c_i for the
  // compressed keys i that row r sees (NsaScoreRequest's rule and multiply-adds), 0 past them, width = the
  // keys the last row sees (resized to heads * num_rows * width); or false where the backend leaves them to
  // the caller. proxy::pooled_key_logits is the definition; the CUDA backend gives its bits. moba's block
  // scores are these logits over its blocks' mean keys (cmp = stride = its block, scale 1). Thread-safe.
  virtual bool pooled_key_logits(const NsaScoreRequest& request, std::vector<double>& logits) const {
    (void)request;
    (void)logits;
    return false;
  }
  // `request`'s rankings into order (resized to sets * num_rows * stride), or false where the backend leaves
  // them to the caller (the CPU backend: proxy::token_score_rankings on the same cores is the reference).
  // The CUDA backend gives the host's scores bit for bit, hence its rankings. Thread-safe.
  virtual bool token_score_rankings(const TokenScoreRequest& request, std::vector<std::int32_t>& order) const {
    (void)request;
    (void)order;
    return false;
  }
};

std::unique_ptr<Backend> make_cpu_backend();
// Several backends as one (what a device list makes; tests build it from their own backends).
std::unique_ptr<Backend> make_multi_device_backend(std::vector<std::unique_ptr<Backend>> devices);
// "cpu" or "cuda" / "cuda:N". Throws Error(kDevice) when the device is unusable, and
// Error(kUsage) for a precision the device does not offer (the CPU computes in fp32 only).
// "cuda:0,cuda:1" -> {"cuda:0", "cuda:1"}; Error(kUsage) on an empty entry.
std::vector<std::string> split_device_list(const std::string& devices);
// --gpus "0,1" -> "cuda:0,cuda:1"; Error(kUsage) unless every entry is a GPU index.
std::string gpu_device_list(const std::string& gpus);

// A comma-separated list ("cuda:0,cuda:1") spreads the KV heads over the devices round-robin.
std::unique_ptr<Backend> make_backend(const std::string& device, Precision precision = Precision::kFp32);
std::unique_ptr<Backend> make_backend(const std::string& device, const std::string& precision);

// Build and runtime facts for `hysparse info`.
struct CudaStatus {
  bool compiled = false;
  std::vector<std::string> devices;  // one description per visible GPU
  std::string why_none;              // when devices is empty
};
CudaStatus cuda_status();

}  // namespace hysparse
