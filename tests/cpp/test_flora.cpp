// Tests of the LibTorch optimizer flora::Flora (csrc/include/flora/flora.h), run by ctest:
// one ctest test per FLORA_TEST below (`flora_cpp_tests <name>`; no name runs them all).
//
// `flora_cpp_tests trajectory <scenario>` prints the parameters and state after the scenario's
// steps (tests/cpp_cases.py); tests/test_cpp.py runs the same in Python and compares bitwise.
#include "flora/flora.h"

#include "flora_test.h"
#include "reference_values.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/util/accumulate.h>
#include <c10/util/irange.h>
#include <torch/cuda.h>
#include <torch/optim/schedulers/step_lr.h>
#include <torch/serialize.h>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

using flora::Flora;
using flora::FloraOptions;
using flora::FloraParamState;
using torch::optim::OptimizerParamGroup;

// ----------------------------------------------------------------------------- inputs
// The formulas of tests/cpp_cases.py, with the same ops, so Python gets the same tensors.

at::Tensor initial_param(int64_t k, at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  const int64_t numel = c10::multiply_integers(shape);
  return at::arange(numel, at::kDouble)
      .mul(0.37 + 0.11 * k)
      .sin()
      .mul(0.5)
      .reshape(shape)
      .to(dtype)
      .set_requires_grad(true);
}

at::Tensor gradient(int64_t k, int64_t t, at::IntArrayRef shape,
                    at::ScalarType dtype = at::kFloat) {
  const int64_t numel = c10::multiply_integers(shape);
  return at::arange(numel, at::kDouble)
      .mul(0.91 + 0.07 * k + 0.013 * t)
      .cos()
      .mul(1.0 + 0.1 * t)
      .reshape(shape)
      .to(dtype);
}

// Sets the step-t gradient of every parameter (numbered from 0 in the given order); with
// skip > 0, parameter k has none when (k + t) % skip == 0 (cpp_cases.has_gradient).
void set_gradients(const std::vector<at::Tensor>& params, int64_t t, int64_t skip = 0) {
  for (const auto k : c10::irange(params.size())) {
    at::Tensor p = params[k];
    if (skip > 0 && (static_cast<int64_t>(k) + t) % skip == 0) {
      p.mutable_grad() = at::Tensor();
      continue;
    }
    p.mutable_grad() = gradient(static_cast<int64_t>(k), t, p.sizes(), p.scalar_type())
                           .to(p.device());
  }
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const auto& p : params) out.push_back(p.detach().clone().set_requires_grad(true));
  return out;
}

bool same_tensors(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (const auto i : c10::irange(a.size())) {
    if (!a[i].cpu().equal(b[i].cpu())) return false;
  }
  return true;
}

