// flora::Flora, the LibTorch optimizer: bookkeeping around the flora::step_group_ op, with the
// conventions of flora_ext/optimizer.py (seeds, resampling, checks before any write).
#include "flora/flora.h"

#include "common/quantize.h"
#include "common/random.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_set>
#include <utility>
#include <vector>

namespace flora {
namespace {

// Largest base seed: seed + i and the seeds that follow stay in int63 (as in Python).
constexpr int64_t kMaxBaseSeed = int64_t{1} << 62;

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

c10::IValue read_value(torch::serialize::InputArchive& archive, const char* key,
                       const char* what) {
  c10::IValue value;
  TORCH_CHECK(archive.try_read(key, value), "flora: saved ", what, " have no '", key, "'");
  return value;
}

bool has_key(torch::serialize::InputArchive& archive, const char* key) {
  c10::IValue value;
  return archive.try_read(key, value);
}

// An option saved by FloraOptions::serialize, into `out`.
void read_option(torch::serialize::InputArchive& archive, const char* key, double& out) {
  out = read_value(archive, key, "options").toDouble();
}
void read_option(torch::serialize::InputArchive& archive, const char* key, int64_t& out) {
  out = read_value(archive, key, "options").toInt();
}
void read_option(torch::serialize::InputArchive& archive, const char* key, bool& out) {
  c10::IValue value;
  // Archives saved before skip_nonfinite existed lack it: off, as it was then.
  if (std::string_view(key) == "skip_nonfinite" && !archive.try_read(key, value)) {
    out = false;
    return;
  }
  out = read_value(archive, key, "options").toBool();
}
void read_option(torch::serialize::InputArchive& archive, const char* key, std::string& out) {
  c10::IValue value;
  // Archives saved before projection existed lack it: the Gaussian, as it was then.
  if (!archive.try_read(key, value)) {
    out = "gaussian";
    return;
  }
  TORCH_CHECK(value.isString(), "flora: saved ", key, " must be a str, got ", value.tagKind());
  out = value.toStringRef();
}
void read_option(torch::serialize::InputArchive& archive, const char* key,
                 std::optional<double>& out) {
  const c10::IValue value = read_value(archive, key, "options");
  TORCH_CHECK(value.isNone() || value.isDouble(), "flora: saved ", key,
              " must be None or a float, got ", value.tagKind());
  out = value.isNone() ? std::nullopt : std::optional<double>(value.toDouble());
}

// ---------------------------------------------------------------- 8-bit state (quantization)
// The format is csrc/common/quantize.h's; the op steps the codes itself, as it does for
// flora_ext/_quantized.py, so both give bitwise the same steps.

// The code of 0.0 in the map: what a fresh state holds.
uint8_t zero_code(bool is_signed) {
  const QuantMap& map = dynamic_map(is_signed);
  for (int q = 0; q < 256; ++q) {
    if (map.value[q] == 0.0f) return static_cast<uint8_t>(q);
  }
  TORCH_INTERNAL_ASSERT(false, "flora: the code map has no 0");
}

// The ops of the 8-bit format (CPU or CUDA, by the tensors): all take three tensors and
// the map's sign.
using FormatOp = c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, bool)>;
FormatOp format_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
}

// torch.ops.flora.quantize_blockwise_.
void quantize_blockwise(const at::Tensor& values, const at::Tensor& codes,
                        const at::Tensor& absmax, bool is_signed) {
  static const FormatOp op = format_op("flora::quantize_blockwise_");
  op.call(values, codes, absmax, is_signed);
}

// The 8-bit tensors of a state: second_moment takes the unsigned map, momentum the signed one.
struct QuantizedField {
  const char* name;
  bool is_signed;
  at::Tensor& (FloraParamState::*codes)() noexcept;
  at::Tensor& (FloraParamState::*absmax)() noexcept;
};
const QuantizedField kQuantizedFields[] = {
    {"second_moment", false, &FloraParamState::second_moment,
     &FloraParamState::second_moment_absmax},
    {"momentum", true, &FloraParamState::momentum, &FloraParamState::momentum_absmax},
};

