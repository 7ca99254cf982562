// flora_ext ops: the shape rules and the entry points shared by the CPU and
// CUDA kernels, the Python bindings and the C++ optimizer.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace flora {

enum class MomentumKind : int { kNone = 0, kDense = 1, kCompressed = 2 };

// The basis of compressed momentum (docs/FLORA.md, "Orthogonalised projections"): the
// Gaussian P itself (flora-opt's math), or P_o = s R^-T P (left; P R^-1 s right), P's rows
// orthonormalised by the Cholesky factor R of its Gram and scaled by s, which makes
// up(down(X)) s^2 times the orthogonal projection on P's span. The momentum holds
// coordinates in that basis.
enum class Projection : int { kGaussian = 0, kOrthogonal = 1 };

// The op schemas' projection argument: "gaussian" or "orthogonal"; anything else throws
// naming the argument.
Projection projection_from_name(c10::string_view name);
const char* projection_name(Projection projection);

// Which state a parameter gets (docs/FLORA.md, "Which state a parameter gets").
// The one implementation of the rule: the Python optimizer asks for it too.
struct ParamLayout {
  bool factored = false;  // row/col second moment instead of a full one
  MomentumKind momentum = MomentumKind::kNone;
  bool left = false;      // compressed: n < m, P is r x n, momentum r x m
  int64_t rows = 0;       // n (2-D only)
  int64_t cols = 0;       // m (2-D only)
  int64_t rank = 0;       // r when compressed, else 0

  std::vector<int64_t> momentum_shape(at::IntArrayRef param_shape) const;
  // Shape of the projection P: r x n (left) or m x r (right).
  std::vector<int64_t> projection_shape() const;
};

ParamLayout param_layout(at::IntArrayRef shape, int64_t rank, double beta1,
                         bool factorize_second_moment, double max_aspect_ratio);

const char* momentum_kind_name(MomentumKind kind);

// Smallest eps1 a step accepts: float32's smallest normal, 2^-126 (MIN_EPS1 in
// flora_ext/hyperparams.py). eps1 is added to G^2 in float32, where a smaller value is lost
// (below about 1e-45, or with denormals flushed to zero) and a zero gradient row would then
// give 0 / 0.
constexpr double kMinEps1 = std::numeric_limits<float>::min();

// Hyper-parameters of one step; the op schema spells them out one by one.
struct StepOptions {
  int64_t step = 1;  // t, already incremented
  int64_t seed = 0;  // current projection seed (compressed momentum)
  double lr = 0.0;   // ignored with relative_step
  double beta1 = 0.0;
  double eps1 = 1e-30;
  double eps2 = 1e-3;
  double clip_threshold = 1.0;
  double decay_rate = -0.8;
  double weight_decay = 0.0;
  int64_t rank = 0;
  int64_t kappa = 1000;
  bool scale_parameter = true;
  bool relative_step = false;
  bool warmup_init = false;
  bool factorize_second_moment = true;
  // Compressed momentum only where the longer side is at most this times the shorter
  // (common/rules.h, momentum_compressible); 0: no limit.
  double max_aspect_ratio = 4.0;
  // CUDA only: projection GEMMs on TF32 tensor cores (bf16/fp16 ones for such
  // gradients); false keeps them exact fp32. The CPU path is always exact.
  bool tf32 = true;
  // Half-precision parameters: round the fp32 result to bfloat16 stochastically
  // (unbiased) instead of to nearest. No effect on float32 parameters.
  bool stochastic_rounding = false;
  // A parameter whose gradient holds a NaN or inf keeps its value and state (compressed
  // momentum on a resampling step: moved to the next basis, nothing added) and adds one
  // to the call's nonfinite_skips counter (docs/FLORA.md §4.8).
  bool skip_nonfinite = false;
  // Compressed momentum: the down projection (see Projection).
  Projection projection = Projection::kGaussian;
  // step_group_capturable_: the step count and seed are read on the device, so a CUDA
  // step plans the change of basis every step and picks on the device (docs/cuda.md).
  bool capturable = false;

