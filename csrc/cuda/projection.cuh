// The entries of a projection on the device: Philox words from cuRAND, through the
// Box-Muller transform that the CPU path shares (csrc/common/random.h).
#pragma once

#include "../common/random.h"

#include <curand_kernel.h>

#include <cstdint>

namespace flora {
namespace cuda_detail {

__device__ __forceinline__ void projection_values(uint64_t seed, int64_t q, double scale,
                                                  float z[4]) {
  curandStatePhilox4_32_10_t state;
  curand_init(seed, static_cast<unsigned long long>(q), 0, &state);
  const uint4 w = curand4(&state);
  box_muller(w.x, w.y, scale, &z[0], &z[1]);
  box_muller(w.z, w.w, scale, &z[2], &z[3]);
}

}  // namespace cuda_detail
}  // namespace flora