// Checks the codes and absmax of state `name` (expected: whether the layout has it, of
// `shape`); returns an uninitialised float32 tensor of `shape` on the parameter's device for
// check_step_inputs to check the rest against (it is freed at once), or, where the codes are
// absent or not expected, the codes as they are, for check_step_inputs to name.
at::Tensor check_quantized(const at::Tensor& param, const char* name, const at::Tensor& codes,
                           const at::Tensor& absmax, bool expected, at::IntArrayRef shape) {
  if (!expected) {
    TORCH_CHECK(!absmax.defined(), "flora: ", name, "_absmax must be None for a parameter of "
                "shape ", param.sizes(), ", which has no ", name);
    return codes;  // check_step_inputs: `name` must be None
  }
  if (!codes.defined()) return codes;  // check_step_inputs: `name` must be given
  TORCH_CHECK(codes.scalar_type() == at::kByte, "flora: ", name,
              " must be uint8 (8-bit codes, quantization=true), got ", codes.scalar_type());
  TORCH_CHECK(codes.sizes() == shape, "flora: ", name, " must have shape ", shape,
              " for a parameter of shape ", param.sizes(), ", got ", codes.sizes());
  TORCH_CHECK(codes.device() == param.device(), "flora: ", name, " must be on ",
              param.device(), " like its parameter, got ", codes.device());
  TORCH_CHECK(codes.is_contiguous(), "flora: ", name, " must be contiguous");
  const int64_t blocks = quant_blocks(codes.numel());
  TORCH_CHECK(absmax.defined(), "flora: ", name, "_absmax must be given with quantization=true "
              "(one float32 absmax per block of ", kQuantBlock, " codes of ", name, ")");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "flora: ", name,
              "_absmax must be float32, got ", absmax.scalar_type());
  TORCH_CHECK(absmax.dim() == 1 && absmax.numel() == blocks, "flora: ", name,
              "_absmax must have shape [", blocks, "] (one entry per block of ", kQuantBlock,
              " of the ", codes.numel(), " codes), got ", absmax.sizes());
  TORCH_CHECK(absmax.device() == param.device(), "flora: ", name, "_absmax must be on ",
              param.device(), " like its parameter, got ", absmax.device());
  TORCH_CHECK(absmax.is_contiguous(), "flora: ", name, "_absmax must be contiguous");
  return at::empty(shape, param.options().dtype(at::kFloat));
}

// Checks `state` against the layout `options` give `param`, and that one step with `grad`
// can run: flora::check_step_inputs, the checks the kernels run, plus the seed rule and,
// with quantization, the 8-bit tensors.
void check_state(const at::Tensor& param, const at::Tensor& grad, const FloraOptions& options,
                 const FloraParamState& state) {
  const ParamLayout layout = param_layout(param.sizes(), options.rank(), options.beta1(),
                                          options.factorize_second_moment(),
                                          options.max_aspect_ratio());
  const bool compressed = layout.momentum == MomentumKind::kCompressed;
  TORCH_CHECK(state.step() >= 0, "flora: state step must be >= 0, got ", state.step());
  TORCH_CHECK(state.seed().has_value() == compressed, "flora: the state of a parameter of shape ",
              param.sizes(), compressed ? " needs a seed" : " must have no seed",
              " (momentum=", momentum_kind_name(layout.momentum), ", rank=", options.rank(),
              ", beta1=", options.beta1(), ")");
  at::Tensor second_moment = state.second_moment(), momentum = state.momentum();
  if (options.quantization()) {
    second_moment = check_quantized(param, "second_moment", second_moment,
                                    state.second_moment_absmax(), !layout.factored,
                                    param.sizes());
    momentum = check_quantized(param, "momentum", momentum, state.momentum_absmax(),
                               layout.momentum != MomentumKind::kNone,
                               layout.momentum_shape(param.sizes()));
  } else {
    TORCH_CHECK(!state.second_moment_absmax().defined() && !state.momentum_absmax().defined(),
                "flora: the state of a parameter of shape ", param.sizes(), " is 8-bit state (",
                state.momentum_absmax().defined() ? "momentum_absmax" : "second_moment_absmax",
                " is set), made with quantization=true; this optimizer has quantization=false: "
                "construct it with FloraOptions(...).quantization(true) to use it");
  }
  check_step_inputs(param, grad, defined_or_none(state.row_second_moment()),
                    defined_or_none(state.col_second_moment()), defined_or_none(second_moment),
                    defined_or_none(momentum),
                    options.step_options(state.step() + 1, state.seed().value_or(0)));
}

