// Op schemas of the `flora` namespace, the shape rules and the argument
// checks that every backend runs before it writes anything.
#include "flora/ops.h"
#include "common/random.h"
#include "common/quantize.h"
#include "common/rules.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

namespace flora {

std::vector<int64_t> ParamLayout::momentum_shape(at::IntArrayRef param_shape) const {
  switch (momentum) {
    case MomentumKind::kNone:
      return {};
    case MomentumKind::kDense:
      return param_shape.vec();
    case MomentumKind::kCompressed:
      return left ? std::vector<int64_t>{rank, cols} : std::vector<int64_t>{rows, rank};
  }
  return {};
}

std::vector<int64_t> ParamLayout::projection_shape() const {
  TORCH_CHECK(momentum == MomentumKind::kCompressed,
              "flora: only compressed momentum has a projection");
  return left ? std::vector<int64_t>{rank, rows} : std::vector<int64_t>{cols, rank};
}

ParamLayout param_layout(at::IntArrayRef shape, int64_t rank, double beta1,
                         bool factorize_second_moment, double max_aspect_ratio) {
  ParamLayout layout;
  layout.factored = factorize_second_moment && shape.size() == 2;
  if (layout.factored) {
    layout.rows = shape[0];
    layout.cols = shape[1];
  }
  if (!(beta1 > 0.0)) {
    layout.momentum = MomentumKind::kNone;
    return layout;
  }
  // The aspect-ratio limit keeps embeddings and output heads dense (docs/FLORA.md §3).
  const bool compressible = layout.factored && momentum_compressible(layout.rows, layout.cols,
                                                                     rank, max_aspect_ratio);
  if (compressible) {
    layout.momentum = MomentumKind::kCompressed;
    layout.left = layout.rows < layout.cols;
    layout.rank = rank;
  } else {
    layout.momentum = MomentumKind::kDense;
  }
  return layout;
}

const char* momentum_kind_name(MomentumKind kind) {
  switch (kind) {
    case MomentumKind::kNone: return "none";
    case MomentumKind::kDense: return "dense";
    case MomentumKind::kCompressed: return "compressed";
  }
  return "?";
}

Projection projection_from_name(c10::string_view name) {
  if (name == "gaussian") return Projection::kGaussian;
  TORCH_CHECK(name == "orthogonal", "flora: projection must be 'gaussian' or 'orthogonal', "
              "got '", std::string(name), "'");
  return Projection::kOrthogonal;
}

const char* projection_name(Projection projection) {
  return projection == Projection::kOrthogonal ? "orthogonal" : "gaussian";
}

double StepOptions::beta2() const {
  return 1.0 - std::pow(static_cast<double>(step), decay_rate);
}

double StepOptions::base_lr() const {
  if (!relative_step) return lr;
  const double t = static_cast<double>(step);
  const double cap = warmup_init ? 1e-6 * t : 1e-2;
  return std::min(cap, 1.0 / std::sqrt(t));
}

namespace {

bool is_supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_state_tensor(const std::optional<at::Tensor>& state, const char* name,
                        bool expected, at::IntArrayRef expected_shape,
                        const at::Tensor& param, const ParamLayout& layout,
                        const std::optional<at::Tensor>& absmax = std::nullopt) {
  const bool present = state.has_value() && state->defined();
  TORCH_CHECK(present == expected, "flora: ", name, " must be ",
              expected ? "given" : "None", " for a parameter of shape ", param.sizes(),
              " (factored=", layout.factored, ", momentum=",
              momentum_kind_name(layout.momentum), ")");
  if (!present) return;
  const at::Tensor& t = *state;
  if (absmax.has_value()) {
    // 8-bit codes (quantization=True's format) with their absmax.
    TORCH_CHECK(t.scalar_type() == at::kByte, "flora: ", name,
                " given with an absmax must be uint8 codes, got ", t.scalar_type());
    const at::Tensor& a = *absmax;
    const int64_t blocks = quant_blocks(c10::multiply_integers(expected_shape));
    TORCH_CHECK(a.defined() && a.scalar_type() == at::kFloat && a.dim() == 1 &&
                    a.numel() == blocks && a.is_contiguous(),
                "flora: ", name, "_absmax must be a contiguous float32 vector of ", blocks,
                " entries (one per block of ", kQuantBlock, " codes), got ",
                a.defined() ? c10::str(a.scalar_type(), " of shape ", a.sizes()) : "None");
    TORCH_CHECK(a.device() == param.device(), "flora: ", name, "_absmax must be on ",
                param.device(), " like its parameter, got ", a.device());
    TORCH_CHECK(at::get_overlap_status(a, t) == at::MemOverlapStatus::No,
                "flora: ", name, "_absmax must not share memory with its codes");
  } else {
    TORCH_CHECK(t.scalar_type() != at::kByte, "flora: ", name, " is uint8 (8-bit codes) "
                "without its absmax: step_group_ takes 8-bit state as the codes followed by "
                "their float32 absmax");
    TORCH_CHECK(t.scalar_type() == at::kFloat, "flora: ", name,
                " must be float32, got ", t.scalar_type());
  }
  TORCH_CHECK(t.device() == param.device(), "flora: ", name, " must be on ",
              param.device(), " like its parameter, got ", t.device());
  TORCH_CHECK(t.sizes() == expected_shape, "flora: ", name, " must have shape ",
              expected_shape, " for a parameter of shape ", param.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "flora: ", name, " must be contiguous");
  TORCH_CHECK(!t.is_same(param), "flora: ", name, " must not alias the parameter");
}

}  // namespace

ParamLayout check_step_inputs(const at::Tensor& param, const at::Tensor& grad,
                              const std::optional<at::Tensor>& row_second_moment,
                              const std::optional<at::Tensor>& col_second_moment,
                              const std::optional<at::Tensor>& second_moment,
                              const std::optional<at::Tensor>& momentum,
                              const StepOptions& o) {
  return check_step_inputs(
      param, grad, ParamState{row_second_moment, col_second_moment, second_moment, momentum}, o);
}

ParamLayout check_step_inputs(const at::Tensor& param, const at::Tensor& grad,
                              const ParamState& state, const StepOptions& o) {
  TORCH_CHECK(param.defined(), "flora: param must be a defined tensor");
  TORCH_CHECK(param.layout() == at::kStrided, "flora: param must be dense (strided), got ",
              param.layout());
  TORCH_CHECK(is_supported_param_dtype(param.scalar_type()),
              "flora: param must be float32, float16 or bfloat16, got ",
              param.scalar_type());
  // A step writes every element; one memory location behind several elements
  // (an expanded tensor) would get several different values.
  TORCH_CHECK(at::has_internal_overlap(param) != at::MemOverlap::Yes,
              "flora: param must not have elements that share memory (an expanded or "
              "otherwise self-overlapping tensor, strides ", param.strides(),
              "); pass a tensor with its own memory, e.g. p.contiguous()");
  TORCH_CHECK(grad.defined(), "flora: grad must be a defined tensor");
  TORCH_CHECK(grad.layout() == at::kStrided,
              "flora: sparse gradients are not supported (grad layout ", grad.layout(), ")");
  TORCH_CHECK(!grad.is_complex(), "flora: complex gradients are not supported, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "flora: grad must have dtype ",
              param.scalar_type(), " like its parameter, got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == param.sizes(), "flora: grad must have shape ", param.sizes(),
              " like its parameter, got ", grad.sizes());
  TORCH_CHECK(grad.device() == param.device(), "flora: grad must be on ", param.device(),
              " like its parameter, got ", grad.device());

  TORCH_CHECK(o.step >= 1, "flora: step must be >= 1, got ", o.step);
  TORCH_CHECK(o.seed >= 0, "flora: seed must be >= 0, got ", o.seed);
  TORCH_CHECK(o.rank >= 0, "flora: rank must be >= 0, got ", o.rank);
  TORCH_CHECK(o.kappa >= 1, "flora: kappa must be >= 1, got ", o.kappa);
  TORCH_CHECK(std::isfinite(o.lr) && o.lr >= 0.0, "flora: lr must be finite and >= 0, got ",
              o.lr);
  TORCH_CHECK(o.beta1 >= 0.0 && o.beta1 < 1.0, "flora: beta1 must be in [0, 1), got ",
              o.beta1);
  TORCH_CHECK(std::isfinite(o.eps1) && o.eps1 >= kMinEps1,
              "flora: eps1 must be finite and >= 2^-126 (float32's smallest normal, about "
              "1.2e-38), got ", o.eps1);
  TORCH_CHECK(std::isfinite(o.eps2) && o.eps2 >= 0.0,
              "flora: eps2 must be finite and >= 0, got ", o.eps2);
  TORCH_CHECK(std::isfinite(o.clip_threshold) && o.clip_threshold > 0.0,
              "flora: clip_threshold must be finite and > 0, got ", o.clip_threshold);
  TORCH_CHECK(std::isfinite(o.decay_rate) && o.decay_rate <= 0.0,
              "flora: decay_rate must be finite and <= 0, got ", o.decay_rate);
  TORCH_CHECK(std::isfinite(o.weight_decay) && o.weight_decay >= 0.0,
              "flora: weight_decay must be finite and >= 0, got ", o.weight_decay);
  TORCH_CHECK(!o.warmup_init || o.relative_step,
              "flora: warmup_init requires relative_step=True");
  TORCH_CHECK(o.max_aspect_ratio == 0.0 ||
                  (std::isfinite(o.max_aspect_ratio) && o.max_aspect_ratio >= 1.0),
              "flora: max_aspect_ratio must be 0 (no limit) or a finite float >= 1, got ",
              o.max_aspect_ratio);
  TORCH_CHECK(!o.stochastic_rounding || param.scalar_type() != at::kHalf,
              "flora: stochastic_rounding supports bfloat16 (and float32, where it does "
              "nothing) parameters, got a float16 parameter of shape ", param.sizes());

  const ParamLayout layout =
      param_layout(param.sizes(), o.rank, o.beta1, o.factorize_second_moment,
                   o.max_aspect_ratio);
  std::vector<int64_t> no_shape;
  std::vector<int64_t> row_shape{layout.rows}, col_shape{layout.cols};
  check_state_tensor(state.row_second_moment, "row_second_moment", layout.factored, row_shape,
                     param, layout);
  check_state_tensor(state.col_second_moment, "col_second_moment", layout.factored, col_shape,
                     param, layout);
  check_state_tensor(state.second_moment, "second_moment", !layout.factored, param.sizes(),
                     param, layout, state.second_moment_absmax);
  const std::vector<int64_t> m_shape = layout.momentum_shape(param.sizes());
  check_state_tensor(state.momentum, "momentum", layout.momentum != MomentumKind::kNone,
                     m_shape, param, layout, state.momentum_absmax);
  return layout;
}

std::vector<GroupEntry> check_group_inputs(at::TensorList params, at::TensorList grads,
                                           at::TensorList states, at::IntArrayRef steps,
                                           at::IntArrayRef seeds,
                                           const StepOptions& group_options) {
  const size_t count = params.size();
  const auto check_length = [&](size_t length, const char* name) {
    TORCH_CHECK(length == count, "flora: ", name, " must have one entry per parameter (",
                count, "), got ", length);
  };
  check_length(grads.size(), "grads");
  check_length(steps.size(), "steps");
  check_length(seeds.size(), "seeds");
  std::vector<GroupEntry> entries(count);
  size_t next_state = 0;
  const auto take_state = [&](size_t k, const char* name) -> std::optional<at::Tensor> {
    TORCH_CHECK(next_state < states.size(), "flora: states holds ", states.size(),
                " tensors; parameter ", k, " needs its ", name, " after them");
    return states[next_state++];
  };
  for (size_t k = 0; k < count; ++k) {
    GroupEntry& entry = entries[k];
    entry.options = group_options.for_parameter(steps[k], seeds[k]);
    const ParamLayout layout = param_layout(params[k].sizes(), entry.options.rank,
                                            entry.options.beta1,
                                            entry.options.factorize_second_moment,
                                            entry.options.max_aspect_ratio);
    // 8-bit codes (uint8) are followed by their absmax.
    const auto take_absmax = [&](const std::optional<at::Tensor>& t, const char* name,
                                 std::optional<at::Tensor>& absmax) {
      if (t.has_value() && t->defined() && t->scalar_type() == at::kByte)
        absmax = take_state(k, name);
    };
    if (layout.factored) {
      entry.state.row_second_moment = take_state(k, "row_second_moment");
      entry.state.col_second_moment = take_state(k, "col_second_moment");
    } else {
      entry.state.second_moment = take_state(k, "second_moment");
      take_absmax(entry.state.second_moment, "second_moment_absmax",
                  entry.state.second_moment_absmax);
    }
    if (layout.momentum != MomentumKind::kNone) {
      entry.state.momentum = take_state(k, "momentum");
      take_absmax(entry.state.momentum, "momentum_absmax", entry.state.momentum_absmax);
    }
    try {
      entry.layout = check_step_inputs(params[k], grads[k], entry.state, entry.options);
    } catch (c10::Error& err) {
      err.add_context(c10::str("in parameter ", k, " of the group (shape ", params[k].sizes(),
                               ")"));
      throw;
    }
    TORCH_CHECK(params[k].device() == params[0].device(),
                "flora: all parameters of one step_group_ call must be on one device; "
                "parameter ", k, " is on ", params[k].device(), ", parameter 0 on ",
                params[0].device());
  }
  TORCH_CHECK(next_state == states.size(), "flora: states holds ", states.size(),
              " tensors, the parameters' layouts need ", next_state);
  return entries;
}

void attach_param_norms(std::vector<GroupEntry>& entries, at::TensorList params,
                        const std::optional<at::Tensor>& param_norms,
                        at::IntArrayRef norms_known) {
  const int64_t count = static_cast<int64_t>(params.size());
  if (!param_norms.has_value() || !param_norms->defined()) {
    TORCH_CHECK(norms_known.empty(), "flora: norms_known needs param_norms");
    return;
  }
  const at::Tensor& norms = *param_norms;
  TORCH_CHECK(norms.scalar_type() == at::kDouble && norms.dim() == 1 &&
                  norms.numel() == count && norms.is_contiguous(),
              "flora: param_norms must be a contiguous float64 vector with one entry per "
              "parameter (", count, "), got ", norms.scalar_type(), " of shape ", norms.sizes());
  TORCH_CHECK(count == 0 || norms.device() == params[0].device(),
              "flora: param_norms must be on the parameters' device ", params[0].device(),
              ", got ", norms.device());
  TORCH_CHECK(norms_known.empty() || static_cast<int64_t>(norms_known.size()) == count,
              "flora: norms_known must be empty or have one entry per parameter (", count,
              "), got ", norms_known.size());
  for (const int64_t known : norms_known)
    TORCH_CHECK(known == 0 || known == 1, "flora: norms_known entries must be 0 or 1, got ",
                known);
  double* data = norms.data_ptr<double>();
  for (int64_t k = 0; k < count; ++k) {
    entries[k].param_sq = data + k;
    entries[k].param_sq_known = !norms_known.empty() && norms_known[k] == 1;
  }
}

void attach_nonfinite_skips(std::vector<GroupEntry>& entries, at::TensorList params,
                            const std::optional<at::Tensor>& nonfinite_skips) {
  const bool given = nonfinite_skips.has_value() && nonfinite_skips->defined();
  const bool skip = !entries.empty() && entries[0].options.skip_nonfinite;
  if (!skip) return;  // nothing is skipped, so nothing is counted
  TORCH_CHECK(given, "flora: skip_nonfinite=True needs nonfinite_skips, the counter of "
              "skipped parameters (an int64 tensor of one element on the parameters' device)");
  const at::Tensor& counter = *nonfinite_skips;
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.numel() == 1,
              "flora: nonfinite_skips must be an int64 tensor of one element, got ",
              counter.scalar_type(), " of shape ", counter.sizes());
  TORCH_CHECK(params.empty() || counter.device() == params[0].device(),
              "flora: nonfinite_skips must be on the parameters' device ", params[0].device(),
              ", got ", counter.device());
  for (const at::Tensor& p : params)
    TORCH_CHECK(!counter.is_same(p), "flora: nonfinite_skips must not be a parameter");
  int64_t* data = counter.data_ptr<int64_t>();
  for (GroupEntry& entry : entries) entry.nonfinite_skips = data;
}

