// CUDA kernels of the flora ops. First version: one parameter per call, a few
// row-wise kernels with deterministic (fixed-order) reductions, cuRAND Philox for
// the projections and cuBLAS for the projection GEMMs. The fused multi-tensor
// step is its own piece of work.
#include "flora/ops.h"
#include "../common/random.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <curand_kernel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>

namespace flora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kRowsPerColumnChunk = 32;
constexpr int64_t kMaxPassBlocks = 2048;

// Momentum handling of the row pass.
enum RowPassMode : int { kPassNoMomentum = 0, kPassDenseMomentum = 1, kPassWriteUpdate = 2 };
// Where the apply kernel finds D.

// scalars[] layout, written by the reduction kernels, read by the apply kernel.
enum Scalar : int { kRowMean = 0, kStepSize = 1, kInvClip = 2, kDecay = 3, kNumScalars = 4 };

__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ inline double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, valid in thread 0. blockDim.x must be a multiple of 32.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_totals[32];
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / 32 ? warp_totals[lane] : T(0);
    v = warp_sum(v);
  }
  __syncthreads();
  return v;
}

// U of a factored parameter (FLORA.md step 3) is g * row_scale(i) * col_scale[j];
// the factors are computed once a row / once a column, by these two formulas only.
__device__ inline float row_scale(float row, float row_mean) { return 1.0f / sqrtf(row / row_mean); }
__device__ inline float col_scale(float col) { return 1.0f / sqrtf(col); }

__global__ void fill_projection_kernel(float* __restrict__ out, int64_t numel, uint64_t seed,
                                       double scale) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (4 * q >= numel) return;
  curandStatePhilox4_32_10_t state;
  curand_init(seed, static_cast<unsigned long long>(q), 0, &state);
  const uint4 w = curand4(&state);
  float z[4];
  box_muller(w.x, w.y, scale, &z[0], &z[1]);
  box_muller(w.z, w.w, scale, &z[2], &z[3]);
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (4 * q + k < numel) out[4 * q + k] = z[k];
}

// One warp per row: row EMA of mean(G^2 + eps1) and the row's sum of p^2.
template <typename scalar_t>
__global__ void row_stats_kernel(const scalar_t* __restrict__ grad,
                                 const scalar_t* __restrict__ param, float* __restrict__ row,
                                 float* __restrict__ param_sq_rows, int64_t n, int64_t m,
                                 double beta2, float eps1) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  float g_sq = 0.f, p_sq = 0.f;
  for (int64_t j = lane; j < m; j += 32) {
    const float g = static_cast<float>(grad[i * m + j]);
    const float p = static_cast<float>(param[i * m + j]);
    g_sq += g * g + eps1;
    p_sq += p * p;
  }
  g_sq = warp_sum(g_sq);
  p_sq = warp_sum(p_sq);
  if (lane == 0) {
    row[i] = static_cast<float>(beta2 * row[i] + (1.0 - beta2) * (double(g_sq) / m));
    param_sq_rows[i] = p_sq;
  }
}

// Column sums of G^2 + eps1 over a chunk of rows, one thread per column.
template <typename scalar_t>
__global__ void col_partial_kernel(const scalar_t* __restrict__ grad,
                                   float* __restrict__ partial, int64_t n, int64_t m,
                                   float eps1) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= m) return;
  const int64_t first = blockIdx.y * kRowsPerColumnChunk;
  const int64_t last = min(n, first + kRowsPerColumnChunk);
  float s = 0.f;
  for (int64_t i = first; i < last; ++i) {
    const float g = static_cast<float>(grad[i * m + j]);
    s += g * g + eps1;
  }
  partial[blockIdx.y * m + j] = s;
}

// Column EMA, and the column factor of U for the kernels that follow.
__global__ void col_finalize_kernel(const float* __restrict__ partial, float* __restrict__ col,
                                    float* __restrict__ col_factor, int64_t chunks, int64_t n,
                                    int64_t m, double beta2) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= m) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * m + j];
  const float c_new = static_cast<float>(beta2 * col[j] + (1.0 - beta2) * (s / n));
  col[j] = c_new;
  col_factor[j] = col_scale(c_new);
}

