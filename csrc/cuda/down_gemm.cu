// The down GEMM of fused tasks (fused_down_kernel) and its momentum epilogue.
#include "config.cuh"
#include "launch.h"
#include "task_table.cuh"
#include "vector_io.cuh"
#include "down_tile.cuh"
#include "mma.cuh"
#include "quant_io.cuh"
#include "../common/rules.h"

#include <c10/cuda/CUDAException.h>

namespace flora {
namespace cuda_detail {
namespace {


// One step of the mma.sync main loop: acc += U P^T over the stage's kDnBK of the
// contraction, the warp's 64 outputs x 32 of the rank (U: a16 buffer As, P^T: Bs).
template <bool kLeft>
__device__ __forceinline__ void down_mma_step(float (&acc)[4][4][4], const uint16_t* As,
                                              const uint16_t* Bs, int lane, int wm, int wn) {
  constexpr int kAStride = kLeft ? kUpBStride : kUpAStride;  // U: [k][out] or [out][k]
  constexpr int kBStride = kLeft ? kDnBStrideLeft : kUpAStride;  // P^T: [k][r] or [r][k]
#pragma unroll
  for (int kk = 0; kk < kDnBK; kk += 16) {
    uint32_t af[4][4], bf[2][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      if constexpr (kLeft) {  // [k][out]: transposed loads
        load_matrix_x4<true>(af[mt], As + (kk + (lane / 16) * 8 + lane % 8) * kAStride +
                                         wm * 64 + mt * 16 + ((lane / 8) % 2) * 8);
      } else {
        load_matrix_x4<false>(af[mt], As + (wm * 64 + mt * 16 + lane % 16) * kAStride + kk +
                                          (lane / 16) * 8);
      }
    }
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      if constexpr (kLeft) {  // [k][r]
        load_matrix_x4<true>(bf[np], Bs + (kk + lane % 16) * kBStride + wn * 32 + np * 16 +
                                         (lane / 16) * 8);
      } else {  // [r][k]
        load_matrix_x4<false>(bf[np], Bs + (wn * 32 + np * 16 + (lane / 16) * 8 + lane % 8) *
                                               kBStride + kk + ((lane / 8) % 2) * 8);
      }
    }
    mma_warp_tile(acc, af, bf);
  }
}

// The warp's accumulators into the tile at the start of shared memory, [k][out] (left)
// or [out][k] (right), as the epilogue reads it.
template <bool kLeft>
__device__ __forceinline__ void store_down_tile(const float (&acc)[4][4][4], uint8_t* smem,
                                                int lane, int wm, int wn) {
  float* xt = reinterpret_cast<float*>(smem);
  constexpr int kXStride = kLeft ? kDnXStrideLeft : kDnXStrideRight;
  const int g = lane / 4, q = lane % 4;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int ol = wm * 64 + mt * 16 + g + 8 * h, kl = wn * 32 + nt * 8 + 2 * q;
        if constexpr (kLeft) {  // [k][out]
          xt[kl * kXStride + ol] = acc[mt][nt][2 * h];
          xt[(kl + 1) * kXStride + ol] = acc[mt][nt][2 * h + 1];
        } else {  // [out][k]
          *reinterpret_cast<float2*>(xt + ol * kXStride + kl) =
              make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
        }
      }
}

// The P^T tile of an mma.sync stage by cp.async: [k][r] (left) or [r][k] (right), rows
// padded as the ldmatrix loads want them; zeros past the tensor and the rank.
template <bool kLeft>
__device__ __forceinline__ void copy_pt_stage(uint16_t* Bs, const uint16_t* P, int k0, int r0,
                                              int n, int m, int rank) {
  constexpr int kBStride = kLeft ? kDnBStrideLeft : kUpAStride;  // P^T: [k][r] or [r][k]
  const int tid = threadIdx.x;
#pragma unroll
for (int u = 0; u < 2; ++u) {
  const int c = tid + u * kDnThreads;
  if constexpr (kLeft) {
    const int kr = c / (kDnBN / 8), rc = (c % (kDnBN / 8)) * 8;
    const bool v = k0 + kr < n && r0 + rc < rank;
    copy16_async_zfill(Bs + kr * kBStride + rc,
                       v ? P + int64_t(k0 + kr) * rank + r0 + rc : P, v);
  } else {
    const int rr = c / (kDnBK / 8), kc = (c % (kDnBK / 8)) * 8;
    const bool v = r0 + rr < rank && k0 + kc < m;
    copy16_async_zfill(Bs + rr * kBStride + kc, v ? P + int64_t(r0 + rr) * m + k0 + kc : P,
                       v);
  }
}
}

#ifndef FLORA_DOWN_WGMMA
// The GEMM of one fused_down_kernel tile with mma.sync (every target but sm_90a): see
// fused_down_kernel. Leaves the tile at the start of shared memory (store_down_tile).
template <int DT, bool kLeft>
__device__ __forceinline__ void down_tile_mma(const DownJob& job, uint8_t* smem, int n, int m,
                                              int rank, int o0, int r0, float row_mean) {
  const int tid = threadIdx.x;
  using S = Storage<DT>;
  constexpr int kStages = kDnStages<DT>, kStageBytes = kDnStageBytes<DT>;
  constexpr int kGBytes = kDnGBytes<DT>;
  constexpr int E = 16 / int(sizeof(S));  // elements of G in a 16-byte chunk
  constexpr int kGRounds = kUpBM * kDnBK / E / kDnThreads;  // chunks a thread: 2 fp32, 1 16-bit
  constexpr int kAStride = kLeft ? kUpBStride : kUpAStride;  // U: [k][out] or [out][k]
  uint16_t* a16 = reinterpret_cast<uint16_t*>(smem + kStages * kStageBytes);
  float* kscale = reinterpret_cast<float*>(smem + kStages * kStageBytes + kDnABytes);
  const int K = kLeft ? n : m;
  const S* G = static_cast<const S*>(job.grad);
  const uint16_t* P = job.proj;
  const int lane = tid % 32, warp = tid / 32;
  const int wm = warp / 8, wn = warp % 8;  // warp tile: 64 outputs x 32 of the rank
  const bool active = r0 + wn * 32 < rank;  // warps past a small rank skip their MMAs
  const int ktiles = static_cast<int>(ceil_div(K, kDnBK));

  // Stage: G [out][k] (right) or [k][out] (left) as stored, P^T, and the scale of each
  // k of the stage (b_j right, a_i left; 0 past the tensor), all by cp.async: nothing
  // on a step's critical path waits for global memory.
  const auto load_stage = [&](int stage, int kt) {
    uint16_t* Bs = reinterpret_cast<uint16_t*>(smem + stage * kStageBytes + kGBytes);
    const int k0 = kt * kDnBK;
    copy_g_stage<DT, kLeft>(reinterpret_cast<S*>(smem + stage * kStageBytes), G, k0, o0, n, m,
                            [](int, int j) { return j; });
    copy_pt_stage<kLeft>(Bs, P, k0, r0, n, m, rank);
    copy_k_scales(kscale + stage * kDnBK, kLeft ? job.row_factor : job.col_factor, k0, K);
  };

  // The scales of the thread's chunks along the output dimension, the same every step:
  // right, a_i of its rows; left, b_j of the block's columns, in shared memory (which
  // spares the registers). 0 past the tensor. Set after the first stages are issued.
  float out_scale[kLeft ? 1 : kGRounds];
  float* col_scale_s = kscale + kStages * kDnBK;
  // U of a stage in two halves: read G (and the k scales) from shared memory, then,
  // after the step's MMAs have been issued, scale, round and store into `dst_buf`.
  struct Pending {
    uint4 g[kGRounds];
    float ks[kLeft ? kGRounds : E];
  };
  const auto convert_read = [&](int stage, Pending& pend) {
    const S* Gs = reinterpret_cast<const S*>(smem + stage * kStageBytes);
    const float* ks = kscale + stage * kDnBK;
#pragma unroll
    for (int u = 0; u < kGRounds; ++u) {
      const int c = tid + u * kDnThreads;
      if constexpr (kLeft) {
        const int kr = c / (kUpBM / E), oc = (c % (kUpBM / E)) * E;
        pend.g[u] = *reinterpret_cast<const uint4*>(Gs + kr * kUpBM + oc);
        pend.ks[u] = ks[kr];
      } else {
        const int orow = c / (kDnBK / E), kc = (c % (kDnBK / E)) * E;
        pend.g[u] = *reinterpret_cast<const uint4*>(Gs + orow * kDnBK + kc);
      }
    }
    if constexpr (!kLeft) {
      const int kc = (tid % (kDnBK / E)) * E;
#pragma unroll
      for (int e = 0; e < E; ++e) pend.ks[e] = ks[kc + e];
    }
  };
  const auto convert_write = [&](const Pending& pend, uint16_t* dst_buf) {
#pragma unroll
    for (int u = 0; u < kGRounds; ++u) {
      const int c = tid + u * kDnThreads;
      float g[E], sc[E];
      unpack<DT>(pend.g[u], g);
      int dst;
      if constexpr (kLeft) {  // a_k (0 past n) b_out
        const int kr = c / (kUpBM / E), oc = (c % (kUpBM / E)) * E;
#pragma unroll
        for (int e = 0; e < E; ++e) sc[e] = pend.ks[u] * col_scale_s[oc + e];
        dst = kr * kAStride + oc;
      } else {
        const int orow = c / (kDnBK / E), kc = (c % (kDnBK / E)) * E;
#pragma unroll
        for (int e = 0; e < E; ++e) sc[e] = out_scale[u] * pend.ks[e];
        dst = orow * kAStride + kc;
      }
      uint32_t h[E / 2];
#pragma unroll
      for (int e = 0; e < E; e += 2) h[e / 2] = pack_half2(g[e] * sc[e], g[e + 1] * sc[e + 1]);
      if constexpr (E == 4) {
        *reinterpret_cast<uint2*>(dst_buf + dst) = make_uint2(h[0], h[1]);
      } else {
        *reinterpret_cast<uint4*>(dst_buf + dst) = make_uint4(h[0], h[1], h[2], h[3]);
      }
    }
  };

  float acc[4][4][4] = {};

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    copy_async_commit();
  }
  // The scales along the output dimension, read while the first stages load.
  if constexpr (kLeft) {
    if (tid < kUpBM) col_scale_s[tid] = o0 + tid < m ? job.col_factor[o0 + tid] : 0.f;
  } else {
#pragma unroll
    for (int u = 0; u < kGRounds; ++u) {
      const int i = o0 + (tid + u * kDnThreads) / (kDnBK / E);
      out_scale[u] = i < n ? row_scale(job.row[i], row_mean) : 0.f;
    }
  }
  copy_async_wait(kStages - 2);
  __syncthreads();  // stage 0 landed
  {
    Pending first;
    convert_read(0, first);
    convert_write(first, a16);
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    // Committed: kStages - 1 + kt groups; stages up to kt + 1 must have landed.
    copy_async_wait(kStages - 3);
    // U of step kt is in a16[kt % 2] for every thread; the MMAs of kt - 1 are done
    // with the other buffer and with stage kt - 1, whose slot loads step kt + 3 next.
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next);
    copy_async_commit();
    const bool more = kt + 1 < ktiles;
    Pending pend;
    if (more) convert_read((kt + 1) % kStages, pend);
    if (active) {
      const uint16_t* As = a16 + (kt % 2) * kDnAHalves;
      const uint16_t* Bs = reinterpret_cast<const uint16_t*>(
          smem + (kt % kStages) * kStageBytes + kGBytes);
      down_mma_step<kLeft>(acc, As, Bs, lane, wm, wn);
    }
    if (more) convert_write(pend, a16 + ((kt + 1) % 2) * kDnAHalves);
  }

  // The tile goes through shared memory (the ring is free now), [k][out] (left) or
  // [out][k] (right), for the epilogue below.
  copy_async_wait(0);
  __syncthreads();
  if (active) store_down_tile<kLeft>(acc, smem, lane, wm, wn);
  __syncthreads();
}
#endif  // !FLORA_DOWN_WGMMA