// torch.ops.flora.next_seed, as C++ code outside the library can call it.
int64_t next_seed(int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::next_seed", "")
                       .typed<int64_t(int64_t)>();
  return op.call(seed);
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("flora_cpp_tests_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// ------------------------------------------------------------------------ scenarios
struct Scenario {
  FloraOptions defaults;
  // Per group: (shape, dtype) of each parameter and the group's own options, if any.
  std::vector<std::pair<std::vector<std::pair<std::vector<int64_t>, at::ScalarType>>,
                        std::optional<FloraOptions>>>
      groups;
  int64_t steps = 0;
  int64_t skip = 0;  // see set_gradients
};

const char* const kScenarios[] = {"compressed", "relative_step", "half",  "groups",
                                  "quantized",  "orthogonal",    "aspect"};

// The SCENARIOS of tests/cpp_cases.py.
Scenario scenario(const std::string& name) {
  Scenario s;
  if (name == "compressed") {
    s.defaults = FloraOptions(1e-2).beta1(0.9).rank(4).kappa(3).seed(7);
    s.groups.push_back({{{{16, 40}, at::kFloat}, {{40, 16}, at::kFloat}}, std::nullopt});
    s.groups.push_back(
        {{{{37}, at::kFloat}, {{8, 64}, at::kFloat}, {{12, 20}, at::kBFloat16}},
         FloraOptions().weight_decay(0.1).kappa(2)});
    s.steps = 7;
  } else if (name == "relative_step") {
    s.defaults = FloraOptions()
                     .relative_step(true)
                     .warmup_init(true)
                     .scale_parameter(false)
                     .clip_threshold(0.5)
                     .decay_rate(-0.5)
                     .eps1(1e-20)
                     .eps2(1e-2)
                     .factorize_second_moment(false)
                     .rank(2);
    s.groups.push_back({{{{16, 40}, at::kFloat}, {{7}, at::kFloat}}, std::nullopt});
    s.steps = 5;
  } else if (name == "half") {
    s.defaults = FloraOptions(5e-2).beta1(0.8).rank(8).kappa(1).seed(100);
    s.groups.push_back({{{{24, 24}, at::kHalf}, {{10, 3}, at::kHalf}}, std::nullopt});
    s.steps = 4;
  } else if (name == "groups") {
    s.defaults = FloraOptions(2e-2).beta1(0.9).rank(3).kappa(2).seed(11);
    s.groups.push_back({{{{12, 30}, at::kFloat},
                         {{30, 12}, at::kBFloat16},
                         {{50}, at::kFloat},
                         {{4, 40}, at::kFloat}},
                        std::nullopt});
    s.groups.push_back(
        {{{{16, 16}, at::kHalf}, {{9}, at::kBFloat16}, {{20, 10}, at::kFloat}},
         FloraOptions().rank(5).kappa(3).weight_decay(0.05).clip_threshold(0.5)});
    s.groups.push_back(
        {{{{24, 8}, at::kFloat}, {{6, 7}, at::kBFloat16}},
         FloraOptions(1e-2).factorize_second_moment(false).stochastic_rounding(true)});
    s.groups.push_back({{{{10, 10}, at::kFloat}, {{5}, at::kHalf}},
                        FloraOptions().beta1(0.0).decay_rate(-0.5).scale_parameter(false)});
    s.steps = 9;
    s.skip = 5;
  } else if (name == "quantized") {
    s.defaults = FloraOptions(1e-2).beta1(0.9).rank(4).kappa(3).seed(5).quantization(true);
    s.groups.push_back(
        {{{{16, 40}, at::kFloat}, {{40, 16}, at::kFloat}, {{300}, at::kFloat}}, std::nullopt});
    s.groups.push_back(
        {{{{24, 30}, at::kBFloat16}, {{9}, at::kBFloat16}, {{20, 10}, at::kFloat}},
         FloraOptions().factorize_second_moment(false).stochastic_rounding(true).kappa(2)});
    s.groups.push_back({{{{10, 10}, at::kFloat}, {{70}, at::kFloat}}, FloraOptions().beta1(0.0)});
    s.groups.push_back(
        {{{{24, 30}, at::kBFloat16}, {{30, 24}, at::kBFloat16}, {{16, 40}, at::kBFloat16}},
         FloraOptions().stochastic_rounding(true)});
    s.steps = 6;
    s.skip = 4;
  } else if (name == "orthogonal") {
    s.defaults = FloraOptions(2e-2).beta1(0.9).rank(4).kappa(2).seed(3).projection("orthogonal");
    s.groups.push_back({{{{16, 40}, at::kFloat},
                         {{40, 16}, at::kFloat},
                         {{24, 24}, at::kBFloat16},
                         {{8, 64}, at::kFloat},
                         {{9}, at::kFloat}},
                        std::nullopt});
    s.groups.push_back({{{{12, 30}, at::kFloat}}, FloraOptions().projection("gaussian")});
    s.steps = 7;
  } else if (name == "aspect") {
    // max_aspect_ratio 0 is Python's None: no limit
    s.defaults = FloraOptions(2e-2).beta1(0.9).rank(4).kappa(2).seed(9).max_aspect_ratio(0.0);
    s.groups.push_back(
        {{{{8, 64}, at::kFloat}, {{64, 8}, at::kFloat}, {{12, 30}, at::kFloat}}, std::nullopt});
    s.groups.push_back({{{{8, 64}, at::kFloat}, {{8, 33}, at::kFloat}},
                        FloraOptions().max_aspect_ratio(4.0)});
    s.steps = 5;
  } else {
    TORCH_CHECK(false, "unknown scenario '", name,
                "' (compressed, relative_step, half, groups, quantized, orthogonal, aspect)");
  }
  return s;
}

struct Run {
  std::vector<at::Tensor> params;
  std::unique_ptr<Flora> optimizer;
  int64_t skip = 0;
};

Run start(const Scenario& s, at::Device device = at::kCPU) {
  Run run;
  std::vector<OptimizerParamGroup> groups;
  int64_t k = 0;
  for (const auto& [shapes, options] : s.groups) {
    std::vector<at::Tensor> group_params;
    for (const auto& [shape, dtype] : shapes) {
      at::Tensor p = initial_param(k++, shape, dtype).detach().to(device).set_requires_grad(true);
      group_params.push_back(p);
      run.params.push_back(p);
    }
    if (options) {
      groups.emplace_back(group_params, std::make_unique<FloraOptions>(*options));
    } else {
      groups.emplace_back(group_params);
    }
  }
  run.optimizer = std::make_unique<Flora>(groups, s.defaults);
  run.skip = s.skip;
  return run;
}

void advance(Run& run, int64_t first_step, int64_t last_step) {
  for (int64_t t = first_step; t <= last_step; ++t) {
    set_gradients(run.params, t, run.skip);
    run.optimizer->step();
  }
}

void print_values(const char* what, size_t k, const at::Tensor& t) {
  const at::Tensor values = t.detach().cpu().to(at::kDouble).contiguous();  // exact
  std::printf("%s %zu", what, k);
  const double* data = values.data_ptr<double>();
  for (const auto i : c10::irange(values.numel())) std::printf(" %a", data[i]);
  std::printf("\n");
}

int print_trajectory(const std::string& name) {
  const Scenario s = scenario(name);
  Run run = start(s);
  advance(run, 1, s.steps);
  for (const auto k : c10::irange(run.params.size())) {
    print_values("param", k, run.params[k]);
    const FloraParamState* state = run.optimizer->param_state(run.params[k]);
    TORCH_CHECK(state != nullptr, "no state for parameter ", k);
    std::printf("step %zu %lld\n", k, static_cast<long long>(state->step()));
    if (state->seed()) std::printf("seed %zu %lld\n", k, static_cast<long long>(*state->seed()));
    const std::pair<const char*, const at::Tensor*> tensors[] = {
        {"row_second_moment", &state->row_second_moment()},
        {"col_second_moment", &state->col_second_moment()},
        {"second_moment", &state->second_moment()},
        {"momentum", &state->momentum()},
        {"second_moment_absmax", &state->second_moment_absmax()},
        {"momentum_absmax", &state->momentum_absmax()}};
    for (const auto& [key, tensor] : tensors) {
      if (tensor->defined()) print_values(key, k, *tensor);
    }
  }
  return 0;
}

// ------------------------------------------------------------------------------ tests

FLORA_TEST(options_defaults_are_pythons) {
  const FloraOptions o;
  REQUIRE(!o.lr().has_value());
  REQUIRE_EQ(o.rank(), 0);
  REQUIRE_EQ(o.kappa(), 1000);
  REQUIRE_EQ(o.eps1(), 1e-30);
  REQUIRE_EQ(o.eps2(), 1e-3);
  REQUIRE_EQ(o.clip_threshold(), 1.0);
  REQUIRE_EQ(o.decay_rate(), -0.8);
  REQUIRE_EQ(o.beta1(), 0.0);
  REQUIRE_EQ(o.weight_decay(), 0.0);
  REQUIRE(o.scale_parameter());
  REQUIRE(!o.relative_step());
  REQUIRE(!o.warmup_init());
  REQUIRE(o.factorize_second_moment());
  REQUIRE_EQ(o.seed(), 0);
  REQUIRE(o.projection() == "gaussian");
  for (int bit = 0; bit < FloraOptions::kNumOptions; ++bit) REQUIRE(!o.is_set(bit));
  REQUIRE_EQ(FloraOptions(2e-3).lr().value(), 2e-3);
  REQUIRE(FloraOptions(2e-3).is_set(0));
  REQUIRE(!FloraOptions(std::nullopt).is_set(0));
}

FLORA_TEST(options_setters_chain_and_clone) {
  FloraOptions o = FloraOptions(1e-2)
                       .rank(8)
                       .kappa(5)
                       .eps1(1e-20)
                       .eps2(1e-2)
                       .clip_threshold(2.0)
                       .decay_rate(-0.5)
                       .beta1(0.95)
                       .weight_decay(0.01)
                       .scale_parameter(false)
                       .factorize_second_moment(false)
                       .seed(42);
  REQUIRE_EQ(o.lr().value(), 1e-2);
  REQUIRE_EQ(o.rank(), 8);
  REQUIRE_EQ(o.kappa(), 5);
  REQUIRE_EQ(o.eps1(), 1e-20);
  REQUIRE_EQ(o.eps2(), 1e-2);
  REQUIRE_EQ(o.clip_threshold(), 2.0);
  REQUIRE_EQ(o.decay_rate(), -0.5);
  REQUIRE_EQ(o.beta1(), 0.95);
  REQUIRE_EQ(o.weight_decay(), 0.01);
  REQUIRE(!o.scale_parameter());
  REQUIRE(!o.factorize_second_moment());
  REQUIRE_EQ(o.seed(), 42);
  REQUIRE(!o.is_set(FloraOptions::kOption_relative_step));  // untouched
  REQUIRE(!o.is_set(FloraOptions::kOption_warmup_init));
  o.validate();
  const torch::optim::OptimizerOptions& base = o;
  const std::unique_ptr<torch::optim::OptimizerOptions> copy = base.clone();
  const auto* flora_copy = dynamic_cast<const FloraOptions*>(copy.get());
  REQUIRE(flora_copy != nullptr);
  REQUIRE(*flora_copy == o);
  REQUIRE(!(*flora_copy == FloraOptions(1e-2)));
  REQUIRE_EQ(o.get_lr(), 1e-2);
  o.set_lr(0.5);
  REQUIRE_EQ(o.lr().value(), 0.5);
  REQUIRE_THROWS_WITH(FloraOptions().relative_step(true).get_lr(), "lr is unset");
}

FLORA_TEST(bad_options_are_rejected_with_the_option_named) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<std::pair<FloraOptions, std::string>> cases = {
      {FloraOptions(1e-3).kappa(0), "flora: kappa must be >= 1, got 0"},
      {FloraOptions(-1.0), "flora: lr must be finite and >= 0, got -1"},
      {FloraOptions(nan), "flora: lr must be finite"},
      {FloraOptions(), "flora: lr is required unless relative_step=true; param group 0 has none"},
      {FloraOptions(1e-3).relative_step(true), "are exclusive"},
      {FloraOptions(1e-3).warmup_init(true), "warmup_init=true requires relative_step=true"},
      {FloraOptions(1e-3).rank(-1), "flora: rank must be >= 0, got -1"},
      {FloraOptions(1e-3).beta1(1.0), "flora: beta1 must be in [0, 1), got 1"},
      {FloraOptions(1e-3).beta1(-0.1), "flora: beta1 must be in [0, 1)"},
      {FloraOptions(1e-3).eps1(-1.0), "flora: eps1 must be finite and >= 2^-126"},
      // a zero gradient row would give 0 / 0: eps1 must survive in float32, denormals flushed
      {FloraOptions(1e-3).eps1(0.0), "flora: eps1 must be finite and >= 2^-126 (float32's "
                                     "smallest normal, about 1.2e-38), got 0"},
      {FloraOptions(1e-3).eps1(1e-40), "flora: eps1 must be finite and >= 2^-126"},
      {FloraOptions(1e-3).eps2(nan), "flora: eps2 must be finite and >= 0"},
      {FloraOptions(1e-3).clip_threshold(0.0), "flora: clip_threshold must be finite and > 0"},
      {FloraOptions(1e-3).clip_threshold(inf), "flora: clip_threshold must be finite"},
      {FloraOptions(1e-3).decay_rate(0.5), "flora: decay_rate must be finite and <= 0"},
      {FloraOptions(1e-3).weight_decay(-0.1), "flora: weight_decay must be finite and >= 0"},
      {FloraOptions(1e-3).seed(-1), "flora: seed must be in [0, 2^62], got -1"},
      {FloraOptions(1e-3).seed((int64_t{1} << 62) + 1), "flora: seed must be in [0, 2^62]"},
      {FloraOptions(1e-3).projection("qr"),
       "flora: projection must be \"gaussian\" or \"orthogonal\", got \"qr\""},
      {FloraOptions(1e-3).capturable(true),
       "flora: capturable=true is not supported by the C++ flora::Flora"},
      {FloraOptions(1e-3).max_aspect_ratio(0.5),
       "flora: max_aspect_ratio must be 0 (no limit) or a finite value >= 1, got 0.5"},
      {FloraOptions(1e-3).max_aspect_ratio(inf), "flora: max_aspect_ratio must be 0"},
  };
  for (const auto& [options, message] : cases) {
    std::vector<at::Tensor> params = {initial_param(0, {3, 3})};
    REQUIRE_THROWS_WITH((void)Flora(params, options), message);
    // ... and as the options of a param group, which is then not added
    Flora optimizer(params, FloraOptions(1e-3));
    std::vector<at::Tensor> more = {initial_param(1, {3})};
    FloraOptions group_options = options;
    if (!options.lr().has_value() && !options.relative_step()) continue;  // inherits lr
    REQUIRE_THROWS_WITH(
        optimizer.add_param_group(
            OptimizerParamGroup(more, std::make_unique<FloraOptions>(group_options))),
        message);
    REQUIRE_EQ(optimizer.param_groups().size(), size_t{1});
  }
}

FLORA_TEST(lr_may_be_set_by_every_param_group_instead_of_the_defaults) {
  // As torch.optim and Python's Flora: defaults without lr, each group with its own.
  std::vector<at::Tensor> a = {initial_param(0, {6, 8})};
  std::vector<at::Tensor> b = {initial_param(1, {6, 8})};
  std::vector<OptimizerParamGroup> groups;
  groups.emplace_back(a, std::make_unique<FloraOptions>(FloraOptions(1e-2)));
  groups.emplace_back(b, std::make_unique<FloraOptions>(FloraOptions().relative_step(true)));
  Flora optimizer(groups, FloraOptions().beta1(0.9));
  REQUIRE(!optimizer.defaults_options().lr().has_value());
  REQUIRE_EQ(optimizer.group_options(0).lr().value(), 1e-2);
  REQUIRE(!optimizer.group_options(1).lr().has_value());
  set_gradients({a[0], b[0]}, 1);
  const at::Tensor a0 = a[0].detach().clone();
  const at::Tensor b0 = b[0].detach().clone();
  optimizer.step();
  REQUIRE(!a[0].equal(a0));
  REQUIRE(!b[0].equal(b0));
  // A group that gets no lr from anywhere is named, and not added.
  std::vector<at::Tensor> c = {initial_param(2, {6, 8})};
  REQUIRE_THROWS_WITH(optimizer.add_param_group(OptimizerParamGroup(c)),
                      "flora: lr is required unless relative_step=true; param group 2 has none");
  REQUIRE_EQ(optimizer.param_groups().size(), size_t{2});
  // The other defaults are still checked in the constructor.
  REQUIRE_THROWS_WITH((void)Flora(groups, FloraOptions().kappa(0)),
                      "flora: kappa must be >= 1, got 0");
  std::vector<OptimizerParamGroup> second_without_lr;
  second_without_lr.emplace_back(a, std::make_unique<FloraOptions>(FloraOptions(1e-2)));
  second_without_lr.emplace_back(b);
  REQUIRE_THROWS_WITH((void)Flora(second_without_lr, FloraOptions()),
                      "flora: lr is required unless relative_step=true; param group 1 has none");
}

FLORA_TEST(bad_parameters_are_rejected) {
  const at::Tensor double_param = at::zeros({3}, at::kDouble).set_requires_grad(true);
  REQUIRE_THROWS_WITH((void)Flora({double_param}, FloraOptions(1e-3)),
                    "flora: parameters must be float32, float16 or bfloat16, got a parameter "
                    "of dtype Double");
  at::Tensor p = initial_param(0, {4, 4});
  REQUIRE_THROWS_WITH(
      (void)Flora({OptimizerParamGroup({p}), OptimizerParamGroup({p})}, FloraOptions(1e-3)),
                    "flora: some parameters appear in more than one parameter group");
  Flora optimizer({p}, FloraOptions(1e-3));
  REQUIRE_THROWS_WITH(optimizer.add_param_group(OptimizerParamGroup({p})),
                    "more than one parameter group");
  REQUIRE_EQ(optimizer.param_groups().size(), size_t{1});
}

FLORA_TEST(param_groups_take_unset_options_from_the_defaults) {
  // As in Python: a group's options override what they set and inherit the rest.
  std::vector<at::Tensor> a = {initial_param(0, {16, 40})};
  std::vector<at::Tensor> b = {initial_param(1, {16, 40})};
  std::vector<at::Tensor> c = {initial_param(2, {16, 40})};
  std::vector<OptimizerParamGroup> groups;
  groups.emplace_back(a);
  groups.emplace_back(b, std::make_unique<FloraOptions>(FloraOptions().rank(8).kappa(2)));
  groups.emplace_back(c, std::make_unique<FloraOptions>(FloraOptions().beta1(0.0)));
  Flora optimizer(groups, FloraOptions(1e-2).beta1(0.9).rank(4).seed(10));
  REQUIRE_EQ(optimizer.group_options(1).rank(), 8);
  REQUIRE_EQ(optimizer.group_options(1).kappa(), 2);
  REQUIRE_EQ(optimizer.group_options(1).lr().value(), 1e-2);
  REQUIRE_EQ(optimizer.group_options(1).beta1(), 0.9);
  REQUIRE_EQ(optimizer.group_options(2).beta1(), 0.0);
  REQUIRE_EQ(optimizer.group_options(2).rank(), 4);
  std::vector<at::Tensor> late = {initial_param(3, {16, 40})};
  optimizer.add_param_group(
      OptimizerParamGroup(late, std::make_unique<FloraOptions>(FloraOptions().seed(100))));
  std::vector<at::Tensor> all = {a[0], b[0], c[0], late[0]};
  set_gradients(all, 1);
  optimizer.step();
  REQUIRE(optimizer.param_state(a[0])->momentum().sizes() == at::IntArrayRef({4, 40}));
  REQUIRE_EQ(optimizer.param_state(a[0])->seed().value(), 11);  // seed + parameter number
  REQUIRE(optimizer.param_state(b[0])->momentum().sizes() == at::IntArrayRef({8, 40}));
  REQUIRE_EQ(optimizer.param_state(b[0])->seed().value(), 12);
  REQUIRE(!optimizer.param_state(c[0])->momentum().defined());
  REQUIRE(!optimizer.param_state(c[0])->seed().has_value());
  REQUIRE_EQ(optimizer.param_state(late[0])->seed().value(), 104);
}

FLORA_TEST(seeds_advance_every_kappa_steps) {
  std::vector<at::Tensor> params = {initial_param(0, {16, 40}), initial_param(1, {40, 16}),
                                    initial_param(2, {10})};
  Flora optimizer(params, FloraOptions(1e-2).beta1(0.9).rank(4).kappa(3).seed(10));
  for (int64_t t = 1; t <= 7; ++t) {
    set_gradients(params, t);
    optimizer.step();
    int64_t expected = 11;
    for (int64_t resampled = 0; resampled < t / 3; ++resampled) expected = next_seed(expected);
    REQUIRE_EQ(optimizer.param_state(params[0])->seed().value(), expected);
    REQUIRE_EQ(optimizer.param_state(params[0])->step(), t);
  }
  REQUIRE_EQ(optimizer.param_state(params[1])->seed().value(), next_seed(next_seed(12)));
  REQUIRE(!optimizer.param_state(params[2])->seed().has_value());  // 1-D: dense momentum
  REQUIRE(optimizer.param_state(params[2])->momentum().sizes() == at::IntArrayRef({10}));
}

// The step ops (flora::step_, flora::step_group_) that `body` calls, in order (RecordFunction
// sees every dispatcher call of this thread; the kernels' own calls of other ops are left out).
template <typename Body>
std::vector<std::string> step_op_calls(Body body) {
  static thread_local std::vector<std::string>* calls = nullptr;
  std::vector<std::string> seen;
  calls = &seen;
  const at::CallbackHandle handle = at::addThreadLocalCallback(
      at::RecordFunctionCallback(
          [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
            const std::string name = fn.name();
            if (calls != nullptr && name.rfind("flora::step", 0) == 0) calls->push_back(name);
            return nullptr;
          })
          .scopes({at::RecordScope::FUNCTION}));
  try {
    body();
  } catch (...) {
    at::removeCallback(handle);
    calls = nullptr;
    throw;
  }
  at::removeCallback(handle);
  calls = nullptr;
  return seen;
}

FLORA_TEST(step_makes_one_step_group_call_per_group_and_device) {
  // As flora_ext.Flora: the parameters of a group on one device go through one call.
  const Scenario s = scenario("groups");
  Run run = start(s);
  set_gradients(run.params, 1, s.skip);
  const std::vector<std::string> calls = step_op_calls([&] { run.optimizer->step(); });
  REQUIRE_EQ(calls.size(), s.groups.size());
  for (const auto& name : calls) REQUIRE_EQ(name, std::string("flora::step_group_"));
  // A group without any gradient makes no call.
  for (size_t k = 0; k < 4; ++k) run.params[k].mutable_grad() = at::Tensor();
  REQUIRE_EQ(step_op_calls([&] { run.optimizer->step(); }).size(), s.groups.size() - 1);

  if (!flora::cuda_compiled() || !torch::cuda::is_available()) return;
  // A group over two devices: one call per device, the same step as on one device.
  Run cpu = start(s);
  Run mixed = start(s);
  cpu.skip = mixed.skip = 0;
  for (size_t k = 0; k < mixed.params.size(); k += 2) {
    mixed.params[k] = mixed.params[k].detach().to(at::kCUDA).set_requires_grad(true);
  }
  std::vector<OptimizerParamGroup> groups;
  groups.emplace_back(mixed.params);
  FloraOptions options = s.defaults;
  options.tf32(false);
  mixed.optimizer = std::make_unique<Flora>(groups, options);
  groups.clear();
  groups.emplace_back(cpu.params);
  cpu.optimizer = std::make_unique<Flora>(groups, options);
  set_gradients(mixed.params, 1);
  const std::vector<std::string> mixed_calls =
      step_op_calls([&] { mixed.optimizer->step(); });
  REQUIRE_EQ(mixed_calls.size(), size_t{2});
  advance(mixed, 2, 4);
  advance(cpu, 1, 4);
  for (size_t k = 0; k < cpu.params.size(); ++k) {
    const at::Tensor a = mixed.params[k].detach().cpu().to(at::kDouble);
    const at::Tensor b = cpu.params[k].detach().to(at::kDouble);
    const double err = (a - b).norm().item<double>() / b.norm().item<double>();
    REQUIRE(err < (cpu.params[k].scalar_type() == at::kFloat ? 1e-5 : 1e-2));
    REQUIRE(mixed.optimizer->param_state(mixed.params[k])->seed() ==
            cpu.optimizer->param_state(cpu.params[k])->seed());
  }
}

FLORA_TEST(reference_step) {
  // tests/reference.py (docs/FLORA.md in float64) for the same inputs: reference_values.h.
  namespace ref = flora_test::reference;
  std::vector<at::Tensor> params;
  for (const auto k : c10::irange(ref::kShapes.size())) {
    params.push_back(initial_param(static_cast<int64_t>(k), ref::kShapes[k]));
  }
  Flora optimizer(params, FloraOptions(ref::kLr)
                              .beta1(ref::kBeta1)
                              .rank(ref::kRank)
                              .kappa(ref::kKappa)
                              .weight_decay(ref::kWeightDecay)
                              .seed(ref::kSeed));
  for (int64_t t = 1; t <= ref::kSteps; ++t) {
    set_gradients(params, t);
    optimizer.step();
  }
  auto rel_err = [](const at::Tensor& got, const at::Tensor& want) {
    TORCH_CHECK(got.numel() == want.numel(), "size ", got.numel(), " vs ", want.numel());
    const at::Tensor a = got.detach().to(at::kDouble).flatten();
    const at::Tensor b = want.detach().to(at::kDouble).flatten();
    return (a - b).norm().item<double>() / b.norm().item<double>();
  };
  auto values = [](const std::vector<double>& v) { return at::tensor(v, at::kDouble); };
  for (const auto k : c10::irange(params.size())) {
    const FloraParamState* state = optimizer.param_state(params[k]);
    const at::Tensor initial = initial_param(static_cast<int64_t>(k), ref::kShapes[k]);
    const at::Tensor expected = values(ref::kParams[k]);
    // The update itself (not only the parameter, which the update changes by ~10%)
    const at::Tensor initial_values = initial.flatten().to(at::kDouble);
    const double update_err =
        rel_err(params[k].flatten() - initial_values, expected - initial_values);
    const double momentum_err = rel_err(state->momentum(), values(ref::kMomenta[k]));
    std::printf("parameter %zu: rel err %.2e (param), %.2e (update), %.2e (momentum)\n", k,
                rel_err(params[k], expected), update_err, momentum_err);
    REQUIRE(rel_err(params[k], expected) < 1e-5);
    REQUIRE(update_err < 1e-4);
    REQUIRE(momentum_err < 1e-5);
    REQUIRE_EQ(state->seed().value_or(-1), ref::kSeeds[k]);
    REQUIRE_EQ(state->step(), int64_t{ref::kSteps});
    REQUIRE(rel_err(initial, expected) > 1e-2);  // the steps moved the parameter
  }
}

FLORA_TEST(bad_gradient_rejects_the_whole_step) {
  std::vector<at::Tensor> params = {initial_param(0, {16, 40}), initial_param(1, {10, 4})};
  Flora optimizer(params, FloraOptions(1e-2).beta1(0.9).rank(4));
  set_gradients(params, 1);
  optimizer.step();
  // A deep copy: the optimizer's state tensors are updated in place.
  FloraParamState saved_state = *optimizer.param_state(params[0]);
  saved_state.momentum(saved_state.momentum().clone());
  saved_state.row_second_moment(saved_state.row_second_moment().clone());
  saved_state.col_second_moment(saved_state.col_second_moment().clone());
  const std::vector<at::Tensor> saved_params = clones(params);
  const std::vector<std::pair<at::Tensor, std::string>> bad_grads = {
      {gradient(1, 2, {10, 4}).to_sparse(), "flora: sparse gradients are not supported"},
      {gradient(1, 2, {10, 4}, at::kDouble), "flora: grad must have dtype Float"},
      {gradient(1, 2, {4, 10}), "flora: grad must have shape [10, 4]"},
      {at::zeros({10, 4}, at::kComplexFloat), "flora: complex gradients are not supported"},
  };
  for (const auto& [grad, message] : bad_grads) {
    params[0].mutable_grad() = gradient(0, 2, {16, 40});
    params[1].mutable_grad() = grad;
    REQUIRE_THROWS_WITH(optimizer.step(), message);
    REQUIRE(same_tensors(params, saved_params));
    REQUIRE(*optimizer.param_state(params[0]) == saved_state);
  }
  // A parameter stepped for the first time gets no state from a rejected step either.
  std::vector<at::Tensor> fresh = {initial_param(2, {8, 8}), initial_param(3, {3})};
  Flora second(fresh, FloraOptions(1e-2));
  fresh[0].mutable_grad() = gradient(2, 1, {8, 8});
  fresh[1].mutable_grad() = gradient(3, 1, {4});
  REQUIRE_THROWS_WITH(second.step(), "flora: grad must have shape [3]");
  REQUIRE(second.param_state(fresh[0]) == nullptr);
  REQUIRE(second.state().empty());
}

FLORA_TEST(skip_nonfinite_keeps_the_parameter_and_counts_the_skip) {
  // Compressed momentum with kappa 2: the skipped second step moves the momentum to the
  // next basis (docs/FLORA.md §4.8) and leaves the rest; the other parameter steps.
  std::vector<at::Tensor> params = {initial_param(0, {16, 40}), initial_param(1, {10, 4})};
  Flora optimizer(params, FloraOptions(1e-2).beta1(0.9).rank(4).kappa(2).skip_nonfinite(true));
  const at::Device cpu(at::kCPU);
  REQUIRE_EQ(optimizer.nonfinite_skips(cpu).item<int64_t>(), 0);
  set_gradients(params, 1);
  optimizer.step();
  const std::vector<at::Tensor> saved = clones(params);
  const FloraParamState& state = *optimizer.param_state(params[0]);
  const at::Tensor row = state.row_second_moment().clone();
  const at::Tensor momentum = state.momentum().clone();
  const int64_t seed = *state.seed();
  set_gradients(params, 2);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  params[0].mutable_grad().select(0, 3).select(0, 5).fill_(nan);
  optimizer.step();
  REQUIRE(params[0].equal(saved[0]));
  REQUIRE(!params[1].equal(saved[1]));
  REQUIRE(at::isfinite(params[1]).all().item<bool>());
  REQUIRE_EQ(state.step(), 2);
  REQUIRE(state.row_second_moment().equal(row));
  REQUIRE_EQ(*state.seed(), next_seed(seed));
  REQUIRE(!state.momentum().equal(momentum));
  REQUIRE(at::isfinite(state.momentum()).all().item<bool>());
  REQUIRE_EQ(optimizer.nonfinite_skips(cpu).item<int64_t>(), 1);
  set_gradients(params, 3);
  optimizer.step();
  REQUIRE(!params[0].equal(saved[0]));
  REQUIRE_EQ(optimizer.nonfinite_skips(cpu).item<int64_t>(), 1);
}

FLORA_TEST(changed_options_that_break_the_state_are_reported_before_any_write) {
  std::vector<at::Tensor> params = {initial_param(0, {16, 40})};
  Flora optimizer(params, FloraOptions(1e-2).beta1(0.9).rank(4));
  set_gradients(params, 1);
  optimizer.step();
  const std::vector<at::Tensor> saved = clones(params);
  optimizer.group_options(0).rank(8);
  REQUIRE_THROWS_WITH(optimizer.step(), "flora: momentum must have shape [8, 40]");
  REQUIRE(same_tensors(params, saved));
  optimizer.group_options(0).rank(4).kappa(0);
  REQUIRE_THROWS_WITH(optimizer.step(), "flora: kappa must be >= 1, got 0");
  optimizer.group_options(0).kappa(1000).beta1(0.0);
  REQUIRE_THROWS_WITH(optimizer.step(), "must have no seed");
  REQUIRE(same_tensors(params, saved));
  REQUIRE_EQ(optimizer.param_state(params[0])->step(), 1);
}

FLORA_TEST(step_with_closure_returns_the_loss_and_keeps_gradients) {
  at::Tensor w = initial_param(0, {4, 8});
  Flora optimizer({w}, FloraOptions(1e-2).beta1(0.9).rank(2));
  const at::Tensor x = initial_param(1, {16, 8}).detach();
  const at::Tensor loss = optimizer.step([&] {
    optimizer.zero_grad();
    at::Tensor l = at::matmul(x, w.t()).pow(2).mean();
    l.backward();
    return l;
  });
  REQUIRE(loss.defined() && loss.item<double>() > 0.0);
  REQUIRE(w.grad().defined());
  REQUIRE_EQ(optimizer.param_state(w)->step(), 1);
  REQUIRE(!optimizer.step().defined());  // no closure: no loss, the kept gradient steps again
  REQUIRE_EQ(optimizer.param_state(w)->step(), 2);
  optimizer.zero_grad();
  REQUIRE(!w.grad().defined());
}

FLORA_TEST(training_reduces_the_loss) {
  at::Tensor w1 = (initial_param(0, {32, 16}) * 0.5).detach().set_requires_grad(true);
  at::Tensor w2 = (initial_param(1, {1, 32}) * 0.5).detach().set_requires_grad(true);
  Flora optimizer({w1, w2}, FloraOptions(3e-2).beta1(0.9).rank(8).kappa(10));
  const at::Tensor x = initial_param(2, {256, 16}).detach();
  const at::Tensor y = x.select(1, 0).mul(x.select(1, 1)).unsqueeze(1);
  double first = 0.0, last = 0.0;
  for (int i = 0; i < 60; ++i) {
    optimizer.zero_grad();
    at::Tensor loss = at::matmul(at::tanh(at::matmul(x, w1.t())), w2.t()).sub(y).pow(2).mean();
    loss.backward();
    optimizer.step();
    (i == 0 ? first : last) = loss.item<double>();
  }
  std::printf("loss %.4f -> %.4f\n", first, last);
  REQUIRE(last < 0.5 * first);
}

FLORA_TEST(lr_scheduler_sets_the_step_size) {
  std::vector<at::Tensor> params = {initial_param(0, {16, 40})};
  Flora optimizer(params, FloraOptions(1e-2).beta1(0.9).rank(4));
  torch::optim::StepLR scheduler(optimizer, /*step_size=*/1, /*gamma=*/0.0);
  set_gradients(params, 1);
  optimizer.step();
  scheduler.step();  // LibTorch's StepLR decays from its second step() on
  scheduler.step();
  REQUIRE_EQ(optimizer.group_options(0).lr().value(), 0.0);
  const std::vector<at::Tensor> before = clones(params);
  set_gradients(params, 2);
  optimizer.step();
  REQUIRE(same_tensors(params, before));  // lr 0: the parameters stay, the state moves on
  REQUIRE_EQ(optimizer.param_state(params[0])->step(), 2);
}

FLORA_TEST(save_and_load_resume_bitwise) {
  for (const char* name : kScenarios) {
    const Scenario s = scenario(name);
    Run reference = start(s);
    advance(reference, 1, s.steps);

    Run first = start(s);
    advance(first, 1, 3);
    const std::string path = temp_path(std::string(name) + ".pt");
    torch::save(*first.optimizer, path);
    // A new optimizer, built with other options, over copies of the parameters.
    Run resumed;
    resumed.params = clones(first.params);
    resumed.skip = s.skip;
    Scenario other = s;
    other.defaults.lr(std::nullopt).relative_step(true).kappa(999);
    for (auto& group : other.groups) group.second = std::nullopt;
    std::vector<OptimizerParamGroup> groups;
    size_t k = 0;
    for (const auto& group : s.groups) {
      std::vector<at::Tensor> group_params(resumed.params.begin() + k,
                                           resumed.params.begin() + k + group.first.size());
      k += group.first.size();
      groups.emplace_back(group_params);
    }
    resumed.optimizer = std::make_unique<Flora>(groups, other.defaults);
    torch::load(*resumed.optimizer, path);
    std::filesystem::remove(path);
    for (size_t g = 0; g < groups.size(); ++g) {
      REQUIRE(resumed.optimizer->group_options(g) == first.optimizer->group_options(g));
    }
    for (size_t i = 0; i < resumed.params.size(); ++i) {
      REQUIRE(*resumed.optimizer->param_state(resumed.params[i]) ==
            *first.optimizer->param_state(first.params[i]));
    }
    advance(resumed, 4, s.steps);
    REQUIRE(same_tensors(resumed.params, reference.params));
    for (size_t i = 0; i < resumed.params.size(); ++i) {
      REQUIRE(*resumed.optimizer->param_state(resumed.params[i]) ==
            *reference.optimizer->param_state(reference.params[i]));
    }
  }
}

FLORA_TEST(load_rejects_a_state_that_does_not_fit_and_changes_nothing) {
  std::vector<at::Tensor> saved_params = {initial_param(0, {16, 40})};
  Flora source(saved_params, FloraOptions(1e-2).beta1(0.9).rank(4));
  set_gradients(saved_params, 1);
  source.step();
  const std::string path = temp_path("source.pt");
  torch::save(source, path);

  struct Case {
    std::vector<int64_t> shape;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{40, 16}, "flora: the loaded state of parameter 1 (param group 0) does not fit it"},
      {{640}, "must have no seed"},
  };
  for (const auto& c : cases) {
    std::vector<at::Tensor> params = {initial_param(0, c.shape)};
    Flora target(params, FloraOptions(5e-3).beta1(0.5).rank(2).kappa(7));
    set_gradients(params, 1);
    target.step();
    const FloraParamState before = *target.param_state(params[0]);
    const FloraOptions options_before = target.group_options(0);
    REQUIRE_THROWS_WITH(torch::load(target, path), c.message);
    REQUIRE(*target.param_state(params[0]) == before);
    REQUIRE(target.group_options(0) == options_before);
  }
  std::vector<at::Tensor> two = {initial_param(0, {16, 40}), initial_param(1, {3})};
  Flora target(two, FloraOptions(1e-2));
  REQUIRE_THROWS_WITH(torch::load(target, path), "different size");
  std::filesystem::remove(path);
}

