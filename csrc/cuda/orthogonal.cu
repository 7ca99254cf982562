// projection="orthogonal" on the CUDA path (docs/FLORA.md §5.1): its down projection is
// K (P X) (left) or (X P) K (right), K = s^2 Gram^-1 (r x r), Gram = P P^T or P^T P. This
// file computes K from the Gram, a batch of matrices at a time, and, for the unfused path,
// the Gram and the products with K in float64.
#include "config.cuh"
#include "launch.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace flora {
namespace cuda_detail {
namespace {

constexpr int kInverseThreads = 1024;
constexpr int kGramTile = 16;

// One block a matrix: K = scale * gram^-1 by Gauss-Jordan elimination in float64 (r x r,
// then a column of r) in shared memory when `in_shared` (the matrix fits), else in `work`,
// which holds K in float64 afterwards either way; `outs` (unless null) gets K in float32.
// The Gram comes from `grams` (float32) or, when that is null, from `work` (float64).
// Every elimination step passes over the whole matrix: shared memory spares r round trips
// to L2. Without pivoting: for a symmetric positive definite matrix every pivot is positive
// (a Schur complement's diagonal), and elimination in that order is stable. A pivot that is
// not positive or not finite means the Gram is not positive definite: a kernel cannot
// raise, so that matrix's K is all NaN.
__global__ void __launch_bounds__(kInverseThreads)
    scaled_inverse_kernel(const float* __restrict__ grams, float* __restrict__ outs,
                          double* __restrict__ works, int r, double scale, bool in_shared) {
  extern __shared__ double staged[];
  const int64_t rr = int64_t(r) * r;
  double* work = works + blockIdx.x * (rr + r);
  double* a = in_shared ? staged : work;
  double* col = a + rr;
  if (grams != nullptr) {
    const float* gram = grams + blockIdx.x * rr;
    for (int64_t e = threadIdx.x; e < rr; e += blockDim.x) a[e] = gram[e];
  } else if (in_shared) {
    for (int64_t e = threadIdx.x; e < rr; e += blockDim.x) a[e] = work[e];
  }
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
  float* out = outs != nullptr ? outs + blockIdx.x * rr : nullptr;
  for (int64_t e = threadIdx.x; e < rr; e += blockDim.x) {
    const double k = definite ? scale * a[e] : NAN;
    work[e] = k;
    if (out != nullptr) out[e] = static_cast<float>(k);
  }
}

// The fused path's K where the float64 matrix does not fit shared memory (r > 167 on an
// H100): one block a matrix, K = scale * gram^-1 by the sweep operator on the upper
// triangle only, in shared memory in T (double up to r = 239, float up to r = 339 on an
// H100). Sweeping pivot k of a symmetric matrix keeps it symmetric (a_ij -= a_ik a_kj / d
// for i, j != k; a_ik /= d; a_kk = -1 / d, d = a_kk) and leaves -gram^-1 after every
// pivot; each pivot is a Schur complement's diagonal, positive for a positive definite
// Gram. In float: the fused path takes only r <= half of P's long side, where cond(Gram)
// <= ~34, so K keeps ~1e-5 relative, far inside the TF32 product that applies it. Reads the
// Gram's upper triangle; a pivot that is not positive or not finite gives an all-NaN K.
template <typename T>
__global__ void __launch_bounds__(kInverseThreads)
    packed_inverse_kernel(const float* __restrict__ grams, float* __restrict__ outs, int r,
                          double scale) {
  extern __shared__ __align__(16) unsigned char packed_raw[];
  T* const tri = reinterpret_cast<T*>(packed_raw);  // row i: (i, i) .. (i, r - 1)
  T* const col = tri + r * (r + 1) / 2;             // a_ik of the pivot k, every i
  const int64_t rr = int64_t(r) * r;
  const float* gram = grams + blockIdx.x * rr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  const auto row_at = [r](int i) { return i * r - i * (i - 1) / 2; };  // where (i, i) is
  for (int i = warp; i < r; i += warps) {
    const int at = row_at(i) - i;
    for (int j = i + lane; j < r; j += 32) tri[at + j] = static_cast<T>(gram[i * r + j]);
  }
  __syncthreads();
  bool definite = true;
  for (int k = 0; k < r; ++k) {
    const T d = tri[row_at(k)];  // the same value in every thread
    for (int i = threadIdx.x; i < r; i += blockDim.x)
      col[i] = i <= k ? tri[row_at(i) + k - i] : tri[row_at(k) + i - k];
    __syncthreads();  // col complete, d read, before row k is rewritten
    if (!(d > T(0)) || !isfinite(d)) {
      definite = false;
      break;
    }
    const T inv = T(1) / d;
    for (int i = warp; i < r; i += warps) {
      const int at = row_at(i) - i;
      const T ci = col[i];
      for (int j = i + lane; j < r; j += 32) {
        T v;
        if (i == k && j == k) v = -inv;
        else if (i == k) v = col[j] * inv;
        else if (j == k) v = ci * inv;
        else v = tri[at + j] - ci * (col[j] * inv);
        tri[at + j] = v;
      }
    }
    __syncthreads();
  }
  float* out = outs + blockIdx.x * rr;
  for (int64_t e = threadIdx.x; e < rr; e += blockDim.x) {
    const int i = static_cast<int>(e / r), j = static_cast<int>(e % r);
    const int lo = i < j ? i : j, hi = i < j ? j : i;
    out[e] = definite ? static_cast<float>(-scale * static_cast<double>(
                                                        tri[row_at(lo) + hi - lo]))
                      : NAN;
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

// out = K x (left: x r x others, out r x others) or x K (right: x others x r, out
// others x r) with float64 accumulation, K (r x r) in float64. Tiles of kGramTile^2
// outputs a block (grid.x along `others`, grid.y along r), K and x staged in shared memory
// along the contraction; loads coalesce along rows.
template <bool kLeft>
__global__ void apply_f64_kernel(const double* __restrict__ k, const float* __restrict__ x,
                                 float* __restrict__ out, int r, int64_t others) {
  __shared__ double k_tile[kGramTile][kGramTile + 1];
  __shared__ double x_tile[kGramTile][kGramTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t o0 = int64_t(blockIdx.x) * kGramTile;
  const int r0 = blockIdx.y * kGramTile;
  double sum = 0.0;
  for (int l0 = 0; l0 < r; l0 += kGramTile) {
    if constexpr (kLeft) {  // out[a][j] = sum_l K[a][l] x[l][j], a = r0 + ty, j = o0 + tx
      const int a = r0 + ty, l = l0 + ty;
      const int64_t j = o0 + tx;
      k_tile[ty][tx] = a < r && l0 + tx < r ? k[int64_t(a) * r + l0 + tx] : 0.0;
      x_tile[ty][tx] = l < r && j < others ? double(x[int64_t(l) * others + j]) : 0.0;
      __syncthreads();
#pragma unroll
      for (int q = 0; q < kGramTile; ++q) sum += k_tile[ty][q] * x_tile[q][tx];
    } else {  // out[i][c] = sum_l x[i][l] K[l][c], i = o0 + ty, c = r0 + tx
      const int64_t i = o0 + ty;
      const int l = l0 + ty, c = r0 + tx;
      x_tile[ty][tx] = i < others && l0 + tx < r ? double(x[i * r + l0 + tx]) : 0.0;
      k_tile[ty][tx] = l < r && c < r ? k[int64_t(l) * r + c] : 0.0;
      __syncthreads();
#pragma unroll
      for (int q = 0; q < kGramTile; ++q) sum += x_tile[ty][q] * k_tile[q][tx];
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
  const int64_t bytes = (r * r + r) * static_cast<int64_t>(sizeof(double));
  const bool in_shared = bytes <= smem_optin();  // r <= 167 on an H100, 142 on an A100
  // The fused path (fp32 Grams in, fp32 K out) past that: the packed triangle.
  const int64_t packed = r * (r + 1) / 2 + r;
  const auto packed_launch = [&](auto kernel, int64_t packed_bytes) {
    allow_smem(kernel, packed_bytes);
    kernel<<<static_cast<unsigned>(count), kInverseThreads,
             static_cast<size_t>(packed_bytes), stream>>>(grams, outs, static_cast<int>(r),
                                                          scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (!in_shared && grams != nullptr && outs != nullptr) {
    if (packed * int64_t(sizeof(double)) <= smem_optin()) {
      packed_launch(packed_inverse_kernel<double>, packed * int64_t(sizeof(double)));
      return;
    }
    if (packed * int64_t(sizeof(float)) <= smem_optin()) {
      packed_launch(packed_inverse_kernel<float>, packed * int64_t(sizeof(float)));
      return;
    }
  }
  if (in_shared) allow_smem(scaled_inverse_kernel, bytes);
  scaled_inverse_kernel<<<static_cast<unsigned>(count), kInverseThreads,
                          in_shared ? static_cast<size_t>(bytes) : 0, stream>>>(
      grams, outs, work, static_cast<int>(r), scale, in_shared);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_gram_f64(const float* p, double* gram, int64_t r, int64_t length, bool left,
                     cudaStream_t stream) {
  if (r == 0) return;
  const unsigned tiles = static_cast<unsigned>(ceil_div(r, kGramTile));
  gram_f64_kernel<<<dim3(tiles, tiles), dim3(kGramTile, kGramTile), 0, stream>>>(
      p, gram, static_cast<int>(r), length, left);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_apply_f64(const double* k, const float* x, float* out, int64_t r, int64_t others,
                      bool left, cudaStream_t stream) {
  if (r == 0 || others == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(others, kGramTile)),
                  static_cast<unsigned>(ceil_div(r, kGramTile)));
  const dim3 block(kGramTile, kGramTile);
  if (left) {
    apply_f64_kernel<true><<<grid, block, 0, stream>>>(k, x, out, static_cast<int>(r), others);
  } else {
    apply_f64_kernel<false><<<grid, block, 0, stream>>>(k, x, out, static_cast<int>(r), others);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


// ---- the K cache ------------------------------------------------------------

struct KReadyEvent {
  cudaEvent_t event = nullptr;
  KReadyEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming)); }
  ~KReadyEvent() {
    if (event != nullptr) (void)cudaEventDestroy(event);  // released once it has completed
  }
  KReadyEvent(const KReadyEvent&) = delete;
  KReadyEvent& operator=(const KReadyEvent&) = delete;
};

namespace {

// All of them together: past this many bytes the cache starts again empty.
constexpr int64_t kKCacheBytes = int64_t(1) << 30;

struct KKeyHash {
  size_t operator()(const KCacheKey& k) const {
    size_t h = std::hash<int64_t>()(k.seed);
    for (const int64_t v : {int64_t(k.device), k.r, k.length, k.batch,
                            int64_t(k.left) * 2 + int64_t(k.fused)})
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};

struct KEntry {
  at::Tensor k;
  std::shared_ptr<KReadyEvent> ready;
};

// Never destroyed: tensors freed at exit could outlive the allocator.
std::mutex k_mutex;
auto& k_entries = *new std::unordered_map<KCacheKey, KEntry, KKeyHash>();
int64_t k_bytes = 0;

int64_t bytes_of(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace

KSlot k_take(const KCacheKey& key) {
  KSlot slot;
  slot.key = key;
  {
    std::lock_guard<std::mutex> lock(k_mutex);
    const auto it = k_entries.find(key);
    if (it != k_entries.end()) {
      slot.k = it->second.k;  // the slot's reference outlives an eviction
      slot.ready = it->second.ready;
      return slot;
    }
  }
  slot.miss = true;
  slot.k = at::empty({key.r, key.r}, at::TensorOptions()
                                         .device(at::Device(at::kCUDA, key.device))
                                         .dtype(key.fused ? at::kFloat : at::kDouble));
  slot.ready = std::make_shared<KReadyEvent>();
  return slot;
}

void k_ready(const KSlot& slot) {
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  // Freed later, the block must wait for this stream's reads too.
  c10::cuda::CUDACachingAllocator::recordStream(slot.k.storage().data_ptr(), stream);
  C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), slot.ready->event, 0));
}

void k_publish(const KSlot& slot) {
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  c10::cuda::CUDACachingAllocator::recordStream(slot.k.storage().data_ptr(), stream);
  C10_CUDA_CHECK(cudaEventRecord(slot.ready->event, stream.stream()));
  std::lock_guard<std::mutex> lock(k_mutex);
  const int64_t bytes = bytes_of(slot.k);
  if (k_bytes + bytes > kKCacheBytes) {
    k_entries.clear();
    k_bytes = 0;
  }
  if (k_entries.try_emplace(slot.key, KEntry{slot.k, slot.ready}).second) k_bytes += bytes;  // else another thread's equal K is cached already
}

void k_drop(const KCacheKey& key) {
  std::lock_guard<std::mutex> lock(k_mutex);
  for (auto it = k_entries.begin(); it != k_entries.end();) {
    KCacheKey any_batch = it->first;
    any_batch.batch = key.batch;
    if (any_batch == key) {
      k_bytes -= bytes_of(it->second.k);
      it = k_entries.erase(it);
    } else {
      ++it;
    }
  }
}

int64_t k_cache_clear() {
  std::lock_guard<std::mutex> lock(k_mutex);
  const int64_t count = static_cast<int64_t>(k_entries.size());
  k_entries.clear();
  k_bytes = 0;
  return count;
}

int64_t k_cache_entries() {
  std::lock_guard<std::mutex> lock(k_mutex);
  return static_cast<int64_t>(k_entries.size());
}

}  // namespace cuda_detail
}  // namespace flora
