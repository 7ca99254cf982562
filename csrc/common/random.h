// Projection entries and seed schedule, shared by the CPU and CUDA kernels.
//
// Element e of a projection with seed s is drawn from the Philox4x32-10 block
// (key = s, counter = (0, 0, e / 4)): words (w0, w1) give elements 4q, 4q+1 and
// (w2, w3) give 4q+2, 4q+3 through one Box-Muller transform. The CUDA side gets
// the words from cuRAND (curand_init(s, q, 0) + curand4), the CPU side from
// at::Philox4_32(s, q, 0): the same words. Box-Muller runs in double and rounds
// once, so both sides give the same float up to libm's last-bit differences.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FLORA_HOST_DEVICE __host__ __device__
#else
#define FLORA_HOST_DEVICE
#endif

namespace flora {

// Largest seed we hand out: seeds live in int64 state and in torch schemas.
constexpr uint64_t kSeedMask = 0x7FFFFFFFFFFFFFFFULL;

FLORA_HOST_DEVICE inline void box_muller(uint32_t w0, uint32_t w1, double scale,
                                         float* z0, float* z1) {
  constexpr double kTwoPow32Inv = 2.3283064365386962890625e-10;  // 2^-32
  constexpr double kHalfStep = 1.16415321826934814453125e-10;     // 2^-33, keeps u > 0
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const double u1 = w0 * kTwoPow32Inv + kHalfStep;
  const double u2 = w1 * kTwoPow32Inv + kHalfStep;
  const double radius = scale * sqrt(-2.0 * log(u1));
  const double theta = kTwoPi * u2;
  *z0 = static_cast<float>(radius * sin(theta));
  *z1 = static_cast<float>(radius * cos(theta));
}

// The seed of the next projection (kappa resampling, accumulation cycles):
// splitmix64's finalizer, so consecutive seeds of one parameter never collide
// with the seed + i of its neighbours.
FLORA_HOST_DEVICE inline int64_t next_seed(int64_t seed) {
  uint64_t z = static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<int64_t>(z & kSeedMask);
}

// Key of the Philox stream whose word e % 4 of block e / 4 rounds element e of the
// k-th parameter of a step_group_ call at step t stochastically. Mixed through
// next_seed twice, so it does not coincide with the projection seeds nearby.
FLORA_HOST_DEVICE inline uint64_t rounding_key(int64_t seed, int64_t step, int64_t index) {
  const uint64_t mixed = static_cast<uint64_t>(next_seed(seed)) ^
                         (static_cast<uint64_t>(step) * 0xD1B54A32D192ED03ULL) ^
                         (static_cast<uint64_t>(index) * 0x9E3779B97F4A7C15ULL);
  return static_cast<uint64_t>(next_seed(static_cast<int64_t>(mixed & kSeedMask)));
}

// bfloat16 bits of x rounded stochastically: up (away from zero) with probability
// equal to the dropped fraction of the low 16 bits, so E[result] = x. `random`'s
// low 16 bits are the uniform draw. Inf and NaN keep their class.
FLORA_HOST_DEVICE inline uint16_t bfloat16_bits_stochastic(float x, uint32_t random) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7F800000u) == 0x7F800000u) {
    const bool nan = (bits & 0x007FFFFFu) != 0;
    return static_cast<uint16_t>((bits >> 16) | (nan ? 0x0040u : 0u));
  }
  bits += random & 0xFFFFu;
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace flora
