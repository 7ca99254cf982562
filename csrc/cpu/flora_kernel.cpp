// CPU kernels of the flora ops: the readable path, kept for testing and for
// CPU users. Math in float32 state with double accumulators; every reduction
// sums fixed-size chunks and then the chunks in order, so results do not
// depend on the number of threads.
#include "flora/ops.h"
#include "../common/quantize.h"
#include "../common/random.h"
#include "../common/rules.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace flora {
namespace {

constexpr int64_t kChunk = 4096;  // elements per partial sum of 1-D reductions

// P's entries in out's dtype: float32, or bfloat16 / float16 rounded to nearest (the
// values of the float32 P's .to(dtype)).
template <typename T>
void fill_projection_as(T* data, int64_t numel, int64_t seed, double scale) {
  const int64_t groups = (numel + 3) / 4;
  at::parallel_for(0, groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      at::Philox4_32 words(static_cast<uint64_t>(seed), static_cast<uint64_t>(q), 0);
      uint32_t w[4];
      for (auto& x : w) x = words();
      float z[4];
      box_muller(w[0], w[1], scale, &z[0], &z[1]);
      box_muller(w[2], w[3], scale, &z[2], &z[3]);
      for (int64_t k = 0; k < 4 && 4 * q + k < numel; ++k) data[4 * q + k] = static_cast<T>(z[k]);
    }
  });
}

void fill_projection_cpu(const at::Tensor& out, int64_t seed, double scale) {
  detail::check_projection_output(out, seed, scale);
  const int64_t numel = out.numel();
  switch (out.scalar_type()) {
    case at::kBFloat16:
      fill_projection_as(out.data_ptr<at::BFloat16>(), numel, seed, scale);
      break;
    case at::kHalf:
      fill_projection_as(out.data_ptr<at::Half>(), numel, seed, scale);
      break;
    default:
      fill_projection_as(out.data_ptr<float>(), numel, seed, scale);
  }
}

// Sum of f(e) over e in [0, numel): chunk partials in parallel, then in order.
template <typename F>
double chunked_sum(int64_t numel, const F& f) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double s = 0.0;
      const int64_t stop = std::min(numel, (c + 1) * kChunk);
      for (int64_t e = c * kChunk; e < stop; ++e) s += f(e);
      partial[c] = s;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

// Fills unscaled (row and column normalised) update U of a factored parameter
// and advances its row/col second-moment EMAs (docs/FLORA.md, step 3).
void factored_update(const float* g, int64_t n, int64_t m, double beta2, double eps1,
                     float* row, float* col, float* u) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double s = 0.0;
      for (int64_t j = 0; j < m; ++j) {
        const double x = g[i * m + j];
        s += x * x + eps1;
      }
      row[i] = static_cast<float>(beta2 * row[i] + (1.0 - beta2) * (s / m));
    }
  });
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(end - begin, 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = begin; j < end; ++j) {
        const double x = g[i * m + j];
        acc[j - begin] += x * x + eps1;
      }
    for (int64_t j = begin; j < end; ++j)
      col[j] = static_cast<float>(beta2 * col[j] + (1.0 - beta2) * (acc[j - begin] / n));
  });
  double row_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) row_sum += row[i];
  const double row_mean = row_sum / n;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double a = row_scale<double>(row[i], row_mean);
      for (int64_t j = 0; j < m; ++j)
        u[i * m + j] = static_cast<float>(g[i * m + j] * a * col_scale<double>(col[j]));
    }
  });
}

// Full (unfactored) second moment: S = beta2 S + (1 - beta2)(G^2 + eps1), U = G / sqrt(S).
void full_update(const float* g, int64_t numel, double beta2, double eps1, float* s,
                 float* u) {
  at::parallel_for(0, numel, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const double x = g[e];
      s[e] = static_cast<float>(beta2 * s[e] + (1.0 - beta2) * (x * x + eps1));
      u[e] = static_cast<float>(x / std::sqrt(double(s[e])));
    }
  });
}

