// projection="orthogonal" on the CUDA path (docs/FLORA.md §5.1): its down projection is
// K (P X) (left) or (X P) K (right), K = s^2 Gram^-1 (r x r), Gram = P P^T or P^T P. This
// file computes K from the Gram, a batch of matrices at a time.
#include "config.cuh"
#include "launch.h"

#include <c10/cuda/CUDAException.h>

#include <cmath>

namespace flora {
namespace cuda_detail {
namespace {

constexpr int kInverseThreads = 1024;

// One block a matrix: out = scale * gram^-1 by Gauss-Jordan elimination in float64 in
// `work` (r x r, then a column of r). Without pivoting: for a symmetric positive definite
// matrix every pivot is positive (a Schur complement's diagonal), and elimination in that
// order is stable. A pivot that is not positive or not finite means the Gram is not
// positive definite: a kernel cannot raise, so that matrix's K is all NaN.
__global__ void __launch_bounds__(kInverseThreads)
    scaled_inverse_kernel(const float* __restrict__ grams, float* __restrict__ outs,
                          double* __restrict__ works, int r, double scale) {
  const int64_t rr = int64_t(r) * r;
  const float* gram = grams + blockIdx.x * rr;
  float* out = outs + blockIdx.x * rr;
  double* a = works + blockIdx.x * (rr + r);
  double* col = a + rr;
  for (int64_t e = threadIdx.x; e < rr; e += blockDim.x) a[e] = gram[e];
  __syncthreads();
  bool definite = true;
  for (int p = 0; p < r; ++p) {
    const double pivot = a[int64_t(p) * r + p];  // the same value in every thread
    __syncthreads();  // read before row p is rewritten
    if (!(pivot > 0.0) || !isfinite(pivot)) {
      definite = false;
      break;
    }
    // Column p (the multipliers, before they are overwritten), then row p / pivot.
    for (int i = threadIdx.x; i < r; i += blockDim.x)
      col[i] = i == p ? 0.0 : a[int64_t(i) * r + p];
    for (int j = threadIdx.x; j < r; j += blockDim.x) {
      const int64_t e = int64_t(p) * r + j;
      a[e] = (j == p ? 1.0 : a[e]) / pivot;
    }
    __syncthreads();
    // Every other row: a_i -= col_i a_p, column p becoming the inverse's.
    for (int e = threadIdx.x; e < rr; e += blockDim.x) {  // rr < 2^31: 32-bit division
      const int i = e / r, j = e % r;
      if (i == p) continue;
      a[e] = (j == p ? 0.0 : a[e]) - col[i] * a[int64_t(p) * r + j];
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < rr; e += blockDim.x)
    out[e] = definite ? static_cast<float>(scale * a[e]) : NAN;
}

}  // namespace

int64_t scaled_inverse_work_floats(int64_t r, int64_t count) {
  // Asked while the call is planned, before anything is written.
  TORCH_CHECK(r <= 46340, "flora: projection='orthogonal' on CUDA supports rank <= 46340, "
              "got ", r);
  return 2 * count * (r * r + r);  // doubles
}

void launch_scaled_inverse(const float* grams, float* outs, double* work, int64_t r,
                           int64_t count, double scale, cudaStream_t stream) {
  if (count == 0 || r == 0) return;
  scaled_inverse_kernel<<<static_cast<unsigned>(count), kInverseThreads, 0, stream>>>(
      grams, outs, work, static_cast<int>(r), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace flora
