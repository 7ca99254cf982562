// The momentum work of fused compressed tensors, per group of one shape, before the
// apply pass: P^T and the tiled P (projection_t_kernel), the r x r products Gram and S
// in batched cuBLAS, the down GEMM (down_gemm.cu) and beta1^2 <Gram, S>.
#include "config.cuh"
#include "launch.h"
#include "task_table.cuh"
#include "vector_io.cuh"
#include "mma.cuh"
#include "projection.cuh"
#include "quant_io.cuh"
#include "../common/random.h"
#include "../common/rules.h"
#include "flora/ops.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace flora {
namespace cuda_detail {
namespace {


// ---- fused compressed momentum ------------------------------------------------
//
// D = (1 - beta1) U + beta1 up(M) is never stored: the apply pass computes up(M)
// tile by tile on the tensor cores and writes p from it. Its clip factor needs
// sum D^2 first, from (docs/FLORA.md's identities, M the momentum before this step)
//   sum D^2 = (1 - beta1)^2 sum U^2 + 2 beta1 (1 - beta1) <down(U), M>
//             + beta1^2 <M, Gram M>,
// Gram = P P^T (left) or P^T P (right), r x r: <U, up(M)> = <down(U), M> and
// |up(M)|^2 = <M, Gram M>. sum U^2 comes with the row stats (or the rms pass), and
// down(U) is the GEMM the momentum needs anyway (fused_down_kernel).
//
// 16-bit tasks take the down GEMM in cuBLAS instead (Tuning::down_library): the gradient as
// it is times P scaled along the contraction in its dtype, then down_epilogue_kernel.
// Otherwise both GEMMs read their operands as fp16: the 10-bit mantissa of TF32 (what cuBLAS's
// TF32 mode keeps) at half the bytes, which they stream from L2 for every tile (8 bytes
// an output element in fp32), and twice the tensor-core rate. P ~ N(0, 1/r) is far
// inside fp16's range; so are U (RMS ~1; a lone element reaches ~sqrt(n) / (1 - beta2))
// and M, a projection of U, |M| <~ n / sqrt(r); values past 65504 saturate instead of
// becoming inf (a gradient spike that large is clipped in D anyway).


// Writes P's entries (kr, 4 cg .. 4 cg + 3) as fp16 into P^T (`plain_t`, pcol x prow) and
// into the tiled layout of the down GEMM (`tiled`; nullptr for the library down GEMM's
// tasks, which read only P^T).
__device__ __forceinline__ void store_halves(uint16_t* __restrict__ plain_t,
                                             uint16_t* __restrict__ tiled, bool left, int kr,
                                             int cg, int prow, int pcol, const float z[4]) {
  uint16_t h[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    h[u] = to_half_bits(z[u]);
    plain_t[int64_t(4 * cg + u) * prow + kr] = h[u];
  }
  if (tiled == nullptr) return;
  if (left) {  // rank kr, k 4 cg .. 4 cg + 3: one half of a core row
    const int64_t ktiles = ceil_div(pcol, kTileK);
    *reinterpret_cast<uint2*>(tiled + tiled_index(kr, 4 * cg, ktiles)) =
        make_uint2(h[0] | (uint32_t(h[1]) << 16), h[2] | (uint32_t(h[3]) << 16));
  } else {  // k kr, rank 4 cg .. 4 cg + 3
    const int64_t ktiles = ceil_div(prow, kTileK);
#pragma unroll
    for (int u = 0; u < 4; ++u) tiled[tiled_index(4 * cg + u, kr, ktiles)] = h[u];
  }
}

// P^T in fp16 for every task of a fused group, P being prow x pcol (pcol % 4 == 0);
// blockIdx.y picks the task's seed and output. Thread `idx` draws the Philox group of
// P's row kr, columns 4 cg .. 4 cg + 3 (the same numbers as projection_pair_kernel);
// neighbouring threads take neighbouring rows, so the transposed writes coalesce.
// Also P in the tiled layout of the wgmma down GEMM (tiled_index; its padding zeroed
// beforehand), the contraction k being P's columns (left) or rows (right).
// Sizes are below 2^31 groups (checked on the host): 32-bit index arithmetic.
__global__ void projection_t_kernel(uint16_t* const* __restrict__ outs,
                                    uint16_t* const* __restrict__ tiled, bool left,
                                    const uint64_t* __restrict__ seeds, int prow, int pcol,
                                    double scale) {
  const int groups_per_row = pcol / 4;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= prow * groups_per_row) return;
  const int kr = idx % prow, cg = idx / prow;
  float z[4];
  projection_values(seeds[blockIdx.y], int64_t(kr) * groups_per_row + cg, scale, z);
  store_halves(outs[blockIdx.y], tiled[blockIdx.y], left, kr, cg, prow, pcol, z);
}

// projection="orthogonal": the basis P_o (fp32, in P^T's layout: task k's at raw + k psize,
// from the GEMM with W) rounded to fp16 in both of projection_t_kernel's layouts, over
// the Gaussian P there. The same threads and writes as projection_t_kernel.
__global__ void basis_halves_kernel(const float* __restrict__ raw,
                                    uint16_t* const* __restrict__ outs,
                                    uint16_t* const* __restrict__ tiled, bool left, int prow,
                                    int pcol) {
  const int groups_per_row = pcol / 4;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= prow * groups_per_row) return;
  const int kr = idx % prow, cg = idx / prow;
  const float* task = raw + int64_t(blockIdx.y) * prow * pcol;
  float z[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) z[u] = task[int64_t(4 * cg + u) * prow + kr];
  store_halves(outs[blockIdx.y], tiled[blockIdx.y], left, kr, cg, prow, pcol, z);
}

