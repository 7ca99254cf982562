// The 8-bit state format (csrc/common/quantize.h): the code maps, the argument checks and
// the op schemas of quantize_blockwise_ / dequantize_blockwise_ / dynamic_map.
#include "common/quantize.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace flora {
namespace {

QuantMap build_dynamic_map(bool is_signed) {
  constexpr int kDecades = 7;  // 10^-6 .. 10^0
  std::vector<double> codes;
  for (int i = 0; i < kDecades; ++i) {
    const int bins = is_signed ? (1 << i) : (1 << (i + 1));
    const double decade = std::pow(10.0, i - (kDecades - 1));
    for (int b = 0; b < bins; ++b) {
      // midpoint of bin b of [0.1, 1] cut into `bins` equal parts
      const double lower = 0.1 + 0.9 * b / bins;
      const double upper = 0.1 + 0.9 * (b + 1) / bins;
      const double code = decade * (lower + upper) / 2.0;
      codes.push_back(code);
      if (is_signed) codes.push_back(-code);
    }
  }
  codes.push_back(0.0);
  codes.push_back(1.0);
  TORCH_INTERNAL_ASSERT(codes.size() == 256, "flora: dynamic map has ", codes.size(), " codes");
  std::sort(codes.begin(), codes.end());
  QuantMap map;
  for (int q = 0; q < 256; ++q) map.value[q] = static_cast<float>(codes[q]);
  for (int q = 0; q < 255; ++q)
    map.threshold[q] = static_cast<float>((codes[q] + codes[q + 1]) / 2.0);
  return map;
}

at::Tensor dynamic_map_op(bool is_signed) {
  const QuantMap& map = dynamic_map(is_signed);
  at::Tensor out = at::empty({256}, at::TensorOptions().dtype(at::kFloat));
  std::copy(map.value, map.value + 256, out.data_ptr<float>());
  return out;
}

}  // namespace

const QuantMap& dynamic_map(bool is_signed) {
  static const QuantMap signed_map = build_dynamic_map(true);
  static const QuantMap unsigned_map = build_dynamic_map(false);
  return is_signed ? signed_map : unsigned_map;
}

void check_quantized_args(const at::Tensor& values, const at::Tensor& codes,
                          const at::Tensor& absmax) {
  TORCH_CHECK(values.defined() && codes.defined() && absmax.defined(),
              "flora: values, codes and absmax must be defined tensors");
  TORCH_CHECK(values.scalar_type() == at::kFloat, "flora: values must be float32, got ",
              values.scalar_type());
  TORCH_CHECK(codes.scalar_type() == at::kByte, "flora: codes must be uint8, got ",
              codes.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "flora: absmax must be float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(codes.sizes() == values.sizes(), "flora: codes must have the shape of values ",
              values.sizes(), ", got ", codes.sizes());
  const int64_t blocks = quant_blocks(values.numel());
  TORCH_CHECK(absmax.dim() == 1 && absmax.numel() == blocks,
              "flora: absmax must be a vector of ", blocks, " entries (one per block of ",
              kQuantBlock, " of the ", values.numel(), " values), got shape ", absmax.sizes());
  TORCH_CHECK(codes.device() == values.device() && absmax.device() == values.device(),
              "flora: values, codes and absmax must be on one device, got ", values.device(),
              ", ", codes.device(), " and ", absmax.device());
  TORCH_CHECK(values.is_contiguous() && codes.is_contiguous() && absmax.is_contiguous(),
              "flora: values, codes and absmax must be contiguous");
  TORCH_CHECK(at::get_overlap_status(values, codes) == at::MemOverlapStatus::No &&
                  at::get_overlap_status(values, absmax) == at::MemOverlapStatus::No &&
                  at::get_overlap_status(codes, absmax) == at::MemOverlapStatus::No,
              "flora: values, codes and absmax must not share memory");
}

}  // namespace flora

TORCH_LIBRARY_FRAGMENT(flora, m) {
  // quantization=True's state format (csrc/common/quantize.h): `signed` picks the map
  // (signed for momentum, unsigned for second moments).
  m.def("quantize_blockwise_(Tensor values, Tensor(a!) codes, Tensor(b!) absmax, bool signed) "
        "-> ()");
  // requantize_blockwise_: codes and absmax hold a state already; a block whose values are
  // bitwise what it reads back keeps its codes and absmax (a state a step left unchanged,
  // e.g. skipped for a non-finite gradient, is not rounded again), the others are written
  // as quantize_blockwise_ writes them.
  m.def("requantize_blockwise_(Tensor values, Tensor(a!) codes, Tensor(b!) absmax, "
        "bool signed) -> ()");
  m.def("dequantize_blockwise_(Tensor codes, Tensor absmax, Tensor(a!) values, bool signed) "
        "-> ()");
  m.def("dynamic_map(bool signed) -> Tensor", &flora::dynamic_map_op);
}