// down_next(up_now(M)): the compressed momentum moved to the basis of the next seed, through
// the r x r product of the two bases (docs/FLORA.md, step 4b).
at::Tensor momentum_in_next_basis(const at::Tensor& momentum, const at::Tensor& p_now,
                                  const at::Tensor& p_next, const ParamLayout& layout) {
  return layout.left ? p_next.mm(p_now.t()).mm(momentum)
                     : momentum.mm(p_now.t().mm(p_next));
}

at::Tensor projection_of(int64_t seed, const ParamLayout& layout) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(layout.rank));
  const auto shape = layout.projection_shape();
  return projection(seed, shape[0], shape[1], scale, at::Device(at::kCPU));
}

// The basis of projection="orthogonal" (docs/FLORA.md §5.1): P_o = s R^-T P (left, r x n)
// or P R^-1 s (right, m x r), R the upper Cholesky factor of the r x r Gram (P P^T = R^T R
// on the left, P^T P on the right), s^2 = long / r for P's long side: P's r long vectors
// orthonormalised in order and scaled by s. Down and up both use it, and the momentum holds
// coordinates in it. The Gram, its factor and the solve run in float64 (a Gaussian P is
// full rank, but its Gram's condition number grows as r nears long); P_o is rounded to
// float32.
at::Tensor orthogonal_basis(const at::Tensor& p, const ParamLayout& layout) {
  const at::Tensor a = (layout.left ? p : p.t()).to(at::kDouble);  // r x long
  const int64_t rank = a.size(0), length = a.size(1);
  const auto [lower, info] = at::linalg_cholesky_ex(a.mm(a.t()));  // R^T
  TORCH_CHECK(info.item<int64_t>() == 0, "flora: projection='orthogonal': the ", rank, " x ",
              rank, " Gram matrix of the projection is not positive definite (a rank-deficient "
              "projection of shape ", p.sizes(), ")");
  const at::Tensor basis =
      at::linalg_solve_triangular(lower, a, /*upper=*/false)
          .mul_(std::sqrt(static_cast<double>(length) / static_cast<double>(rank)))
          .to(at::kFloat);
  return layout.left ? basis : basis.t().contiguous();
}

at::Tensor basis_of(int64_t seed, const StepOptions& o, const ParamLayout& layout) {
  const at::Tensor p = projection_of(seed, layout);
  return o.projection == Projection::kOrthogonal ? orthogonal_basis(p, layout) : p;
}

// The bases of one compressed step: `now` (of the current seed, which up() uses) and `down`
// (what compresses into the basis after this step: the next seed's on a resample).
struct StepProjections {
  at::Tensor now, down;
};

StepProjections step_projections(const StepOptions& o, const ParamLayout& layout) {
  StepProjections out;
  out.now = basis_of(o.seed, o, layout);
  out.down = o.resample() ? basis_of(next_seed(o.seed), o, layout) : out.now;
  return out;
}

// Compressed momentum (docs/FLORA.md, step 4): returns D, updates momentum in place.
at::Tensor compressed_momentum_update(const at::Tensor& u, at::Tensor& momentum,
                                      const ParamLayout& layout, const StepOptions& o,
                                      const StepProjections& proj) {
  const at::Tensor up = layout.left ? proj.now.t().mm(momentum) : momentum.mm(proj.now.t());
  at::Tensor d = u * (1.0 - o.beta1) + up * o.beta1;

  const at::Tensor base =
      o.resample() ? momentum_in_next_basis(momentum, proj.now, proj.down, layout) : momentum;
  const at::Tensor down_u = layout.left ? proj.down.mm(u) : u.mm(proj.down);
  momentum.copy_(base * o.beta1 + down_u * (1.0 - o.beta1));
  return d;
}