// The row factors a_i = row_scale(row_i) of left fused tasks, once a step: the down
// GEMM's conversion reads them instead of taking a division and a square root for every
// element (which made the sm_90a GEMM's left tasks issue-bound).
__global__ void row_factor_kernel(const DownJob* __restrict__ jobs, int n) {
  const DownJob& job = jobs[blockIdx.y];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) job.row_factor[i] = row_scale(job.row[i], job.scalars[kRowMean]);
}

// The library down GEMM's operand (Tuning::down_library): P^T (fp16, pcol x prow rows,
// job.proj) times the factors along the contraction, a_i of row i (left: P^T is n x r) or
// b_j of column j (right: r x m), rounded to the gradient's dtype, as the unfused path
// rounds (P diag a) and (diag b P) for 16-bit gradients; fp16 saturates at +-65504 (a
// factor that large belongs to a row or column of tiny gradients). prow % 4 == 0.
template <int DT>
__global__ void scale_projection_t_kernel(const DownJob* __restrict__ jobs,
                                          uint16_t* const* __restrict__ outs, bool left,
                                          int prow, int pcol) {
  const DownJob& job = jobs[blockIdx.y];
  uint16_t* out = outs[blockIdx.y];
  const int64_t quads = int64_t(prow) * pcol / 4;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < quads;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = 4 * q;
    const int64_t row = e / prow;
    const int col = static_cast<int>(e % prow);
    const uint2 h = *reinterpret_cast<const uint2*>(job.proj + e);
    const uint16_t in[4] = {static_cast<uint16_t>(h.x & 0xffffu), static_cast<uint16_t>(h.x >> 16),
                            static_cast<uint16_t>(h.y & 0xffffu), static_cast<uint16_t>(h.y >> 16)};
    uint16_t o[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float scale = left ? job.row_factor[row] : job.col_factor[col + u];
      float v = to_float<kF16>(in[u]) * scale;
      if constexpr (DT == kF16) v = fminf(fmaxf(v, -65504.f), 65504.f);
      o[u] = from_float<DT>(v);
    }
    *reinterpret_cast<uint2*>(out + e) =
        make_uint2(o[0] | (uint32_t(o[1]) << 16), o[2] | (uint32_t(o[3]) << 16));
  }
}