// The tile of a down-GEMM block (fused_down_kernel's and down_epilogue_kernel's grids):
// block `local` of its task takes kUpBM outputs from o0 by kDnBN of the rank from r0.
struct DownTileOrigin {
  int local, o0, r0;
};
__device__ __forceinline__ DownTileOrigin down_tile_origin(int rank) {
  const int rblocks = static_cast<int>(ceil_div(rank, kDnBN));
  const int local = blockIdx.x;
  return {local, (local / rblocks) * kUpBM, (local % rblocks) * kDnBN};
}

// The momentum epilogue of a down-GEMM tile (kUpBM outputs from o0 by kDnBN of the rank
// from r0, block `local` of the task): <down(U), M> partials, M in fp16 for the up GEMM,
// and the new M. read_x(row, col, idx, x) gives the tile's four results at tile row
// `row`, columns col .. col + 3 (the tile as stored: [k][out] left, [out][k] right),
// whose momentum index is idx. map_s: 256 floats of shared memory for 8-bit momentum's map.
template <bool kLeft, typename ReadX>
__device__ __forceinline__ void down_epilogue(const DownJob& job, float* map_s, int n, int m,
                                              int rank, int o0, int r0, int local, float beta1,
                                              int update, ReadX read_x) {
  const int tid = threadIdx.x;
  // The momentum is read and written in whole 16-byte chunks along its rows:
  // M[o, k] (right, the tile's rows are contiguous) or M[k, o] (left, 512-byte row
  // pieces). Scattered fragment-sized accesses took about a third of the kernel's time.
  // 8-bit momentum read from its codes: the signed map in shared memory.
  if (job.read_codes) {  // the same for the whole block
    for (int k = tid; k < 256; k += kDnThreads) map_s[k] = job.map[k];
    __syncthreads();
  }
  const float keep = 1.f - beta1, cross = 2.f * beta1 * keep;
  // A skipped task's new M is M' alone (selected: 0 * NaN would be NaN).
  const bool skip = job.skip != nullptr && *job.skip != 0;
  float sum = 0.f;
  constexpr int kRowChunks = kLeft ? kUpBM / 4 : kDnBN / 4;  // float4s along a tile row
  constexpr int kBatch = 8, kRounds = kUpBM * kDnBN / 4 / kDnThreads / kBatch;  // 2
  // kBatch chunks a thread at a time, their loads issued before any store: the stores
  // might alias the next loads as far as the compiler knows, and one DRAM round trip a
  // chunk kept the kernel waiting.
#pragma unroll 1
  for (int round = 0; round < kRounds; ++round) {
    int64_t idx[kBatch];
    bool ok[kBatch];
    float4 m4[kBatch], b4[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = tid + (round * kBatch + u) * kDnThreads;
      const int row = c / kRowChunks, col = (c % kRowChunks) * 4;  // of the tile as stored
      if constexpr (kLeft) {  // row: rank index, col: output
        ok[u] = r0 + row < rank && o0 + col < m;
        idx[u] = int64_t(r0 + row) * m + o0 + col;
      } else {  // row: output, col: rank index (rank % 8 == 0: whole chunks)
        ok[u] = o0 + row < n && r0 + col < rank;
        idx[u] = int64_t(o0 + row) * rank + r0 + col;
      }
      if (!ok[u]) continue;
      if (job.read_codes) {  // four codes of one block (idx % 4 == 0)
        const uint32_t c = *reinterpret_cast<const uint32_t*>(job.codes + idx[u]);
        const float a = job.absmax[idx[u] / kQuantBlock];
        m4[u] = make_float4(decode(map_s, c & 0xffu, a), decode(map_s, (c >> 8) & 0xffu, a),
                            decode(map_s, (c >> 16) & 0xffu, a), decode(map_s, c >> 24, a));
      } else {
        m4[u] = *reinterpret_cast<const float4*>(job.momentum + idx[u]);
      }
      b4[u] = update && job.base != nullptr ? *reinterpret_cast<const float4*>(job.base + idx[u])
                                            : m4[u];
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (!ok[u]) continue;
      const int c = tid + (round * kBatch + u) * kDnThreads;
      const int row = c / kRowChunks, col = (c % kRowChunks) * 4;
      float x[4];
      read_x(row, col, idx[u], x);
      const float mo[4] = {m4[u].x, m4[u].y, m4[u].z, m4[u].w};
      const float bv[4] = {b4[u].x, b4[u].y, b4[u].z, b4[u].w};
      if (job.partials != nullptr) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sum += mo[e] * (cross * x[e]);
      }
      if (job.momentum16 != nullptr)
        *reinterpret_cast<uint2*>(job.momentum16 + idx[u]) =
            make_uint2(pack_half2(mo[0], mo[1]), pack_half2(mo[2], mo[3]));
      if (update) {
        *reinterpret_cast<float4*>(job.momentum + idx[u]) =
            skip ? b4[u]
                 : make_float4(bv[0] * beta1 + x[0] * keep, bv[1] * beta1 + x[1] * keep,
                               bv[2] * beta1 + x[2] * keep, bv[3] * beta1 + x[3] * keep);
      }
    }
  }
  if (job.partials == nullptr) return;
  const double total = block_sum(static_cast<double>(sum));
  if (tid == 0) job.partials[local] = total;
}