namespace detail {

StepOptions options_from_schema(int64_t step, int64_t seed, double lr, double beta1,
                                double eps1, double eps2, double clip_threshold,
                                double decay_rate, double weight_decay, int64_t rank,
                                int64_t kappa, bool scale_parameter, bool relative_step,
                                bool warmup_init, bool factorize_second_moment, bool tf32,
                                bool stochastic_rounding, bool skip_nonfinite,
                                c10::string_view projection, double max_aspect_ratio) {
  StepOptions o;
  o.step = step;
  o.seed = seed;
  o.lr = lr;
  o.beta1 = beta1;
  o.eps1 = eps1;
  o.eps2 = eps2;
  o.clip_threshold = clip_threshold;
  o.decay_rate = decay_rate;
  o.weight_decay = weight_decay;
  o.rank = rank;
  o.kappa = kappa;
  o.scale_parameter = scale_parameter;
  o.relative_step = relative_step;
  o.warmup_init = warmup_init;
  o.factorize_second_moment = factorize_second_moment;
  o.tf32 = tf32;
  o.stochastic_rounding = stochastic_rounding;
  o.skip_nonfinite = skip_nonfinite;
  o.projection = projection_from_name(projection);
  o.max_aspect_ratio = max_aspect_ratio;
  return o;
}

void check_projection_output(const at::Tensor& out, int64_t seed, double scale) {
  TORCH_CHECK(out.defined(), "flora: out must be a defined tensor");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16 ||
                  out.scalar_type() == at::kHalf,
              "flora: out must be float32, bfloat16 or float16, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "flora: out must be contiguous");
  TORCH_CHECK(seed >= 0, "flora: seed must be >= 0, got ", seed);
  TORCH_CHECK(std::isfinite(scale), "flora: scale must be finite, got ", scale);
}

void check_capturable_inputs(at::TensorList params, const std::vector<GroupEntry>& entries,
                             at::TensorList steps, at::TensorList seeds,
                             const at::Tensor& workspace,
                             const std::optional<at::Tensor>& lr_tensor) {
  const size_t count = params.size();
  size_t compressed = 0;
  for (const GroupEntry& entry : entries)
    compressed += entry.layout.momentum == MomentumKind::kCompressed;
  TORCH_CHECK(steps.size() == count, "flora: steps must have one tensor per parameter (",
              count, "), got ", steps.size());
  TORCH_CHECK(seeds.size() == compressed, "flora: seeds must have one tensor per parameter "
              "with compressed momentum (", compressed, "), got ", seeds.size());
  if (count == 0) return;
  const at::Device device = params[0].device();
  const auto check_counter = [&](const at::Tensor& t, const char* name, size_t k) {
    TORCH_CHECK(t.defined() && t.scalar_type() == at::kLong && t.dim() == 0,
                "flora: ", name, "[", k, "] must be a 0-d int64 tensor, got ",
                t.defined() ? c10::str(t.scalar_type(), " of shape ", t.sizes())
                            : std::string("an undefined tensor"));
    TORCH_CHECK(t.device() == device, "flora: ", name, "[", k, "] must be on the parameters' "
                "device ", device, ", got ", t.device());
  };
  for (size_t k = 0; k < count; ++k) check_counter(steps[k], "steps", k);
  for (size_t j = 0; j < seeds.size(); ++j) check_counter(seeds[j], "seeds", j);
  // One tensor written twice would advance twice (and race on CUDA).
  std::vector<const void*> counters;
  for (const at::Tensor& t : steps) counters.push_back(t.data_ptr());
  for (const at::Tensor& t : seeds) counters.push_back(t.data_ptr());
  std::sort(counters.begin(), counters.end());
  TORCH_CHECK(std::adjacent_find(counters.begin(), counters.end()) == counters.end(),
              "flora: steps and seeds must be distinct tensors (one a parameter)");
  TORCH_CHECK(workspace.defined() && workspace.scalar_type() == at::kFloat &&
                  workspace.dim() == 1 && workspace.device() == device,
              "flora: workspace must be a 1-D float32 tensor on ", device);
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    const at::Tensor& lr = *lr_tensor;
    TORCH_CHECK(lr.dim() == 0 && (lr.scalar_type() == at::kFloat ||
                                  lr.scalar_type() == at::kDouble),
                "flora: lr_tensor must be a 0-d float32 or float64 tensor, got ",
                lr.scalar_type(), " of shape ", lr.sizes());
    TORCH_CHECK(lr.device() == device, "flora: lr_tensor must be on the parameters' device ",
                device, ", got ", lr.device());
    TORCH_CHECK(!entries[0].options.relative_step,
                "flora: lr_tensor and relative_step=True are exclusive");
  }
}