// beta1^2 <Gram, S> of a fused task in kDotBlocks partials, partials[tiles + b] from
// block b (grid: kDotBlocks, tasks), each over rr / kDotBlocks consecutive elements
// (rr = r^2, r % 8 == 0: whole float4s), summed by fused_clip_kernel in a fixed order.
// (One block a task took 25 us a launch: 0.6 ms a bf16 1.35B step.)
__global__ void __launch_bounds__(kThreads)
    gram_dot_kernel(const DownJob* __restrict__ jobs, int rr, int tiles, float beta1) {
  const DownJob& job = jobs[blockIdx.y];
  const int chunk4 = rr / 4 / kDotBlocks;
  const float4* g = reinterpret_cast<const float4*>(job.gram) + blockIdx.x * chunk4;
  const float4* q = reinterpret_cast<const float4*>(job.sq) + blockIdx.x * chunk4;
  double sum = 0.0;
  for (int e = threadIdx.x; e < chunk4; e += kThreads) {
    const float4 a = g[e], b = q[e];
    sum += double(a.x) * b.x + double(a.y) * b.y + double(a.z) * b.z + double(a.w) * b.w;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0)
    job.partials[tiles + blockIdx.x] = static_cast<double>(beta1) * beta1 * sum;
}



// The arrays of a shape group's table: one pointer (or seed) a task each, then the down
// GEMM's jobs (one pass, two on resample steps).
// projection="orthogonal" adds Gram' of the next Gaussian P (resample steps), the W of
// both bases (fp16, the cache's tensors) and the fp32 result of the product with W.
enum { kGramA, kGramC, kSqA, kSqC, kBasesA, kBasesB, kBasesC, kBaseA, kBaseB, kBaseC,
       kProjNow, kProjNext, kPlainNow, kPlainNext, kSeedNow, kSeedNext, kGramNextC, kWNow,
       kWNext, kRawC, kScaled, kGradIn, kDownX, kArrays };
static_assert(sizeof(DownJob) % sizeof(int64_t) == 0, "jobs follow the arrays aligned");
constexpr int64_t kJobWords = int64_t(sizeof(DownJob) / sizeof(int64_t));

// The shape every task of a group shares.
struct GroupShape {
  int64_t n, m, r, prow, pcol, psize, msize, kdim, tsize;
  bool left, resample, tile_padding, orthogonal;
};

GroupShape group_shape(const Item& first) {
  const ParamLayout& layout = first.entry->layout;
  GroupShape s;
  s.n = layout.rows;
  s.m = layout.cols;
  s.r = layout.rank;
  s.left = layout.left;
  const auto shape = layout.projection_shape();
  s.prow = shape[0];
  s.pcol = shape[1];
  s.psize = s.prow * s.pcol;
  s.msize = first.entry->state.momentum->numel();
  // P tiled for the sm_90a down GEMM; zeros where the tiles pass the rank or k.
  s.kdim = s.left ? s.n : s.m;
  s.tsize = tiled_halves(s.r, s.kdim);
  s.tile_padding = s.r % kTileRank != 0 || s.kdim % kTileK != 0;
  s.resample = first.entry->options.plans_resample();  // the same for the whole group
  s.orthogonal = first.entry->options.projection == Projection::kOrthogonal;  // likewise
  return s;
}

// Where a group's temporaries lie in its share of the workspace (offsets in floats, each
// array 16-byte aligned): Gram and S (count r x r each); on resample steps the next P^T
// and tiled P (fp16), the change of basis (count r x r) and M in the next basis;
// projection="orthogonal": W as computed (count r x r fp16; the cache's misses are copied
// from there to FusedWork::wslots), Gram' of the next Gaussian P (resample steps), W P in
// fp32 (count x P) and W's scratch.
struct GroupTemps {
  int64_t gram = 0, sq = 0, next_t = 0, next_p = 0, bases = 0, base = 0;
  int64_t w16 = 0, gram_next = 0, raw = 0, basis_work = 0, scaled = 0, x = 0, floats = 0;
};