// Writes the float32 result back into a half-precision parameter: round to
// nearest, or stochastically (bfloat16) from the Philox stream of rounding_key.
void write_back_rounded(const at::Tensor& param, const at::Tensor& result, uint64_t key) {
  const float* x = result.data_ptr<float>();
  at::BFloat16* out = param.data_ptr<at::BFloat16>();
  const int64_t numel = param.numel();
  at::parallel_for(0, (numel + 3) / 4, 256, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      at::Philox4_32 words(key, static_cast<uint64_t>(q), 0);
      for (int64_t k = 0; k < 4; ++k) {
        const uint32_t w = words();
        const int64_t e = 4 * q + k;
        if (e < numel) out[e].x = bfloat16_bits_stochastic(x[e], w);
      }
    }
  });
}

// Whether every one of the n values is finite (the sum of x - x is NaN otherwise).
bool all_finite(const float* x, int64_t n) {
  return !std::isnan(chunked_sum(n, [&](int64_t e) { return double(x[e]) - double(x[e]); }));
}

// skip_nonfinite's step of a parameter whose gradient is not finite: value and state stay,
// but compressed momentum follows the seed to the next basis on a resampling step (the
// caller advances the seed), with nothing of this step's gradient added.
void skip_step(const GroupEntry& entry) {
  const StepOptions& o = entry.options;
  if (entry.layout.momentum == MomentumKind::kCompressed && o.resample()) {
    at::Tensor momentum = *entry.state.momentum;  // a handle: copy_ writes the state
    const StepProjections proj = step_projections(o, entry.layout);
    momentum.copy_(momentum_in_next_basis(momentum, proj.now, proj.down, entry.layout));
  }
  ++*entry.nonfinite_skips;
}

// One parameter whose inputs check_step_inputs has accepted; `index` is its place
// in the call (it keys the stochastic rounding).
void run_step_cpu(const at::Tensor& param, const at::Tensor& grad, const GroupEntry& entry,
                  int64_t index) {
  const StepOptions& o = entry.options;
  const ParamLayout& layout = entry.layout;
  const ParamState& state = entry.state;
  const int64_t numel = param.numel();
  if (numel == 0) return;

  const at::Tensor g = grad.to(at::kFloat).contiguous();
  if (o.skip_nonfinite && !all_finite(g.data_ptr<float>(), numel)) {
    skip_step(entry);
    return;
  }
  const bool in_place = param.scalar_type() == at::kFloat && param.is_contiguous();
  at::Tensor p = in_place ? param : param.to(at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  float* pp = p.data_ptr<float>();

  // The projections first, so that orthogonal_basis's check (a Gram that is not positive
  // definite: in practice never, for a Gaussian P with r <= long) throws before this
  // parameter or its state is written.
  StepProjections proj;
  if (layout.momentum == MomentumKind::kCompressed) proj = step_projections(o, layout);

  // Step 1: learning rate of this step, scaled by the parameter's RMS.
  const double param_sq = chunked_sum(numel, [&](int64_t e) { return double(pp[e]) * pp[e]; });
  const double lr_t = scaled_lr(o.base_lr(), o.scale_parameter, o.eps2, param_sq, numel);
  const double beta2 = o.beta2();

  // Step 3: second moment and the normalised update U.
  at::Tensor u = at::empty({numel}, g.options());
  if (layout.factored) {
    factored_update(gp, layout.rows, layout.cols, beta2, o.eps1,
                    state.row_second_moment->data_ptr<float>(),
                    state.col_second_moment->data_ptr<float>(), u.data_ptr<float>());
  } else {
    full_update(gp, numel, beta2, o.eps1, state.second_moment->data_ptr<float>(),
                u.data_ptr<float>());
  }

  // Step 4: momentum.
  at::Tensor d = u;
  if (layout.momentum == MomentumKind::kDense) {
    at::Tensor m = state.momentum->view({numel});
    m.mul_(o.beta1).add_(u, 1.0 - o.beta1);  // D = (1 - beta1) U + beta1 M; M = D
    d = m;
  } else if (layout.momentum == MomentumKind::kCompressed) {
    at::Tensor m = *state.momentum;
    d = compressed_momentum_update(u.view({layout.rows, layout.cols}), m, layout, o, proj)
            .contiguous()
            .view({numel});
  }

  // Step 5: clip by RMS; step 6: decoupled weight decay, then the update.
  const float* dp = d.data_ptr<float>();
  const double d_sq = chunked_sum(numel, [&](int64_t e) { return double(dp[e]) * dp[e]; });
  const double clip = clip_factor(d_sq, numel, o.clip_threshold);
  const float decay = static_cast<float>(o.weight_decay * lr_t);
  const float step_size = static_cast<float>(lr_t);
  const float inv_clip = static_cast<float>(1.0 / clip);
  at::parallel_for(0, numel, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      float x = pp[e];
      if (decay != 0.0f) x -= decay * x;
      pp[e] = x - step_size * (dp[e] * inv_clip);
    }
  });
  if (in_place) return;
  if (!o.stochastic_rounding || param.scalar_type() != at::kBFloat16) {
    param.copy_(p.view(param.sizes()));
    return;
  }
  at::Tensor rounded = param.is_contiguous() ? param : at::empty(param.sizes(), param.options());
  write_back_rounded(rounded, p, rounding_key(o.seed, o.step, index));
  if (!rounded.is_same(param)) param.copy_(rounded);
}

