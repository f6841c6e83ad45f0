#pragma once
// mixed_sum: the DARTS mixed edge, a weighted sum of K same-shaped tensors.
//
//   forward   out[i]      = sum_k w[k] * x_k[i]
//   backward  grad_x_k[i] = w[k] * g[i]
//             grad_w[k]   = sum_i g[i] * x_k[i]
//
// with x_k, out, g, grad_x_k of n elements (contiguous, dtype scalar_t) and w, grad_w of K elements.
// Sums are taken in acc_t: float for float16/bfloat16/float32, double for float64.
//
// This header holds the math once, as per-element functions that csrc/cpu/mixed_sum.cpp (a loop over a
// tile) and csrc/cuda/mixed_sum.cu (one thread per element) both call, so that the CPU tests exercise
// the code the GPU runs. It also declares each backend's entry point, called by csrc/bindings.cpp.

#include "pynas/macros.h"

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace at {
class Tensor;
}

namespace pynas {
namespace mixed_sum {

// A kernel pass handles at most kChunk inputs, whose pointers travel by value in a Pointers struct (a
// CUDA kernel parameter). Any K is done in ceil(K / kChunk) passes that accumulate.
constexpr int kChunk = 8;

template <typename T>
struct Pointers {
  T* p[kChunk];
};

PYNAS_HOST_DEVICE inline int num_chunks(int64_t k) { return static_cast<int>((k + kChunk - 1) / kChunk); }

// Number of inputs in chunk c (the last chunk may be short).
PYNAS_HOST_DEVICE inline int chunk_size(int64_t k, int c) {
  const int64_t rest = k - static_cast<int64_t>(c) * kChunk;
  return rest < kChunk ? static_cast<int>(rest) : kChunk;
}

// Forward of one element over one chunk of N inputs: returns acc + sum_{j<N} w[j] * x_j[i].
// `w` points at the chunk's first weight.
template <int N, typename acc_t, typename scalar_t>
PYNAS_HOST_DEVICE inline acc_t forward_element(const Pointers<const scalar_t>& xs, const acc_t* w, int64_t i,
                                               acc_t acc) {
  for (int j = 0; j < N; ++j) acc += w[j] * static_cast<acc_t>(xs.p[j][i]);
  return acc;
}

// Backward of one element over one chunk of N inputs, given g = grad_out[i] in acc_t:
// writes grad_x_j[i] = w[j] * g and adds g * x_j[i] to the caller's running sum dot[j * stride] (a
// stride lets the CPU keep interleaved partial sums that it can vectorise, see csrc/cpu/mixed_sum.cpp).
template <int N, typename acc_t, typename scalar_t>
PYNAS_HOST_DEVICE inline void backward_element(const Pointers<const scalar_t>& xs, const Pointers<scalar_t>& gxs,
                                               const acc_t* w, acc_t g, int64_t i, acc_t* dot, int stride) {
  for (int j = 0; j < N; ++j) {
    dot[j * stride] += g * static_cast<acc_t>(xs.p[j][i]);
    gxs.p[j][i] = static_cast<scalar_t>(w[j] * g);
  }
}

// Calls f(std::integral_constant<int, n>{}) for 1 <= n <= kChunk, so that the per-element loops over
// a chunk are unrolled at compile time. Host code only.
template <typename F>
inline void with_chunk_size(int n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: break;  // unreachable: callers pass chunk_size(), which is in [1, kChunk]
  }
}
static_assert(kChunk == 8, "with_chunk_size() enumerates 1..kChunk");

}  // namespace mixed_sum

// Backend entry points. Arguments are already checked by csrc/bindings.cpp (same shape, dtype and
// device for every tensor of xs; weights 1-D of length K on that device); they may be non-contiguous.
namespace cpu {
at::Tensor mixed_sum_forward(const std::vector<at::Tensor>& xs, const at::Tensor& weights);
std::pair<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward(const at::Tensor& grad_out,
                                                                  const std::vector<at::Tensor>& xs,
                                                                  const at::Tensor& weights);
}  // namespace cpu

namespace cuda {
at::Tensor mixed_sum_forward(const std::vector<at::Tensor>& xs, const at::Tensor& weights);
std::pair<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward(const at::Tensor& grad_out,
                                                                  const std::vector<at::Tensor>& xs,
                                                                  const at::Tensor& weights);
}  // namespace cuda

}  // namespace pynas