GroupTemps group_temps(const GroupShape& s, int count, int down_chunk) {
  GroupTemps g;
  int64_t at = 0;
  const auto take = [&](int64_t floats) {
    const int64_t start = at;
    at += ceil_div(floats, 4) * 4;
    return start;
  };
  const int64_t rr = int64_t(count) * s.r * s.r;
  g.gram = take(rr);
  g.sq = take(rr);
  if (s.resample) {
    g.next_t = take(ceil_div(int64_t(count) * s.psize, 2));
    if (down_chunk == 0) g.next_p = take(ceil_div(int64_t(count) * s.tsize, 2));
    g.bases = take(rr);
    g.base = take(int64_t(count) * s.msize);
  }
  if (s.orthogonal) {
    g.w16 = take(ceil_div(rr, 2));
    if (s.resample) g.gram_next = take(rr);
    g.raw = take(int64_t(count) * s.psize);
    g.basis_work = take(basis_work_floats(s.r, count));
  }
  if (down_chunk > 0) {  // P^T scaled, in the gradient's dtype, and the GEMM's fp32 result
    g.scaled = take(ceil_div(int64_t(down_chunk) * s.psize, 2));
    g.x = take(int64_t(down_chunk) * s.msize);
  }
  g.floats = at;
  return g;
}

// The pointer arrays of a shape group's GEMMs: array `a` holds one pointer a task, on the
// host (host[a * count + k]) and in the uploaded table (device, at the same place). The
// GEMMs take tasks first .. first + n - 1 (n = 0: all of them).
struct GroupArrays {
  const void* const* host;
  const int64_t* device;
  int count;
  int64_t min_batched;
  int first = 0, n = 0;
};

// C_k = op(A_k) op(B_k) (fp32 C) for the tasks k of a group, A, B and C from arrays a, b,
// c. Batched from two tensors on. A lone GEMM gets split-K from cuBLAS and a batched one
// does not; once that made groups of two or three faster one GEMM a tensor (bf16 1.35B
// shapes, an early version: 24 against 31 ms a step). Now the batched calls win: bf16
// 1.35B cuBLAS time 0.73 against 0.94 ms a step (48 launches against 104), the resample
// step ~1 ms shorter, and each call saved is ~10 us of host time on small models.
// beta = 1 adds to C.
void group_gemm_of(const GroupArrays& g, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                   int a, int b, int type, int c, float beta = 0.f) {
  const int count = g.count, n = g.n > 0 ? g.n : count;
  if (n >= g.min_batched) {
    const auto arr = [&](int array) { return g.device + array * count + g.first; };
    gemm_batched(ta, tb, M, N, K, 1.f, reinterpret_cast<const void* const*>(arr(a)),
                 reinterpret_cast<const void* const*>(arr(b)), type, beta,
                 reinterpret_cast<void* const*>(arr(c)), n, true);
    return;
  }
  for (int k = g.first; k < g.first + n; ++k)
    gemm(ta, tb, M, N, K, 1.f, g.host[a * count + k], g.host[b * count + k], type, beta,
         static_cast<float*>(const_cast<void*>(g.host[c * count + k])), true);
}

}  // namespace

int64_t fused_temp_floats(const Item& first, int count, int down_chunk) {
  return group_temps(group_shape(first), count, down_chunk).floats;
}

int64_t library_down_task_bytes(const Item& first) {
  const GroupShape s = group_shape(first);
  return 2 * s.psize + 4 * s.msize;  // group_temps' scaled and x, a task each
}

int64_t fused_table_words(int count, bool resample) {
  return kArrays * int64_t(count) + (resample ? 2 : 1) * int64_t(count) * kJobWords;
}

