// The stage loads of the fused down GEMM and its sm_90a main loop on wgmma
// (down_tile_wgmma); included by down_gemm.cu only.
#pragma once

#include "config.cuh"
#include "mma.cuh"
#include "task_table.cuh"
#include "vector_io.cuh"
#include "../common/rules.h"

namespace flora {
namespace cuda_detail {

// The G tile of a down-GEMM stage (kDnBK of the contraction by kUpBM outputs) by
// cp.async, both variants: [k][out] as stored (left), or [out][k] (right) with the
// 16-byte chunk j of row orow at chunk swizzle(orow, j) of its row; zeros past the
// tensor.
template <int DT, bool kLeft, typename Swizzle>
__device__ __forceinline__ void copy_g_stage(Storage<DT>* Gs, const Storage<DT>* G, int k0,
                                             int o0, int n, int m, Swizzle swizzle) {
  constexpr int E = 16 / int(sizeof(Storage<DT>));  // elements of G in a 16-byte chunk
  constexpr int kRowChunks = kDnBK / E;                // right: chunks of a tile row
  constexpr int kGRounds = kUpBM * kDnBK / E / kDnThreads;  // 2 fp32, 1 16-bit
#pragma unroll
  for (int u = 0; u < kGRounds; ++u) {
    const int c = threadIdx.x + u * kDnThreads;
    if constexpr (kLeft) {
      const int kr = c / (kUpBM / E), oc = (c % (kUpBM / E)) * E;
      const bool v = k0 + kr < n && o0 + oc < m;
      copy16_async_zfill(Gs + kr * kUpBM + oc, v ? G + int64_t(k0 + kr) * m + o0 + oc : G, v);
    } else {
      const int orow = c / kRowChunks, j = c % kRowChunks;
      const bool v = o0 + orow < n && k0 + j * E < m;
      copy16_async_zfill(Gs + orow * kDnBK + swizzle(orow, j) * E,
                         v ? G + int64_t(o0 + orow) * m + k0 + j * E : G, v);
    }
  }
}

// The kDnBK scales of a stage's k (b_j right, a_i left) by cp.async; K % 4 == 0, so a 16-byte chunk is all in or all out (0 past the tensor).
__device__ __forceinline__ void copy_k_scales(float* dst, const float* src, int k0, int K) {
  const int tid = threadIdx.x;
  if (tid >= kDnBK / 4) return;
  const bool v = k0 + 4 * tid < K;
  copy16_async_zfill(dst + 4 * tid, v ? src + k0 + 4 * tid : src, v);
}

// ---- sm_90a: the down GEMM on wgmma ---------------------------------------------
//
// Built only for the sm_90a target (TORCH_CUDA_ARCH_LIST 9.0a): the code of
// fused_down_kernel for that target runs down_tile_wgmma, every other target the
// mma.sync loop. Both leave the same tile in shared memory for the same epilogue.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLORA_DOWN_WGMMA 1
#endif

#ifdef FLORA_DOWN_WGMMA
__device__ __forceinline__ uint64_t smem_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return uint64_t((a & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32);
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by ordinary stores or cp.async, read next by the tensor cores.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accumulator accesses across a wgmma wait.
__device__ __forceinline__ void pin(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// d (64 x 128, fp32, the warpgroup's registers) += A (64 x 16) B (16 x 128), fp16.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(1));
}

// The wgmma operand layouts of U (A: right [out/8][k/8] cores, k neighbours 128 bytes
// apart, row groups 512; left [k/8][out], row groups 128 bytes apart, k neighbours 2048)
// and of P (B: [rank/8][k/8] cores).
template <bool kLeft> constexpr uint32_t kWgALbo = kLeft ? kUpBM * 16 : 128;
template <bool kLeft> constexpr uint32_t kWgASbo = kLeft ? 128 : (kDnBK / 8) * 128;
constexpr uint32_t kWgBLbo = 128, kWgBSbo = (kDnBK / 8) * 128;

// One step of the wgmma main loop: the warpgroup's acc += U P over the stage's kDnBK of
// the contraction (As, Bs: its U and P tiles in shared memory), committed as one group.
template <bool kLeft>
__device__ __forceinline__ void issue_wgmma_step(float (&acc)[64], const uint8_t* As,
                                                 const uint8_t* Bs) {
  constexpr uint32_t kALbo = kWgALbo<kLeft>, kASbo = kWgASbo<kLeft>;
  constexpr uint32_t kBLbo = kWgBLbo, kBSbo = kWgBSbo;
  pin(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kDnBK; kk += 16) {
    wgmma_m64n128k16(acc, smem_desc(As + (kk / 8) * kALbo, kALbo, kASbo),
                     smem_desc(Bs + (kk / 8) * kBLbo, kBLbo, kBSbo));
  }
  wgmma_commit();
}

// The warpgroup's accumulators into the tile at the start of shared memory (xs), [k][out]
// (left) or [out][k] (right), as the epilogue reads it.
template <bool kLeft>
__device__ __forceinline__ void store_wgmma_tile(const float (&acc)[64], float* xs, int wgm,
                                                 int wgn) {
  constexpr int kXStride = kLeft ? kDnXStrideLeft : kDnXStrideRight;
  const int tid = threadIdx.x;
  const int lane = tid % 32, w = (tid % 128) / 32, g = lane / 4, q = lane % 4;
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ol = wgm * 64 + w * 16 + g + 8 * h, kl = wgn * 128 + j * 8 + 2 * q;
      const float x0 = acc[4 * j + 2 * h], x1 = acc[4 * j + 2 * h + 1];
      if constexpr (kLeft) {  // [k][out]
        xs[kl * kXStride + ol] = x0;
        xs[(kl + 1) * kXStride + ol] = x1;
      } else {  // [out][k]
        *reinterpret_cast<float2*>(xs + ol * kXStride + kl) = make_float2(x0, x1);
      }
    }
}

// The GEMM of one fused_down_kernel tile (kUpBM outputs from o0 by kDnBN of the rank
// from r0) with wgmma: four warpgroups of 64 outputs x 128 of the rank. Stages come
// in by cp.async as in the mma.sync loop; each thread turns one 16-byte row piece of
// U (8 k of one output) a step into fp16, written k-major for the tensor cores. A
// step issues its wgmmas, converts the next U while they run, then waits for the
// previous step's: one barrier a step. Leaves the tile, [out][k] (right) or [k][out]
// (left) in fp32, at the start of shared memory.
template <int DT, bool kLeft>
__device__ __forceinline__ void down_tile_wgmma(const DownJob& job, uint8_t* smem, int n,
                                                int m, int rank, int o0, int r0,
                                                float row_mean) {
  using S = Storage<DT>;
  constexpr int kStages = kWgStages<DT>, kStageBytes = kWgStageBytes<DT>;
  constexpr int kGBytes = kDnGBytes<DT>;
  constexpr int E = 16 / int(sizeof(S));  // elements of G in a 16-byte chunk
  // U: right [out/8][k/8] cores (k neighbours 128 bytes apart, row groups 512);
  // left [k/8][out] (row groups 128 bytes apart, k neighbours 2048): either way a
  // warp's 16-byte stores and its reads of G hit distinct banks.
  constexpr uint32_t kALbo = kWgALbo<kLeft>, kASbo = kWgASbo<kLeft>;
  constexpr uint32_t kBSbo = kWgBSbo;
  uint8_t* abuf = smem + kStages * kStageBytes;
  float* kscale = reinterpret_cast<float*>(abuf + kWgABuffers * kWgABytes);
  float* col_scale_s = kscale + kStages * kDnBK;
  const int K = kLeft ? n : m;
  const S* G = static_cast<const S*>(job.grad);
  // This block's rank block of the tiled projection, one 16 KiB tile a step.
  const uint8_t* P = reinterpret_cast<const uint8_t*>(job.proj_tiled) +
                     int64_t(r0 / kTileRank) * ceil_div(K, kTileK) * kTileHalves * 2;
  const int tid = threadIdx.x, wg = tid / 128;
  // Right: G's rows in shared memory are kRowChunks 16-byte chunks (8 fp32, 4 bf16),
  // permuted by row so that the 8 rows a quarter warp reads hit distinct banks.
  constexpr int kRowChunks = kDnBK / E;
  const auto g_swizzle = [](int row) { return (row * kRowChunks / 8) % kRowChunks; };
  // Every warpgroup issues its wgmmas, also past a small rank (zeros there): under a
  // branch ptxas serializes them (C7518).
  const int wgm = wg / 2, wgn = wg % 2;
  const int ktiles = static_cast<int>(ceil_div(K, kDnBK));

  const auto load_stage = [&](int stage, int kt) {
    uint8_t* Bs = smem + stage * kStageBytes + kGBytes;
    const int k0 = kt * kDnBK;
    copy_g_stage<DT, kLeft>(reinterpret_cast<S*>(smem + stage * kStageBytes), G, k0, o0, n, m,
                            [&](int row, int j) { return j ^ g_swizzle(row); });
    // P: the step's tile as it is stored (padded with zeros), a straight copy.
    static_assert(kWgBBytes == kTileHalves * 2 && kDnBN == kTileRank && kDnBK == kTileK,
                  "one tile of the tiled projection a stage");
#pragma unroll
    for (int u = 0; u < kWgBBytes / 16 / kDnThreads; ++u) {
      const int c = tid + u * kDnThreads;
      copy16_async_zfill(Bs + c * 16, P + int64_t(kt) * kWgBBytes + c * 16, true);
    }
    copy_k_scales(kscale + stage * kDnBK, kLeft ? job.row_factor : job.col_factor, k0, K);
  };

  // Thread tid converts output `out`, k 8 kc .. 8 kc + 7 of each step: left, a warp
  // takes 32 neighbouring outputs of one k (one row of G in shared memory); right, a
  // quarter warp the 8 rows of one core matrix of U, their G chunks apart in banks by
  // the swizzle.
  const int out = kLeft ? tid % kUpBM : (tid / 32) * 8 + tid % 8;
  const int kc = kLeft ? tid / kUpBM : (tid / 8) % (kDnBK / 8);
  const int a_offset = kLeft ? kc * kALbo + out * 16
                             : (out / 8) * kASbo + kc * kALbo + (out % 8) * 16;
  struct Pending {
    float g[8], ks[8];
  };
  const auto convert_read = [&](int stage, Pending& pend) {
    const S* Gs = reinterpret_cast<const S*>(smem + stage * kStageBytes);
    const float* ks = kscale + stage * kDnBK + 8 * kc;
#pragma unroll
    for (int e = 0; e < 8; ++e) pend.ks[e] = ks[e];
    if constexpr (kLeft) {  // a warp reads 32 neighbouring outputs of one k
#pragma unroll
      for (int e = 0; e < 8; ++e) pend.g[e] = to_float<DT>(Gs[(8 * kc + e) * kUpBM + out]);
    } else {
#pragma unroll
      for (int u = 0; u < 8 / E; ++u) {
        const int j = (8 * kc) / E + u;
        const uint4 w =
            *reinterpret_cast<const uint4*>(Gs + out * kDnBK + (j ^ g_swizzle(out)) * E);
        unpack<DT>(w, pend.g + u * E);
      }
    }
  };
  float out_scale = 0.f;  // right: a_i of the thread's output row
  const auto convert_write = [&](const Pending& pend, int buffer) {
    float sc[8];
    if constexpr (kLeft) {  // a_k (0 past n) b_out
#pragma unroll
      for (int e = 0; e < 8; ++e) sc[e] = pend.ks[e] * col_scale_s[out];
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) sc[e] = out_scale * pend.ks[e];
    }
    uint32_t h[4];
#pragma unroll
    for (int e = 0; e < 8; e += 2)
      h[e / 2] = pack_half2(pend.g[e] * sc[e], pend.g[e + 1] * sc[e + 1]);
    *reinterpret_cast<uint4*>(abuf + buffer * kWgABytes + a_offset) =
        make_uint4(h[0], h[1], h[2], h[3]);
  };

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < ktiles) load_stage(s, s);
    copy_async_commit();
  }
  if constexpr (kLeft) {
    if (tid < kUpBM) col_scale_s[tid] = o0 + tid < m ? job.col_factor[o0 + tid] : 0.f;
  } else {
    out_scale = o0 + out < n ? row_scale(job.row[o0 + out], row_mean) : 0.f;
  }
  copy_async_wait(kStages - 3);
  __syncthreads();  // stage 0 and the column scales landed
  {
    Pending first;
    convert_read(0, first);
    convert_write(first, 0);
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    // Committed: kStages - 2 + kt groups; stages up to kt + 1 must have landed.
    copy_async_wait(kStages - 4);
    fence_async_shared();  // this thread's U and cp.async data, for the tensor cores
    // U of step kt is complete; every warpgroup is done with the wgmmas of kt - 2,
    // so U buffer (kt + 1) % 3 and stage slot (kt - 2) % kStages are free.
    __syncthreads();
    const int next = kt + kStages - 2;
    if (next < ktiles) load_stage(next % kStages, next);
    copy_async_commit();
    const bool more = kt + 1 < ktiles;
    Pending pend;
    if (more) convert_read((kt + 1) % kStages, pend);
    issue_wgmma_step<kLeft>(acc, abuf + (kt % kWgABuffers) * kWgABytes +
                                     (kLeft ? wgm * 64 * 16 : wgm * 8 * kASbo),
                            smem + (kt % kStages) * kStageBytes + kGBytes + wgn * 16 * kBSbo);
    if (more) convert_write(pend, (kt + 1) % kWgABuffers);
    wgmma_wait<1>();
    pin(acc);
  }
  wgmma_wait<0>();
  pin(acc);
  copy_async_wait(0);
  __syncthreads();  // the ring is free for the tile
  if (r0 + wgn * 128 < rank)
    store_wgmma_tile<kLeft>(acc, reinterpret_cast<float*>(smem), wgm, wgn);
  __syncthreads();
}
#endif  // FLORA_DOWN_WGMMA

}  // namespace cuda_detail
}  // namespace flora
