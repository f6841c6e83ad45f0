#pragma once
// Host-side helpers for kernels that take a list of tensors, shared by csrc/cpu and csrc/cuda.

#include "pynas/mixed_sum.h"

#include <ATen/core/Tensor.h>

#include <vector>

namespace pynas {

// Each tensor of `xs` made contiguous (a no-op for those that already are).
inline std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& xs) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.contiguous());
  return out;
}

// The data pointers of chunk `c` (tensors c*kChunk .. c*kChunk+size-1) of `ts`, as a by-value struct.
template <typename scalar_t, typename T>
mixed_sum::Pointers<T> chunk_pointers(const std::vector<at::Tensor>& ts, int c) {
  mixed_sum::Pointers<T> p{};
  const int size = mixed_sum::chunk_size(static_cast<int64_t>(ts.size()), c);
  for (int j = 0; j < size; ++j) {
    p.p[j] = const_cast<T*>(ts[static_cast<size_t>(c) * mixed_sum::kChunk + j].template const_data_ptr<scalar_t>());
  }
  return p;
}

}  // namespace pynas
