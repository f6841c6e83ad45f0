// CUDA backend of rnn_mix (math in csrc/include/pynas/rnn_mix.h; this file is the thin shell:
// indexing, block reductions, launches).
//
// Forward: one thread per (b, k) element, looping over the J nodes. Backward: the same threads, nodes in
// the outer loop, write d states, d c, d h and leave one partial sum per block, node and function in a
// (blocks, J, 5) buffer, which is then summed over blocks in a fixed order (no atomics). The block count
// depends only on the element count (not on the GPU), so d probs is deterministic.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/rnn_mix.h"
#include "pynas/cuda_grid.cuh"
#include "pynas/cuda_reduce.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>

namespace pynas {
namespace cuda {

namespace {

using rnn_mix::kFuncs;

constexpr int kThreads = 256;
// A fixed cap (about 8 blocks of 256 threads per SM on an H100) rather than one read from the device, so
// the split of elements among blocks, hence the rounding of d probs, is the same on every GPU.
constexpr int64_t kMaxBlocks = 1024;

// out[i] = sum_j forward_term(states[j, i], c[j, i], h[j, i], probs[j, :]), i over the n = B * H elements.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ c, const scalar_t* __restrict__ h,
                   const acc_t* __restrict__ probs, scalar_t* __restrict__ out, int64_t num_nodes, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    acc_t acc = acc_t(0);
    for (int64_t j = 0; j < num_nodes; ++j) {
      const int64_t at = j * n + i;
      acc += rnn_mix::forward_term<acc_t>(static_cast<acc_t>(s[at]), static_cast<acc_t>(c[at]),
                                          static_cast<acc_t>(h[at]), probs + j * kFuncs);
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

// d states, d c, d h at every element, and partial[(blockIdx.x * J + j) * 5 + f] = this block's share of
// d probs[j, f] (column 0 stays zero).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ s, const scalar_t* __restrict__ c,
                    const scalar_t* __restrict__ h, const acc_t* __restrict__ probs, scalar_t* __restrict__ ds,
                    scalar_t* __restrict__ dc, scalar_t* __restrict__ dh, acc_t* __restrict__ partial,
                    int64_t num_nodes, int64_t n) {
  for (int64_t j = 0; j < num_nodes; ++j) {
    const acc_t* p = probs + j * kFuncs;
    acc_t dp[kFuncs];
#pragma unroll
    for (int f = 0; f < kFuncs; ++f) dp[f] = acc_t(0);
    for (int64_t i = first_index(); i < n; i += grid_stride()) {
      const int64_t at = j * n + i;
      acc_t ds_v, dc_v, dh_v;
      rnn_mix::backward_term<acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(s[at]), static_cast<acc_t>(c[at]),
                                    static_cast<acc_t>(h[at]), p, &ds_v, &dc_v, &dh_v, dp);
      ds[at] = static_cast<scalar_t>(ds_v);
      dc[at] = static_cast<scalar_t>(dc_v);
      dh[at] = static_cast<scalar_t>(dh_v);
    }
    block_sum<kThreads>(dp);  // valid in thread 0; ends with a barrier, so the next j may reuse it
    if (threadIdx.x == 0) {
      acc_t* out = partial + (static_cast<int64_t>(blockIdx.x) * num_nodes + j) * kFuncs;
#pragma unroll
      for (int f = 0; f < kFuncs; ++f) out[f] = dp[f];
    }
  }
}

int64_t num_blocks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

}  // namespace

at::Tensor rnn_mix_forward(const at::Tensor& states_in, const at::Tensor& c_in, const at::Tensor& h_in,
                           const at::Tensor& probs) {
  const c10::cuda::CUDAGuard guard(states_in.device());
  const at::Tensor states = states_in.contiguous(), c = c_in.contiguous(), h = h_in.contiguous();
  const int64_t num_nodes = states.size(0);
  at::Tensor out = at::empty({states.size(1), states.size(2)}, states.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(num_blocks(n)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, states.scalar_type(), "rnn_mix_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor p_acc = probs.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    forward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        states.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        p_acc.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), num_nodes, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_mix_backward(const at::Tensor& grad_out_in,
                                                                            const at::Tensor& states_in,
                                                                            const at::Tensor& c_in,
                                                                            const at::Tensor& h_in,
                                                                            const at::Tensor& probs) {
  const c10::cuda::CUDAGuard guard(states_in.device());
  const at::Tensor states = states_in.contiguous(), c = c_in.contiguous(), h = h_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t num_nodes = states.size(0);
  const int64_t n = states.size(1) * states.size(2);
  at::Tensor d_states = at::empty(states.sizes(), states.options());
  at::Tensor d_c = at::empty(states.sizes(), states.options());
  at::Tensor d_h = at::empty(states.sizes(), states.options());
  at::Tensor d_probs;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, states.scalar_type(), "rnn_mix_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor p_acc = probs.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    if (n == 0 || num_nodes == 0) {
      d_probs = at::zeros(probs.sizes(), probs.options());
      return;
    }
    const int64_t blocks = num_blocks(n);
    at::Tensor partial = at::empty({blocks, num_nodes, kFuncs}, p_acc.options());
    backward_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), states.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
        h.const_data_ptr<scalar_t>(), p_acc.const_data_ptr<acc_t>(), d_states.mutable_data_ptr<scalar_t>(),
        d_c.mutable_data_ptr<scalar_t>(), d_h.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(),
        num_nodes, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Fixed-order sum over the blocks (torch's reductions use no atomics), then to probs' dtype.
    d_probs = partial.sum(0).to(probs.scalar_type());
  });
  return {std::move(d_states), std::move(d_c), std::move(d_h), std::move(d_probs)};
}

}  // namespace cuda
}  // namespace pynas