// Zero state for `param`, parameter number `number` (1-based over all groups).
std::unique_ptr<FloraParamState> initial_state(const at::Tensor& param,
                                               const FloraOptions& options, int64_t number) {
  const ParamLayout layout = param_layout(param.sizes(), options.rank(), options.beta1(),
                                          options.factorize_second_moment(),
                                          options.max_aspect_ratio());
  const auto fp32 = at::TensorOptions().dtype(at::kFloat).device(param.device());
  auto state = std::make_unique<FloraParamState>();
  if (layout.factored) {
    state->row_second_moment(at::zeros({layout.rows}, fp32));
    state->col_second_moment(at::zeros({layout.cols}, fp32));
  } else {
    state->second_moment(at::zeros(param.sizes(), fp32));
  }
  if (layout.momentum != MomentumKind::kNone) {
    state->momentum(at::zeros(layout.momentum_shape(param.sizes()), fp32));
  }
  if (options.quantization()) {
    for (const QuantizedField& field : kQuantizedFields) {
      at::Tensor& values = (state.get()->*field.codes)();
      if (!values.defined()) continue;
      (state.get()->*field.absmax)() = at::zeros({quant_blocks(values.numel())}, fp32);
      values = at::full(values.sizes(), int64_t{zero_code(field.is_signed)},
                        fp32.dtype(at::kByte));
    }
  }
  if (layout.momentum == MomentumKind::kCompressed) {
    state->seed(options.seed() + number);
  }
  return state;
}

// The arguments of one step_group_ call: parameters of one device, their gradients, their
// state tensors in one flat list (ops.h), their steps (already incremented) and seeds.
struct GroupCall {
  std::vector<at::Tensor> params, grads, states;
  std::vector<int64_t> steps, seeds;
  std::optional<at::Tensor> nonfinite_skips;  // with skip_nonfinite: the device's counter

  // The state tensors in step_group_'s order: row, col, second moment, momentum; an 8-bit
  // state (quantization) as its codes followed by its absmax, which the op steps in place
  // (docs/FLORA.md §11).
  void add(const at::Tensor& param, const FloraParamState& state) {
    params.push_back(param);
    grads.push_back(param.grad());
    for (const at::Tensor* t : {&state.row_second_moment(), &state.col_second_moment(),
                                &state.second_moment(), &state.second_moment_absmax(),
                                &state.momentum(), &state.momentum_absmax()}) {
      if (t->defined()) states.push_back(*t);
    }
    steps.push_back(state.step() + 1);
    seeds.push_back(state.seed().value_or(0));
  }
};

// torch.ops.flora.step_group_ (step and seed of `o` are unused: the call's are per parameter).
void step_group(const GroupCall& call, const StepOptions& o) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("flora::step_group_", "")
          .typed<void(at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef,
                      at::IntArrayRef, double, double, double, double, double, double, double,
                      int64_t, int64_t, bool, bool, bool, bool, bool, bool, bool,
                      c10::string_view, const std::optional<at::Tensor>&, at::IntArrayRef,
                      const std::optional<at::Tensor>&, double)>();
  op.call(call.params, call.grads, call.states, call.steps, call.seeds, o.lr, o.beta1, o.eps1,
          o.eps2, o.clip_threshold, o.decay_rate, o.weight_decay, o.rank, o.kappa,
          o.scale_parameter, o.relative_step, o.warmup_init, o.factorize_second_moment, o.tf32,
          o.stochastic_rounding, o.skip_nonfinite, projection_name(o.projection),
          /*param_norms=*/std::nullopt,
          /*norms_known=*/{}, call.nonfinite_skips, o.max_aspect_ratio);
}

// The positions of `items` by device, devices in the order they first appear.
template <typename Item>
std::vector<std::vector<size_t>> by_device(const std::vector<Item>& items) {
  std::vector<at::Device> devices;
  std::vector<std::vector<size_t>> batches;
  for (size_t k = 0; k < items.size(); ++k) {
    const at::Device device = items[k].param.device();
    size_t d = 0;
    while (d < devices.size() && devices[d] != device) ++d;
    if (d == devices.size()) {
      devices.push_back(device);
      batches.emplace_back();
    }
    batches[d].push_back(k);
  }
  return batches;
}

