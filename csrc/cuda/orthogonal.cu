// projection="orthogonal" on the CUDA path (docs/FLORA.md §5.1): the basis P_o = s R^-T P
// (left, r x long) or P R^-1 s (right, long x r), R the upper Cholesky factor of the r x r
// Gram (P P^T = R^T R, or P^T P), takes P's place in every product of the step. This file
// computes W = s R^-T (r x r, lower triangular) from the Gram, a batch of matrices at a
// time; the W cache; and, for the unfused path, the Gram and P_o = W P (P W^T) in float64.
#include "config.cuh"
#include "launch.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace flora {
namespace cuda_detail {
namespace {

constexpr int kBasisThreads = 1024;
constexpr int kGramTile = 16;

// Where (a, b), a <= b, lies in the packed upper triangle of an r x r matrix.
__device__ __forceinline__ int64_t packed_at(int64_t a, int64_t b, int64_t r) {
  return a * r - a * (a - 1) / 2 + (b - a);
}

// One block a matrix: W = s R^-T = s D^-1/2 L^-1 by Gaussian elimination without pivoting,
// Gram = L D L^T (L unit lower triangular, D the pivots: the Cholesky factor is L D^1/2).
// Eliminating below pivot p applies L^-1's row operations, so after the last pivot the
// rows hold D L^T (left of the diagonal: zeros) and the operations themselves are L^-1.
// Storage is one packed triangle, slot (a, b) for a <= b: the Schur complement is
// symmetric, so while both a, b >= p the slot holds its (a, b) entry; once a < p it holds
// L^-1's entry (b, a), whose column a retired with pivot a; (a, a) keeps the pivot D_a.
// Pivot p then updates every slot (a, b) with b > p: (p, b) becomes -c_b = -a_pb / d, any
// other loses col_a col_b / d, col being the pivot's row before the update (its Schur row
// right of p, L^-1's row p left of it). In shared memory when `in_shared`, else in `works`
// (basis_work_floats), T float (fused path: r <= half of P's long side, cond(Gram) <= ~34)
// or double. The Gram comes from `grams32` (fp32) or `grams64` (float64), r x r row-major;
// W goes to `outs16` (fp16 bits) or `outs64` (float64), whichever is not null. Without
// pivoting every pivot of a positive definite matrix is positive (a Schur complement's
// diagonal); one that is not positive or not finite gives an all-NaN W (a kernel cannot
// raise).
template <typename T>
__global__ void __launch_bounds__(kBasisThreads)
    packed_basis_kernel(const float* __restrict__ grams32, const double* __restrict__ grams64,
                        T* __restrict__ works, uint16_t* __restrict__ outs16,
                        double* __restrict__ outs64, int r, double s, bool in_shared) {
  extern __shared__ __align__(16) unsigned char basis_raw[];
  const int64_t rr = int64_t(r) * r;
  const int64_t packed = int64_t(r) * (r + 1) / 2 + r;  // the triangle, then col
  T* const tri = in_shared ? reinterpret_cast<T*>(basis_raw) : works + blockIdx.x * packed;
  T* const col = tri + (packed - r);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  for (int a = warp; a < r; a += warps) {
    for (int b = a + lane; b < r; b += 32) {
      const int64_t e = blockIdx.x * rr + int64_t(a) * r + b;
      tri[packed_at(a, b, r)] = static_cast<T>(grams32 != nullptr ? double(grams32[e])
                                                                   : grams64[e]);
    }
  }
  __syncthreads();
  bool definite = true;
  for (int p = 0; p < r; ++p) {
    const T d = tri[packed_at(p, p, r)];  // the same value in every thread
    for (int i = threadIdx.x; i < r; i += blockDim.x)
      col[i] = i < p ? tri[packed_at(i, p, r)] : tri[packed_at(p, i, r)];
    __syncthreads();  // col complete, d read, before anything is rewritten
    if (!(d > T(0)) || !isfinite(d)) {
      definite = false;
      break;
    }
    const T inv = T(1) / d;
    for (int a = warp; a < r; a += warps) {
      const T ca = col[a];
      const int64_t row = packed_at(a, a, r) - a;
      for (int b = (a > p ? a : p + 1) + lane; b < r; b += 32) {
        const T cb = col[b] * inv;
        tri[row + b] = a == p ? -cb : tri[row + b] - ca * cb;
      }
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < rr; e += blockDim.x) {
    const int i = static_cast<int>(e / r), j = static_cast<int>(e % r);
    double w = 0.0;
    if (!definite) {
      w = NAN;
    } else if (j <= i) {
      const double scaled = s / sqrt(static_cast<double>(tri[packed_at(i, i, r)]));
      w = j == i ? scaled : scaled * static_cast<double>(tri[packed_at(j, i, r)]);
    }
    if (outs16 != nullptr) outs16[blockIdx.x * rr + e] = __half_as_ushort(__double2half(w));
    if (outs64 != nullptr) outs64[blockIdx.x * rr + e] = w;
  }
}

// gram = A A^T in float64 (r x r), A (r x length) being P (left, r x length row-major) or
// P^T (right, P length x r). Tiles of kGramTile^2 outputs a block, the operands staged in
// shared memory along the contraction; loads coalesce along P's rows either way.
__global__ void gram_f64_kernel(const float* __restrict__ p, double* __restrict__ gram, int r,
                                int64_t length, bool left) {
  __shared__ double a_tile[kGramTile][kGramTile + 1];  // [row of A][l]
  __shared__ double b_tile[kGramTile][kGramTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int i0 = blockIdx.y * kGramTile, j0 = blockIdx.x * kGramTile;
  const auto at = [&](int row, int64_t l) -> double {  // A[row][l], 0 outside
    if (row >= r || l >= length) return 0.0;
    return left ? p[int64_t(row) * length + l] : p[l * r + row];
  };
  double sum = 0.0;
  for (int64_t l0 = 0; l0 < length; l0 += kGramTile) {
    // left: threads along l read along a row of P; right: along A's rows (P's columns).
    const int row = left ? ty : tx, l = left ? tx : ty;
    a_tile[row][l] = at(i0 + row, l0 + l);
    b_tile[row][l] = at(j0 + row, l0 + l);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kGramTile; ++q) sum += a_tile[ty][q] * b_tile[tx][q];
    __syncthreads();
  }
  if (i0 + ty < r && j0 + tx < r) gram[int64_t(i0 + ty) * r + j0 + tx] = sum;
}

// out = W x (left: x r x others, out r x others) or x W^T (right: x others x r, out
// others x r) with float64 accumulation, W (r x r) in float64: P_o from P. Tiles of
// kGramTile^2 outputs a block (grid.x along `others`, grid.y along r), W and x staged in
// shared memory along the contraction; loads coalesce along x's rows.
template <bool kLeft>
__global__ void basis_f64_kernel(const double* __restrict__ w, const float* __restrict__ x,
                                 float* __restrict__ out, int r, int64_t others) {
  __shared__ double w_tile[kGramTile][kGramTile + 1];
  __shared__ double x_tile[kGramTile][kGramTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t o0 = int64_t(blockIdx.x) * kGramTile;
  const int r0 = blockIdx.y * kGramTile;
  double sum = 0.0;
  for (int l0 = 0; l0 < r; l0 += kGramTile) {
    if constexpr (kLeft) {  // out[a][j] = sum_l W[a][l] x[l][j], a = r0 + ty, j = o0 + tx
      const int a = r0 + ty, l = l0 + ty;
      const int64_t j = o0 + tx;
      w_tile[ty][tx] = a < r && l0 + tx < r ? w[int64_t(a) * r + l0 + tx] : 0.0;
      x_tile[ty][tx] = l < r && j < others ? double(x[int64_t(l) * others + j]) : 0.0;
      __syncthreads();
#pragma unroll
      for (int q = 0; q < kGramTile; ++q) sum += w_tile[ty][q] * x_tile[q][tx];
    } else {  // out[i][c] = sum_l x[i][l] W[c][l], i = o0 + ty, c = r0 + tx
      const int64_t i = o0 + ty;
      const int l = l0 + ty, c = r0 + tx;
      x_tile[ty][tx] = i < others && l0 + tx < r ? double(x[i * r + l0 + tx]) : 0.0;
      w_tile[ty][tx] = l < r && c < r ? w[int64_t(c) * r + l] : 0.0;
      __syncthreads();
#pragma unroll
      for (int q = 0; q < kGramTile; ++q) sum += x_tile[ty][q] * w_tile[q][tx];
    }
    __syncthreads();
  }
  if constexpr (kLeft) {
    if (r0 + ty < r && o0 + tx < others)
      out[int64_t(r0 + ty) * others + o0 + tx] = static_cast<float>(sum);
  } else {
    if (o0 + ty < others && r0 + tx < r)
      out[(o0 + ty) * r + r0 + tx] = static_cast<float>(sum);
  }
}

int64_t packed_elems(int64_t r) { return r * (r + 1) / 2 + r; }

}  // namespace

int64_t basis_work_floats(int64_t r, int64_t count) {
  // Asked while the call is planned, before anything is written.
  TORCH_CHECK(r <= 46340, "flora: projection='orthogonal' on CUDA supports rank <= 46340, "
              "got ", r);
  return 2 * count * (r * r + packed_elems(r));  // doubles: the Gram, the packed triangle
}

void launch_basis_w(const float* grams32, double* work, uint16_t* outs16, double* outs64,
                    int64_t r, int64_t count, double s, cudaStream_t stream) {
  if (count == 0 || r == 0) return;
  // The float64 Grams (grams32 null) are in `work`; the triangles follow them.
  const double* grams64 = grams32 != nullptr ? nullptr : work;
  double* const tri64 = work + count * r * r;
  const int64_t elems = packed_elems(r);
  const auto run = [&](auto kernel, auto* tri, int64_t elem_bytes) {
    const int64_t bytes = elems * elem_bytes;
    const bool in_shared = bytes <= smem_optin();
    if (in_shared) allow_smem(kernel, bytes);
    kernel<<<static_cast<unsigned>(count), kBasisThreads,
             in_shared ? static_cast<size_t>(bytes) : 0, stream>>>(
        grams32, grams64, tri, outs16, outs64, static_cast<int>(r), s, in_shared);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // The fused path's Grams (fp32, cond <= ~34) in float where double does not fit shared
  // memory (r > 239 on an H100) but float does (r <= 339); float64 otherwise.
  const bool float_fits = elems * int64_t(sizeof(float)) <= smem_optin();
  const bool double_fits = elems * int64_t(sizeof(double)) <= smem_optin();
  if (grams32 != nullptr && outs16 != nullptr && !double_fits && float_fits) {
    run(packed_basis_kernel<float>, reinterpret_cast<float*>(tri64), sizeof(float));
  } else {
    run(packed_basis_kernel<double>, tri64, sizeof(double));
  }
}

void launch_gram_f64(const float* p, double* gram, int64_t r, int64_t length, bool left,
                     cudaStream_t stream) {
  if (r == 0) return;
  const unsigned tiles = static_cast<unsigned>(ceil_div(r, kGramTile));
  gram_f64_kernel<<<dim3(tiles, tiles), dim3(kGramTile, kGramTile), 0, stream>>>(
      p, gram, static_cast<int>(r), length, left);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_basis_f64(const double* w, const float* x, float* out, int64_t r, int64_t others,
                      bool left, cudaStream_t stream) {
  if (r == 0 || others == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(others, kGramTile)),
                  static_cast<unsigned>(ceil_div(r, kGramTile)));
  const dim3 block(kGramTile, kGramTile);
  if (left) {
    basis_f64_kernel<true><<<grid, block, 0, stream>>>(w, x, out, static_cast<int>(r), others);
  } else {
    basis_f64_kernel<false><<<grid, block, 0, stream>>>(w, x, out, static_cast<int>(r), others);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


// ---- the W cache ------------------------------------------------------------

struct WReadyEvent {
  cudaEvent_t event = nullptr;
  WReadyEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming)); }
  ~WReadyEvent() {
    if (event != nullptr) (void)cudaEventDestroy(event);  // released once it has completed
  }
  WReadyEvent(const WReadyEvent&) = delete;
  WReadyEvent& operator=(const WReadyEvent&) = delete;
};

namespace {

// All of them together: past this many bytes the cache starts again empty.
constexpr int64_t kWCacheBytes = int64_t(1) << 30;

struct WKeyHash {
  size_t operator()(const WCacheKey& k) const {
    size_t h = std::hash<int64_t>()(k.seed);
    for (const int64_t v : {int64_t(k.device), k.r, k.length, k.batch,
                            int64_t(k.left) * 2 + int64_t(k.fused)})
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};

struct WEntry {
  at::Tensor w;
  std::shared_ptr<WReadyEvent> ready;
};

// Never destroyed: tensors freed at exit could outlive the allocator.
std::mutex w_mutex;
auto& w_entries = *new std::unordered_map<WCacheKey, WEntry, WKeyHash>();
int64_t w_bytes = 0;

int64_t bytes_of(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace

WSlot w_take(const WCacheKey& key) {
  WSlot slot;
  slot.key = key;
  {
    std::lock_guard<std::mutex> lock(w_mutex);
    const auto it = w_entries.find(key);
    if (it != w_entries.end()) {
      slot.w = it->second.w;  // the slot's reference outlives an eviction
      slot.ready = it->second.ready;
      return slot;
    }
  }
  slot.miss = true;
  slot.w = at::empty({key.r, key.r}, at::TensorOptions()
                                         .device(at::Device(at::kCUDA, key.device))
                                         .dtype(key.fused ? at::kHalf : at::kDouble));
  slot.ready = std::make_shared<WReadyEvent>();
  return slot;
}

void w_ready(const WSlot& slot) {
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  // Freed later, the block must wait for this stream's reads too.
  c10::cuda::CUDACachingAllocator::recordStream(slot.w.storage().data_ptr(), stream);
  C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), slot.ready->event, 0));
}

void w_publish(const WSlot& slot) {
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  c10::cuda::CUDACachingAllocator::recordStream(slot.w.storage().data_ptr(), stream);
  C10_CUDA_CHECK(cudaEventRecord(slot.ready->event, stream.stream()));
  std::lock_guard<std::mutex> lock(w_mutex);
  const int64_t bytes = bytes_of(slot.w);
  if (w_bytes + bytes > kWCacheBytes) {
    w_entries.clear();
    w_bytes = 0;
  }
  if (w_entries.try_emplace(slot.key, WEntry{slot.w, slot.ready}).second) w_bytes += bytes;  // else another thread's equal W is cached already
}

void w_drop(const WCacheKey& key) {
  std::lock_guard<std::mutex> lock(w_mutex);
  for (auto it = w_entries.begin(); it != w_entries.end();) {
    WCacheKey any_batch = it->first;
    any_batch.batch = key.batch;
    if (any_batch == key) {
      w_bytes -= bytes_of(it->second.w);
      it = w_entries.erase(it);
    } else {
      ++it;
    }
  }
}

int64_t w_cache_clear() {
  std::lock_guard<std::mutex> lock(w_mutex);
  const int64_t count = static_cast<int64_t>(w_entries.size());
  w_entries.clear();
  w_bytes = 0;
  return count;
}

int64_t w_cache_entries() {
  std::lock_guard<std::mutex> lock(w_mutex);
  return static_cast<int64_t>(w_entries.size());
}

}  // namespace cuda_detail
}  // namespace flora