void capturable_on_host(GroupKernel kernel, at::TensorList params, at::TensorList grads,
                        std::vector<GroupEntry>& entries, at::TensorList steps,
                        at::TensorList seeds, const std::optional<at::Tensor>& lr_tensor) {
  double lr = entries[0].options.lr;
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    lr = lr_tensor->item<double>();
    TORCH_CHECK(std::isfinite(lr) && lr >= 0.0,
                "flora: lr_tensor must hold a finite value >= 0, got ", lr);
  }
  std::vector<int64_t> seed_index(entries.size(), -1);
  int64_t compressed = 0;
  for (size_t k = 0; k < entries.size(); ++k) {
    StepOptions& o = entries[k].options;
    const int64_t before = steps[k].item<int64_t>();
    TORCH_CHECK(before >= 0 && before < std::numeric_limits<int64_t>::max(),
                "flora: steps[", k, "] must hold a count in [0, 2**63 - 1), got ", before);
    o.step = before + 1;
    o.lr = lr;
    if (entries[k].layout.momentum == MomentumKind::kCompressed) {
      seed_index[k] = compressed;
      o.seed = seeds[compressed++].item<int64_t>();
      TORCH_CHECK(o.seed >= 0, "flora: seeds[", seed_index[k], "] must hold a seed >= 0, got ",
                  o.seed);
    }
  }
  kernel(params, grads, entries);
  for (size_t k = 0; k < entries.size(); ++k) {
    const StepOptions& o = entries[k].options;
    steps[k].fill_(o.step);
    if (seed_index[k] >= 0 && o.resample()) seeds[seed_index[k]].fill_(next_seed(o.seed));
  }
}

}  // namespace detail

