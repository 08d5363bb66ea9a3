// CPU backend: Eigen for the tile products, exact one-pass block statistics.
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "backend/backend.hpp"
#include "backend/row_statistics.hpp"
#include "common/error.hpp"
#include "common/portable_exp.hpp"

namespace hysparse {
namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Keys are streamed in chunks of whole blocks of at least this many keys.
constexpr std::int64_t kMinKeyChunk = 256;

// Sums in double over eight lanes: vectorises, and is exact whenever a sequential double
// sum is, so blocks holding the same logits in another order tie exactly.
double sum_in_double(const float* values, std::int64_t n) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(values[j + l]);
  }
  for (; j < n; ++j) lanes[0] += static_cast<double>(values[j]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

void dense_layer_statistics(const StatsRequest& req, StatsTile& out) {
  const std::int64_t T = req.seq_len, B = req.block_size;
  for (std::int64_t h = 0; h < req.heads; ++h) {
    for (std::int64_t r = 0; r < req.num_rows; ++r) {
      const std::int64_t t = req.rows[r];
      const float* p = req.attn + (h * T + t) * T;
      for (std::int64_t b = 0; b * B <= t; ++b) {
        const std::int64_t end = std::min(t + 1, (b + 1) * B);
        float peak = 0.0f;
        double sum = 0.0;
        for (std::int64_t j = b * B; j < end; ++j) {
          peak = std::max(peak, p[j]);
          sum += p[j];
        }
        if (peak > 0.0f) {
          out.block_max[out.at(h, r, b)] = std::log(peak);
          out.block_sum[out.at(h, r, b)] = static_cast<float>(sum / peak);
        }
      }
    }
    finish_row_statistics(req, out, h);
    for (std::int64_t r = 0; r < req.num_rows; ++r) out.lse_all[static_cast<std::size_t>(h * out.rows + r)] = 0.0;
  }
}

void qk_layer_statistics(const StatsRequest& req, StatsTile& out) {
  const std::int64_t d = req.head_dim, B = req.block_size, R = req.num_rows, G = req.heads;
  const std::int64_t last = req.rows[R - 1];
  const std::int64_t chunk = ((std::max(kMinKeyChunk, B) + B - 1) / B) * B;
  const auto scale = static_cast<float>(req.scale);

  // The query rows of every head of the group, interleaved by row (row r of head h at r * G + h): the rows
  // that see a key chunk are then one block for all heads, so each chunk of keys is packed once for the
  // group's product, not once per head.
  RowMatrix q_rows(R * G, d), scores, probabilities, output;
  Eigen::ArrayXf exps(std::max<std::int64_t>(B, 1));
  std::vector<float> running_max(static_cast<std::size_t>(R * G), kNegInf);
  Eigen::Map<const RowMatrix> keys(req.k, req.seq_len, d);
  for (std::int64_t h = 0; h < G; ++h) {
    const float* q_head = req.q + h * req.seq_len * d;
    for (std::int64_t r = 0; r < R; ++r) {
      q_rows.row(r * G + h) = Eigen::Map<const Eigen::RowVectorXf>(q_head + req.rows[r] * d, d) * scale;
    }
  }
  if (req.v) output.setZero(R * G, d);
  for (std::int64_t c0 = 0; c0 <= last; c0 += chunk) {
    const std::int64_t width = std::min(chunk, last + 1 - c0);
    // First row that sees any key of this chunk (rows are ascending).
    const std::int64_t r_begin = std::lower_bound(req.rows, req.rows + R, c0) - req.rows;
    const std::int64_t active = R - r_begin;
    if (active <= 0) continue;
    scores.noalias() = q_rows.bottomRows(active * G) * keys.middleRows(c0, width).transpose();
    if (req.v) probabilities.setZero(active * G, width);
    for (std::int64_t i = 0; i < active; ++i) {
      const std::int64_t r = r_begin + i;
      const std::int64_t visible = std::min(width, req.rows[r] + 1 - c0);
      for (std::int64_t h = 0; h < G; ++h) {
        float* z = scores.row(i * G + h).data();
        for (std::int64_t b0 = 0; b0 < visible; b0 += B) {
          const std::int64_t len = std::min(B, visible - b0);
          Eigen::Map<Eigen::ArrayXf> segment(z + b0, len);
          const float m = segment.maxCoeff();
          exps.head(len) = (segment - m).exp();  // vectorised (a cast in the expression would not be)
          const auto l = static_cast<float>(sum_in_double(exps.data(), len));
          const std::size_t cell = out.at(h, r, (c0 + b0) / B);
          out.block_max[cell] = m;
          out.block_sum[cell] = l;
        }
        if (req.v) {
          Eigen::Map<Eigen::ArrayXf> visible_scores(z, visible);
          float& row_max = running_max[static_cast<std::size_t>(r * G + h)];
          const float current = std::max(row_max, visible_scores.maxCoeff());
          if (row_max != kNegInf) output.row(r * G + h) *= std::exp(row_max - current);
          row_max = current;
          probabilities.row(i * G + h).head(visible) = (visible_scores - current).exp().matrix().transpose();
        }
      }
    }
    if (req.v) {
      Eigen::Map<const RowMatrix> values(req.v + c0 * d, width, d);
      output.bottomRows(active * G).noalias() += probabilities * values;
    }
  }
  for (std::int64_t h = 0; h < G; ++h) finish_row_statistics(req, out, h);
  if (req.v) {
    for (std::int64_t h = 0; h < G; ++h) {
      for (std::int64_t r = 0; r < R; ++r) {
        const double lse_all = out.lse_all[static_cast<std::size_t>(h * R + r)];
        const auto factor = static_cast<float>(std::exp(static_cast<double>(running_max[static_cast<std::size_t>(r * G + h)]) - lse_all));
        Eigen::Map<Eigen::RowVectorXf>(&out.output[static_cast<std::size_t>((h * R + r) * d)], d) = output.row(r * G + h) * factor;
      }
    }
  }
}

// Output walks (backend.hpp) on the host. Walks of one row whose steps are the same key ranges
// (a selection shared by the heads of a KV group: hysparse, swa, a grouped oracle) are evaluated
// together: each step's keys and values are read once for all their heads (a matrix product in
// place of one matrix-vector product per head). Products in fp32 (Eigen), weights
// exp(scale * z - lse_all) in double, each step's weighted values summed in fp32 and accumulated in
// double.

// Steps of fewer keys are evaluated head by head even when several heads share them.
constexpr std::int64_t kMinSharedStepKeys = 16;

// Whether walks a and b add the same key ranges with the same factors, checkpoints at the same places.
bool same_steps(const OutputWalks& walks, const OutputWalk& a, const OutputWalk& b) {
  if (a.row != b.row || a.num_steps != b.num_steps) return false;
  for (std::int64_t i = 0; i < a.num_steps; ++i) {
    const auto ia = static_cast<std::size_t>(a.first_step + i), ib = static_cast<std::size_t>(b.first_step + i);
    const OutputStep& x = walks.steps[ia];
    const OutputStep& y = walks.steps[ib];
    if (x.begin < 0 || y.begin < 0) {
      if (x.begin >= 0 || y.begin >= 0) return false;  // checkpoints match in place, not in slot
      continue;
    }
    if (x.begin != y.begin || x.end != y.end) return false;
    if (!walks.factors.empty() && walks.factors[ia] != walks.factors[ib]) return false;
  }
  return true;
}

// Groups of walks with the same steps, each listed in walk order (most groups hold the heads of one
// shared selection; a per-head selection is a group of one).
std::vector<std::vector<std::size_t>> group_walks(const OutputWalks& walks) {
  std::vector<std::pair<std::uint64_t, std::size_t>> keyed(walks.walks.size());
  for (std::size_t w = 0; w < walks.walks.size(); ++w) {
    const OutputWalk& walk = walks.walks[w];
    std::uint64_t key = std::hash<std::int64_t>()(walk.row) ^ (static_cast<std::uint64_t>(walk.num_steps) << 32);
    for (std::int64_t i = 0; i < walk.num_steps; ++i) {
      const OutputStep& step = walks.steps[static_cast<std::size_t>(walk.first_step + i)];
      const std::uint64_t range = step.begin < 0 ? ~std::uint64_t{0}
                                                 : (static_cast<std::uint64_t>(static_cast<std::uint32_t>(step.begin)) << 32) |
                                                       static_cast<std::uint32_t>(step.end);
      key = (key ^ range) * 0x100000001B3ull;
    }
    keyed[w] = {key, w};
  }
  std::sort(keyed.begin(), keyed.end());
  std::vector<std::vector<std::size_t>> groups;
  for (std::size_t i = 0; i < keyed.size();) {
    std::size_t j = i;
    while (j < keyed.size() && keyed[j].first == keyed[i].first) ++j;
    // Equal keys: split into truly equal step lists (a hash collision leaves several groups).
    const std::size_t first_group = groups.size();
    for (std::size_t k = i; k < j; ++k) {
      const OutputWalk& walk = walks.walks[keyed[k].second];
      bool placed = false;
      for (std::size_t g = first_group; g < groups.size() && !placed; ++g) {
        if (same_steps(walks, walks.walks[groups[g].front()], walk)) {
          groups[g].push_back(keyed[k].second);
          placed = true;
        }
      }
      if (!placed) groups.push_back({keyed[k].second});
    }
    i = j;
  }
  // In the order of their first walk: consecutive walks read neighbouring keys (cache).
  std::sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) { return a.front() < b.front(); });
  return groups;
}