// The table of a group, on the host: the pointer arrays of the batched GEMMs and of the
// projection kernel, the projection seeds, then the down GEMM's jobs. Every pointer is
// known when the call's workspace is, so the tables of all groups go to the device in
// the call's one upload.
void fill_fused_table(const FusedWork& w) {
  const GroupShape s = group_shape(*w.items[0]);
  const int count = static_cast<int>(w.items.size());
  const GroupTemps g = group_temps(s, count, w.down_chunk);
  const int64_t r = s.r;
  float* const gram = w.temps + g.gram;
  float* const sq = w.temps + g.sq;
  auto* const next_t = reinterpret_cast<uint16_t*>(w.temps + g.next_t);
  auto* const next_p = reinterpret_cast<uint16_t*>(w.temps + g.next_p);
  float* const bases = w.temps + g.bases;
  float* const base = w.temps + g.base;
  float* const gram_next = w.temps + g.gram_next;
  float* const raw = w.temps + g.raw;
  int64_t* const words = w.host;
  auto* ptrs = reinterpret_cast<const void**>(words);
  const auto set = [&](int array, int k, const void* p) { ptrs[array * count + k] = p; };
  auto* jobs = reinterpret_cast<DownJob*>(words + kArrays * count);
  for (int k = 0; k < count; ++k) {
    const StepOptions& o = w.items[k]->entry->options;
    const Task& t = *w.tasks[k];
    const FusedBuffers& buf = w.bufs[k];
    // 8-bit momentum is formed in the task's float32 stage (read back into it first on
    // resample steps, whose change of basis reads M through cuBLAS).
    float* mom = t.mc_codes != nullptr ? t.mc_stage
                                       : w.items[k]->entry->state.momentum->data_ptr<float>();
    // Temporaries of the next basis: only on resample steps (else null, unread).
    uint16_t* next_t_k = s.resample ? next_t + k * s.psize : nullptr;
    uint16_t* next_p_k = s.resample && w.down_chunk == 0 ? next_p + k * s.tsize : nullptr;
    float* bases_k = s.resample ? bases + k * r * r : nullptr;
    float* base_k = s.resample ? base + k * s.msize : nullptr;
    // Orthogonal: W of both bases, Gram' of the next Gaussian P and W P; else null, unread.
    const void* w_now_k = s.orthogonal ? w.wslots[k].w.data_ptr() : nullptr;
    const void* w_next_k = s.orthogonal && s.resample ? w.wslots_next[k].w.data_ptr() : nullptr;
    float* gram_next_k = s.orthogonal && s.resample ? gram_next + k * r * r : nullptr;
    float* raw_k = s.orthogonal ? raw + k * s.psize : nullptr;
    set(kGramA, k, buf.plain_t);
    set(kGramC, k, gram + k * r * r);
    set(kSqA, k, buf.momentum16);  // written by the down GEMM before S
    set(kSqC, k, sq + k * r * r);
    // bases = P_next P_now^T (left) or P_now^T P_next (right), from the transposes.
    set(kBasesA, k, s.left ? static_cast<const void*>(next_t_k) : buf.plain_t);
    set(kBasesB, k, s.left ? static_cast<const void*>(buf.plain_t) : next_t_k);
    set(kBasesC, k, bases_k);
    set(kBaseA, k, s.left ? static_cast<const void*>(bases_k) : mom);
    set(kBaseB, k, s.left ? static_cast<const void*>(mom) : bases_k);
    set(kBaseC, k, base_k);
    set(kProjNow, k, buf.plain_t);
    set(kProjNext, k, next_t_k);
    set(kPlainNow, k, buf.tiled);
    set(kPlainNext, k, next_p_k);
    set(kGramNextC, k, gram_next_k);
    set(kWNow, k, w_now_k);
    set(kWNext, k, w_next_k);
    set(kRawC, k, raw_k);
    // The library down GEMM: a scaled P^T and a result for each task of a chunk, which
    // the next chunk and the second pass of a resample step reuse (one after the other).
    const int64_t slot = w.down_chunk > 0 ? k % w.down_chunk : 0;
    float* x_k = w.down_chunk > 0 ? w.temps + g.x + slot * s.msize : nullptr;
    set(kScaled, k, w.down_chunk > 0
                        ? reinterpret_cast<uint16_t*>(w.temps + g.scaled) + slot * s.psize
                        : nullptr);
    set(kGradIn, k, w.items[k]->grad.data_ptr());
    set(kDownX, k, x_k);
    words[kSeedNow * count + k] = static_cast<int64_t>(o.seed);
    words[kSeedNext * count + k] = static_cast<int64_t>(next_seed(o.seed));
    DownJob now{w.items[k]->grad.data_ptr(), buf.plain_t,
                buf.tiled, mom, nullptr, buf.momentum16,
                t.terms + 1, gram + k * r * r, sq + k * r * r, t.row, t.scalars, t.col_factor,
                buf.row_factor};
    now.skip = t.skip;
    now.x = x_k;
    if (t.mc_codes != nullptr) {
      now.codes = t.mc_codes;
      now.absmax = t.mc_absmax;
      now.map = w.quant_maps + kMapSigned;
      now.read_codes = !s.resample;
    }
    jobs[k] = now;
    if (s.resample) {
      DownJob next = now;
      next.proj = next_t_k;
      next.proj_tiled = next_p_k;
      next.base = base_k;
      next.momentum16 = nullptr;
      next.partials = nullptr;
      jobs[count + k] = next;
    }
  }
}