// quantization loading float32 state (saved without it): the momentum and unfactored second
// moment are quantized on purpose, so that a float32 checkpoint resumes with 8-bit state
// (docs/FLORA.md §11). Only a tensor of the shape the layout expects; check_state names
// the others.
void quantize_loaded(const at::Tensor& param, const FloraOptions& options,
                     const QuantizedField& field, at::Tensor& values, at::Tensor& absmax) {
  const ParamLayout layout = param_layout(param.sizes(), options.rank(), options.beta1(),
                                          options.factorize_second_moment(),
                                          options.max_aspect_ratio());
  const bool momentum = std::string_view(field.name) == "momentum";
  const bool expected = momentum ? layout.momentum != MomentumKind::kNone : !layout.factored;
  if (!expected) return;
  const std::vector<int64_t> shape =
      momentum ? layout.momentum_shape(param.sizes()) : param.sizes().vec();
  if (values.sizes() != at::IntArrayRef(shape)) return;
  at::Tensor codes = at::empty(values.sizes(), values.options().dtype(at::kByte));
  absmax = at::empty({quant_blocks(values.numel())}, values.options());
  quantize_blockwise(values, codes, absmax, field.is_signed);
  values = codes;
}

bool is_supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

// ------------------------------------------------------------------------------ FloraOptions

FloraOptions::FloraOptions(std::optional<double> lr) {
  if (lr.has_value()) this->lr(lr);
}

void FloraOptions::validate() const {
  if (lr_.has_value()) {
    TORCH_CHECK(std::isfinite(*lr_) && *lr_ >= 0.0, "flora: lr must be finite and >= 0, got ",
                *lr_);
    TORCH_CHECK(!relative_step_,
                "flora: lr and relative_step=true are exclusive: relative_step computes the "
                "step size itself; leave lr unset (std::nullopt) or set relative_step(false)");
  } else {
    TORCH_CHECK(relative_step_, "flora: lr is required unless relative_step=true");
  }
  TORCH_CHECK(!warmup_init_ || relative_step_,
              "flora: warmup_init=true requires relative_step=true");
  TORCH_CHECK(rank_ >= 0, "flora: rank must be >= 0, got ", rank_);
  TORCH_CHECK(kappa_ >= 1, "flora: kappa must be >= 1, got ", kappa_);
  TORCH_CHECK(std::isfinite(eps1_) && eps1_ >= kMinEps1,
              "flora: eps1 must be finite and >= 2^-126 (float32's smallest normal, about "
              "1.2e-38), got ", eps1_);
  TORCH_CHECK(std::isfinite(eps2_) && eps2_ >= 0.0, "flora: eps2 must be finite and >= 0, got ",
              eps2_);
  TORCH_CHECK(std::isfinite(clip_threshold_) && clip_threshold_ > 0.0,
              "flora: clip_threshold must be finite and > 0, got ", clip_threshold_);
  TORCH_CHECK(std::isfinite(decay_rate_) && decay_rate_ <= 0.0,
              "flora: decay_rate must be finite and <= 0, got ", decay_rate_);
  TORCH_CHECK(beta1_ >= 0.0 && beta1_ < 1.0, "flora: beta1 must be in [0, 1), got ", beta1_);
  TORCH_CHECK(std::isfinite(weight_decay_) && weight_decay_ >= 0.0,
              "flora: weight_decay must be finite and >= 0, got ", weight_decay_);
  TORCH_CHECK(seed_ >= 0 && seed_ <= kMaxBaseSeed, "flora: seed must be in [0, 2^62], got ",
              seed_);
  TORCH_CHECK(max_aspect_ratio_ == 0.0 ||
                  (std::isfinite(max_aspect_ratio_) && max_aspect_ratio_ >= 1.0),
              "flora: max_aspect_ratio must be 0 (no limit) or a finite value >= 1, got ",
              max_aspect_ratio_);
  TORCH_CHECK(projection_ == "gaussian" || projection_ == "orthogonal",
              "flora: projection must be \"gaussian\" or \"orthogonal\", got \"", projection_,
              "\"");
  TORCH_CHECK(!capturable_,
              "flora: capturable=true is not supported by the C++ flora::Flora, which keeps "
              "its step counts on the host; use flora_ext.Flora(..., capturable=True) from "
              "Python for CUDA graph capture, or capturable(false)");
}