  StepOptions for_parameter(int64_t param_step, int64_t param_seed) const {
    StepOptions o = *this;
    o.step = param_step;
    o.seed = param_seed;
    return o;
  }
  double beta2() const;      // 1 - t^decay_rate
  double base_lr() const;    // lr, or the relative step size
  bool resample() const { return step % kappa == 0; }
  // Whether a CUDA step plans (and runs) the change of basis.
  bool plans_resample() const { return capturable || resample(); }
};

// Validates everything before a kernel writes anything; throws c10::Error
// naming the argument. Returns the layout the state tensors were checked against.
ParamLayout check_step_inputs(const at::Tensor& param, const at::Tensor& grad,
                              const std::optional<at::Tensor>& row_second_moment,
                              const std::optional<at::Tensor>& col_second_moment,
                              const std::optional<at::Tensor>& second_moment,
                              const std::optional<at::Tensor>& momentum,
                              const StepOptions& options);

// The state tensors of one parameter, as step_ takes them. step_group_ also takes an
// unfactored second moment and a dense momentum in the 8-bit format of quantization=True
// (csrc/common/quantize.h): uint8 codes, then their float32 absmax; the step reads and
// writes them in place (docs/FLORA.md §11).
struct ParamState {
  std::optional<at::Tensor> row_second_moment, col_second_moment, second_moment, momentum;
  std::optional<at::Tensor> second_moment_absmax, momentum_absmax;  // with 8-bit codes only

  bool quantized_second_moment() const { return second_moment_absmax.has_value(); }
  bool quantized_momentum() const { return momentum_absmax.has_value(); }
};

// check_step_inputs with `state`'s 8-bit tensors: codes of the state's shape (contiguous,
// on the parameter's device), absmax of one float32 entry a block of 256; 8-bit states
// are an unfactored second moment and a dense momentum only.
ParamLayout check_step_inputs(const at::Tensor& param, const at::Tensor& grad,
                              const ParamState& state, const StepOptions& options);

// step_group_ takes every parameter's state tensors in one flat list, in
// parameter order, each parameter's in the order row_second_moment,
// col_second_moment (factored) or second_moment, then momentum (if any): the
// layout rule says which a parameter has. (A flat list also keeps None out of
// mutable tensor lists, which torch.compile's functionalization cannot handle.)
// Checks the lengths and every parameter with check_step_inputs before any
// kernel runs, so a bad entry anywhere changes nothing.
struct GroupEntry {
  ParamState state;
  StepOptions options;
  ParamLayout layout;
  // step_group_'s param_norms: where this parameter's sum of p^2 is cached (null
  // without a cache), and whether the entry holds the sum for p as it is now. A
  // backend may read a known entry instead of p, and should leave the sum of the p
  // it writes there.
  double* param_sq = nullptr;
  bool param_sq_known = false;
  // With skip_nonfinite: the call's counter of skipped parameters (one int64 in the
  // parameters' memory: host on the CPU, device on CUDA), else null.
  int64_t* nonfinite_skips = nullptr;
};
std::vector<GroupEntry> check_group_inputs(at::TensorList params, at::TensorList grads,
                                           at::TensorList states, at::IntArrayRef steps,
                                           at::IntArrayRef seeds,
                                           const StepOptions& group_options);

// Checks step_group_'s param_norms (float64, one entry a parameter, on their
// device) and norms_known (empty, or 0/1 a parameter) and points the entries at them.
void attach_param_norms(std::vector<GroupEntry>& entries, at::TensorList params,
                        const std::optional<at::Tensor>& param_norms,
                        at::IntArrayRef norms_known);

// Checks step_group_'s (and step_'s) nonfinite_skips: with skip_nonfinite, one int64 on the
// parameters' device, required; points the entries at it.
void attach_nonfinite_skips(std::vector<GroupEntry>& entries, at::TensorList params,
                            const std::optional<at::Tensor>& nonfinite_skips);

// What a backend implements: one step of every parameter of a call whose inputs
// check_group_inputs (or check_step_inputs) accepted. entries[k] belongs to params[k].
using GroupKernel = void (*)(at::TensorList params, at::TensorList grads,
                             const std::vector<GroupEntry>& entries);

