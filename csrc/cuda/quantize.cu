// CUDA kernels of the 8-bit state format (csrc/common/quantize.h): the same map, the same
// float32 operations (one IEEE division to scale, one multiplication to read back) and the
// same tie rule as the CPU kernels, so both write the same bytes for the same input.
#include "../common/quantize.h"
#include "launch.h"
#include "quant_io.cuh"
#include "vector_io.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace flora {
namespace {

// One warp a block of kQuantBlock elements, eight consecutive elements a lane: the block's
// absmax is a warp reduction (no block-wide barriers), and a full block of aligned tensors
// moves as two float4 loads and one 8-byte store of codes a lane.
static_assert(kQuantBlock == 256, "32 lanes x 8 elements");
constexpr int kPerLane = 8;
constexpr int kWarpsPerCta = 8;
constexpr int kMaxGrid = 65535;  // warps loop over the rest

__device__ inline float absmax_combine(float a, float b) {
  return (b > a || isnan(b)) ? b : a;  // NaN sticks, as on the CPU
}

__device__ inline float warp_absmax(float a) {
  for (int offset = 16; offset > 0; offset >>= 1)
    a = absmax_combine(a, __shfl_xor_sync(0xffffffffu, a, offset));
  return a;
}

// The lane's eight codes from flat index e: one 8-byte word where the block is whole and
// aligned (`vec`), else byte by byte (zeros past numel).
__device__ inline void load_lane_codes(const uint8_t* q, int64_t e, int64_t numel, bool vec,
                                       uint8_t (&c)[kPerLane]) {
  if (vec) {
    cuda_detail::load_code_word<kPerLane>(q + e, c);
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) c[k] = e + k < numel ? q[e + k] : 0;
  }
}

// Whether the vector path may be taken: float4 values and 8-byte code words (a block
// starts at a multiple of 256 elements, so base alignment is enough).
__device__ inline bool vector_aligned(const void* values, const void* codes) {
  return reinterpret_cast<uintptr_t>(values) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(codes) % 8 == 0;
}

// The block's copy of a map's decision points, padded (and, for kKeep or reading back,
// values).
struct StagedMap {
  float threshold[kPaddedThresholds];
  float value[256];
};

__device__ inline void stage_map(StagedMap& s, const QuantMap& map, bool values) {
  for (int k = threadIdx.x; k < 255; k += blockDim.x)
    s.threshold[padded_threshold(k)] = map.threshold[k];
  if (values)
    for (int k = threadIdx.x; k < 256; k += blockDim.x) s.value[k] = map.value[k];
  __syncthreads();
}

// The kQuantBlock-element blocks of one tensor, a warp each, strided over the warps of the
// grid's x dimension. kKeep: requantize_blockwise_ (a block whose values are bitwise its
// read-back keeps its codes and absmax).
template <bool kKeep>
__device__ void quantize_blocks(const float* __restrict__ x, uint8_t* __restrict__ q,
                                float* __restrict__ amax, int64_t numel, const StagedMap& map) {
  const bool aligned = vector_aligned(x, q);
  const int64_t blocks = quant_blocks(numel);
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerCta;
  for (int64_t b = int64_t(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5); b < blocks;
       b += warps) {
    const int64_t e = b * kQuantBlock + lane * kPerLane;
    const bool vec = aligned && (b + 1) * kQuantBlock <= numel;  // uniform across the warp
    float v[kPerLane];
    cuda_detail::loadf<kPerLane>(x + e, vec, cuda_detail::valid_of<kPerLane>(numel - e), v);
    if constexpr (kKeep) {
      uint8_t c[kPerLane];
      load_lane_codes(q, e, numel, vec, c);
      const float a = amax[b];
      bool same = true;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k)
        same &= e + k >= numel ||
                __float_as_uint(cuda_detail::decode(map.value, c[k], a)) == __float_as_uint(v[k]);
      if (__all_sync(0xffffffffu, same)) continue;
    }
    float a = fabsf(v[0]);
#pragma unroll
    for (int k = 1; k < kPerLane; ++k) a = absmax_combine(a, fabsf(v[k]));
    a = warp_absmax(a);
    if (lane == 0) amax[b] = a;
    uint8_t c[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k)
      c[k] = cuda_detail::encode(map.threshold, v[k], a);
    if (vec) {
      cuda_detail::store_code_word<kPerLane>(q + e, c);
    } else {
#pragma unroll
      for (int k = 0; k < kPerLane; ++k)
        if (e + k < numel) q[e + k] = c[k];
    }
  }
}

