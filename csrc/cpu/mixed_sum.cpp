// CPU backend of mixed_sum (math in csrc/include/pynas/mixed_sum.h).
//
// The n elements are cut into fixed tiles of kTile elements that at::parallel_for hands to threads.
// The backward's sums over elements are made per tile and then added in tile order, so grad_weights
// does not depend on the number of threads.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/mixed_sum.h"
#include "pynas/tensor_lists.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

namespace pynas {
namespace cpu {
namespace {

using mixed_sum::Pointers;
using pynas::chunk_pointers;
using pynas::contiguous_all;

// 4096 elements: the tile and K of its inputs stay in L2; the accumulator of a tile stays in L1.
constexpr int64_t kTile = 4096;

// Tiles per task at least: about 32768 input elements, the grain torch's own CPU kernels use.
int64_t grain_in_tiles(int64_t k) { return std::max<int64_t>(1, 32768 / (kTile * k)); }


// Interleaved partial sums per weight in the backward: the sum over a tile's elements becomes kLanes
// independent sums that the compiler can put in SIMD lanes (it may not reorder a single running sum
// without -ffast-math). The order of additions is fixed at compile time, so grad_weights does not
// vary between runs or thread counts.
constexpr int kLanes = 8;

// The loops below carry `omp simd` (ignored where OpenMP is off): inputs and outputs never overlap,
// the outputs being fresh tensors, so the compiler needs no runtime overlap checks to vectorise.

// out[b:e] (or acc[0:e-b] when more chunks follow) for one chunk of N inputs.
template <int N, typename scalar_t, typename acc_t>
void forward_tile(Pointers<const scalar_t> xs, const acc_t* w, int64_t b, int64_t e, acc_t* acc, bool first,
                  scalar_t* out) {
  if (out != nullptr && first) {  // the whole sum in one chunk: no accumulator
#pragma omp simd
    for (int64_t i = b; i < e; ++i) out[i] = static_cast<scalar_t>(mixed_sum::forward_element<N>(xs, w, i, acc_t(0)));
  } else if (out != nullptr) {  // last of several chunks
#pragma omp simd
    for (int64_t i = b; i < e; ++i) out[i] = static_cast<scalar_t>(mixed_sum::forward_element<N>(xs, w, i, acc[i - b]));
  } else if (first) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) acc[i - b] = mixed_sum::forward_element<N>(xs, w, i, acc_t(0));
  } else {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) acc[i - b] = mixed_sum::forward_element<N>(xs, w, i, acc[i - b]);
  }
}

// grad_x_j[b:e] and dot[j] = sum_{i in [b, e)} g[i] * x_j[i] for one chunk of N inputs.
template <int N, typename scalar_t, typename acc_t>
void backward_tile(const scalar_t* g, Pointers<const scalar_t> xs, Pointers<scalar_t> gxs, const acc_t* w, int64_t b,
                   int64_t e, acc_t* dot) {
  acc_t lanes[N][kLanes] = {};
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      mixed_sum::backward_element<N>(xs, gxs, w, static_cast<acc_t>(g[i + l]), i + l, &lanes[0][l], kLanes);
    }
  }
  for (int l = 0; i < e; ++i, ++l) {  // the tail: fewer than kLanes elements
    mixed_sum::backward_element<N>(xs, gxs, w, static_cast<acc_t>(g[i]), i, &lanes[0][l], kLanes);
  }
  for (int j = 0; j < N; ++j) {
    acc_t s = 0;
    for (int l = 0; l < kLanes; ++l) s += lanes[j][l];
    dot[j] = s;
  }
}

}  // namespace

at::Tensor mixed_sum_forward(const std::vector<at::Tensor>& xs_in, const at::Tensor& weights) {
  const std::vector<at::Tensor> xs = contiguous_all(xs_in);
  const int64_t k = static_cast<int64_t>(xs.size());
  const int chunks = mixed_sum::num_chunks(k);
  at::Tensor out = at::empty(xs[0].sizes(), xs[0].options());
  const int64_t n = out.numel();
  if (n == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "mixed_sum_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w_acc = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* w = w_acc.const_data_ptr<acc_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    std::vector<Pointers<const scalar_t>> ptrs;
    for (int c = 0; c < chunks; ++c) ptrs.push_back(chunk_pointers<scalar_t, const scalar_t>(xs, c));

    const int64_t tiles = (n + kTile - 1) / kTile;
    at::parallel_for(0, tiles, grain_in_tiles(k), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(chunks > 1 ? kTile : 0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t * kTile, e = std::min(n, b + kTile);
        for (int c = 0; c < chunks; ++c) {
          mixed_sum::with_chunk_size(mixed_sum::chunk_size(k, c), [&](auto size) {
            forward_tile<decltype(size)::value>(ptrs[c], w + c * mixed_sum::kChunk, b, e, acc.data(), c == 0,
                                                c == chunks - 1 ? o : nullptr);
          });
        }
      }
    });
  });
  return out;
}

std::pair<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward(const at::Tensor& grad_out_in,
                                                                  const std::vector<at::Tensor>& xs_in,
                                                                  const at::Tensor& weights) {
  const std::vector<at::Tensor> xs = contiguous_all(xs_in);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t k = static_cast<int64_t>(xs.size());
  const int chunks = mixed_sum::num_chunks(k);
  const int64_t n = grad_out.numel();
  std::vector<at::Tensor> grad_xs;
  for (int64_t j = 0; j < k; ++j) grad_xs.push_back(at::empty(xs[0].sizes(), xs[0].options()));
  at::Tensor grad_w;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "mixed_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w_acc = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* w = w_acc.const_data_ptr<acc_t>();
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    std::vector<Pointers<const scalar_t>> x_ptrs;
    std::vector<Pointers<scalar_t>> gx_ptrs;
    for (int c = 0; c < chunks; ++c) {
      x_ptrs.push_back(chunk_pointers<scalar_t, const scalar_t>(xs, c));
      gx_ptrs.push_back(chunk_pointers<scalar_t, scalar_t>(grad_xs, c));
    }

    // Stage 1: per-tile sums, partial[t * k + j]. Stage 2: add them in tile order, in double.
    const int64_t tiles = (n + kTile - 1) / kTile;
    std::vector<acc_t> partial(static_cast<size_t>(tiles * k));
    at::parallel_for(0, tiles, grain_in_tiles(k), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t * kTile, e = std::min(n, b + kTile);
        for (int c = 0; c < chunks; ++c) {
          mixed_sum::with_chunk_size(mixed_sum::chunk_size(k, c), [&](auto size) {
            backward_tile<decltype(size)::value>(g, x_ptrs[c], gx_ptrs[c], w + c * mixed_sum::kChunk, b, e,
                                                 &partial[t * k + c * mixed_sum::kChunk]);
          });
        }
      }
    });
    at::Tensor grad_w_acc = at::empty({k}, w_acc.options());
    acc_t* gw = grad_w_acc.mutable_data_ptr<acc_t>();
    for (int64_t j = 0; j < k; ++j) {
      double s = 0;
      for (int64_t t = 0; t < tiles; ++t) s += static_cast<double>(partial[t * k + j]);
      gw[j] = static_cast<acc_t>(s);
    }
    grad_w = grad_w_acc.to(weights.scalar_type());
  });
  return {std::move(grad_xs), std::move(grad_w)};
}

}  // namespace cpu
}  // namespace pynas