// The down GEMM of fused tasks: down(U) = P U (left, r x m) or U P (right, n x r), on
// the tensor cores with fp16 operands. A block of kDnThreads takes kUpBM outputs along
// m (left) or n (right) by kDnBN of the rank (all of it up to 256), so that G is read
// and converted once, contracting over n (left) or m (right) kDnBK at a time: G and P^T
// arrive through a ring of kDnStages<DT> buffers (cp.async); each step turns the next G
// tile into U = g a_i b_j in fp16 (pack_half2: U has RMS ~1, and its 10-bit mantissa
// is what TF32 keeps) in one of two buffers while the tensor cores work on the other,
// one barrier a step. U never exists in global memory, and the GEMM result goes
// straight into the momentum epilogue of DownJob. Grid: (tiles of a task, tasks).
// sm_90a code runs the main loop of down_tile_wgmma instead (same tile, same epilogue).
template <int DT, bool kLeft>
__global__ void __launch_bounds__(kDnThreads, 1)
    fused_down_kernel(const DownJob* __restrict__ jobs, int n, int m, int rank, float beta1,
                      int update) {
  extern __shared__ uint4 dn_smem[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(dn_smem);
  const DownJob job = jobs[blockIdx.y];  // in registers: the epilogue's stores may alias
  const DownTileOrigin tile = down_tile_origin(rank);
  const int local = tile.local, o0 = tile.o0, r0 = tile.r0;
  const float row_mean = job.scalars[kRowMean];
#ifdef FLORA_DOWN_WGMMA
  down_tile_wgmma<DT, kLeft>(job, smem, n, m, rank, o0, r0, row_mean);
#else
  down_tile_mma<DT, kLeft>(job, smem, n, m, rank, o0, r0, row_mean);
#endif
  const float* xs = reinterpret_cast<const float*>(smem);
  constexpr int kXStride = kLeft ? kDnXStrideLeft : kDnXStrideRight;
  // The map of 8-bit momentum after the tile.
  float* map_s = reinterpret_cast<float*>(smem + kDnTileBytes);
  down_epilogue<kLeft>(job, map_s, n, m, rank, o0, r0, local, beta1, update,
                       [&](int row, int col, int64_t, float (&x)[4]) {
                         const float4 x4 =
                             *reinterpret_cast<const float4*>(xs + row * kXStride + col);
                         x[0] = x4.x; x[1] = x4.y; x[2] = x4.z; x[3] = x4.w;
                       });
}

// The momentum epilogue of the library down GEMM (Tuning::down_library): the same tiles
// and epilogue as fused_down_kernel, the GEMM's result X read from job.x (the momentum's
// layout) and scaled along the outputs (b_j left, a_i right) as fused_down_kernel's U is.
template <bool kLeft>
__global__ void __launch_bounds__(kDnThreads, 1)
    down_epilogue_kernel(const DownJob* __restrict__ jobs, int n, int m, int rank, float beta1,
                         int update) {
  __shared__ float map_s[256];
  const DownJob job = jobs[blockIdx.y];
  const DownTileOrigin tile = down_tile_origin(rank);
  const int local = tile.local, o0 = tile.o0, r0 = tile.r0;
  const float row_mean = job.scalars[kRowMean];
  down_epilogue<kLeft>(job, map_s, n, m, rank, o0, r0, local, beta1, update,
                       [&](int row, int col, int64_t idx, float (&x)[4]) {
                         const float4 x4 = *reinterpret_cast<const float4*>(job.x + idx);
                         if constexpr (kLeft) {  // X diag(b): b of the outputs
                           const float4 b = *reinterpret_cast<const float4*>(
                               job.col_factor + o0 + col);
                           x[0] = x4.x * b.x; x[1] = x4.y * b.y;
                           x[2] = x4.z * b.z; x[3] = x4.w * b.w;
                         } else {  // diag(a) X: a of the output row
                           const float a = row_scale(job.row[o0 + row], row_mean);
                           x[0] = x4.x * a; x[1] = x4.y * a; x[2] = x4.z * a; x[3] = x4.w * a;
                         }
                       });
}

}  // namespace

void launch_down(int dtype, bool left, dim3 grid, const DownJob* jobs, int n, int m, int rank,
                 float beta1, bool update, cudaStream_t stream) {
  with_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    const auto launch = [&](auto kernel) {
      allow_smem(kernel, kDnLaunchSmem<DT>);
      kernel<<<grid, kDnThreads, kDnLaunchSmem<DT>, stream>>>(jobs, n, m, rank, beta1,
                                                             update ? 1 : 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (left) launch(fused_down_kernel<DT, true>);
    else launch(fused_down_kernel<DT, false>);
  });
}

void launch_down_epilogue(bool left, dim3 grid, const DownJob* jobs, int n, int m, int rank,
                          float beta1, bool update, cudaStream_t stream) {
  const auto launch = [&](auto kernel) {
    kernel<<<grid, kDnThreads, 0, stream>>>(jobs, n, m, rank, beta1, update ? 1 : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (left) launch(down_epilogue_kernel<true>);
  else launch(down_epilogue_kernel<false>);
}

}  // namespace cuda_detail
}  // namespace flora