FloraOptions FloraOptions::merged_with(const FloraOptions& group) const {
  FloraOptions out = *this;
#define FLORA_MERGE_OPTION(T, name, default_value) \
  if (group.is_set(kOption_##name)) out.name(group.name());
  FLORA_OPTIONS(FLORA_MERGE_OPTION)
#undef FLORA_MERGE_OPTION
  if (group.quantization_is_set()) out.quantization(group.quantization());
  return out;
}

StepOptions FloraOptions::step_options(int64_t step, int64_t seed) const {
  return detail::options_from_schema(step, seed, lr_.value_or(0.0), beta1_, eps1_, eps2_,
                                     clip_threshold_, decay_rate_, weight_decay_, rank_, kappa_,
                                     scale_parameter_, relative_step_, warmup_init_,
                                     factorize_second_moment_, tf32_, stochastic_rounding_,
                                     skip_nonfinite_, projection_, max_aspect_ratio_);
}

double FloraOptions::get_lr() const {
  TORCH_CHECK(lr_.has_value(),
              "flora: lr is unset in this param group (relative_step computes the step size)");
  return *lr_;
}

void FloraOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const FloraOptions& a, const FloraOptions& b) {
#define FLORA_SAME_OPTION(T, name, default_value) && a.name() == b.name()
  return true FLORA_OPTIONS(FLORA_SAME_OPTION) && a.quantization() == b.quantization();
#undef FLORA_SAME_OPTION
}

void FloraOptions::serialize(torch::serialize::OutputArchive& archive) const {
  // lr is None when unset, as Python saves lr=None.
#define FLORA_WRITE_OPTION(T, name, default_value) archive.write(#name, c10::IValue(name##_));
  FLORA_OPTIONS(FLORA_WRITE_OPTION)
#undef FLORA_WRITE_OPTION
  archive.write("quantization", c10::IValue(quantization_));
}

void FloraOptions::serialize(torch::serialize::InputArchive& archive) {
  // capturable and max_aspect_ratio came later: archives without them load with their
  // defaults (4.0: the rule they were saved under).
#define FLORA_READ_OPTION(T, name, default_value)                                     \
  if ((std::string_view(#name) != "capturable" &&                                     \
       std::string_view(#name) != "max_aspect_ratio") || has_key(archive, #name))     \
    read_option(archive, #name, name##_);
  FLORA_OPTIONS(FLORA_READ_OPTION)
#undef FLORA_READ_OPTION
  explicitly_set_ = (uint32_t{1} << kNumOptions) - 1;  // a loaded group is complete
  // What the saving optimizer had (absent before quantization existed: false); Flora::load
  // replaces it with the loading optimizer's own, as load_state_dict keeps Python's.
  quantization_ = has_key(archive, "quantization") &&
                  read_value(archive, "quantization", "options").toBool();
  quantization_set_ = true;
}

// --------------------------------------------------------------------------- FloraParamState

void FloraParamState::serialize(torch::serialize::OutputArchive& archive) const {
  archive.write("step", c10::IValue(step()));
  // Absent fields are left out, as missing keys in the Python state dict.
  if (seed().has_value()) archive.write("seed", c10::IValue(*seed()));
  for (const auto& [key, tensor] :
       {std::pair<const char*, const at::Tensor*>{"row_second_moment", &row_second_moment()},
        {"col_second_moment", &col_second_moment()},
        {"second_moment", &second_moment()},
        {"momentum", &momentum()},
        {"second_moment_absmax", &second_moment_absmax()},
        {"momentum_absmax", &momentum_absmax()}}) {
    if (tensor->defined()) archive.write(key, *tensor);
  }
}

void FloraParamState::serialize(torch::serialize::InputArchive& archive) {
  step(read_value(archive, "step", "state").toInt());
  c10::IValue seed_value;
  seed(archive.try_read("seed", seed_value) ? std::optional<int64_t>(seed_value.toInt())
                                            : std::nullopt);
  // A fresh tensor for each key: try_read writes into a defined tensor with set_().
  const auto read_tensor = [&archive](const char* key) {
    at::Tensor t;
    return archive.try_read(key, t) ? t : at::Tensor();
  };
  row_second_moment(read_tensor("row_second_moment"));
  col_second_moment(read_tensor("col_second_moment"));
  second_moment(read_tensor("second_moment"));
  momentum(read_tensor("momentum"));
  second_moment_absmax(read_tensor("second_moment_absmax"));
  momentum_absmax(read_tensor("momentum_absmax"));
}

bool operator==(const FloraParamState& a, const FloraParamState& b) {
  auto same = [](const at::Tensor& x, const at::Tensor& y) {
    if (x.defined() != y.defined()) return false;
    return !x.defined() || (x.sizes() == y.sizes() && x.device() == y.device() && x.equal(y));
  };
  return a.step() == b.step() && a.seed() == b.seed() &&
         same(a.row_second_moment(), b.row_second_moment()) &&
         same(a.col_second_moment(), b.col_second_moment()) &&
         same(a.second_moment(), b.second_moment()) && same(a.momentum(), b.momentum()) &&
         same(a.second_moment_absmax(), b.second_moment_absmax()) &&
         same(a.momentum_absmax(), b.momentum_absmax());
}

// ------------------------------------------------------------------------------------ Flora

Flora::Flora(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
             FloraOptions defaults)
    : Optimizer(std::vector<torch::optim::OptimizerParamGroup>{},
                std::make_unique<FloraOptions>(defaults)) {
  // As in Python, lr may be left to the param groups: each is checked (add_param_group)
  // with the defaults merged in, so here every check but that lr is set.
  if (defaults.lr().has_value() || defaults.relative_step()) {
    defaults.validate();
  } else {
    FloraOptions(defaults).lr(0.0).validate();
  }
  for (const auto& group : param_groups) add_param_group(group);
}

Flora::Flora(std::vector<torch::Tensor> params, FloraOptions defaults)
    : Flora(std::vector<torch::optim::OptimizerParamGroup>{
                torch::optim::OptimizerParamGroup(std::move(params))},
            std::move(defaults)) {}

const FloraOptions& Flora::defaults_options() const {
  return static_cast<const FloraOptions&>(defaults());
}

FloraOptions& Flora::group_options(size_t index) {
  TORCH_CHECK(index < param_groups_.size(), "flora: no param group ", index, " (there are ",
              param_groups_.size(), ")");
  return static_cast<FloraOptions&>(param_groups_[index].options());
}

const FloraOptions& Flora::group_options(size_t index) const {
  TORCH_CHECK(index < param_groups_.size(), "flora: no param group ", index, " (there are ",
              param_groups_.size(), ")");
  return static_cast<const FloraOptions&>(param_groups_[index].options());
}

const FloraParamState* Flora::param_state(const torch::Tensor& param) const {
  const auto it = state_.find(param.unsafeGetTensorImpl());
  return it == state_.end() ? nullptr : static_cast<const FloraParamState*>(it->second.get());
}

torch::Tensor Flora::nonfinite_skips(torch::Device device) const {
  for (const torch::Tensor& counter : nonfinite_skips_) {
    if (counter.device() == device) return counter.clone();
  }
  return torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(device));
}

torch::Tensor& Flora::skip_counter(torch::Device device) {
  for (torch::Tensor& counter : nonfinite_skips_) {
    if (counter.device() == device) return counter;
  }
  nonfinite_skips_.push_back(
      torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(device)));
  return nonfinite_skips_.back();
}

void Flora::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  FloraOptions options = defaults_options();
  if (param_group.has_options()) {
    const auto* group = dynamic_cast<const FloraOptions*>(&param_group.options());
    TORCH_CHECK(group != nullptr,
                "flora: the options of a param group must be flora::FloraOptions");
    options = options.merged_with(*group);
  }
  TORCH_CHECK(options.lr().has_value() || options.relative_step(),
              "flora: lr is required unless relative_step=true; param group ", param_groups_.size(),
              " has none (give its FloraOptions an lr, or the optimizer's defaults)");
  options.validate();
  TORCH_CHECK(options.quantization() == defaults_options().quantization(),
              "flora: quantization is an option of the whole optimizer, not of a param group: "
              "param group ", param_groups_.size(), " sets quantization=",
              options.quantization() ? "true" : "false",
              ", the optimizer's defaults quantization=",
              defaults_options().quantization() ? "true" : "false",
              "; set it in the defaults only");
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const auto& group : param_groups_) {
    for (const auto& p : group.params()) seen.insert(p.unsafeGetTensorImpl());
  }
  for (const auto& p : param_group.params()) {
    TORCH_CHECK(p.defined(), "flora: parameters must be defined tensors");
    TORCH_CHECK(is_supported_param_dtype(p.scalar_type()),
                "flora: parameters must be float32, float16 or bfloat16, got a parameter of dtype ",
                p.scalar_type());
    TORCH_CHECK(p.layout() == at::kStrided, "flora: parameters must be dense tensors, got ",
                p.layout());
    TORCH_CHECK(seen.insert(p.unsafeGetTensorImpl()).second,
                "flora: some parameters appear in more than one parameter group");
  }
  // torch's add_param_group gives the group a copy of the defaults (torch >= 2.10 ignores
  // the options of a group of an optimizer it does not know), so set ours afterwards.
  Optimizer::add_param_group(torch::optim::OptimizerParamGroup(param_group.params()));
  param_groups_.back().set_options(std::make_unique<FloraOptions>(options));
}

torch::Tensor Flora::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  struct Pending {
    at::Tensor param;
    FloraParamState* state;
    std::unique_ptr<FloraParamState> fresh;  // state made by this step, not yet stored
  };
  struct GroupStep {
    const FloraOptions* options;
    std::vector<Pending> items;
  };
  // Everything is checked before the first write, so a step that throws changes nothing.
  std::vector<GroupStep> groups;
  int64_t number = 0;  // 1-based over all groups: the seed offset (docs/FLORA.md)
  const bool quantization = defaults_options().quantization();
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    auto& group = param_groups_[g];
    const auto& options = static_cast<const FloraOptions&>(group.options());
    options.validate();  // options may have been changed since the group was added
    TORCH_CHECK(options.quantization() == quantization,
                "flora: quantization must be the same in every param group (an option of the "
                "whole optimizer): param group ", g, " has quantization=",
                options.quantization() ? "true" : "false",
                ", the optimizer's defaults quantization=", quantization ? "true" : "false");
    GroupStep work{&options, {}};
    for (const auto& p : group.params()) {
      ++number;
      if (!p.grad().defined()) continue;
      Pending item{p, nullptr, nullptr};
      const auto it = state_.find(p.unsafeGetTensorImpl());
      if (it == state_.end()) {
        item.fresh = initial_state(p, options, number);
        item.state = item.fresh.get();
      } else {
        item.state = static_cast<FloraParamState*>(it->second.get());
      }
      check_state(p, p.grad(), options, *item.state);
      work.items.push_back(std::move(item));
    }
    if (!work.items.empty()) groups.push_back(std::move(work));
  }
  // The counters of skip_nonfinite exist before the first write, as the state does.
  for (const auto& group : groups) {
    if (!group.options->skip_nonfinite()) continue;
    for (const auto& item : group.items) skip_counter(item.param.device());
  }
  for (auto& group : groups) {
    for (auto& item : group.items) {
      if (item.fresh) state_[item.param.unsafeGetTensorImpl()] = std::move(item.fresh);
    }
    // One step_group_ call per device, as flora_ext.Flora makes them.
    for (const std::vector<size_t>& batch : by_device(group.items)) {
      std::optional<at::Tensor> skips;
      if (group.options->skip_nonfinite()) {
        skips = skip_counter(group.items[batch[0]].param.device());
      }
      GroupCall call;
      for (const size_t k : batch) {
        const Pending& item = group.items[k];
        call.add(item.param, *item.state);
      }
      call.nonfinite_skips = skips;
      step_group(call, group.options->step_options(1, 0));
      for (const size_t k : batch) {
        FloraParamState& state = *group.items[k].state;
        const int64_t t = state.step() + 1;
        state.step(t);
        if (state.seed().has_value() && t % group.options->kappa() == 0) {
          state.seed(next_seed(*state.seed()));
        }
      }
    }
  }
  return loss;
}