FusedCounterWords fused_counter_words(const FusedWork& w, int k) {
  const int count = static_cast<int>(w.items.size());
  const GroupShape s = group_shape(*w.items[0]);
  auto* const words = const_cast<int64_t*>(w.device);  // the table in the workspace
  FusedCounterWords c{words + kSeedNow * count + k, words + kSeedNext * count + k, nullptr,
                      nullptr};
  if (s.resample) {
    auto* const jobs = reinterpret_cast<DownJob*>(words + kArrays * count);
    const auto* const host_jobs = reinterpret_cast<const DownJob*>(w.host + kArrays * count);
    c.next_base = &jobs[count + k].base;  // an address in device memory, not read here
    c.base = host_jobs[count + k].base;
  }
  return c;
}

// The momentum work of fused tasks of one shape (same n, m, rank, dtype), before the
// apply pass: P^T of the current basis (and of the next one on resample steps), the
// r x r products Gram = P P^T and S = M M^T (batched cuBLAS: one tensor's are too small
// to fill the GPU), then the down GEMM, whose epilogue leaves the momentum terms of
// sum D^2, M in fp16 for the up GEMM, and the new M. On resample steps the down GEMM
// runs twice: in the current basis for the terms, in the next one for the new M.
// Groups of min_batched tensors or more batch their GEMMs. Allocates nothing: its
// temporaries and table are the call's (fill_fused_table).
void fused_momentum_group(const FusedWork& w, int64_t min_batched) {
  const Item& first = *w.items[0];
  const GroupShape s = group_shape(first);
  const GroupTemps g = group_temps(s, static_cast<int>(w.items.size()), w.down_chunk);
  const int64_t n = s.n, m = s.m, r = s.r, prow = s.prow, pcol = s.pcol;
  const bool left = s.left, resample = s.resample;
  const int count = static_cast<int>(w.items.size());
  const double scale = 1.0 / std::sqrt(static_cast<double>(r));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int passes = resample ? 2 : 1;
  const int64_t* const dwords = w.device;
  const auto* ptrs = reinterpret_cast<const void* const*>(w.host);

  if (s.tile_padding && w.down_chunk == 0) {  // the library down GEMM reads no tiled P
    for (int k = 0; k < count; ++k)
      C10_CUDA_CHECK(cudaMemsetAsync(w.bufs[k].tiled, 0, s.tsize * 2, stream));
    if (resample)
      C10_CUDA_CHECK(cudaMemsetAsync(w.temps + g.next_p, 0, int64_t(count) * s.tsize * 2,
                                     stream));
  }

  const unsigned pblocks = static_cast<unsigned>(ceil_div(prow * (pcol / 4), kThreads));
  const dim3 pgrid(pblocks, static_cast<unsigned>(count));
  const auto draw = [&](int outs, int outs_p, int seeds) {
    projection_t_kernel<<<pgrid, kThreads, 0, stream>>>(
        reinterpret_cast<uint16_t* const*>(dwords + outs * count),
        reinterpret_cast<uint16_t* const*>(dwords + outs_p * count), left,
        reinterpret_cast<const uint64_t*>(dwords + seeds * count),
        static_cast<int>(prow), static_cast<int>(pcol), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  draw(kProjNow, kPlainNow, kSeedNow);
  if (resample) draw(kProjNext, kPlainNext, kSeedNext);

  const GroupArrays arrays{ptrs, dwords, count, min_batched};
  const auto group_gemm = [&](bool ta, bool tb, int64_t M, int64_t N, int64_t K, int a, int b,
                              int type, int c, float beta = 0.f) {
    group_gemm_of(arrays, ta, tb, M, N, K, a, b, type, c, beta);
  };
  // projection="orthogonal": P_o = W P (left) or P W^T (right) takes P's place in both
  // fp16 layouts, for each basis of the step, W = s R^-T from the Gram of the fp16 P drawn
  // above. W comes from the W cache; where it misses one of the group, the whole group's
  // W is computed in one launch (one block a matrix: a matrix's bits do not depend on the
  // others) and the misses copied to their cache tensors, which the product then reads:
  // a hit has the bits of a miss.
  if (s.orthogonal) {
    const double sw = std::sqrt(static_cast<double>(s.kdim) / static_cast<double>(r));
    auto* const w16 = reinterpret_cast<uint16_t*>(w.temps + g.w16);
    const auto ensure_w = [&](const std::vector<WSlot>& slots, int proj, int gram_c,
                              int64_t gram_at) {
      bool any_miss = false;
      for (const WSlot& slot : slots) any_miss = any_miss || slot.miss;
      if (any_miss) {
        if (left) group_gemm(true, false, r, r, n, proj, proj, kF16, gram_c);
        else group_gemm(false, true, r, r, m, proj, proj, kF16, gram_c);
        launch_basis_w(w.temps + gram_at, reinterpret_cast<double*>(w.temps + g.basis_work),
                       w16, nullptr, r, count, sw, stream);
      }
      for (int k = 0; k < count; ++k) {
        const WSlot& slot = slots[k];
        if (!slot.miss) {
          w_ready(slot);
          continue;
        }
        C10_CUDA_CHECK(cudaMemcpyAsync(slot.w.data_ptr(), w16 + k * r * r,
                                       r * r * sizeof(uint16_t), cudaMemcpyDeviceToDevice,
                                       stream));
        w_publish(slot);
      }
    };
    const auto to_basis = [&](int proj, int plain, int wmat) {
      if (left) group_gemm(false, true, n, r, r, proj, wmat, kF16, kRawC);  // P^T W^T
      else group_gemm(false, false, r, m, r, wmat, proj, kF16, kRawC);     // W P^T
      basis_halves_kernel<<<pgrid, kThreads, 0, stream>>>(
          w.temps + g.raw, reinterpret_cast<uint16_t* const*>(dwords + proj * count),
          reinterpret_cast<uint16_t* const*>(dwords + plain * count), left,
          static_cast<int>(prow), static_cast<int>(pcol));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    ensure_w(w.wslots, kProjNow, kGramC, g.gram);
    to_basis(kProjNow, kPlainNow, kWNow);
    if (resample) {
      ensure_w(w.wslots_next, kProjNext, kGramNextC, g.gram_next);
      to_basis(kProjNext, kPlainNext, kWNext);
    }
  }
  // Gram = P P^T (left) or P^T P (right) of the basis up(M) uses (P_o: s^2 I up to its
  // rounding).
  if (left) group_gemm(true, false, r, r, n, kGramA, kGramA, kF16, kGramC);
  else group_gemm(false, true, r, r, m, kGramA, kGramA, kF16, kGramC);
  const auto* djobs = reinterpret_cast<const DownJob*>(dwords + kArrays * count);
  // Tasks with 8-bit momentum (a group may mix them with float32 ones in a direct op call;
  // the launches leave jobs without codes alone).
  const bool codes = std::any_of(w.tasks.begin(), w.tasks.end(),
                                 [](const Task* t) { return t->mc_codes != nullptr; });
  if (resample) {
    // 8-bit momentum: read back into the stages, which the GEMM below reads as M.
    if (codes) launch_momentum_codes(false, djobs, count, s.msize, stream);
    // M' = down_next(up_now(M)) = bases M (left) or M bases (right), bases = P_next P_now^T
    // (left) or P_now^T P_next (right).
    if (left) group_gemm(true, false, r, r, n, kBasesA, kBasesB, kF16, kBasesC);
    else group_gemm(false, true, r, r, m, kBasesA, kBasesB, kF16, kBasesC);
    if (left) group_gemm(false, false, r, m, r, kBaseA, kBaseB, kF32, kBaseC);
    else group_gemm(false, false, n, r, r, kBaseA, kBaseB, kF32, kBaseC);
  }

  const dim3 dgrid(static_cast<unsigned>(down_tiles(n, m, r)), static_cast<unsigned>(count));
  const float beta1 = static_cast<float>(first.entry->options.beta1);
  const int ni = static_cast<int>(n), mi = static_cast<int>(m), ri = static_cast<int>(r);
  if (left) {  // the same for both passes
    row_factor_kernel<<<dim3(static_cast<unsigned>(ceil_div(n, kThreads)), count), kThreads, 0,
                        stream>>>(djobs, ni);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const unsigned sblocks =
      static_cast<unsigned>(std::min<int64_t>(ceil_div(s.psize / 4, kThreads), 1024));
  for (int pass = 0; pass < passes; ++pass) {
    // Resample steps: the terms and M16 in the current basis, then the new M in the next.
    const bool update = !resample || pass == 1;
    const DownJob* jobs = djobs + pass * count;
    if (w.down_chunk == 0) {
      launch_down(first.dtype, left, dgrid, jobs, ni, mi, ri, beta1, update, stream);
      continue;
    }
    // X = (P diag a) G = S^T G, S = the scaled P^T (n x r), left; G (diag b P) = G S^T,
    // S r x m, right: cuBLAS on the gradient as it is; then the epilogue. A chunk of
    // down_chunk tasks at a time, through the same places (fill_fused_table).
    auto* const scaled = reinterpret_cast<uint16_t* const*>(dwords + kScaled * count);
    for (int c0 = 0; c0 < count; c0 += w.down_chunk) {
      const int chunk = std::min(w.down_chunk, count - c0);
      const dim3 sgrid(sblocks, static_cast<unsigned>(chunk));
      if (first.dtype == kBF16) {
        scale_projection_t_kernel<kBF16><<<sgrid, kThreads, 0, stream>>>(
            jobs + c0, scaled + c0, left, static_cast<int>(prow), static_cast<int>(pcol));
      } else {
        scale_projection_t_kernel<kF16><<<sgrid, kThreads, 0, stream>>>(
            jobs + c0, scaled + c0, left, static_cast<int>(prow), static_cast<int>(pcol));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      GroupArrays part = arrays;
      part.first = c0;
      part.n = chunk;
      if (left) group_gemm_of(part, true, false, r, m, n, kScaled, kGradIn, first.dtype, kDownX);
      else group_gemm_of(part, false, true, n, r, m, kGradIn, kScaled, first.dtype, kDownX);
      launch_down_epilogue(left, dim3(dgrid.x, static_cast<unsigned>(chunk)), jobs + c0, ni, mi,
                           ri, beta1, update, stream);
    }
  }
  // 8-bit momentum: the new M from the stages into the codes (the jobs that wrote it).
  if (codes) launch_momentum_codes(true, djobs + (passes - 1) * count, count, s.msize, stream);
  // S = M M^T (left) or M^T M (right) of fp16(M) before this step, which the down GEMM
  // left for the up GEMM: fp16 tensor cores at half the bytes of M (TF32 from M took
  // the products 0.8 ms a fp32 1.35B step), the same 10-bit mantissa, and the very M
  // the apply pass's up(M) reads. Then beta1^2 <Gram, S> for the clip.
  if (left) group_gemm(false, true, r, r, m, kSqA, kSqA, kF16, kSqC);
  else group_gemm(true, false, r, r, n, kSqA, kSqA, kF16, kSqC);
  gram_dot_kernel<<<dim3(kDotBlocks, static_cast<unsigned>(count)), kThreads, 0, stream>>>(
      djobs, static_cast<int>(r * r), static_cast<int>(down_tiles(n, m, r)), beta1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace flora
