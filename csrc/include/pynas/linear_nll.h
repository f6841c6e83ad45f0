#pragma once
// linear_nll's rows kernel: the log-softmax and NLL of a chunk of logits rows, and their gradient in place.
//
// For logits (R, V) (contiguous, a chunk of h @ W^T + b) and target (R,) int64 class indices:
//
//   nll[r]    = logsumexp(logits[r]) - logits[r, target[r]]
//   logits[r] = (softmax(logits[r]) - onehot(target[r])) * scale        (only with `grad`)
//
// pynas/ops/linear_nll.py runs it on chunks of rows between the chunk's GEMMs (the decoder's logits before,
// grad_h = P W and grad_W += P^T h after), so the (N, V) log-probabilities are never stored. Each row is
// computed by one thread (CPU) or one block (CUDA): results do not depend on the thread count. A target outside
// [0, V) raises on the CPU; on a CUDA device (no host check, no sync) its row's nll is NaN. Arguments are
// checked in csrc/bindings.cpp: logits 2-D contiguous floating, target (R,) int64 on its device, nll (R,) of
// logits' dtype and device.

namespace at {
class Tensor;
}

namespace pynas {
namespace cpu {
void linear_nll_rows_(at::Tensor& logits, const at::Tensor& target, at::Tensor& nll, bool grad, double scale);
}  // namespace cpu
namespace cuda {
void linear_nll_rows_(at::Tensor& logits, const at::Tensor& target, at::Tensor& nll, bool grad, double scale);
}  // namespace cuda
}  // namespace pynas