// ------------------------------------------------------------ quantization (8-bit state)

// Float values of 8-bit state, and the 8-bit form of float values: the format's ops.
at::Tensor dequantized(const at::Tensor& codes, const at::Tensor& absmax, bool is_signed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::dequantize_blockwise_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   bool)>();
  at::Tensor values = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  op.call(codes, absmax, values, is_signed);
  return values;
}

std::pair<at::Tensor, at::Tensor> quantized(const at::Tensor& values, bool is_signed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::quantize_blockwise_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   bool)>();
  at::Tensor codes = at::empty(values.sizes(), values.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(values.numel() + 255) / 256}, values.options());
  op.call(values, codes, absmax, is_signed);
  return {codes, absmax};
}

FloraParamState& mutable_state(Flora& optimizer, const at::Tensor& param) {
  return static_cast<FloraParamState&>(*optimizer.state().at(param.unsafeGetTensorImpl()));
}

FLORA_TEST(quantization_keeps_8_bit_state_and_steps_as_float_from_zero) {
  // Compressed momentum (factored second moment) and a 1-D parameter (dense momentum,
  // unfactored second moment: both 8-bit).
  const FloraOptions options = FloraOptions(1e-2).beta1(0.9).rank(4);
  std::vector<at::Tensor> params = {initial_param(0, {16, 40}), initial_param(1, {300})};
  std::vector<at::Tensor> float_params = clones(params);
  Flora q(params, FloraOptions(options).quantization(true));
  Flora f(float_params, options);
  REQUIRE(q.defaults_options().quantization() && q.group_options(0).quantization());
  REQUIRE(!f.group_options(0).quantization());
  set_gradients(params, 1);
  set_gradients(float_params, 1);
  q.step();
  f.step();
  // A fresh state reads back exact zeros: the first step is the float step, bitwise, and
  // the 8-bit state is the float state quantized.
  REQUIRE(same_tensors(params, float_params));
  for (size_t k = 0; k < params.size(); ++k) {
    const FloraParamState& qs = *q.param_state(params[k]);
    const FloraParamState& fs = *f.param_state(float_params[k]);
    REQUIRE_EQ(qs.momentum().scalar_type(), at::kByte);
    REQUIRE(qs.momentum().sizes() == fs.momentum().sizes());
    REQUIRE_EQ(qs.momentum_absmax().scalar_type(), at::kFloat);
    const auto [codes, absmax] = quantized(fs.momentum(), true);
    REQUIRE(qs.momentum().equal(codes));
    REQUIRE(qs.momentum_absmax().equal(absmax));
    REQUIRE(!fs.momentum_absmax().defined() && !fs.second_moment_absmax().defined());
    if (k == 0) {
      REQUIRE(qs.row_second_moment().equal(fs.row_second_moment()));
      REQUIRE(qs.col_second_moment().equal(fs.col_second_moment()));
      REQUIRE(!qs.second_moment().defined() && !qs.second_moment_absmax().defined());
    } else {
      REQUIRE_EQ(qs.momentum_absmax().numel(), 2);  // 300 elements: blocks of 256
      const auto [sm_codes, sm_absmax] = quantized(fs.second_moment(), false);
      REQUIRE_EQ(qs.second_moment().scalar_type(), at::kByte);
      REQUIRE(qs.second_moment().equal(sm_codes));
      REQUIRE(qs.second_moment_absmax().equal(sm_absmax));
    }
  }
  // Later steps read rounded state: close to the float run, not equal.
  for (int64_t t = 2; t <= 5; ++t) {
    set_gradients(params, t);
    set_gradients(float_params, t);
    q.step();
    f.step();
  }
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor initial = initial_param(static_cast<int64_t>(k), params[k].sizes());
    const at::Tensor dq = (params[k] - initial).detach().to(at::kDouble);
    const at::Tensor df = (float_params[k] - initial).detach().to(at::kDouble);
    const double err = (dq - df).norm().item<double>() / df.norm().item<double>();
    std::printf("parameter %zu: 8-bit vs float32 state, update rel err %.2e\n", k, err);
    REQUIRE(err > 0.0 && err < 2e-2);
  }
}