void step_(at::Tensor& param, const at::Tensor& grad,
           const std::optional<at::Tensor>& row_second_moment,
           const std::optional<at::Tensor>& col_second_moment,
           const std::optional<at::Tensor>& second_moment,
           const std::optional<at::Tensor>& momentum, const StepOptions& o,
           const std::optional<at::Tensor>& nonfinite_skips) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::step_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, int64_t, int64_t,
                                   double, double, double, double, double, double, double,
                                   int64_t, int64_t, bool, bool, bool, bool, bool, bool, bool,
                                   c10::string_view, const std::optional<at::Tensor>&,
                                   double)>();
  op.call(param, grad, row_second_moment, col_second_moment, second_moment, momentum,
          o.step, o.seed, o.lr, o.beta1, o.eps1, o.eps2, o.clip_threshold, o.decay_rate,
          o.weight_decay, o.rank, o.kappa, o.scale_parameter, o.relative_step,
          o.warmup_init, o.factorize_second_moment, o.tf32, o.stochastic_rounding,
          o.skip_nonfinite, projection_name(o.projection), nonfinite_skips,
          o.max_aspect_ratio);
}

at::Tensor projection(int64_t seed, int64_t rows, int64_t cols, double scale,
                      at::Device device) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "flora: projection shape must be non-negative, got (",
              rows, ", ", cols, ")");
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat).device(device));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::fill_projection_", "")
                       .typed<void(const at::Tensor&, int64_t, double)>();
  op.call(out, seed, scale);
  return out;
}

