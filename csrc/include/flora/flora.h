// flora::Flora, the Flora optimizer for LibTorch programs, shaped like torch::optim::AdamW:
// options with chainable setters (FloraOptions), per-parameter state (FloraParamState),
// param groups, step(closure), torch::save / torch::load of the optimizer.
//
// It steps each device's parameters of a param group in one call of the op that
// flora_ext.Flora calls from Python (torch.ops.flora.step_group_), so the same inputs and
// seeds give bitwise the same trajectory in both.
// The math is in docs/FLORA.md; the Python optimizer (flora_ext/optimizer.py) is the reference
// for the conventions: per-parameter seeds, resampling, state layout, checks.
//
//   flora::Flora optimizer(model->parameters(),
//                          flora::FloraOptions(1e-3).beta1(0.9).rank(32));
//   ...
//   optimizer.zero_grad();
//   loss.backward();
//   optimizer.step();
//   torch::save(optimizer, "flora.pt");     // and torch::load(optimizer, "flora.pt")
#pragma once

#include "flora/ops.h"

#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace flora {

// The options of flora::Flora: the arguments of flora_ext.Flora (flora_ext/hyperparams.py, the
// table tests/test_hyperparams.py holds this list against), with the same names and defaults.
// Python's None is std::nullopt for lr, and 0 for rank (no compression) and beta1 (no momentum),
// which is what None means there. eps=(eps1, eps2) is split into eps1 and eps2.
// X(type, name, default): one line per option, in the order of their bits (FloraOptions::is_set);
// the setters, getters, merging, comparison and serialization are made from it.
#define FLORA_OPTIONS(X)                                                                      \
  /* Step size; required unless relative_step, and exclusive with it. */                     \
  X(std::optional<double>, lr, std::nullopt)                                                \
  /* Rank r of the momentum projection; 0 keeps the momentum dense. */                       \
  X(int64_t, rank, 0)                                                                       \
  /* Resample the projection every kappa steps. */                                          \
  X(int64_t, kappa, 1000)                                                                   \
  /* Added to g^2 before averaging. */                                                      \
  X(double, eps1, 1e-30)                                                                    \
  /* Floor of the parameter RMS that scale_parameter multiplies the step by. */             \
  X(double, eps2, 1e-3)                                                                     \
  /* The update is divided by max(1, RMS(update) / clip_threshold). */                      \
  X(double, clip_threshold, 1.0)                                                            \
  /* beta2_t = 1 - t^decay_rate. */                                                         \
  X(double, decay_rate, -0.8)                                                               \
  /* Momentum coefficient; 0 means no first moment at all. */                               \
  X(double, beta1, 0.0)                                                                     \
  /* Decoupled weight decay, scaled by the effective step size. */                          \
  X(double, weight_decay, 0.0)                                                              \
  /* Multiply the step size by the parameter's RMS (at least eps2). */                      \
  X(bool, scale_parameter, true)                                                            \
  /* lr_t = min(1e-2, 1/sqrt(t)), or min(1e-6 t, 1/sqrt(t)) with warmup_init. */            \
  X(bool, relative_step, false)                                                             \
  X(bool, warmup_init, false)                                                               \
  /* Row and column second moments for 2-D parameters. */                                   \
  X(bool, factorize_second_moment, true)                                                    \
  /* Base seed: parameter number i (1-based over all groups, in order) starts at seed + i. */ \
  X(int64_t, seed, 0)                                                                       \
  /* CUDA: projection GEMMs on tensor cores (TF32); false keeps them exact fp32. */         \
  X(bool, tf32, true)                                                                       \
  /* bfloat16 parameters: unbiased stochastic rounding of the written value. */             \
  X(bool, stochastic_rounding, false)                                                       \
  /* A parameter whose gradient holds a NaN or inf keeps its value and state on that step; */ \
  /* the skips are counted (Flora::nonfinite_skips). */                                      \
  X(bool, skip_nonfinite, false)                                                            \
  /* Compressed momentum's basis: "gaussian" (flora-opt's) or "orthogonal" (docs/FLORA.md, */ \
  /* "Orthogonalised projections"); a checkpoint resumes only with the one it was saved with. */ \
  X(std::string, projection, "gaussian")                                                    \
  /* Compressed momentum only where the longer side is at most this times the shorter */   \
  /* (4: flora-opt's rule, embeddings and heads dense); 0 (Python's None): no limit. */     \
  X(double, max_aspect_ratio, 4.0)                                                          \
  /* Python only (flora_ext.Flora): device step counts for CUDA graph capture. */            \
  X(bool, capturable, false)

struct FloraOptions : public torch::optim::OptimizerCloneableOptions<FloraOptions> {
  // The bit of each option (kOption_lr, ...), and how many there are.
#define FLORA_OPTION_BIT(T, name, default_value) kOption_##name,
  enum Option : int { FLORA_OPTIONS(FLORA_OPTION_BIT) kNumOptions };
#undef FLORA_OPTION_BIT

  FloraOptions() = default;
  // Like AdamWOptions(lr); FloraOptions(std::nullopt) leaves lr unset (relative_step).
  FloraOptions(std::optional<double> lr);  // NOLINT(google-explicit-constructor)