// A parameter with 8-bit state: its codes read into float32, the float32 step on them, and
// the values written back (requantize_blockwise_: blocks the step left as they read back,
// e.g. all of a skipped step, keep their codes), as the CUDA passes do in their loads and
// stores. The read-back is allocated before anything is written.
void run_quantized_step_cpu(const at::Tensor& param, const at::Tensor& grad,
                            const GroupEntry& entry, int64_t index) {
  GroupEntry stepped = entry;
  struct Field {
    std::optional<at::Tensor> ParamState::*values;
    std::optional<at::Tensor> ParamState::*absmax;
    bool is_signed;
  };
  static constexpr Field kFields[] = {
      {&ParamState::second_moment, &ParamState::second_moment_absmax, false},
      {&ParamState::momentum, &ParamState::momentum_absmax, true}};
  for (const Field& f : kFields) {
    if (!(entry.state.*f.absmax).has_value()) continue;
    const at::Tensor& codes = *(entry.state.*f.values);
    at::Tensor values = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
    dequantize_blockwise_cpu(codes, *(entry.state.*f.absmax), values, f.is_signed);
    stepped.state.*f.values = values;
    stepped.state.*f.absmax = std::nullopt;
  }
  run_step_cpu(param, grad, stepped, index);
  for (const Field& f : kFields) {
    if (!(entry.state.*f.absmax).has_value()) continue;
    requantize_blockwise_cpu(*(stepped.state.*f.values), *(entry.state.*f.values),
                             *(entry.state.*f.absmax), f.is_signed);
  }
}

void run_group_cpu(at::TensorList params, at::TensorList grads,
                   const std::vector<GroupEntry>& entries) {
  for (size_t k = 0; k < params.size(); ++k) {
    const GroupEntry& entry = entries[k];
    if (entry.state.quantized_second_moment() || entry.state.quantized_momentum())
      run_quantized_step_cpu(params[k], grads[k], entry, static_cast<int64_t>(k));
    else
      run_step_cpu(params[k], grads[k], entry, static_cast<int64_t>(k));
  }
}

}  // namespace
}  // namespace flora

namespace flora {
namespace {
void run_group_capturable_cpu(at::TensorList params, at::TensorList grads,
                              std::vector<GroupEntry>& entries, at::TensorList steps,
                              at::TensorList seeds, const at::Tensor& /*workspace*/,
                              const std::optional<at::Tensor>& lr_tensor) {
  detail::capturable_on_host(&run_group_cpu, params, grads, entries, steps, seeds, lr_tensor);
}
}  // namespace
}  // namespace flora

TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("step_", &flora::detail::step_op<&flora::run_group_cpu>);
  m.impl("step_group_", &flora::detail::step_group_op<&flora::run_group_cpu>);
  m.impl("step_group_capturable_",
         &flora::detail::step_group_capturable_op<&flora::run_group_capturable_cpu>);
  m.impl("fill_projection_", &flora::fill_projection_cpu);
}