bool cuda_compiled() {
#ifdef FLORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {

// Host-side rules as ops without tensor arguments, so that Python asks the
// library (torch.ops.flora.*) instead of restating them, and the library needs
// no Python API: one .so serves Python and C++ programs alike.
int64_t next_seed_op(int64_t seed) {
  TORCH_CHECK(seed >= 0, "flora: seed must be >= 0, got ", seed);
  return next_seed(seed);
}

std::tuple<bool, std::string, std::vector<int64_t>, bool, int64_t> param_layout_op(
    at::IntArrayRef shape, int64_t rank, double beta1, bool factorize_second_moment,
    double max_aspect_ratio) {
  for (const int64_t size : shape) {
    TORCH_CHECK(size >= 0, "flora: shape must have sizes >= 0, got ", shape);
  }
  TORCH_CHECK(rank >= 0, "flora: rank must be >= 0, got ", rank);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "flora: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(max_aspect_ratio == 0.0 ||
                  (std::isfinite(max_aspect_ratio) && max_aspect_ratio >= 1.0),
              "flora: max_aspect_ratio must be 0 (no limit) or a finite float >= 1, got ",
              max_aspect_ratio);
  const ParamLayout layout =
      param_layout(shape, rank, beta1, factorize_second_moment, max_aspect_ratio);
  return {layout.factored, momentum_kind_name(layout.momentum), layout.momentum_shape(shape),
          layout.left, layout.rank};
}