FLORA_TEST(quantization_steps_each_group_in_one_call_on_its_codes) {
  // Every 8-bit state, compressed momentum included, goes to the op as codes: one
  // step_group_ call a group, no float32 copy of the state around it.
  Scenario s = scenario("quantized");
  s.skip = 0;
  Run run = start(s);
  set_gradients(run.params, 1);
  REQUIRE_EQ(step_op_calls([&] { run.optimizer->step(); }).size(), s.groups.size());
  for (const at::Tensor& p : run.params) {
    const FloraParamState* state = run.optimizer->param_state(p);
    if (state->momentum().defined()) REQUIRE_EQ(state->momentum().scalar_type(), at::kByte);
  }
}

FLORA_TEST(quantization_is_an_option_of_the_whole_optimizer) {
  const FloraOptions defaults;
  REQUIRE(!defaults.quantization() && !defaults.quantization_is_set());
  REQUIRE(!(FloraOptions(1e-2) == FloraOptions(1e-2).quantization(true)));
  REQUIRE(FloraOptions().merged_with(FloraOptions().quantization(true)).quantization());
  REQUIRE(FloraOptions().quantization(true).merged_with(FloraOptions()).quantization());
  std::vector<at::Tensor> a = {initial_param(0, {8, 8})}, b = {initial_param(1, {5})};
  {
    std::vector<OptimizerParamGroup> groups;
    groups.emplace_back(a);
    groups.emplace_back(b, std::make_unique<FloraOptions>(FloraOptions().quantization(true)));
    REQUIRE_THROWS_WITH(Flora bad(groups, FloraOptions(1e-2)),
                        "flora: quantization is an option of the whole optimizer, not of a "
                        "param group: param group 1 sets quantization=true, the optimizer's "
                        "defaults quantization=false");
  }
  std::vector<OptimizerParamGroup> groups;
  groups.emplace_back(a);
  groups.emplace_back(b, std::make_unique<FloraOptions>(FloraOptions().quantization(true)));
  Flora optimizer(groups, FloraOptions(1e-2).beta1(0.9).quantization(true));  // repeats it
  REQUIRE(optimizer.group_options(0).quantization() && optimizer.group_options(1).quantization());
  optimizer.group_options(1).quantization(false);
  set_gradients({a[0], b[0]}, 1);
  REQUIRE_THROWS_WITH(optimizer.step(), "flora: quantization must be the same in every param "
                                        "group (an option of the whole optimizer): param group "
                                        "1 has quantization=false");
  REQUIRE(optimizer.state().empty());
  optimizer.group_options(1).quantization(true);
  optimizer.step();
  REQUIRE_EQ(optimizer.param_state(b[0])->momentum().scalar_type(), at::kByte);
}

