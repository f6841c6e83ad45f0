#pragma once
// Multi-tensor ops of the second-order (unrolled) architect step: each walks ALL weight tensors in one
// parallel pass ("one launch"), whatever their number. Lists hold contiguous tensors of one floating
// dtype on one device; scalars that depend on data (the finite-difference scale R, a clip coefficient)
// are 0-d tensors read where the data lives, never copied to the host.
// See pynas/strategies/darts.py for how the step uses them.

#include <ATen/core/Tensor.h>

#include <vector>

namespace pynas {
namespace cpu {

// w <- w - eta * (momentum * buf + s * g + weight_decay * w) for every tensor, in place; buf undefined
// (no momentum buffer yet) counts as zero; s = grad_scale (a 0-d tensor, e.g. a clip coefficient) or 1.
void mt_virtual_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& bufs, double eta, double momentum, double weight_decay,
                      const at::Tensor& grad_scale);

// sum over all tensors of sum(x^2), as a 0-d float64 tensor; partial sums per fixed chunk, added in chunk
// order (the result does not depend on the number of threads).
at::Tensor mt_sum_squares(const std::vector<at::Tensor>& xs);

// w <- base + sign * R * v with R = r / max(sqrt(sum_sq), tiny), sum_sq a 0-d tensor; returns R (0-d
// float64). base is the saved copy of the weights: the perturbation never accumulates rounding.
at::Tensor mt_perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& base,
                       const std::vector<at::Tensor>& v, const at::Tensor& sum_sq, double r, double sign);

// dst <- src, bit for bit.
void mt_copy_(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src);

}  // namespace cpu
}  // namespace pynas