__device__ void dequantize_blocks(const uint8_t* __restrict__ q, const float* __restrict__ amax,
                                  float* __restrict__ x, int64_t numel, const StagedMap& map) {
  const bool aligned = vector_aligned(x, q);
  const int64_t blocks = quant_blocks(numel);
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerCta;
  for (int64_t b = int64_t(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5); b < blocks;
       b += warps) {
    const int64_t e = b * kQuantBlock + lane * kPerLane;
    const bool vec = aligned && (b + 1) * kQuantBlock <= numel;
    uint8_t c[kPerLane];
    load_lane_codes(q, e, numel, vec, c);
    const float a = amax[b];
    float v[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) v[k] = cuda_detail::decode(map.value, c[k], a);
    cuda_detail::storef<kPerLane>(x + e, vec, cuda_detail::valid_of<kPerLane>(numel - e), v);
  }
}

template <bool kKeep>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
    quantize_kernel(const float* __restrict__ x, uint8_t* __restrict__ q,
                    float* __restrict__ amax, int64_t numel, QuantMap map) {
  __shared__ StagedMap staged;
  stage_map(staged, map, kKeep);
  quantize_blocks<kKeep>(x, q, amax, numel, staged);
}

__global__ void __launch_bounds__(kWarpsPerCta * 32)
    dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ amax,
                      float* __restrict__ x, int64_t numel, QuantMap map) {
  __shared__ StagedMap staged;
  stage_map(staged, map, true);
  dequantize_blocks(q, amax, x, numel, staged);
}

// The 8-bit compressed momentum of a fused shape group (grid.y: its tasks' DownJobs, all
// of `numel` elements): kRequantize writes each job's stage (`momentum`) back into its
// codes (requantize_blockwise_'s rule), else reads the codes into the stage.
template <bool kRequantize>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
    momentum_codes_kernel(const cuda_detail::DownJob* __restrict__ jobs, int64_t numel,
                          QuantMap map) {
  const cuda_detail::DownJob& job = jobs[blockIdx.y];
  if (job.codes == nullptr) return;  // uniform across the block
  __shared__ StagedMap staged;
  stage_map(staged, map, true);
  if constexpr (kRequantize) quantize_blocks<true>(job.momentum, job.codes, job.absmax, numel, staged);
  else dequantize_blocks(job.codes, job.absmax, job.momentum, numel, staged);
}

int grid_for(int64_t blocks) {
  return static_cast<int>(std::min<int64_t>(cuda_detail::ceil_div(blocks, kWarpsPerCta), kMaxGrid));
}