FLORA_TEST(quantized_state_that_does_not_fit_is_reported_before_any_write) {
  std::vector<at::Tensor> params = {initial_param(0, {16, 40}), initial_param(1, {300})};
  Flora optimizer(params, FloraOptions(1e-2).beta1(0.9).rank(4).quantization(true));
  set_gradients(params, 1);
  optimizer.step();
  const std::vector<at::Tensor> saved = clones(params);
  FloraParamState& state = mutable_state(optimizer, params[1]);
  const at::Tensor codes = state.momentum().clone(), absmax = state.momentum_absmax().clone();
  set_gradients(params, 2);
  state.momentum(codes.to(at::kFloat));
  REQUIRE_THROWS_WITH(optimizer.step(),
                      "flora: momentum must be uint8 (8-bit codes, quantization=true), got Float");
  state.momentum(codes.clone());
  state.momentum_absmax(absmax.narrow(0, 0, 1).clone());
  REQUIRE_THROWS_WITH(optimizer.step(), "flora: momentum_absmax must have shape [2]");
  state.momentum_absmax(at::Tensor());
  REQUIRE_THROWS_WITH(optimizer.step(), "flora: momentum_absmax must be given with "
                                        "quantization=true");
  state.momentum_absmax(absmax.clone());
  state.second_moment(state.second_moment().reshape({20, 15}));
  REQUIRE_THROWS_WITH(optimizer.step(), "flora: second_moment must have shape [300]");
  state.second_moment(state.second_moment().reshape({300}));
  FloraParamState& compressed = mutable_state(optimizer, params[0]);
  compressed.second_moment_absmax(absmax.clone());  // a factored second moment has none
  REQUIRE_THROWS_WITH(optimizer.step(), "flora: second_moment_absmax must be None for a "
                                        "parameter of shape [16, 40], which has no "
                                        "second_moment");
  compressed.second_moment_absmax(at::Tensor());
  REQUIRE(same_tensors(params, saved));
  REQUIRE_EQ(optimizer.param_state(params[0])->step(), 1);
  REQUIRE(state.momentum().equal(codes));
  optimizer.step();  // fits again
  REQUIRE_EQ(state.step(), 2);
  REQUIRE(!params[1].equal(saved[1]));
}

