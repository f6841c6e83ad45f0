#pragma once
// Argument checks of the multi-tensor ops (torch.ops.pynas.mt_*), shared by the CPU registration
// (csrc/cpu/multi_tensor.cpp) and the CUDA one (csrc/cuda/multi_tensor.cu), so both backends reject
// the same inputs with the same messages.

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace pynas {
namespace multi_tensor {

// `ts` holds `len` dense contiguous floating tensors, of the dtype and device of *ref when ref is given.
inline void check_list(const char* op, at::TensorList ts, const char* name, const at::Tensor* ref, size_t len) {
  TORCH_CHECK(ts.size() == len, op, ": ", name, ": expected ", len, " tensors (one per parameter), got ",
              ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK(t.defined() && t.layout() == at::kStrided && t.is_contiguous(), op, ": ", name, "[", i,
                "]: expected a dense contiguous tensor");
    TORCH_CHECK(t.is_floating_point(), op, ": ", name, "[", i, "]: expected a floating dtype, got ", t.scalar_type());
    if (ref != nullptr) {
      TORCH_CHECK(t.scalar_type() == ref->scalar_type() && t.device() == ref->device(), op, ": ", name, "[", i,
                  "]: expected the dtype and device of the first parameter (", ref->scalar_type(), " on ",
                  ref->device(), "), got ", t.scalar_type(), " on ", t.device());
    }
  }
}

inline void check_params(const char* op, at::TensorList params) {
  check_list(op, params, "params", params.empty() ? nullptr : &params[0], params.size());
}

// `ts` is like `params`: same length, and each tensor of its parameter's dtype, device and shape.
inline void check_like_params(const char* op, at::TensorList ts, const char* name, at::TensorList params) {
  check_list(op, ts, name, params.empty() ? nullptr : &params[0], params.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].sizes() == params[i].sizes(), op, ": ", name, "[", i, "]: expected the shape of params[",
                i, "] ", params[i].sizes(), ", got ", ts[i].sizes());
  }
}

// The momentum buffers as a vector with one entry per parameter (undefined: no buffer yet), or empty.
inline std::vector<at::Tensor> checked_bufs(const char* op, const c10::List<std::optional<at::Tensor>>& bufs,
                                            at::TensorList params) {
  TORCH_CHECK(bufs.size() == 0 || bufs.size() == params.size(), op,
              ": bufs: expected no entry or one entry (a tensor or None) per parameter (", params.size(),
              "), got ", bufs.size());
  std::vector<at::Tensor> b;
  b.reserve(bufs.size());
  for (size_t i = 0; i < bufs.size(); ++i) {
    const std::optional<at::Tensor> t = bufs.get(i);
    if (t.has_value() && t->defined()) {
      TORCH_CHECK(t->sizes() == params[i].sizes() && t->scalar_type() == params[i].scalar_type() &&
                      t->device() == params[i].device() && t->is_contiguous(),
                  op, ": bufs[", i, "]: expected a contiguous tensor with the shape, dtype and device of params[", i, "]");
      b.push_back(*t);
    } else {
      b.emplace_back();
    }
  }
  return b;
}

inline void check_grad_scale(const char* op, const at::Tensor& s) {
  TORCH_CHECK(!s.defined() || s.numel() == 1, op, ": grad_scale: expected one value, got ", s.numel());
}

inline void check_perturb_scalars(const char* op, const at::Tensor& sum_sq, double r) {
  TORCH_CHECK(sum_sq.numel() == 1, op, ": sum_sq: expected one value, got ", sum_sq.numel());
  TORCH_CHECK(r > 0, op, ": r: expected a positive value, got ", r);
}

// The four ops with their argument checks, for a backend whose kernels are the static members
// Impl::virtual_step_, Impl::sum_squares, Impl::perturb_ and Impl::copy_ (the signatures of
// csrc/include/pynas/multi_tensor.h). Each backend registers CheckedOps<its Impl>, so every backend
// rejects the same inputs with the same messages.
template <typename Impl>
struct CheckedOps {
  static void virtual_step_(at::TensorList params, at::TensorList grads,
                            const c10::List<std::optional<at::Tensor>>& bufs, double eta, double momentum,
                            double weight_decay, const std::optional<at::Tensor>& grad_scale) {
    constexpr const char* op = "mt_virtual_step_";
    check_params(op, params);
    check_like_params(op, grads, "grads", params);
    const std::vector<at::Tensor> b = checked_bufs(op, bufs, params);
    const at::Tensor s = grad_scale.value_or(at::Tensor());
    check_grad_scale(op, s);
    Impl::virtual_step_(params.vec(), grads.vec(), b, eta, momentum, weight_decay, s);
  }

  static at::Tensor sum_squares(at::TensorList xs) {
    check_list("mt_sum_squares", xs, "xs", xs.empty() ? nullptr : &xs[0], xs.size());
    return Impl::sum_squares(xs.vec());
  }

  static at::Tensor perturb_(at::TensorList params, at::TensorList base, at::TensorList v, const at::Tensor& sum_sq,
                             double r, double sign) {
    constexpr const char* op = "mt_perturb_";
    check_params(op, params);
    check_like_params(op, base, "base", params);
    check_like_params(op, v, "v", params);
    check_perturb_scalars(op, sum_sq, r);
    return Impl::perturb_(params.vec(), base.vec(), v.vec(), sum_sq, r, sign);
  }

  static void copy_(at::TensorList dst, at::TensorList src) {
    constexpr const char* op = "mt_copy_";
    check_params(op, dst);
    check_like_params(op, src, "src", dst);
    Impl::copy_(dst.vec(), src.vec());
  }
};

}  // namespace multi_tensor
}  // namespace pynas