bool cuda_compiled_op() { return cuda_compiled(); }

// Sparse gradients dispatch to the Sparse keys, where no kernel could run: the
// checks name the problem instead of the dispatcher's "could not run" message.
void reject_sparse(at::TensorList, at::TensorList, const std::vector<GroupEntry>&) {
  TORCH_CHECK(false, "flora: sparse tensors are not supported");
}
void reject_sparse_capturable(at::TensorList, at::TensorList, std::vector<GroupEntry>&,
                              at::TensorList, at::TensorList, const at::Tensor&,
                              const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "flora: sparse tensors are not supported");
}

}  // namespace
}  // namespace flora

TORCH_LIBRARY_IMPL(flora, SparseCPU, m) {
  m.impl("step_", &flora::detail::step_op<&flora::reject_sparse>);
  m.impl("step_group_", &flora::detail::step_group_op<&flora::reject_sparse>);
  m.impl("step_group_capturable_",
         &flora::detail::step_group_capturable_op<&flora::reject_sparse_capturable>);
}
TORCH_LIBRARY_IMPL(flora, SparseCUDA, m) {
  m.impl("step_", &flora::detail::step_op<&flora::reject_sparse>);
  m.impl("step_group_", &flora::detail::step_group_op<&flora::reject_sparse>);
  m.impl("step_group_capturable_",
         &flora::detail::step_group_capturable_op<&flora::reject_sparse_capturable>);
}

