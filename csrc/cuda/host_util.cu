// Host helpers of the CUDA path: cuBLAS GEMMs in row-major terms, pinned uploads of
// the step's tables, the dtype codes, the side streams and the device's shared memory.
#include "config.cuh"
#include "launch.h"
#include "tuning.h"

#include <ATen/ATen.h>
// at::getHostAllocator. The header sizes its structures by
// std::hardware_destructive_interference_size, which GCC warns of on every use.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/core/CachingHostAllocator.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic pop
#endif
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <cublas_v2.h>

#include <climits>
#include <map>
#include <mutex>

namespace flora {
namespace cuda_detail {

namespace {

int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= INT_MAX, "flora: ", what, " = ", v, " exceeds the cuBLAS int range");
  return static_cast<int>(v);
}

cudaDataType_t cuda_type(int dt) {
  return dt == kF32 ? CUDA_R_32F : dt == kBF16 ? CUDA_R_16BF : CUDA_R_16F;
}

// Row-major C (M x N, fp32) = alpha op(A) op(B) + beta C, through cuBLAS's
// column-major API as C^T = op(B)^T op(A)^T: run(handle, opB, opA, N, M, K, ldb, lda,
// ldc, type of A and B, compute type) makes the call. A and B share the type `ab`.
// fp32 inputs run on TF32 tensor cores when tf32 is set; 16-bit inputs always use the
// tensor cores with fp32 accumulation.
template <typename Run>
void cublas_row_major(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int ab,
                      bool tf32, const Run& run) {
  const int lda = as_int(trans_a ? M : K, "lda"), ldb = as_int(trans_b ? K : N, "ldb");
  const bool fast = ab == kF32 && tf32;
  const cublasComputeType_t compute = fast ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  // torch sets the shared handle's math mode from allow_tf32, and TF32 math mode lets
  // cuBLAS use TF32 even for CUBLAS_COMPUTE_32F: our option decides, not that flag.
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  cublasMath_t previous;
  TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle, &previous));
  TORCH_CUDABLAS_CHECK(
      cublasSetMathMode(handle, fast ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  const cublasStatus_t status =
      run(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
          as_int(N, "N"), as_int(M, "M"), as_int(K, "K"), ldb, lda, as_int(N, "ldc"),
          cuda_type(ab), compute);
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, previous));
  TORCH_CUDABLAS_CHECK(status);
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void* A, const void* B, int ab, float beta, float* C, bool tf32) {
  cublas_row_major(trans_a, trans_b, M, N, K, ab, tf32,
                   [&](cublasHandle_t handle, cublasOperation_t op_b, cublasOperation_t op_a,
                       int n, int m, int k, int ldb, int lda, int ldc, cudaDataType_t type,
                       cublasComputeType_t compute) {
                     return cublasGemmEx(handle, op_b, op_a, n, m, k, &alpha, B, type, ldb, A,
                                         type, lda, &beta, C, CUDA_R_32F, ldc, compute,
                                         CUBLAS_GEMM_DEFAULT);
                   });
}

// Batched gemm(): C_k = alpha op(A_k) op(B_k) + beta C_k for the `count` pointer
// triples in device arrays a, b, c (one cuBLAS launch for tensors of one shape).
void gemm_batched(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const void* const* a, const void* const* b, int ab, float beta,
                  void* const* c, int count, bool tf32) {
  cublas_row_major(trans_a, trans_b, M, N, K, ab, tf32,
                   [&](cublasHandle_t handle, cublasOperation_t op_b, cublasOperation_t op_a,
                       int n, int m, int k, int ldb, int lda, int ldc, cudaDataType_t type,
                       cublasComputeType_t compute) {
                     return cublasGemmBatchedEx(handle, op_b, op_a, n, m, k, &alpha, b, type,
                                                ldb, a, type, lda, &beta, c, CUDA_R_32F, ldc,
                                                count, compute, CUBLAS_GEMM_DEFAULT);
                   });
}


int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "flora: unsupported param dtype ", t);
  }
}

// The first `count` side streams of a device: created once, kept for every step.
const std::vector<at::cuda::CUDAStream>& side_streams(c10::DeviceIndex device, int count) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, std::vector<at::cuda::CUDAStream>> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto& s = streams[device];
  s.reserve(kMaxSideStreams);  // never moves: another step may hold its streams
  while (static_cast<int>(s.size()) < count)
    s.push_back(at::cuda::getStreamFromPool(false, device));
  return s;
}


// Shared memory a block may have on the current device (after cudaFuncSetAttribute).
int64_t smem_optin() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// Host-to-device copies of a step's tables (task descriptors, pointer arrays, jobs):
// a pinned block of torch's caching host allocator, filled by the caller, then copied
// on the current stream and kept from reuse until that copy is done. What
// Tensor::to(non_blocking) does, without its dispatch and two tensors a copy.
at::DataPtr pinned_block(int64_t bytes) {
  return at::getHostAllocator(at::kCUDA)->allocate(static_cast<size_t>(bytes));
}

void upload(void* device, const at::DataPtr& host, int64_t bytes) {
  const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemcpyAsync(device, host.get(), static_cast<size_t>(bytes),
                                 cudaMemcpyHostToDevice, stream));
  at::getHostAllocator(at::kCUDA)->record_event(host.get(), host.get_context(),
                                                 stream.unwrap());
}

}  // namespace cuda_detail
}  // namespace flora
