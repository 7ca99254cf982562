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


// P's entries as DT: float32, or rounded to nearest (what a float32 P's .to(dtype) gives).
template <int DT>
__global__ void fill_projection_kernel(Storage<DT>* __restrict__ out, int64_t numel,
                                       uint64_t seed, double scale) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (4 * q >= numel) return;
  float z[4];
  projection_values(seed, q, scale, z);
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (4 * q + k < numel) out[4 * q + k] = from_float<DT>(z[k]);
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

// P_o scaled along the parameter's dimension as projection_pair_kernel does, from P_o
// (fp32, rows x cols) already in `plain`: projection="orthogonal"'s basis is not drawn.
template <int DT>
__global__ void scale_projection_kernel(const float* __restrict__ plain,
                                        Storage<DT>* __restrict__ scaled, int64_t rows,
                                        int64_t cols, bool left, const float* __restrict__ row,
                                        const float* __restrict__ scalars,
                                        const float* __restrict__ col_factor) {
  const int64_t numel = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float row_mean = scalars[kRowMean];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += stride) {
    const float s = left ? row_scale(row[e % cols], row_mean) : col_factor[e / cols];
    scaled[e] = from_float<DT>(plain[e] * s);
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
                                    const float* __restrict__ col_factor, float beta1,
                                    const int32_t* __restrict__ skip) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float row_mean = scalars[kRowMean];
  if (skip != nullptr && *skip != 0) {  // skip_nonfinite: M' alone (base is M, or M moved)
    if (base == momentum) return;
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
         e += stride)
      momentum[e] = base[e];
    return;
  }
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
  const auto blocks = static_cast<unsigned>(ceil_div(groups, kThreads));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_dtype(dtype_code(out.scalar_type()), [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    fill_projection_kernel<DT><<<blocks, kThreads, 0, stream>>>(
        static_cast<Storage<DT>*>(out.data_ptr()), numel, static_cast<uint64_t>(seed), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

// The shape of one unfused compressed task's work, and where its temporaries lie in
// the call's workspace (offsets in floats, each array 16-byte aligned): P now (fp32),
// P scaled (the down GEMM's dtype), X = the down GEMM's result; on resample steps the
// next P, the change of basis and M in the next basis; for exact 16-bit projections an
// fp32 copy of G; for projection="orthogonal" the Gaussian P before it becomes P_o and
// the float64 scratch of W (the Gram, the packed triangle).
struct CompressedTemps {
  int64_t n, m, r, prow, pcol;
  bool left, resample, exact_16bit, orthogonal, tf32;
  int down_type;
  int64_t p_now = 0, p_next = 0, scaled = 0, x = 0, bases = 0, base = 0, grad32 = 0;
  int64_t p_raw = 0, basis_work = 0;
  int64_t floats = 0;
};

CompressedTemps compressed_temps(const Item& item) {
  const ParamLayout& layout = item.entry->layout;
  const StepOptions& o = item.entry->options;
  CompressedTemps c;
  c.n = layout.rows;
  c.m = layout.cols;
  c.r = layout.rank;
  c.left = layout.left;
  const auto shape = layout.projection_shape();
  c.prow = shape[0];
  c.pcol = shape[1];
  c.resample = o.plans_resample();
  // The down GEMM reads G as it is: 16-bit gradients meet a 16-bit scaled P
  // (tensor cores, fp32 accumulation) unless exact fp32 was asked for. projection=
  // "orthogonal" keeps every GEMM exact whatever tf32 says: its basis' rounding would
  // carry into the Gram of a P whose condition number grows as r nears P's long side (the
  // fused path, fp16 operands throughout, takes only r <= half of it).
  c.orthogonal = o.projection == Projection::kOrthogonal;
  c.tf32 = o.tf32 && !c.orthogonal;
  c.exact_16bit = item.dtype != kF32 && !c.tf32;
  c.down_type = c.exact_16bit ? kF32 : item.dtype;
  const int64_t psize = c.prow * c.pcol;
  const int64_t msize = item.entry->state.momentum->numel();
  int64_t at = 0;
  const auto take = [&](int64_t floats) {
    const int64_t start = at;
    at += ceil_div(floats, 4) * 4;
    return start;
  };
  c.p_now = take(psize);
  if (c.resample) c.p_next = take(psize);
  c.scaled = take(c.down_type == kF32 ? psize : ceil_div(psize, 2));
  c.x = take(msize);
  if (c.resample) {
    c.bases = take(c.r * c.r);
    c.base = take(msize);
  }
  if (c.exact_16bit) c.grad32 = take(item.grad.numel());
  if (c.orthogonal) {
    c.p_raw = take(psize);
    c.basis_work = take(basis_work_floats(c.r, 1));
  }
  c.floats = at;
  return c;
}

}  // namespace

int64_t compressed_temp_floats(const Item& item) { return compressed_temps(item).floats; }

// The compressed-momentum work of one task between the scalars and rms passes
// (docs/FLORA.md, step 4): fills `update` with beta1 up_s(M) (old M), then moves M to
// beta1 M' + (1 - beta1) down(U), M' = M or its transfer to the next basis. Its
// temporaries are `temps` (compressed_temp_floats of the call's workspace, fp32):
// nothing is allocated here.
void compressed_momentum(const Item& item, const Task& t, const at::Tensor& momentum,
                         const at::Tensor& temps, const WSlot* w_now, const WSlot* w_next) {
  const GroupEntry& entry = *item.entry;
  const StepOptions& o = entry.options;
  const CompressedTemps c = compressed_temps(item);
  const int64_t n = c.n, m = c.m, r = c.r, prow = c.prow, pcol = c.pcol;
  const bool left = c.left, resample = c.resample;
  const int down_type = c.down_type;
  const double scale = 1.0 / std::sqrt(static_cast<double>(r));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* const ws = temps.data_ptr<float>();
  // The fp32 copy of G: copy_ into the workspace converts in one kernel, no allocation.
  const void* grad = item.grad.data_ptr();
  if (c.exact_16bit) {
    temps.narrow(0, c.grad32, item.grad.numel()).view(item.grad.sizes()).copy_(item.grad);
    grad = ws + c.grad32;
  }
  float* const p_now = ws + c.p_now;
  float* const p_next = resample ? ws + c.p_next : nullptr;
  void* const scaled = ws + c.scaled;
  const int64_t groups = ceil_div(prow * pcol, 4);
  const int blocks = static_cast<int>(ceil_div(groups, kThreads));
  const auto fill_pair = [&](float* plain, int64_t seed, bool with_scaled) {
    const uint64_t s = static_cast<uint64_t>(seed);
    if (!with_scaled) {
      fill_projection_kernel<kF32><<<blocks, kThreads, 0, stream>>>(plain, prow * pcol, s, scale);
    } else if (down_type == kF32) {
      projection_pair_kernel<kF32><<<blocks, kThreads, 0, stream>>>(
          plain, static_cast<float*>(scaled), prow, pcol, s, scale, left, t.row, t.scalars,
          t.col_factor);
    } else if (down_type == kBF16) {
      projection_pair_kernel<kBF16><<<blocks, kThreads, 0, stream>>>(
          plain, static_cast<uint16_t*>(scaled), prow, pcol, s, scale, left, t.row,
          t.scalars, t.col_factor);
    } else {
      projection_pair_kernel<kF16><<<blocks, kThreads, 0, stream>>>(
          plain, static_cast<uint16_t*>(scaled), prow, pcol, s, scale, left, t.row,
          t.scalars, t.col_factor);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // projection="orthogonal": P_o = W P (left) or P W^T (right) of each basis, W = s R^-T
  // from the cache (slot), computed here on a miss from the float64 Gram of the fp32 P
  // (into the slot's tensor), then the product in float64: W's entries grow with the
  // Gram's condition number, and an fp32 product would lose that much.
  const int64_t length = left ? pcol : prow;  // P's long side
  const auto fill_basis = [&](float* plain, int64_t seed, const WSlot* slot) {
    TORCH_INTERNAL_ASSERT(slot != nullptr && slot->w.scalar_type() == at::kDouble);
    float* const raw = ws + c.p_raw;
    fill_projection_kernel<kF32><<<blocks, kThreads, 0, stream>>>(
        raw, prow * pcol, static_cast<uint64_t>(seed), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    double* const w = slot->w.data_ptr<double>();
    if (slot->miss) {
      double* const work = reinterpret_cast<double*>(ws + c.basis_work);
      launch_gram_f64(raw, work, r, length, left, stream);
      launch_basis_w(nullptr, work, nullptr, w, r, 1,
                     std::sqrt(static_cast<double>(length) / static_cast<double>(r)), stream);
      w_publish(*slot);
    } else {
      w_ready(*slot);
    }
    launch_basis_f64(w, raw, plain, r, left ? pcol : prow, left, stream);
  };
  const auto scale_basis = [&](const float* plain) {
    const int sblocks = static_cast<int>(std::min<int64_t>(ceil_div(prow * pcol, kThreads), 4096));
    if (down_type == kF32) {
      scale_projection_kernel<kF32><<<sblocks, kThreads, 0, stream>>>(
          plain, static_cast<float*>(scaled), prow, pcol, left, t.row, t.scalars, t.col_factor);
    } else if (down_type == kBF16) {
      scale_projection_kernel<kBF16><<<sblocks, kThreads, 0, stream>>>(
          plain, static_cast<uint16_t*>(scaled), prow, pcol, left, t.row, t.scalars,
          t.col_factor);
    } else {
      scale_projection_kernel<kF16><<<sblocks, kThreads, 0, stream>>>(
          plain, static_cast<uint16_t*>(scaled), prow, pcol, left, t.row, t.scalars,
          t.col_factor);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (c.orthogonal) {
    fill_basis(p_now, o.seed, w_now);
    if (resample) fill_basis(p_next, next_seed(o.seed), w_next);
    scale_basis(resample ? p_next : p_now);
  } else {
    fill_pair(p_now, o.seed, !resample);
    if (resample) fill_pair(p_next, next_seed(o.seed), true);
  }

  // X = (P diag a) G (left, r x m) or G (diag b P) (right, n x r).
  float* const x = ws + c.x;
  if (left) {
    gemm(false, false, r, m, n, 1.f, scaled, grad, down_type, 0.f, x, c.tf32);
  } else {
    gemm(false, false, n, r, m, 1.f, grad, scaled, down_type, 0.f, x, c.tf32);
  }
  // update = beta1 up_now(M): P^T M (left) or M P^T (right), from the old M.
  const float b1 = static_cast<float>(o.beta1);
  float* mom = momentum.data_ptr<float>();
  if (left) {
    gemm(true, false, n, m, r, b1, p_now, mom, kF32, 0.f, t.update, c.tf32);
  } else {
    gemm(false, true, n, m, r, b1, mom, p_now, kF32, 0.f, t.update, c.tf32);
  }
  // M' = down_next(up_now(M)) through the r x r product of the two bases.
  const float* base = mom;
  if (resample) {
    float* const bases = ws + c.bases;
    float* const next_base = ws + c.base;
    if (left) {
      gemm(false, true, r, r, n, 1.f, p_next, p_now, kF32, 0.f, bases, c.tf32);
      gemm(false, false, r, m, r, 1.f, bases, mom, kF32, 0.f, next_base, c.tf32);
    } else {
      gemm(true, false, r, r, m, 1.f, p_now, p_next, kF32, 0.f, bases, c.tf32);
      gemm(false, false, n, r, r, 1.f, mom, bases, kF32, 0.f, next_base, c.tf32);
    }
    base = next_base;
  }
  const int64_t numel = momentum.numel();
  momentum_mix_kernel<<<static_cast<int>(std::min<int64_t>(ceil_div(numel, kThreads), 4096)),
                        kThreads, 0, stream>>>(mom, base, x, numel, left ? m : r, left,
                                               t.row, t.scalars, t.col_factor, b1, t.skip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace flora
