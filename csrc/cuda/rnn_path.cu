// CUDA backend of rnn_path's highway step (math in csrc/include/pynas/rnn_path.h; this file is the thin
// shell: indexing and launches). One thread per (b, k) element of the (B, H) state, grid-stride, int64
// indices; no reductions.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/rnn_path.h"
#include "pynas/cuda_grid.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>

namespace pynas {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

// s[i] = step_forward(prev[i], ch[b, k], ch[b, H + k]) for i = b * H + k < n; m[i] = s[i] * mask[i] when m.
template <int ACT, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ ch, const scalar_t* __restrict__ prev,
                   const scalar_t* __restrict__ mask, scalar_t* __restrict__ s, scalar_t* __restrict__ m, int64_t n,
                   int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const int64_t b = i / H, k = i - b * H;
    const int64_t c = b * 2 * H + k;
    const scalar_t v = static_cast<scalar_t>(rnn_path::step_forward<ACT, acc_t>(
        static_cast<acc_t>(prev[i]), static_cast<acc_t>(ch[c]), static_cast<acc_t>(ch[c + H])));
    s[i] = v;
    if (m != nullptr) m[i] = static_cast<scalar_t>(static_cast<acc_t>(v) * static_cast<acc_t>(mask[i]));
  }
}

// gch[b, k] = d c, gch[b, H + k] = d g; gp[i] = d p (or += with accumulate).
template <int ACT, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ gs, const scalar_t* __restrict__ ch,
                    const scalar_t* __restrict__ prev, scalar_t* __restrict__ gch, scalar_t* __restrict__ gp,
                    bool accumulate, int64_t n, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const int64_t b = i / H, k = i - b * H;
    const int64_t c = b * 2 * H + k;
    acc_t vc, vg, vp;
    rnn_path::step_backward<ACT, acc_t>(static_cast<acc_t>(gs[i]), static_cast<acc_t>(prev[i]),
                                        static_cast<acc_t>(ch[c]), static_cast<acc_t>(ch[c + H]), &vc, &vg, &vp);
    gch[c] = static_cast<scalar_t>(vc);
    gch[c + H] = static_cast<scalar_t>(vg);
    gp[i] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(gp[i]) + vp : vp);
  }
}

unsigned int num_blocks(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

}  // namespace

void rnn_path_step_forward(const at::Tensor& ch, const at::Tensor& prev, int64_t act, const at::Tensor& h_mask,
                           const at::Tensor& s, const at::Tensor& m) {
  const c10::cuda::CUDAGuard guard(prev.device());
  const int64_t H = prev.size(1), n = prev.numel();
  if (n == 0) return;
  const bool masked = h_mask.defined() && m.defined();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prev.scalar_type(), "rnn_path_step_forward_cuda", [&] {
    rnn_path::dispatch_activation(act, [&](auto a) {
      forward_kernel<decltype(a)::value, scalar_t><<<num_blocks(n), kThreads, 0, stream>>>(
          ch.const_data_ptr<scalar_t>(), prev.const_data_ptr<scalar_t>(),
          masked ? h_mask.const_data_ptr<scalar_t>() : nullptr, s.mutable_data_ptr<scalar_t>(),
          masked ? m.mutable_data_ptr<scalar_t>() : nullptr, n, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void rnn_path_step_backward(const at::Tensor& g, const at::Tensor& ch, const at::Tensor& prev, int64_t act,
                            const at::Tensor& gch, const at::Tensor& g_prev, bool accumulate) {
  const c10::cuda::CUDAGuard guard(prev.device());
  const int64_t H = prev.size(1), n = prev.numel();
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prev.scalar_type(), "rnn_path_step_backward_cuda", [&] {
    rnn_path::dispatch_activation(act, [&](auto a) {
      backward_kernel<decltype(a)::value, scalar_t><<<num_blocks(n), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), ch.const_data_ptr<scalar_t>(), prev.const_data_ptr<scalar_t>(),
          gch.mutable_data_ptr<scalar_t>(), g_prev.mutable_data_ptr<scalar_t>(), accumulate, n, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace pynas