FLORA_TEST(quantization_with_skip_nonfinite_keeps_the_parameter) {
  std::vector<at::Tensor> params = {initial_param(0, {16, 40}), initial_param(1, {300})};
  Flora optimizer(params,
                  FloraOptions(1e-2).beta1(0.9).rank(4).quantization(true).skip_nonfinite(true));
  set_gradients(params, 1);
  optimizer.step();
  const std::vector<at::Tensor> saved = clones(params);
  const FloraParamState& state = *optimizer.param_state(params[1]);
  // The skipped parameter's 8-bit state stays bitwise: it is not rounded again.
  const std::vector<at::Tensor> saved_state = {
      state.momentum().clone(), state.momentum_absmax().clone(), state.second_moment().clone(),
      state.second_moment_absmax().clone()};
  set_gradients(params, 2);
  params[1].mutable_grad()[7] = std::numeric_limits<float>::infinity();
  optimizer.step();
  REQUIRE(params[1].equal(saved[1]));
  REQUIRE(!params[0].equal(saved[0]));
  REQUIRE_EQ(optimizer.nonfinite_skips(at::kCPU).item<int64_t>(), 1);
  REQUIRE(state.momentum().equal(saved_state[0]));
  REQUIRE(state.momentum_absmax().equal(saved_state[1]));
  REQUIRE(state.second_moment().equal(saved_state[2]));
  REQUIRE(state.second_moment_absmax().equal(saved_state[3]));
  REQUIRE(at::isfinite(dequantized(state.momentum(), state.momentum_absmax(), true))
              .all()
              .item<bool>());
}