// Single block: mean of the row EMA and this step's learning rate (step 1).
__global__ void step_size_kernel(const float* __restrict__ row, int64_t n,
                                 const float* __restrict__ param_sq_parts, int64_t parts,
                                 int64_t numel, double base_lr, bool scale_parameter,
                                 double eps2, float* __restrict__ scalars) {
  double row_sum = 0.0, param_sq = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) row_sum += row[k];
  for (int64_t k = threadIdx.x; k < parts; k += blockDim.x) param_sq += param_sq_parts[k];
  row_sum = block_sum(row_sum);
  param_sq = block_sum(param_sq);
  if (threadIdx.x == 0) {
    scalars[kRowMean] = n > 0 ? static_cast<float>(row_sum / n) : 1.0f;
    double lr = base_lr;
    if (scale_parameter) lr *= fmax(eps2, sqrt(param_sq / numel));
    scalars[kStepSize] = static_cast<float>(lr);
  }
}

// One warp per row of a factored parameter: U, then the momentum mode's D and
// the row's sum of D^2 (or U written out for the projection GEMMs).
template <typename scalar_t>
__global__ void factored_pass_kernel(const scalar_t* __restrict__ grad,
                                     const float* __restrict__ row,
                                     const float* __restrict__ col_factor,
                                     const float* __restrict__ scalars,
                                     float* __restrict__ momentum, float* __restrict__ out,
                                     float* __restrict__ d_sq_rows, int64_t n, int64_t m,
                                     int mode, float beta1) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  const float a = row_scale(row[i], scalars[kRowMean]);
  float d_sq = 0.f;
  for (int64_t j = lane; j < m; j += 32) {
    const int64_t e = i * m + j;
    const float u = static_cast<float>(grad[e]) * a * col_factor[j];
    if (mode == kPassWriteUpdate) {
      out[e] = u;
      continue;
    }
    float d = u;
    if (mode == kPassDenseMomentum) {
      d = (1.f - beta1) * u + beta1 * momentum[e];
      momentum[e] = d;
    }
    d_sq += d * d;
  }
  d_sq = warp_sum(d_sq);
  if (lane == 0 && mode != kPassWriteUpdate) d_sq_rows[i] = d_sq;
}

// Full second moment: S update, D, and per-block sums of p^2 and D^2.
template <typename scalar_t>
__global__ void full_pass_kernel(const scalar_t* __restrict__ grad,
                                 const scalar_t* __restrict__ param,
                                 float* __restrict__ second_moment,
                                 float* __restrict__ momentum,
                                 float* __restrict__ param_sq_parts,
                                 float* __restrict__ d_sq_parts, int64_t numel, float beta2,
                                 float eps1, int mode, float beta1) {
  float p_sq = 0.f, d_sq = 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += stride) {
    const float g = static_cast<float>(grad[e]);
    const float p = static_cast<float>(param[e]);
    const float s = beta2 * second_moment[e] + (1.f - beta2) * (g * g + eps1);
    second_moment[e] = s;
    float d = g / sqrtf(s);
    if (mode == kPassDenseMomentum) {
      d = (1.f - beta1) * d + beta1 * momentum[e];
      momentum[e] = d;
    }
    p_sq += p * p;
    d_sq += d * d;
  }
  p_sq = block_sum(p_sq);
  d_sq = block_sum(d_sq);
  if (threadIdx.x == 0) {
    param_sq_parts[blockIdx.x] = p_sq;
    d_sq_parts[blockIdx.x] = d_sq;
  }
}

// One warp per row: sum of squares of a float matrix (D after the GEMMs).
__global__ void row_sum_sq_kernel(const float* __restrict__ x, float* __restrict__ rows,
                                  int64_t n, int64_t m) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  float s = 0.f;
  for (int64_t j = lane; j < m; j += 32) {
    const float v = x[i * m + j];
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) rows[i] = s;
}