// Raw launches on `stream`, shared by the ops below and the step's unfused 8-bit stage.
template <bool kKeep>
void launch_quantize(const float* values, uint8_t* codes, float* absmax, int64_t numel,
                     bool is_signed, cudaStream_t stream) {
  if (numel == 0) return;
  quantize_kernel<kKeep><<<grid_for(quant_blocks(numel)), kWarpsPerCta * 32, 0, stream>>>(
      values, codes, absmax, numel, dynamic_map(is_signed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_dequantize(const uint8_t* codes, const float* absmax, float* values, int64_t numel,
                       bool is_signed, cudaStream_t stream) {
  if (numel == 0) return;
  dequantize_kernel<<<grid_for(quant_blocks(numel)), kWarpsPerCta * 32, 0, stream>>>(
      codes, absmax, values, numel, dynamic_map(is_signed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kKeep>
void quantize_cuda(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& absmax,
                   bool is_signed) {
  check_quantized_args(values, codes, absmax);
  const c10::cuda::CUDAGuard guard(values.device());
  launch_quantize<kKeep>(values.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                         absmax.data_ptr<float>(), values.numel(), is_signed,
                         at::cuda::getCurrentCUDAStream());
}

void dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                               const at::Tensor& values, bool is_signed) {
  check_quantized_args(values, codes, absmax);
  const c10::cuda::CUDAGuard guard(values.device());
  launch_dequantize(codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                    values.data_ptr<float>(), values.numel(), is_signed,
                    at::cuda::getCurrentCUDAStream());
}

}  // namespace

namespace cuda_detail {
namespace {

// The new absmax of every changed block of the tasks' 8-bit state (quant_io.cuh). Grid:
// (blocks striding over a task's absmax, tasks).
__global__ void __launch_bounds__(kThreads) quant_commit_kernel(TaskTable table) {
  const Task& t = table.tasks[blockIdx.y];
  if (!quantized(t) || skipped(t)) return;
  const int64_t blocks = quant_blocks(t.numel);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks; b += stride) {
    if (t.sm_codes != nullptr && t.sm_changed[b]) t.sm_absmax[b] = __uint_as_float(t.sm_next[b]);
    if (t.m_codes != nullptr && t.m_changed[b]) t.m_absmax[b] = __uint_as_float(t.m_next[b]);
  }
}

}  // namespace

const float* quant_maps(int device) {
  static std::mutex mutex;
  static std::vector<at::Tensor*> maps;  // never freed: CUDA may be gone at process exit
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(maps.size()) <= device) maps.resize(device + 1, nullptr);
  if (maps[device] == nullptr) {
    at::Tensor host = at::zeros({kMapFloats}, at::TensorOptions().dtype(at::kFloat));
    float* h = host.data_ptr<float>();
    const QuantMap& s = dynamic_map(true);
    const QuantMap& u = dynamic_map(false);
    std::copy(s.value, s.value + 256, h + kMapSigned);
    std::copy(u.value, u.value + 256, h + kMapUnsigned);
    for (int k = 0; k < 255; ++k) {
      h[kThresholdSigned + padded_threshold(k)] = s.threshold[k];
      h[kThresholdUnsigned + padded_threshold(k)] = u.threshold[k];
    }
    maps[device] = new at::Tensor(
        host.to(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device))));
  }
  return maps[device]->data_ptr<float>();
}

void launch_momentum_codes(bool requantize, const DownJob* jobs, int count, int64_t numel,
                           cudaStream_t stream) {
  if (numel == 0 || count == 0) return;
  const dim3 grid(static_cast<unsigned>(grid_for(quant_blocks(numel))),
                  static_cast<unsigned>(count));
  if (requantize)
    momentum_codes_kernel<true><<<grid, kWarpsPerCta * 32, 0, stream>>>(jobs, numel,
                                                                        dynamic_map(true));
  else
    momentum_codes_kernel<false><<<grid, kWarpsPerCta * 32, 0, stream>>>(jobs, numel,
                                                                         dynamic_map(true));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_momentum_stage(bool requantize, float* stage, uint8_t* codes, float* absmax,
                           int64_t numel, cudaStream_t stream) {
  if (requantize) launch_quantize<true>(stage, codes, absmax, numel, true, stream);
  else launch_dequantize(codes, absmax, stage, numel, true, stream);
}

void launch_quant_commit(const TaskTable& table, int64_t max_numel, cudaStream_t stream) {
  constexpr int kMaxBlocks = 64;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>(kMaxBlocks, ceil_div(quant_blocks(max_numel), kThreads))));
  constexpr int kMaxTasks = 65535;  // grid.y
  for (int first = 0; first < table.count; first += kMaxTasks) {
    TaskTable part = table;
    part.tasks += first;
    part.count = std::min(kMaxTasks, table.count - first);
    quant_commit_kernel<<<dim3(blocks, static_cast<unsigned>(part.count)), kThreads, 0,
                          stream>>>(part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda_detail
}  // namespace flora

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("quantize_blockwise_", &flora::quantize_cuda<false>);
  m.impl("requantize_blockwise_", &flora::quantize_cuda<true>);
  m.impl("dequantize_blockwise_", &flora::dequantize_blockwise_cuda);
}
