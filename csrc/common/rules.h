// Rules of the algorithm that the CPU and CUDA kernels share, written once (docs/FLORA.md,
// "The step"). Host and device code call the same functions, so both paths compute
// each quantity with the same operations in the same precision.
#pragma once

#include <cmath>
#include <cstdint>

#include "random.h"  // FLORA_HOST_DEVICE

namespace flora {

// max(a, b), but NaN when either operand is NaN: fmax and std::max return the other
// operand, which let a parameter with one NaN element step unclipped (max(1, NaN) = 1)
// and every later step at the floor eps2 (max(eps2, NaN)). With this max a NaN or inf
// in a gradient makes the whole parameter NaN on every path (docs/FLORA.md §4.7).
FLORA_HOST_DEVICE inline double max_nan(double a, double b) {
  return (a != a || b != b) ? a + b : (a > b ? a : b);
}

// Step 1: the step size, lr scaled by the parameter's RMS (floored at eps2) when
// scale_parameter is set. sum_p2 is the sum of p^2 over the parameter's numel elements.
FLORA_HOST_DEVICE inline double scaled_lr(double base_lr, bool scale_parameter, double eps2,
                                          double sum_p2, int64_t numel) {
  return scale_parameter ? base_lr * max_nan(eps2, sqrt(sum_p2 / numel)) : base_lr;
}

// Step 3: U of a factored parameter is G_ij row_scale(R_i, mean R) col_scale(C_j), from
// the row and column EMAs R and C. T is the precision of the arithmetic: float on the
// device, double on the CPU.
template <typename T>
FLORA_HOST_DEVICE inline T row_scale(T row, T row_mean) {
  return T(1) / sqrt(row / row_mean);
}
template <typename T>
FLORA_HOST_DEVICE inline T col_scale(T col) {
  return T(1) / sqrt(col);
}

// Which factored (rows x cols) parameters get compressed momentum: rank r > 0 no larger
// than the shorter side, and the longer side at most max_aspect_ratio times the shorter
// (4 is flora-opt's rule, which keeps token embeddings and output heads dense); 0 means no
// limit. Compared in double: exact for the integer ratio 4 and any realistic side.
FLORA_HOST_DEVICE inline bool momentum_compressible(int64_t rows, int64_t cols, int64_t rank,
                                                    double max_aspect_ratio) {
  const int64_t shorter = rows < cols ? rows : cols;
  const int64_t longer = rows < cols ? cols : rows;
  return rank > 0 && shorter >= rank &&
         (max_aspect_ratio == 0.0 ||
          static_cast<double>(longer) <= max_aspect_ratio * static_cast<double>(shorter));
}

// Step 5: the factor D is divided by, max(1, RMS(D) / clip_threshold), from sum D^2
// over the parameter's numel elements (NaN when sum D^2 is).
FLORA_HOST_DEVICE inline double clip_factor(double sum_d2, int64_t numel,
                                            double clip_threshold) {
  return max_nan(1.0, sqrt(sum_d2 / numel) / clip_threshold);
}

}  // namespace flora
