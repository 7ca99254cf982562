// Projections (torch.ops.flora.fill_projection_) and the unfused compressed momentum:
// the projections drawn in fp32 and cuBLAS GEMMs (exact fp32, or TF32), used where the
// fused path is off (no TF32, stochastic rounding, unaligned or odd shapes).
#include "config.cuh"
#include "launch.h"
#include "task_table.cuh"
#include "vector_io.cuh"
#include "projection.cuh"
#include "../common/random.h"
#include "../common/rules.h"
#include "flora/ops.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

namespace flora {
namespace cuda_detail {
namespace {


__global__ void fill_projection_kernel(float* __restrict__ out, int64_t numel, uint64_t seed,
                                       double scale) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (4 * q >= numel) return;
  float z[4];
  projection_values(seed, q, scale, z);
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (4 * q + k < numel) out[4 * q + k] = z[k];
}

// The projection P (rows x cols, fp32; skipped when plain is null) and P scaled
// along the parameter's dimension, in the dtype of the down GEMM: left (P is
// r x n) P[k, i] a_i; right (P is m x r) P[j, k] b_j.
template <int DT>
__global__ void projection_pair_kernel(float* __restrict__ plain,
                                       Storage<DT>* __restrict__ scaled, int64_t rows,
                                       int64_t cols, uint64_t seed, double scale, bool left,
                                       const float* __restrict__ row,
                                       const float* __restrict__ scalars,
                                       const float* __restrict__ col_factor) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t numel = rows * cols;
  if (4 * q >= numel) return;
  float z[4];
  projection_values(seed, q, scale, z);
  const float row_mean = scalars[kRowMean];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t e = 4 * q + k;
    if (e >= numel) break;
    if (plain) plain[e] = z[k];
    const float s = left ? row_scale(row[e % cols], row_mean) : col_factor[e / cols];
    scaled[e] = from_float<DT>(z[k] * s);
  }
}

// New compressed momentum: M = beta1 M' + (1 - beta1) down(U), with down(U) the GEMM
// result X scaled along the other dimension: left (r x m) X[k, j] b_j, right (n x r)
// X[i, k] a_i.
__global__ void momentum_mix_kernel(float* __restrict__ momentum,
                                    const float* __restrict__ base,
                                    const float* __restrict__ x, int64_t numel, int64_t cols,
                                    bool left, const float* __restrict__ row,
                                    const float* __restrict__ scalars,
                                    const float* __restrict__ col_factor, float beta1) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float row_mean = scalars[kRowMean];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += stride) {
    const float s = left ? col_factor[e % cols] : row_scale(row[e / cols], row_mean);
    momentum[e] = base[e] * beta1 + (x[e] * s) * (1.f - beta1);
  }
}

}  // namespace

void fill_projection_cuda(const at::Tensor& out, int64_t seed, double scale) {
  detail::check_projection_output(out, seed, scale);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  const int64_t groups = ceil_div(numel, 4);
  fill_projection_kernel<<<ceil_div(groups, kThreads), kThreads, 0,
                           at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), numel, static_cast<uint64_t>(seed), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The compressed-momentum work of one task between the scalars and rms passes