// A step's key weights w_j = exp(scale z_j - lse_all) * factor into weight[0, n) (fp32, for the product
// with v) and their sum in key order into total (double): the exponentials in a loop the compiler
// vectorises, the sum after it.
void step_weights(const float* dot, std::int64_t n, double scale, double lse_all, double factor, float* weight, double& total) {
  thread_local std::vector<double> w;
  w.resize(static_cast<std::size_t>(n));
  double* values = w.data();
  for (std::int64_t j = 0; j < n; ++j) values[j] = portable_exp(scale * static_cast<double>(dot[j]) - lse_all) * factor;
  for (std::int64_t j = 0; j < n; ++j) {
    weight[j] = static_cast<float>(values[j]);
    total += values[j];
  }
}

void evaluate_walk_group(const StatsRequest& req, const StatsTile& tile, const OutputWalks& walks,
                         const std::vector<std::size_t>& group, std::vector<double>& errors) {
  const std::int64_t d = req.head_dim, m = static_cast<std::int64_t>(group.size());
  const OutputWalk& lead = walks.walks[group.front()];
  const std::int64_t r = lead.row;
  thread_local RowMatrix queries;  // [d][m]: one column per walk
  thread_local Eigen::MatrixXf dots, weights, sums;
  thread_local Eigen::VectorXf dot, weight, sum;
  thread_local std::vector<double> lse_all, sink_weight, numerator, denominator;
  queries.resize(d, m);
  lse_all.resize(static_cast<std::size_t>(m));
  sink_weight.resize(static_cast<std::size_t>(m));
  for (std::int64_t k = 0; k < m; ++k) {
    const std::int64_t h = walks.walks[group[static_cast<std::size_t>(k)]].head;
    const std::size_t cell = static_cast<std::size_t>(h * tile.rows + r);
    lse_all[static_cast<std::size_t>(k)] = tile.lse_all[cell];
    sink_weight[static_cast<std::size_t>(k)] =
        req.sink_logits ? std::exp(static_cast<double>(req.sink_logits[h]) - tile.lse_all[cell]) : 0.0;
    queries.col(k) = Eigen::Map<const Eigen::VectorXf>(req.q + (h * req.seq_len + req.rows[r]) * d, d);
  }
  numerator.assign(static_cast<std::size_t>(d * m), 0.0);  // [m][d]
  denominator.assign(static_cast<std::size_t>(m), 0.0);
  for (std::int64_t i = 0; i < lead.num_steps; ++i) {
    const std::size_t index = static_cast<std::size_t>(lead.first_step + i);
    const OutputStep& step = walks.steps[index];
    if (step.begin < 0) {
      for (std::int64_t k = 0; k < m; ++k) {
        const OutputWalk& walk = walks.walks[group[static_cast<std::size_t>(k)]];
        const float* exact = &tile.output[static_cast<std::size_t>((walk.head * tile.rows + r) * d)];
        const double total = denominator[static_cast<std::size_t>(k)] + sink_weight[static_cast<std::size_t>(k)];
        double diff = 0.0, norm = 0.0;
        for (std::int64_t c = 0; c < d; ++c) {
          const double approx = total > 0 ? numerator[static_cast<std::size_t>(k * d + c)] / total : 0.0;
          diff += (approx - exact[c]) * (approx - exact[c]);
          norm += static_cast<double>(exact[c]) * exact[c];
        }
        const OutputStep& own = walks.steps[static_cast<std::size_t>(walk.first_step + i)];  // this walk's slot
        errors[static_cast<std::size_t>(own.end)] = norm > 0 ? std::sqrt(diff / norm) : std::numeric_limits<double>::quiet_NaN();
      }
      continue;
    }
    const std::int64_t j0 = step.begin, n = step.end - step.begin;
    const double factor = walks.factors.empty() ? 1.0 : walks.factors[index];
    Eigen::Map<const RowMatrix> keys(req.k + j0 * d, n, d);
    Eigen::Map<const RowMatrix> values(req.v + j0 * d, n, d);
    if (m == 1 || n < kMinSharedStepKeys) {
      // Matrix-vector products per head (Eigen's kernels for them; a short step gains nothing from a
      // matrix product's setup).
      for (std::int64_t k = 0; k < m; ++k) {
        const OutputWalk& walk = walks.walks[group[static_cast<std::size_t>(k)]];
        dot.noalias() = keys * Eigen::Map<const Eigen::VectorXf>(req.q + (walk.head * req.seq_len + req.rows[r]) * d, d);
        weight.resize(n);
        step_weights(dot.data(), n, req.scale, lse_all[static_cast<std::size_t>(k)], factor, weight.data(),
                     denominator[static_cast<std::size_t>(k)]);
        sum.noalias() = values.transpose() * weight;
        for (std::int64_t c = 0; c < d; ++c) numerator[static_cast<std::size_t>(k * d + c)] += sum[c];
      }
      continue;
    }
    dots.noalias() = keys * queries;  // [n][m]
    weights.resize(n, m);
    for (std::int64_t k = 0; k < m; ++k) {
      step_weights(&dots(0, k), n, req.scale, lse_all[static_cast<std::size_t>(k)], factor, &weights(0, k),
                   denominator[static_cast<std::size_t>(k)]);
    }
    sums.noalias() = values.transpose() * weights;  // [d][m]
    for (std::int64_t k = 0; k < m; ++k) {
      for (std::int64_t c = 0; c < d; ++c) numerator[static_cast<std::size_t>(k * d + c)] += sums(c, k);
    }
  }
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  std::string device() const override {
    return fmt::format("CPU, {} OpenMP threads, Eigen {}.{}.{}", omp_get_max_threads(), EIGEN_WORLD_VERSION,
                       EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION);
  }
  void block_statistics(const StatsRequest& req, StatsTile& out) const override {
    if (req.num_rows <= 0 || req.block_size <= 0) {
      fail(ErrorKind::kInternal, "block_statistics: {} rows, blocks of {} keys", req.num_rows, req.block_size);
    }
    allocate_tile(req, out);
    if (req.attn) dense_layer_statistics(req, out);
    else qk_layer_statistics(req, out);
  }
  void output_errors(const StatsRequest& req, const StatsTile& tile, const OutputWalks& walks,
                     std::vector<double>& errors) const override {
    check_output_request(req, tile, walks);
    errors.assign(static_cast<std::size_t>(walks.checkpoints), std::numeric_limits<double>::quiet_NaN());
    for (const auto& group : group_walks(walks)) evaluate_walk_group(req, tile, walks, group, errors);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace hysparse