// Single block: the RMS clip factor (step 5) and the weight-decay factor.
__global__ void clip_kernel(const float* __restrict__ d_sq_parts, int64_t parts,
                            int64_t numel, double clip_threshold, double weight_decay,
                            float* __restrict__ scalars) {
  double d_sq = 0.0;
  for (int64_t k = threadIdx.x; k < parts; k += blockDim.x) d_sq += d_sq_parts[k];
  d_sq = block_sum(d_sq);
  if (threadIdx.x == 0) {
    const double clip = fmax(1.0, sqrt(d_sq / numel) / clip_threshold);
    scalars[kInvClip] = static_cast<float>(1.0 / clip);
    scalars[kDecay] = static_cast<float>(weight_decay * scalars[kStepSize]);
  }
}

__device__ inline float updated_param(float x, float d, const float* scalars) {
  const float decay = scalars[kDecay];
  if (decay != 0.f) x -= decay * x;
  return x - scalars[kStepSize] * (d * scalars[kInvClip]);
}

// Step 6: p = p - decay p - lr D / clip, written back once in the param dtype.
// D from the full second moment (second_moment != nullptr) or from a buffer.
template <typename scalar_t>
__global__ void apply_kernel(scalar_t* __restrict__ param, const scalar_t* __restrict__ grad,
                             const float* __restrict__ second_moment,
                             const float* __restrict__ update,
                             const float* __restrict__ scalars, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += stride) {
    const float d = second_moment ? static_cast<float>(grad[e]) / sqrtf(second_moment[e])
                                  : update[e];
    param[e] = static_cast<scalar_t>(updated_param(static_cast<float>(param[e]), d, scalars));
  }
}

// Step 6 for a factored parameter without momentum: D = U, one warp per row.
template <typename scalar_t>
__global__ void apply_factored_kernel(scalar_t* __restrict__ param,
                                      const scalar_t* __restrict__ grad,
                                      const float* __restrict__ row,
                                      const float* __restrict__ col_factor,
                                      const float* __restrict__ scalars, int64_t n, int64_t m) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  const float a = row_scale(row[i], scalars[kRowMean]);
  for (int64_t j = lane; j < m; j += 32) {
    const int64_t e = i * m + j;
    const float d = static_cast<float>(grad[e]) * a * col_factor[j];
    param[e] = static_cast<scalar_t>(updated_param(static_cast<float>(param[e]), d, scalars));
  }
}

int64_t blocks_for(int64_t work, int64_t per_block) { return (work + per_block - 1) / per_block; }

int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= INT_MAX, "flora: ", what, " = ", v, " exceeds the cuBLAS int range");
  return static_cast<int>(v);
}

// Row-major C (M x N) = alpha op(A) op(B) + beta C, through cuBLAS's
// column-major API as C^T = op(B)^T op(A)^T. TF32 only where torch allows it.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, const float* B, float beta, float* C) {
  const int lda = as_int(trans_a ? M : K, "lda"), ldb = as_int(trans_b ? K : N, "ldb");
  const cublasComputeType_t compute = at::globalContext().allowTF32CuBLAS()
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
      trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, as_int(N, "N"), as_int(M, "M"), as_int(K, "K"),
      &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &beta, C, CUDA_R_32F,
      as_int(N, "ldc"), compute, CUBLAS_GEMM_DEFAULT));
}

void fill_projection_cuda(const at::Tensor& out, int64_t seed, double scale) {
  detail::check_projection_output(out, seed, scale);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  const int64_t groups = blocks_for(numel, 4);
  fill_projection_kernel<<<blocks_for(groups, kThreads), kThreads, 0,
                           at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), numel, static_cast<uint64_t>(seed), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Compressed momentum (FLORA.md step 4) given W = U (n x m): leaves D in W and