  // A chainable setter and a getter, as TORCH_ARG makes them, that also records that the
  // option was set: the options of a param group override only what they set, and the rest
  // comes from the optimizer's defaults, as with the dict of a param group in Python.
#define FLORA_OPTION(T, name, default_value)                           \
 public:                                                               \
  inline FloraOptions& name(const T& new_##name) {                     \
    this->name##_ = new_##name;                                        \
    this->explicitly_set_ |= (uint32_t{1} << kOption_##name);          \
    return *this;                                                      \
  }                                                                    \
  inline const T& name() const noexcept { return this->name##_; }      \
                                                                       \
 private:                                                              \
  T name##_ = default_value;
  FLORA_OPTIONS(FLORA_OPTION)
#undef FLORA_OPTION

 public:
  // 8-bit momentum and unfactored second moments (docs/FLORA.md §11). An option of the whole
  // optimizer, as flora_ext.Flora's quantization argument is (not a param group key there, so
  // not in FLORA_OPTIONS): set it in the optimizer's defaults; a param group may repeat it
  // but not differ.
  inline FloraOptions& quantization(bool new_quantization) {
    quantization_ = new_quantization;
    quantization_set_ = true;
    return *this;
  }
  inline bool quantization() const noexcept { return quantization_; }
  bool quantization_is_set() const noexcept { return quantization_set_; }

  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const FloraOptions& lhs, const FloraOptions& rhs);
  // For torch::optim::LRScheduler; an error while lr is unset (relative_step).
  double get_lr() const override;
  void set_lr(const double lr) override;

  // Throws c10::Error naming the first invalid option, e.g. "flora: kappa must be >= 1, got 0".
  void validate() const;
  // Whether the setter of option `bit` (kOption_<name>, its position above) was called.
  bool is_set(int bit) const { return (explicitly_set_ >> bit) & 1u; }
  // These options, with those that `group` set explicitly taken from `group`.
  FloraOptions merged_with(const FloraOptions& group) const;
  // The hyper-parameters of the step ops for step t of a parameter.
  StepOptions step_options(int64_t step, int64_t seed) const;

 private:
  uint32_t explicitly_set_ = 0;
  bool quantization_ = false;
  bool quantization_set_ = false;
};

// State of one parameter; which fields are defined follows flora::param_layout (docs/FLORA.md,
// "Which state a parameter gets"), as the state dict of flora_ext.Flora does. All tensors
// are float32, on the parameter's device, except with quantization: then momentum and
// second_moment hold uint8 codes (the float tensor's shape) and their *_absmax fields one
// float32 absmax per block of 256 elements (docs/FLORA.md §11).
struct FloraParamState : public torch::optim::OptimizerCloneableParamState<FloraParamState> {
  TORCH_ARG(int64_t, step) = 0;
  // Seed of the current projection; compressed momentum only.
  TORCH_ARG(std::optional<int64_t>, seed) = std::nullopt;
  TORCH_ARG(torch::Tensor, row_second_moment);  // (n,), factored
  TORCH_ARG(torch::Tensor, col_second_moment);  // (m,), factored
  TORCH_ARG(torch::Tensor, second_moment);      // like the parameter, not factored
  TORCH_ARG(torch::Tensor, momentum);           // r x m, n x r or like the parameter
  TORCH_ARG(torch::Tensor, second_moment_absmax);  // quantization: ceil(numel / 256)
  TORCH_ARG(torch::Tensor, momentum_absmax);       // quantization: ceil(numel / 256)

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const FloraParamState& lhs, const FloraParamState& rhs);
};

class Flora : public torch::optim::Optimizer {
 public:
  // defaults may leave lr unset (FloraOptions()) when every param group sets its own.
  explicit Flora(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                 FloraOptions defaults = {});
  explicit Flora(std::vector<torch::Tensor> params, FloraOptions defaults = {});

  // One Flora step of every parameter that has a gradient; returns the closure's loss.
  // Every gradient, option and state is checked before the first parameter is written, so
  // a step that throws changes nothing. Gradients are kept (zero_grad() clears them).
  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  // Loads what save() wrote (torch::load(optimizer, path)); the state must fit these
  // parameters under the loaded options, or it throws and this optimizer stays as it was.
  // State tensors move to their parameter's device.
  void load(torch::serialize::InputArchive& archive) override;

  // Adds a param group; its FloraOptions, when given, override the options they set and take
  // the rest from defaults(). Hides Optimizer::add_param_group, which is not virtual: call it
  // on a flora::Flora, not through a torch::optim::Optimizer reference.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  const FloraOptions& defaults_options() const;
  // The options of param group `index`.
  FloraOptions& group_options(size_t index);
  const FloraOptions& group_options(size_t index) const;
  // The state of `param`, or nullptr before its first step.
  const FloraParamState* param_state(const torch::Tensor& param) const;
  // How many parameter-steps on `device` skip_nonfinite skipped: an int64 tensor of one
  // element on `device`, counted there without a host sync (.item() syncs when you choose).
  // A copy; zero before any. Not saved by save().
  torch::Tensor nonfinite_skips(torch::Device device) const;

 private:
  // The counters of skip_nonfinite, one a device, made by the first step that needs one.
  std::vector<torch::Tensor> nonfinite_skips_;
  torch::Tensor& skip_counter(torch::Device device);
  // Checks what was just loaded against the parameters, moves it to their devices.
  void adopt_loaded_state();
};

}  // namespace flora