// One Flora step of one parameter, in place on param and state
// (torch.ops.flora.step_; dispatches to the CPU or CUDA kernel).
void step_(at::Tensor& param, const at::Tensor& grad,
           const std::optional<at::Tensor>& row_second_moment,
           const std::optional<at::Tensor>& col_second_moment,
           const std::optional<at::Tensor>& second_moment,
           const std::optional<at::Tensor>& momentum, const StepOptions& options,
           const std::optional<at::Tensor>& nonfinite_skips = std::nullopt);

// A new float32 projection of the given shape on the given device, entries
// N(0, 1) * scale (torch.ops.flora.fill_projection_ on a fresh tensor).
at::Tensor projection(int64_t seed, int64_t rows, int64_t cols, double scale,
                      at::Device device);

// Whether this build of the library has the CUDA kernels (torch.ops.flora.cuda_compiled).
bool cuda_compiled();

namespace detail {
// Used by the backend kernels, which take the op's flat argument list.
StepOptions options_from_schema(int64_t step, int64_t seed, double lr, double beta1,
                                double eps1, double eps2, double clip_threshold,
                                double decay_rate, double weight_decay, int64_t rank,
                                int64_t kappa, bool scale_parameter, bool relative_step,
                                bool warmup_init, bool factorize_second_moment, bool tf32,
                                bool stochastic_rounding, bool skip_nonfinite,
                                c10::string_view projection, double max_aspect_ratio);
// The op entry points of every backend: options from the schema, the checks,
// then the backend's kernel. The argument lists are the op schemas'; a backend
// registers m.impl("step_", &detail::step_op<&its_group_kernel>) and likewise
// step_group_op.
template <GroupKernel kernel>
void step_op(const at::Tensor& param, const at::Tensor& grad,
             const std::optional<at::Tensor>& row_second_moment,
             const std::optional<at::Tensor>& col_second_moment,
             const std::optional<at::Tensor>& second_moment,
             const std::optional<at::Tensor>& momentum, int64_t step, int64_t seed, double lr,
             double beta1, double eps1, double eps2, double clip_threshold, double decay_rate,
             double weight_decay, int64_t rank, int64_t kappa, bool scale_parameter,
             bool relative_step, bool warmup_init, bool factorize_second_moment, bool tf32,
             bool stochastic_rounding, bool skip_nonfinite, c10::string_view projection,
             const std::optional<at::Tensor>& nonfinite_skips, double max_aspect_ratio) {
  std::vector<GroupEntry> entries(1);
  GroupEntry& entry = entries[0];
  entry.options = options_from_schema(step, seed, lr, beta1, eps1, eps2, clip_threshold,
                                      decay_rate, weight_decay, rank, kappa, scale_parameter,
                                      relative_step, warmup_init, factorize_second_moment, tf32,
                                      stochastic_rounding, skip_nonfinite, projection,
                                      max_aspect_ratio);
  entry.state = ParamState{row_second_moment, col_second_moment, second_moment, momentum};
  entry.layout = check_step_inputs(param, grad, row_second_moment, col_second_moment,
                                   second_moment, momentum, entry.options);
  attach_nonfinite_skips(entries, {param}, nonfinite_skips);
  kernel({param}, {grad}, entries);
}

template <GroupKernel kernel>
void step_group_op(at::TensorList params, at::TensorList grads, at::TensorList states,
                   at::IntArrayRef steps, at::IntArrayRef seeds, double lr, double beta1,
                   double eps1, double eps2, double clip_threshold, double decay_rate,
                   double weight_decay, int64_t rank, int64_t kappa, bool scale_parameter,
                   bool relative_step, bool warmup_init, bool factorize_second_moment, bool tf32,
                   bool stochastic_rounding, bool skip_nonfinite, c10::string_view projection,
                   const std::optional<at::Tensor>& param_norms, at::IntArrayRef norms_known,
                   const std::optional<at::Tensor>& nonfinite_skips, double max_aspect_ratio) {
  const StepOptions group = options_from_schema(
      1, 0, lr, beta1, eps1, eps2, clip_threshold, decay_rate, weight_decay, rank, kappa,
      scale_parameter, relative_step, warmup_init, factorize_second_moment, tf32,
      stochastic_rounding, skip_nonfinite, projection, max_aspect_ratio);
  std::vector<GroupEntry> entries;
  {
    RECORD_USER_SCOPE("flora::check_inputs");  // for torch.profiler: host time of the checks
    entries = check_group_inputs(params, grads, states, steps, seeds, group);
    attach_param_norms(entries, params, param_norms, norms_known);
    attach_nonfinite_skips(entries, params, nonfinite_skips);
  }
  if (!params.empty()) kernel(params, grads, entries);
}

void check_projection_output(const at::Tensor& out, int64_t seed, double scale);

// step_group_capturable_ (capturable=True): the step counts and seeds live in tensors that
// the op advances in place; `entries` come from check_group_inputs with placeholder steps
// (1) and seeds (0). A backend reads the real ones from the tensors: steps[k] is
// parameter k's count before this step, seeds[j] the seed of the j-th parameter with
// compressed momentum; lr_tensor, when defined, replaces lr. `workspace` is the backend's
// to keep what it reuses from call to call (CUDA: the plan and its tables).
using CapturableKernel = void (*)(at::TensorList params, at::TensorList grads,
                                  std::vector<GroupEntry>& entries, at::TensorList steps,
                                  at::TensorList seeds, const at::Tensor& workspace,
                                  const std::optional<at::Tensor>& lr_tensor);

// Checks steps, seeds and lr_tensor against the checked entries (0-d int64 tensors on the
// parameters' device, one a parameter and one a compressed parameter; a 0-d floating
// tensor there), before any kernel runs.
void check_capturable_inputs(at::TensorList params, const std::vector<GroupEntry>& entries,
                             at::TensorList steps, at::TensorList seeds,
                             const at::Tensor& workspace,
                             const std::optional<at::Tensor>& lr_tensor);

template <CapturableKernel kernel>
void step_group_capturable_op(at::TensorList params, at::TensorList grads, at::TensorList states,
                              at::TensorList steps, at::TensorList seeds,
                              const at::Tensor& workspace, double lr, double beta1, double eps1,
                              double eps2, double clip_threshold, double decay_rate,
                              double weight_decay, int64_t rank, int64_t kappa,
                              bool scale_parameter, bool relative_step, bool warmup_init,
                              bool factorize_second_moment, bool tf32, bool stochastic_rounding,
                              const std::optional<at::Tensor>& lr_tensor,
                              double max_aspect_ratio) {
  StepOptions group = options_from_schema(
      1, 0, lr, beta1, eps1, eps2, clip_threshold, decay_rate, weight_decay, rank, kappa,
      scale_parameter, relative_step, warmup_init, factorize_second_moment, tf32,
      stochastic_rounding, /*skip_nonfinite=*/false, "gaussian", max_aspect_ratio);
  group.capturable = true;
  const std::vector<int64_t> placeholder_steps(params.size(), 1);
  const std::vector<int64_t> placeholder_seeds(params.size(), 0);
  std::vector<GroupEntry> entries =
      check_group_inputs(params, grads, states, placeholder_steps, placeholder_seeds, group);
  for (size_t k = 0; k < entries.size(); ++k)
    TORCH_CHECK(!entries[k].state.quantized_second_moment() &&
                    !entries[k].state.quantized_momentum(),
                "flora: step_group_capturable_ takes float32 state; parameter ", k,
                " has 8-bit codes (quantization=True steps with step_group_)");
  check_capturable_inputs(params, entries, steps, seeds, workspace, lr_tensor);
  if (!params.empty()) kernel(params, grads, entries, steps, seeds, workspace, lr_tensor);
}

// What a backend that reads the tensors on the host (CPU) runs for step_group_capturable_:
// each step count and seed into the entries, `kernel`, then the counts and seeds advanced
// as the Python optimizer advances its ints.
void capturable_on_host(GroupKernel kernel, at::TensorList params, at::TensorList grads,
                        std::vector<GroupEntry>& entries, at::TensorList steps,
                        at::TensorList seeds, const std::optional<at::Tensor>& lr_tensor);
}  // namespace detail

}  // namespace flora
