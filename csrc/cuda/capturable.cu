// The step-dependent values of a capturable step (step_group_capturable_), computed on
// the device from the state's step counts and seeds, so that a CUDA graph of the step
// replays with the counts it finds (docs/cuda.md, "CUDA graphs").
#include "launch.h"
#include "../common/random.h"

#include <c10/cuda/CUDAException.h>

#include <cmath>

namespace flora {
namespace cuda_detail {
namespace {

// One thread a parameter, before every other pass of the step: t = step + 1, then what
// the host computes from t for a plain step (StepOptions::beta2, base_lr, resample,
// rounding_key in planning.cu) written into the task table and the fused groups' words.
// beta2 = 1 - t^decay_rate is CUDA's pow, which may differ from the host's libm in the
// last bit: a capturable step is bitwise its own replay, and within that of a plain one.
__global__ void advance_kernel(const StepCounter* __restrict__ counters, int count,
                               AdvanceArgs a) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= count) return;
  const StepCounter c = counters[k];
  const int64_t t = *c.step + 1;
  *c.step = t;
  const int64_t seed = c.seed != nullptr ? *c.seed : 0;
  const bool resample = t % a.kappa == 0;
  if (c.task != nullptr) {
    const double td = static_cast<double>(t);
    double lr = a.lr_f64 != nullptr ? *a.lr_f64
                : a.lr_f32 != nullptr ? static_cast<double>(*a.lr_f32)
                                      : a.lr;
    if (a.relative_step) {
      const double cap = a.warmup_init ? 1e-6 * td : 1e-2;
      lr = fmin(cap, 1.0 / sqrt(td));
    }
    Task& task = *c.task;
    task.beta2 = 1.0 - pow(td, a.decay_rate);
    task.base_lr = lr;
    task.rounding_key = rounding_key(seed, t, c.index);
  }
  if (c.seed == nullptr) return;
  const int64_t next = resample ? next_seed(seed) : seed;
  if (c.fused.seed_now != nullptr) {
    // Every step draws the next basis and moves M to it; off resample steps the next
    // basis is the current one and the new M starts from M itself.
    *c.fused.seed_now = seed;
    *c.fused.seed_next = next;
    if (c.fused.next_base != nullptr) *c.fused.next_base = resample ? c.fused.base : nullptr;
  }
  *c.seed = next;
}

}  // namespace

void launch_advance(const StepCounter* counters, int count, const AdvanceArgs& args,
                    cudaStream_t stream) {
  if (count == 0) return;
  constexpr int kAdvanceThreads = 128;
  advance_kernel<<<(count + kAdvanceThreads - 1) / kAdvanceThreads, kAdvanceThreads, 0,
                   stream>>>(counters, count, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace flora