FLORA_TEST(quantized_checkpoints_load_by_pythons_rules) {
  const FloraOptions options = FloraOptions(1e-2).beta1(0.9).rank(4);
  std::vector<at::Tensor> float_params = {initial_param(0, {16, 40}), initial_param(1, {300})};
  Flora f(float_params, options);
  set_gradients(float_params, 1);
  f.step();
  const std::string float_path = temp_path("float.pt");
  torch::save(f, float_path);

  // A float32 checkpoint resumes in 8 bits: the float state quantized.
  std::vector<at::Tensor> params = clones(float_params);
  Flora q(params, FloraOptions(options).quantization(true));
  torch::load(q, float_path);
  REQUIRE(q.group_options(0).quantization());
  for (size_t k = 0; k < params.size(); ++k) {
    const FloraParamState& qs = *q.param_state(params[k]);
    const FloraParamState& fs = *f.param_state(float_params[k]);
    const auto [codes, absmax] = quantized(fs.momentum(), true);
    REQUIRE(qs.momentum().equal(codes) && qs.momentum_absmax().equal(absmax));
    if (k == 1) {
      const auto [sm_codes, sm_absmax] = quantized(fs.second_moment(), false);
      REQUIRE(qs.second_moment().equal(sm_codes) && qs.second_moment_absmax().equal(sm_absmax));
    }
    REQUIRE_EQ(qs.step(), 1);
  }
  set_gradients(params, 2);
  q.step();
  const std::string quantized_path = temp_path("quantized.pt");
  torch::save(q, quantized_path);

  // 8-bit state is refused by an optimizer without quantization, which stays as it was.
  const FloraParamState before = *f.param_state(float_params[1]);
  REQUIRE_THROWS_WITH(torch::load(f, quantized_path),
                      "made with quantization=true; this optimizer has quantization=false");
  REQUIRE(*f.param_state(float_params[1]) == before);
  REQUIRE(!f.group_options(0).quantization());

  // 8-bit state loads as it is into a quantization optimizer.
  std::vector<at::Tensor> other = clones(params);
  Flora q2(other, FloraOptions(options).quantization(true));
  torch::load(q2, quantized_path);
  for (size_t k = 0; k < params.size(); ++k) {
    REQUIRE(*q2.param_state(other[k]) == *q.param_state(params[k]));
  }

  // Damaged 8-bit state is refused, and the loading optimizer stays as it was.
  const FloraParamState kept = *q2.param_state(other[1]);
  FloraParamState& state = mutable_state(q, params[1]);
  const at::Tensor codes = state.momentum(), absmax = state.momentum_absmax();
  struct Damage {
    at::Tensor codes, absmax;
    std::string message;
  };
  const std::vector<Damage> damages = {
      {codes, absmax.narrow(0, 0, 1).clone(), "flora: momentum_absmax must have shape [2]"},
      {codes.to(at::kFloat), absmax,
       "flora: momentum must be uint8 (8-bit codes, as momentum_absmax says), got Float"},
      {codes, at::Tensor(), "flora: momentum must be a float tensor (momentum_absmax is "
                            "missing), got Byte"},
  };
  const std::string damaged_path = temp_path("damaged.pt");
  for (const Damage& damage : damages) {
    state.momentum(damage.codes);
    state.momentum_absmax(damage.absmax);
    torch::save(q, damaged_path);
    REQUIRE_THROWS_WITH(torch::load(q2, damaged_path), damage.message);
    REQUIRE(*q2.param_state(other[1]) == kept);
  }
  state.momentum(codes);
  state.momentum_absmax(absmax);
  for (const std::string& path : {float_path, quantized_path, damaged_path}) {
    std::filesystem::remove(path);
  }
}