TORCH_LIBRARY(flora, m) {
  m.def(
      "step_(Tensor(a!) param, Tensor grad, Tensor(b!)? row_second_moment, "
      "Tensor(c!)? col_second_moment, Tensor(d!)? second_moment, Tensor(e!)? momentum, *, "
      "int step, int seed, float lr, float beta1, float eps1, float eps2, "
      "float clip_threshold, float decay_rate, float weight_decay, int rank, int kappa, "
      "bool scale_parameter, bool relative_step, bool warmup_init, "
      "bool factorize_second_moment, bool tf32=True, bool stochastic_rounding=False, "
      "bool skip_nonfinite=False, str projection=\"gaussian\", "
      "Tensor(f!)? nonfinite_skips=None, float max_aspect_ratio=4.0) -> ()");
  // Every parameter of a param group (on one device) in one call: the per-call
  // overhead of Python and the dispatcher is paid once, not once a parameter.
  m.def(
      "step_group_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, int[] steps, "
      "int[] seeds, *, float lr, float beta1, "
      "float eps1, float eps2, float clip_threshold, float decay_rate, float weight_decay, "
      "int rank, int kappa, bool scale_parameter, bool relative_step, bool warmup_init, "
      "bool factorize_second_moment, bool tf32=True, bool stochastic_rounding=False, "
      "bool skip_nonfinite=False, str projection=\"gaussian\", Tensor(c!)? param_norms=None, "
      "int[] norms_known=[], "
      "Tensor(d!)? nonfinite_skips=None, float max_aspect_ratio=4.0) -> ()");
  // capturable=True: the step counts (before the step) and the seeds of the compressed
  // parameters are 0-d int64 tensors that the op advances; `workspace` keeps what the
  // backend reuses between calls (CUDA: the plan and its tables, docs/cuda.md).
  m.def(
      "step_group_capturable_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, "
      "Tensor(c!)[] steps, Tensor(d!)[] seeds, Tensor(e!) workspace, *, float lr, "
      "float beta1, float eps1, float eps2, float clip_threshold, float decay_rate, "
      "float weight_decay, int rank, int kappa, bool scale_parameter, bool relative_step, "
      "bool warmup_init, bool factorize_second_moment, bool tf32=True, "
      "bool stochastic_rounding=False, Tensor? lr_tensor=None, "
      "float max_aspect_ratio=4.0) -> ()");
  m.def("fill_projection_(Tensor(a!) out, int seed, float scale) -> ()");
  // No tensor arguments: these run through their catch-all kernels on any device.
  m.def("next_seed(int seed) -> int", &flora::next_seed_op);
  m.def(
      "param_layout(int[] shape, int rank, float beta1, bool factorize_second_moment, "
      "float max_aspect_ratio=4.0) -> "
      "(bool factored, str momentum, int[] momentum_shape, bool left, int rank)",
      &flora::param_layout_op);
  m.def("cuda_compiled() -> bool", &flora::cuda_compiled_op);
}