// the new momentum in `momentum`, with one n x m buffer (W) in all.
void compressed_momentum_update(at::Tensor& w, at::Tensor& momentum, const ParamLayout& layout,
                                const StepOptions& o) {
  const int64_t n = layout.rows, m = layout.cols, r = layout.rank;
  const double scale = 1.0 / std::sqrt(static_cast<double>(r));
  const auto shape = layout.projection_shape();
  const at::Tensor p_now = projection(o.seed, shape[0], shape[1], scale, w.device());
  at::Tensor next_momentum = at::empty_like(momentum);
  const float b1 = static_cast<float>(o.beta1), one_minus_b1 = static_cast<float>(1.0 - o.beta1);
  const float* mom = momentum.data_ptr<float>();
  at::Tensor p_down = p_now;
  if (o.resample()) {
    // Transfer to the new basis: down_new(up_now(M)) via the r x r product of the bases.
    p_down = projection(next_seed(o.seed), shape[0], shape[1], scale, w.device());
    at::Tensor bases = at::empty({r, r}, w.options());
    if (layout.left) {
      gemm(false, true, r, r, n, 1.f, p_down.data_ptr<float>(), p_now.data_ptr<float>(), 0.f,
           bases.data_ptr<float>());
      gemm(false, false, r, m, r, 1.f, bases.data_ptr<float>(), mom, 0.f,
           next_momentum.data_ptr<float>());
    } else {
      gemm(true, false, r, r, m, 1.f, p_now.data_ptr<float>(), p_down.data_ptr<float>(), 0.f,
           bases.data_ptr<float>());
      gemm(false, false, n, r, r, 1.f, mom, bases.data_ptr<float>(), 0.f,
           next_momentum.data_ptr<float>());
    }
  } else {
    next_momentum.copy_(momentum);
  }
  // M_next = beta1 M' + (1 - beta1) down(U)
  if (layout.left) {
    gemm(false, false, r, m, n, one_minus_b1, p_down.data_ptr<float>(), w.data_ptr<float>(), b1,
         next_momentum.data_ptr<float>());
  } else {
    gemm(false, false, n, r, m, one_minus_b1, w.data_ptr<float>(), p_down.data_ptr<float>(), b1,
         next_momentum.data_ptr<float>());
  }
  // D = (1 - beta1) U + beta1 up_now(M), with the momentum from before this step.
  if (layout.left) {
    gemm(true, false, n, m, r, b1, p_now.data_ptr<float>(), mom, one_minus_b1,
         w.data_ptr<float>());
  } else {
    gemm(false, true, n, m, r, b1, mom, p_now.data_ptr<float>(), one_minus_b1,
         w.data_ptr<float>());
  }
  momentum.copy_(next_momentum);
}