void Flora::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<FloraParamState, FloraOptions>(archive, *this);
}

void Flora::load(torch::serialize::InputArchive& archive) {
  auto previous_state = std::move(state_);
  state_ = {};
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> previous_options;
  for (const auto& group : param_groups_) previous_options.push_back(group.options().clone());
  try {
    torch::optim::serialize<FloraParamState, FloraOptions>(archive, *this);
    // Whether the state is 8-bit is this optimizer's choice, not the saved one's: float32
    // state is quantized, 8-bit state is refused without quantization (adopt_loaded_state).
    for (auto& group : param_groups_) {
      static_cast<FloraOptions&>(group.options()).quantization(defaults_options().quantization());
    }
    adopt_loaded_state();
  } catch (...) {
    state_ = std::move(previous_state);
    for (size_t i = 0; i < param_groups_.size(); ++i) {
      param_groups_[i].set_options(std::move(previous_options[i]));
    }
    throw;
  }
}

void Flora::adopt_loaded_state() {
  int64_t number = 0;
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const auto& options = static_cast<const FloraOptions&>(param_groups_[g].options());
    try {
      options.validate();
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "flora: loaded options of param group ", g, " are invalid: ",
                  e.what_without_backtrace());
    }
    for (const auto& p : param_groups_[g].params()) {
      const auto it = state_.find(p.unsafeGetTensorImpl());
      ++number;
      if (it == state_.end()) continue;
      auto& state = static_cast<FloraParamState&>(*it->second);
      try {
        // float32 on the parameter's device, as flora_ext.Flora.load_state_dict does; 8-bit
        // codes (those with an absmax) stay uint8.
        for (at::Tensor* t : {&state.row_second_moment(), &state.col_second_moment()}) {
          if (t->defined()) *t = t->to(p.device(), at::kFloat).contiguous();
        }
        for (const QuantizedField& field : kQuantizedFields) {
          at::Tensor& values = (state.*field.codes)();
          at::Tensor& absmax = (state.*field.absmax)();
          if (absmax.defined()) {
            TORCH_CHECK(values.defined(), "flora: ", field.name, "_absmax is set but ",
                        field.name, " is not");
            TORCH_CHECK(values.scalar_type() == at::kByte, "flora: ", field.name,
                        " must be uint8 (8-bit codes, as ", field.name, "_absmax says), got ",
                        values.scalar_type());
            values = values.to(p.device()).contiguous();
            absmax = absmax.to(p.device(), at::kFloat).contiguous();
            continue;
          }
          if (!values.defined()) continue;
          TORCH_CHECK(values.is_floating_point(), "flora: ", field.name,
                      " must be a float tensor",
                      values.scalar_type() == at::kByte
                          ? std::string(" (") + field.name + "_absmax is missing)"
                          : std::string(),
                      ", got ", values.scalar_type());
          values = values.to(p.device(), at::kFloat).contiguous();
          if (options.quantization()) quantize_loaded(p, options, field, values, absmax);
        }
        // The parameter stands in for its gradient: only the state is being checked.
        check_state(p, p, options, state);
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "flora: the loaded state of parameter ", number,
                    " (param group ", g, ") does not fit it: ", e.what_without_backtrace());
      }
    }
  }
}

