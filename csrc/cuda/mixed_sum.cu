// CUDA backend of mixed_sum (math in csrc/include/pynas/mixed_sum.h; this file is the thin shell:
// indexing, block reductions, launches).
//
// Forward: one grid-stride pass per chunk of up to kChunk inputs; when K > kChunk the chunks
// accumulate in an acc_t buffer. Backward: one grid-stride pass per chunk writes grad_x and leaves one
// partial sum per block and weight; a second kernel adds each weight's partials in block order (one
// block per weight), so grad_weights is deterministic on a given GPU (no atomics).

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/mixed_sum.h"
#include "pynas/cuda_grid.cuh"
#include "pynas/cuda_reduce.cuh"
#include "pynas/tensor_lists.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

namespace pynas {
namespace cuda {

// Compiler facts for build_info(): the CUDA version nvcc compiled this file with.
std::string compiled_cuda_version() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__);
}

namespace {

using mixed_sum::Pointers;
using pynas::chunk_pointers;
using pynas::contiguous_all;

constexpr int kThreads = 256;

// One chunk of N inputs. acc_in: running sums of earlier chunks (nullptr for the first chunk);
// acc_out: where to leave the running sums when more chunks follow, else nullptr and out gets them.
template <int N, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Pointers<const scalar_t> xs, const acc_t* __restrict__ w, const acc_t* acc_in, acc_t* acc_out,
                   scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const acc_t a = mixed_sum::forward_element<N>(xs, w, i, acc_in != nullptr ? acc_in[i] : acc_t(0));
    if (acc_out != nullptr) {
      acc_out[i] = a;
    } else {
      out[i] = static_cast<scalar_t>(a);
    }
  }
}

// One chunk of N inputs: grad_x, and partial[blockIdx.x * ld + j] = this block's sum of g * x_j.
template <int N, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ g, Pointers<const scalar_t> xs, Pointers<scalar_t> gxs,
                    const acc_t* __restrict__ w, acc_t* __restrict__ partial, int64_t ld, int64_t n) {
  acc_t dot[N];
#pragma unroll
  for (int j = 0; j < N; ++j) dot[j] = acc_t(0);
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    mixed_sum::backward_element<N>(xs, gxs, w, static_cast<acc_t>(g[i]), i, dot, 1);
  }
  block_sum<kThreads>(dot);  // valid in thread 0
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) partial[blockIdx.x * ld + j] = dot[j];
  }
}

// out[c] = sum_r partial[r * cols + c], one block per column c, in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(const acc_t* __restrict__ partial, int64_t rows, int64_t cols, acc_t* __restrict__ out) {
  const int64_t c = blockIdx.x;
  acc_t s[1] = {acc_t(0)};
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) s[0] += partial[r * cols + c];
  block_sum<kThreads>(s);
  if (threadIdx.x == 0) out[c] = s[0];
}

// Enough blocks to fill the GPU; grid-stride loops cover the rest.
int64_t num_blocks(int64_t n) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, static_cast<int64_t>(sms) * (2048 / kThreads)));
}

}  // namespace

at::Tensor mixed_sum_forward(const std::vector<at::Tensor>& xs_in, const at::Tensor& weights) {
  const c10::cuda::CUDAGuard guard(xs_in[0].device());
  const std::vector<at::Tensor> xs = contiguous_all(xs_in);
  const int64_t k = static_cast<int64_t>(xs.size());
  const int chunks = mixed_sum::num_chunks(k);
  at::Tensor out = at::empty(xs[0].sizes(), xs[0].options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(num_blocks(n)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "mixed_sum_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w_acc = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* w = w_acc.const_data_ptr<acc_t>();
    at::Tensor acc;  // running sums between chunks, only when K > kChunk
    if (chunks > 1) acc = at::empty({n}, w_acc.options());
    acc_t* a = chunks > 1 ? acc.mutable_data_ptr<acc_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int c = 0; c < chunks; ++c) {
      const auto xs_c = chunk_pointers<scalar_t, const scalar_t>(xs, c);
      const bool last = c == chunks - 1;
      mixed_sum::with_chunk_size(mixed_sum::chunk_size(k, c), [&](auto size) {
        forward_kernel<decltype(size)::value, scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
            xs_c, w + c * mixed_sum::kChunk, c == 0 ? nullptr : a, last ? nullptr : a, o, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return out;
}

std::pair<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward(const at::Tensor& grad_out_in,
                                                                  const std::vector<at::Tensor>& xs_in,
                                                                  const at::Tensor& weights) {
  const c10::cuda::CUDAGuard guard(xs_in[0].device());
  const std::vector<at::Tensor> xs = contiguous_all(xs_in);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t k = static_cast<int64_t>(xs.size());
  const int chunks = mixed_sum::num_chunks(k);
  const int64_t n = grad_out.numel();
  std::vector<at::Tensor> grad_xs;
  for (int64_t j = 0; j < k; ++j) grad_xs.push_back(at::empty(xs[0].sizes(), xs[0].options()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_w;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "mixed_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w_acc = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* w = w_acc.const_data_ptr<acc_t>();
    at::Tensor grad_w_acc = at::empty({k}, w_acc.options());
    if (n == 0) {
      grad_w_acc.zero_();
    } else {
      const int64_t blocks = num_blocks(n);
      const dim3 grid(static_cast<unsigned int>(blocks));
      at::Tensor partial = at::empty({blocks, k}, w_acc.options());
      acc_t* p = partial.mutable_data_ptr<acc_t>();
      const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
      for (int c = 0; c < chunks; ++c) {
        const auto xs_c = chunk_pointers<scalar_t, const scalar_t>(xs, c);
        const auto gxs_c = chunk_pointers<scalar_t, scalar_t>(grad_xs, c);
        mixed_sum::with_chunk_size(mixed_sum::chunk_size(k, c), [&](auto size) {
          backward_kernel<decltype(size)::value, scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
              g, xs_c, gxs_c, w + c * mixed_sum::kChunk, p + c * mixed_sum::kChunk, k, n);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      column_sum_kernel<acc_t><<<static_cast<unsigned int>(k), kThreads, 0, stream>>>(p, blocks, k, grad_w_acc.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    grad_w = grad_w_acc.to(weights.scalar_type());
  });
  return {std::move(grad_xs), std::move(grad_w)};
}

}  // namespace cuda
}  // namespace pynas