// (docs/FLORA.md, step 4): fills `update` with beta1 up_s(M) (old M), then moves M to
// beta1 M' + (1 - beta1) down(U), M' = M or its transfer to the next basis.
void compressed_momentum(const Item& item, const Task& t, const at::Tensor& momentum) {
  const GroupEntry& entry = *item.entry;
  const StepOptions& o = entry.options;
  const ParamLayout& layout = entry.layout;
  const int64_t n = layout.rows, m = layout.cols, r = layout.rank;
  const bool left = layout.left;
  const auto shape = layout.projection_shape();
  const int64_t prow = shape[0], pcol = shape[1];
  const double scale = 1.0 / std::sqrt(static_cast<double>(r));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = item.param.options().dtype(at::kFloat);
  const bool resample = o.resample();
  // The down GEMM reads G as it is: 16-bit gradients meet a 16-bit scaled P
  // (tensor cores, fp32 accumulation) unless exact fp32 was asked for.
  const bool exact_16bit = item.dtype != kF32 && !o.tf32;
  const int down_type = exact_16bit ? kF32 : item.dtype;
  const at::Tensor grad = exact_16bit ? item.grad.to(at::kFloat) : item.grad;
  const at::ScalarType scaled_dtype = down_type == kF32 ? at::kFloat : item.grad.scalar_type();

  at::Tensor p_now = at::empty({prow, pcol}, f32);
  at::Tensor p_next = resample ? at::empty({prow, pcol}, f32) : at::Tensor();
  at::Tensor scaled = at::empty({prow, pcol}, f32.dtype(scaled_dtype));
  const int64_t groups = ceil_div(prow * pcol, 4);
  const auto fill_pair = [&](float* plain, int64_t seed, bool with_scaled) {
    const int blocks = static_cast<int>(ceil_div(groups, kThreads));
    const uint64_t s = static_cast<uint64_t>(seed);
    if (!with_scaled) {
      fill_projection_kernel<<<blocks, kThreads, 0, stream>>>(plain, prow * pcol, s, scale);
    } else if (down_type == kF32) {
      projection_pair_kernel<kF32><<<blocks, kThreads, 0, stream>>>(
          plain, scaled.data_ptr<float>(), prow, pcol, s, scale, left, t.row, t.scalars,
          t.col_factor);
    } else if (down_type == kBF16) {
      projection_pair_kernel<kBF16><<<blocks, kThreads, 0, stream>>>(
          plain, static_cast<uint16_t*>(scaled.data_ptr()), prow, pcol, s, scale, left, t.row,
          t.scalars, t.col_factor);
    } else {
      projection_pair_kernel<kF16><<<blocks, kThreads, 0, stream>>>(
          plain, static_cast<uint16_t*>(scaled.data_ptr()), prow, pcol, s, scale, left, t.row,
          t.scalars, t.col_factor);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  fill_pair(p_now.data_ptr<float>(), o.seed, !resample);
  if (resample) fill_pair(p_next.data_ptr<float>(), next_seed(o.seed), true);

  // X = (P diag a) G (left, r x m) or G (diag b P) (right, n x r).
  at::Tensor x = at::empty(momentum.sizes(), f32);
  if (left) {
    gemm(false, false, r, m, n, 1.f, scaled.data_ptr(), grad.data_ptr(), down_type, 0.f,
         x.data_ptr<float>(), o.tf32);
  } else {
    gemm(false, false, n, r, m, 1.f, grad.data_ptr(), scaled.data_ptr(), down_type, 0.f,
         x.data_ptr<float>(), o.tf32);
  }
  // update = beta1 up_now(M): P^T M (left) or M P^T (right), from the old M.
  const float b1 = static_cast<float>(o.beta1);
  float* mom = momentum.data_ptr<float>();
  if (left) {
    gemm(true, false, n, m, r, b1, p_now.data_ptr<float>(), mom, kF32, 0.f, t.update, o.tf32);
  } else {
    gemm(false, true, n, m, r, b1, mom, p_now.data_ptr<float>(), kF32, 0.f, t.update, o.tf32);
  }
  // M' = down_next(up_now(M)) through the r x r product of the two bases.
  at::Tensor base = momentum;
  if (resample) {
    at::Tensor bases = at::empty({r, r}, f32);
    base = at::empty(momentum.sizes(), f32);
    if (left) {
      gemm(false, true, r, r, n, 1.f, p_next.data_ptr<float>(), p_now.data_ptr<float>(), kF32,
           0.f, bases.data_ptr<float>(), o.tf32);
      gemm(false, false, r, m, r, 1.f, bases.data_ptr<float>(), mom, kF32, 0.f,
           base.data_ptr<float>(), o.tf32);
    } else {
      gemm(true, false, r, r, m, 1.f, p_now.data_ptr<float>(), p_next.data_ptr<float>(), kF32,
           0.f, bases.data_ptr<float>(), o.tf32);
      gemm(false, false, n, r, r, 1.f, mom, bases.data_ptr<float>(), kF32, 0.f,
           base.data_ptr<float>(), o.tf32);
    }
  }
  const int64_t numel = momentum.numel();
  momentum_mix_kernel<<<static_cast<int>(std::min<int64_t>(ceil_div(numel, kThreads), 4096)),
                        kThreads, 0, stream>>>(mom, base.data_ptr<float>(),
                                               x.data_ptr<float>(), numel, left ? m : r, left,
                                               t.row, t.scalars, t.col_factor, b1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace flora