namespace {

// The C++ type and value of an option as flora::cpp_options reports them: floats in hex, exact.
const char* option_type(double) { return "float"; }
const char* option_type(int64_t) { return "int"; }
const char* option_type(bool) { return "bool"; }
const char* option_type(const std::optional<double>&) { return "float?"; }
const char* option_type(const std::string&) { return "str"; }

std::string option_value(double v) {
  char text[64];
  std::snprintf(text, sizeof(text), "%a", v);
  return text;
}
std::string option_value(int64_t v) { return std::to_string(v); }
std::string option_value(const std::string& v) { return v; }
std::string option_value(bool v) { return v ? "True" : "False"; }
std::string option_value(const std::optional<double>& v) {
  return v.has_value() ? option_value(*v) : "None";
}

// The options of FloraOptions in order, their C++ types and defaults: what
// tests/test_hyperparams.py holds against flora_ext/hyperparams.py.
std::tuple<std::vector<std::string>, std::vector<std::string>, std::vector<std::string>>
cpp_options_op() {
  const FloraOptions defaults;
  std::vector<std::string> names, types, values;
#define FLORA_DESCRIBE_OPTION(T, name, default_value) \
  names.emplace_back(#name);                          \
  types.emplace_back(option_type(defaults.name()));   \
  values.push_back(option_value(defaults.name()));
  FLORA_OPTIONS(FLORA_DESCRIBE_OPTION)
#undef FLORA_DESCRIBE_OPTION
  return {names, types, values};
}

}  // namespace
}  // namespace flora

TORCH_LIBRARY_FRAGMENT(flora, m) {
  m.def("cpp_options() -> (str[] names, str[] types, str[] defaults)", &flora::cpp_options_op);
}
