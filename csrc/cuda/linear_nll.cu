// CUDA backend of linear_nll's rows kernel (contract in csrc/include/pynas/linear_nll.h; the CPU loop in
// csrc/cpu/linear_nll.cpp is the one to read first).
//
// One block per row, kThreads threads striding over its V logits: a block max, a block sum of
// exp(x - max) (block_sum_all: a fixed order, the same from run to run), the row's NLL written by thread 0,
// and with `grad` the row overwritten by (softmax - onehot) * scale. Arithmetic in at::opmath_type (float for
// float16 / bfloat16). A target outside [0, V) gives the row a NaN NLL and leaves it unscaled (no device
// assert, no host check).

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/cuda_reduce.cuh"
#include "pynas/linear_nll.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace pynas {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const T o = __shfl_down_sync(kFullWarpMask, v, offset);
    v = (o > v || o != o) ? o : v;  // NaN wins
  }
  return v;
}

// Max of v over the block (NaN if any lane is NaN), returned to every thread.
template <typename T>
__device__ __forceinline__ T block_max_all(T v) {
  __shared__ T smem[kThreads / kWarpSize];
  __shared__ T total;
  const int lane = threadIdx.x & (kWarpSize - 1), warp = threadIdx.x / kWarpSize;
  v = warp_max(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T m = lane < static_cast<int>(blockDim.x / kWarpSize) ? smem[lane] : -std::numeric_limits<T>::infinity();
    m = warp_max(m);
    if (lane == 0) total = m;
  }
  __syncthreads();
  const T result = total;
  __syncthreads();
  return result;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nll_rows_kernel(scalar_t* __restrict__ logits,
                                                            const int64_t* __restrict__ target,
                                                            scalar_t* __restrict__ nll, int64_t V, bool grad,
                                                            double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  scalar_t* x = logits + r * V;
  const int64_t t = target[r];
  const bool valid = t >= 0 && t < V;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[i]);
    m = (v > m || v != v) ? v : m;
  }
  m = block_max_all(m);
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) s += ::exp(static_cast<acc_t>(x[i]) - m);
  s = block_sum_all<kThreads>(s);
  const acc_t lse = m + ::log(s);
  if (threadIdx.x == 0) {
    nll[r] = valid ? static_cast<scalar_t>(lse - static_cast<acc_t>(x[t]))
                   : static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
  }
  __syncthreads();  // x[t] read before it is overwritten
  if (!grad || !valid) return;
  const acc_t sc = static_cast<acc_t>(scale);
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const acc_t p = ::exp(static_cast<acc_t>(x[i]) - lse);
    x[i] = static_cast<scalar_t>((p - (i == t ? acc_t(1) : acc_t(0))) * sc);
  }
}

}  // namespace

void linear_nll_rows_(at::Tensor& logits, const at::Tensor& target, at::Tensor& nll, bool grad, double scale) {
  const int64_t R = logits.size(0), V = logits.size(1);
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "linear_nll_rows_", [&] {
    nll_rows_kernel<scalar_t><<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
        logits.mutable_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), nll.mutable_data_ptr<scalar_t>(),
        V, grad, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pynas
