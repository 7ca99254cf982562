// Asynchronous copies to shared memory (cp.async), fp16 packing, and the mma.sync /
// ldmatrix helpers of the fused GEMMs (sm_80 and newer; the host plans the fused path
// there only).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace flora {
namespace cuda_detail {

// 16 bytes global -> shared without a register round trip (sm_80+), so the next
// stage of a row-stats block loads while the current one is summed.
__device__ __forceinline__ void copy16_async(uint4* smem, const uint4* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
#else
  *smem = *gmem;
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most `pending` committed groups are still in flight (the
// instruction takes an immediate: one case per ring depth).
__device__ __forceinline__ void copy_async_wait(int pending) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::); break;
    case 4: asm volatile("cp.async.wait_group 4;\n" ::); break;
    default: asm volatile("cp.async.wait_group 5;\n" ::); break;
  }
#endif
}

// Two floats as fp16 (round to nearest), saturated at +-65504; NaN stays NaN.
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const __half2 top = __float2half2_rn(65504.f);
  const __half2 c = __hmin2_nan(__hmax2_nan(h, __hneg2(top)), top);
#else
  const __half2 c = h;  // the fused path runs on sm_80 and newer only
#endif
  return *reinterpret_cast<const uint32_t*>(&c);
}
__device__ __forceinline__ uint16_t to_half_bits(float x) {
  return static_cast<uint16_t>(pack_half2(x, 0.f) & 0xFFFFu);
}

__device__ __forceinline__ void copy16_async_zfill(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(smem) = valid ? *reinterpret_cast<const uint4*>(gmem) : uint4{};
#endif
}

// Four 8 x 8 fp16 matrices from shared memory (row addresses from lanes 0-31).
template <bool kTrans>
__device__ __forceinline__ void load_matrix_x4(uint32_t r[4], const uint16_t* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  }
#else
  __trap();
#endif
}

// c += a b for one m16n8k16 fp16 tile, fp32 accumulation. The host plans the fused
// path on sm_80 and newer only.
__device__ __forceinline__ void mma_f16(float c[4], const uint32_t a[4], uint32_t b0,
                                        uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// One k16 step of a warp's 64 x 32 tile (both GEMMs): acc[mt][nt] += a[mt] b[nt], with
// b as two ldmatrix.x4 loads of 16 columns each (registers 0-1 and 2-3: two n8 tiles).
__device__ __forceinline__ void mma_warp_tile(float acc[4][4][4], const uint32_t af[4][4],
                                              const uint32_t bf[2][4]) {
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      mma_f16(acc[mt][nt], af[mt], bf[nt / 2][2 * (nt % 2)], bf[nt / 2][2 * (nt % 2) + 1]);
}


}  // namespace cuda_detail
}  // namespace flora