FLORA_TEST(cuda_quantized_state_matches_cpu) {
  if (!flora::cuda_compiled() || !torch::cuda::is_available()) {
    throw flora_test::Skipped(flora::cuda_compiled() ? "no CUDA device"
                                                     : "built without CUDA kernels");
  }
  // As tests/test_quantization.py: the float32 steps of CPU and CUDA differ by rounding, so a
  // value near a code midpoint may take the neighbouring code, which later steps carry:
  // nearly all codes agree (>= 95% over the scenario's ~2800: a tensor of 9 has too few to
  // count alone), the rest within three code gaps of their block's absmax.
  Scenario s = scenario("quantized");
  s.defaults.tf32(false);
  Run cpu = start(s);
  Run cuda = start(s, at::kCUDA);
  advance(cpu, 1, s.steps);
  advance(cuda, 1, s.steps);
  int64_t differing = 0, codes = 0;
  for (size_t i = 0; i < cpu.params.size(); ++i) {
    const FloraParamState& a = *cpu.optimizer->param_state(cpu.params[i]);
    const FloraParamState& b = *cuda.optimizer->param_state(cuda.params[i]);
    const std::pair<const at::Tensor*, const at::Tensor*> fields[][2] = {
        {{&a.second_moment(), &a.second_moment_absmax()},
         {&b.second_moment(), &b.second_moment_absmax()}},
        {{&a.momentum(), &a.momentum_absmax()}, {&b.momentum(), &b.momentum_absmax()}}};
    for (int f = 0; f < 2; ++f) {
      const bool is_signed = f == 1;
      const at::Tensor& cpu_codes = *fields[f][0].first;
      if (!cpu_codes.defined()) continue;
      const at::Tensor& cpu_absmax = *fields[f][0].second;
      const at::Tensor cuda_codes = fields[f][1].first->cpu();
      const at::Tensor cuda_absmax = fields[f][1].second->cpu();
      REQUIRE(fields[f][1].first->is_cuda());
      REQUIRE_EQ(cuda_codes.scalar_type(), at::kByte);
      const int64_t differ = cpu_codes.ne(cuda_codes).sum().item<int64_t>();
      std::printf("parameter %zu %s: %lld of %lld codes differ\n", i,
                  is_signed ? "momentum" : "second_moment", static_cast<long long>(differ),
                  static_cast<long long>(cpu_codes.numel()));
      differing += differ;
      codes += cpu_codes.numel();
      const double gap = is_signed ? 0.9 / 64 : 0.9 / 128;
      const at::Tensor block = at::arange(cpu_codes.numel(), at::kLong).div(256, "floor");
      const at::Tensor bound = cpu_absmax.index_select(0, block).mul(3 * gap * 1.01).add(1e-30);
      const at::Tensor diff = (dequantized(cpu_codes, cpu_absmax, is_signed) -
                               dequantized(cuda_codes, cuda_absmax, is_signed))
                                  .abs()
                                  .flatten();
      REQUIRE(diff.le(bound).all().item<bool>());
    }
  }
  REQUIRE(codes > 2000);
  REQUIRE(differing <= codes / 20);
}

FLORA_TEST(cuda_matches_cpu_and_checkpoints_move_between_devices) {
  if (!flora::cuda_compiled() || !torch::cuda::is_available()) {
    throw flora_test::Skipped(flora::cuda_compiled() ? "no CUDA device"
                                                     : "built without CUDA kernels");
  }
  for (const char* name : kScenarios) {
    Scenario s = scenario(name);
    s.defaults.tf32(false);  // exact fp32 projection GEMMs: CUDA == CPU within 1e-5
    Run cpu = start(s);
    Run cuda = start(s, at::kCUDA);
    advance(cpu, 1, s.steps);
    advance(cuda, 1, s.steps);
    for (size_t i = 0; i < cpu.params.size(); ++i) {
      const at::Tensor a = cuda.params[i].detach().cpu().to(at::kDouble);
      const at::Tensor b = cpu.params[i].detach().to(at::kDouble);
      const double err = (a - b).norm().item<double>() / b.norm().item<double>();
      // 8-bit state: a value near a code midpoint may take the neighbouring code on one
      // device, which later steps carry (docs/FLORA.md §11): 3e-5, as in Python.
      const double fp32_tolerance = s.defaults.quantization() ? 3e-5 : 1e-5;
      const double tolerance =
          cpu.params[i].scalar_type() == at::kFloat ? fp32_tolerance : 1e-2;
      std::printf("%s parameter %zu: CUDA vs CPU rel err %.2e\n", name, i, err);
      REQUIRE(err < tolerance);
      const FloraParamState* state = cuda.optimizer->param_state(cuda.params[i]);
      REQUIRE(state->step() == cpu.optimizer->param_state(cpu.params[i])->step());
      REQUIRE(state->seed() == cpu.optimizer->param_state(cpu.params[i])->seed());
    }
    // A checkpoint of the CUDA run resumes on the CPU.
    const std::string path = temp_path(std::string("cuda_") + name + ".pt");
    torch::save(*cuda.optimizer, path);
    Run moved = start(s);
    for (size_t i = 0; i < moved.params.size(); ++i) {
      moved.params[i].detach().copy_(cuda.params[i].detach().cpu());
    }
    torch::load(*moved.optimizer, path);
    std::filesystem::remove(path);
    const FloraParamState* state = moved.optimizer->param_state(moved.params[0]);
    REQUIRE(state->step() == cuda.optimizer->param_state(cuda.params[0])->step());
    for (const at::Tensor* t : {&state->row_second_moment(), &state->second_moment(),
                                &state->momentum(), &state->momentum_absmax()}) {
      if (t->defined()) REQUIRE(t->device().is_cpu());
    }
    advance(moved, s.steps + 1, s.steps + 1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  using flora_test::registry;
  if (argc >= 2 && std::string(argv[1]) == "trajectory") {
    if (argc != 3) {
      std::fprintf(stderr, "usage: %s trajectory <scenario>\n", argv[0]);
      return 2;
    }
    try {
      return print_trajectory(argv[2]);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
      return 1;
    }
  }
  if (argc >= 2 && std::string(argv[1]) == "--list") {
    for (const auto& test : registry()) std::printf("%s\n", test.name);
    return 0;
  }
  std::vector<flora_test::TestCase> selected;
  for (const auto& test : registry()) {
    bool wanted = argc < 2;
    for (int i = 1; i < argc; ++i) wanted = wanted || std::string(argv[i]) == test.name;
    if (wanted) selected.push_back(test);
  }
  if (selected.size() != static_cast<size_t>(argc < 2 ? registry().size() : argc - 1)) {
    std::fprintf(stderr, "unknown test name among the arguments; --list lists them\n");
    return 2;
  }
  int failed = 0, skipped = 0;
  for (const auto& test : selected) {
    try {
      test.run();
      std::printf("PASS %s\n", test.name);
    } catch (const flora_test::Skipped& e) {
      ++skipped;
      std::printf("SKIP %s: %s\n", test.name, e.what());
    } catch (const std::exception& e) {
      ++failed;
      std::printf("FAIL %s: %s\n", test.name, e.what());
    }
  }
  std::printf("%zu passed, %d failed, %d skipped\n", selected.size() - failed - skipped, failed,
              skipped);
  if (failed > 0) return 1;
  return skipped > 0 && skipped == static_cast<int>(selected.size()) ? flora_test::kSkipped : 0;
}