template <typename scalar_t>
void step_cuda_typed(const at::Tensor& param, const at::Tensor& grad,
                     const std::optional<at::Tensor>& row_second_moment,
                     const std::optional<at::Tensor>& col_second_moment,
                     const std::optional<at::Tensor>& second_moment,
                     const std::optional<at::Tensor>& momentum_opt, const StepOptions& o,
                     const ParamLayout& layout) {
  const int64_t numel = param.numel();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor g = grad.contiguous();
  const bool in_place = param.is_contiguous();
  at::Tensor p = in_place ? param : param.contiguous();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* pp = p.data_ptr<scalar_t>();
  const auto f32 = param.options().dtype(at::kFloat);
  at::Tensor scalars = at::empty({kNumScalars}, f32);
  float* sc = scalars.data_ptr<float>();
  const double beta2 = o.beta2();
  const float eps1 = static_cast<float>(o.eps1), b1 = static_cast<float>(o.beta1);
  float* mom = momentum_opt.has_value() ? momentum_opt->data_ptr<float>() : nullptr;
  const int pass_mode =
      layout.momentum == MomentumKind::kDense ? kPassDenseMomentum : kPassNoMomentum;
  const int64_t apply_blocks = std::min<int64_t>(blocks_for(numel, kThreads), 65536);

  at::Tensor d_sq_parts, update, col_factor;
  if (layout.factored) {
    const int64_t n = layout.rows, m = layout.cols;
    float* row = row_second_moment->data_ptr<float>();
    float* col = col_second_moment->data_ptr<float>();
    at::Tensor param_sq_rows = at::empty({n}, f32);
    const int64_t row_blocks = blocks_for(n, kWarpsPerBlock);
    row_stats_kernel<scalar_t><<<row_blocks, kThreads, 0, stream>>>(
        gp, pp, row, param_sq_rows.data_ptr<float>(), n, m, beta2, eps1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t chunks = blocks_for(n, kRowsPerColumnChunk);
    TORCH_CHECK(chunks <= 65535, "flora: parameter has too many rows (", n, ") for this kernel");
    at::Tensor col_parts = at::empty({chunks, m}, f32);
    col_partial_kernel<scalar_t>
        <<<dim3(blocks_for(m, kThreads), chunks), kThreads, 0, stream>>>(
            gp, col_parts.data_ptr<float>(), n, m, eps1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    col_factor = at::empty({m}, f32);
    col_finalize_kernel<<<blocks_for(m, kThreads), kThreads, 0, stream>>>(
        col_parts.data_ptr<float>(), col, col_factor.data_ptr<float>(), chunks, n, m, beta2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    step_size_kernel<<<1, 1024, 0, stream>>>(row, n, param_sq_rows.data_ptr<float>(), n, numel,
                                             o.base_lr(), o.scale_parameter, o.eps2, sc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    d_sq_parts = at::empty({n}, f32);
    if (layout.momentum == MomentumKind::kCompressed) {
      update = at::empty({n, m}, f32);
      factored_pass_kernel<scalar_t><<<row_blocks, kThreads, 0, stream>>>(
          gp, row, col_factor.data_ptr<float>(), sc, nullptr, update.data_ptr<float>(), nullptr,
          n, m, kPassWriteUpdate, b1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor momentum = *momentum_opt;
      compressed_momentum_update(update, momentum, layout, o);
      row_sum_sq_kernel<<<row_blocks, kThreads, 0, stream>>>(
          update.data_ptr<float>(), d_sq_parts.data_ptr<float>(), n, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      factored_pass_kernel<scalar_t><<<row_blocks, kThreads, 0, stream>>>(
          gp, row, col_factor.data_ptr<float>(), sc, mom, nullptr, d_sq_parts.data_ptr<float>(),
          n, m, pass_mode, b1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (layout.momentum == MomentumKind::kDense) update = *momentum_opt;
    }
  } else {
    // Grid size depends on numel only, so the per-block partial sums (and the
    // result) are the same in every run.
    const int64_t blocks = std::min(blocks_for(numel, kThreads), kMaxPassBlocks);
    at::Tensor param_sq_parts = at::empty({blocks}, f32);
    d_sq_parts = at::empty({blocks}, f32);
    float* s = second_moment->data_ptr<float>();
    full_pass_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        gp, pp, s, mom, param_sq_parts.data_ptr<float>(), d_sq_parts.data_ptr<float>(), numel,
        static_cast<float>(beta2), eps1, pass_mode, b1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    step_size_kernel<<<1, 1024, 0, stream>>>(nullptr, 0, param_sq_parts.data_ptr<float>(),
                                             blocks, numel, o.base_lr(), o.scale_parameter,
                                             o.eps2, sc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (layout.momentum == MomentumKind::kDense) update = *momentum_opt;
  }
  clip_kernel<<<1, 1024, 0, stream>>>(d_sq_parts.data_ptr<float>(), d_sq_parts.numel(), numel,
                                      o.clip_threshold, o.weight_decay, sc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (update.defined() || !layout.factored) {
    // D is in a buffer (momentum, or D after the projections) or comes from S.
    apply_kernel<scalar_t><<<apply_blocks, kThreads, 0, stream>>>(
        pp, gp, update.defined() ? nullptr : second_moment->data_ptr<float>(),
        update.defined() ? update.data_ptr<float>() : nullptr, sc, numel);
  } else {
    apply_factored_kernel<scalar_t><<<blocks_for(layout.rows, kWarpsPerBlock), kThreads, 0,
                                      stream>>>(pp, gp, row_second_moment->data_ptr<float>(),
                                                col_factor.data_ptr<float>(), sc, layout.rows,
                                                layout.cols);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!in_place) param.copy_(p);
}

// One parameter whose inputs check_step_inputs has accepted.
void run_step_cuda(const at::Tensor& param, const at::Tensor& grad,
                   const std::optional<at::Tensor>& row_second_moment,
                   const std::optional<at::Tensor>& col_second_moment,
                   const std::optional<at::Tensor>& second_moment,
                   const std::optional<at::Tensor>& momentum, const StepOptions& o,
                   const ParamLayout& layout) {
  if (param.numel() == 0) return;
  switch (param.scalar_type()) {
    case at::kFloat:
      step_cuda_typed<float>(param, grad, row_second_moment, col_second_moment, second_moment,
                             momentum, o, layout);
      break;
    case at::kHalf:
      step_cuda_typed<at::Half>(param, grad, row_second_moment, col_second_moment,
                                second_moment, momentum, o, layout);
      break;
    case at::kBFloat16:
      step_cuda_typed<at::BFloat16>(param, grad, row_second_moment, col_second_moment,
                                    second_moment, momentum, o, layout);
      break;
    default:
      TORCH_CHECK(false, "flora: unsupported param dtype ", param.scalar_type());
  }
}

void step_cuda(const at::Tensor& param, const at::Tensor& grad,
               const std::optional<at::Tensor>& row_second_moment,
               const std::optional<at::Tensor>& col_second_moment,
               const std::optional<at::Tensor>& second_moment,
               const std::optional<at::Tensor>& momentum, int64_t step, int64_t seed, double lr,
               double beta1, double eps1, double eps2, double clip_threshold, double decay_rate,
               double weight_decay, int64_t rank, int64_t kappa, bool scale_parameter,
               bool relative_step, bool warmup_init, bool factorize_second_moment) {
  const StepOptions o = detail::options_from_schema(
      step, seed, lr, beta1, eps1, eps2, clip_threshold, decay_rate, weight_decay, rank, kappa,
      scale_parameter, relative_step, warmup_init, factorize_second_moment);
  const ParamLayout layout = check_step_inputs(param, grad, row_second_moment,
                                               col_second_moment, second_moment, momentum, o);
  c10::cuda::CUDAGuard guard(param.device());
  run_step_cuda(param, grad, row_second_moment, col_second_moment, second_moment, momentum, o,
                layout);
}

void step_group_cuda(at::TensorList params, at::TensorList grads,
                     at::TensorList states, at::IntArrayRef steps, at::IntArrayRef seeds, double lr, double beta1,
                     double eps1, double eps2, double clip_threshold, double decay_rate,
                     double weight_decay, int64_t rank, int64_t kappa, bool scale_parameter,
                     bool relative_step, bool warmup_init, bool factorize_second_moment) {
  const StepOptions group = detail::options_from_schema(
      1, 0, lr, beta1, eps1, eps2, clip_threshold, decay_rate, weight_decay, rank, kappa,
      scale_parameter, relative_step, warmup_init, factorize_second_moment);
  const std::vector<GroupEntry> entries =
      check_group_inputs(params, grads, states, steps, seeds, group);
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  for (size_t k = 0; k < params.size(); ++k)
    run_step_cuda(params[k], grads[k], entries[k].state.row_second_moment,
                 entries[k].state.col_second_moment, entries[k].state.second_moment,
                 entries[k].state.momentum, entries[k].options, entries[k].layout);
}

}  // namespace
}  // namespace flora

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("step_", &flora::step_cuda);
  m.impl("step_group_", &flora::step_group_cuda);
  m.impl("fill_projection_", &flora::fill_projection_cuda);
}
