// Python bindings of pynas._C: validate the arguments, then hand them to the backend of their device.
// One binding per fused op; the math lives in csrc/include/pynas/<op>.h, the backends in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu.

#include "pynas/checks.h"
#include "pynas/macros.h"
#include "pynas/cnn_edge.h"
#include "pynas/linear_nll.h"
#include "pynas/mixed_sum.h"
#include "pynas/partial_channel.h"
#include "pynas/rnn_cell.h"
#include "pynas/rnn_mix.h"
#include "pynas/rnn_path.h"
#include "pynas/roofline.h"

#include <torch/python.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

// Set by setup.py (only on the C++ side): PYNAS_WITH_CUDA when csrc/cuda is compiled in,
// PYNAS_CUDA_ARCHS (TORCH_CUDA_ARCH_LIST of the build), PYNAS_TORCH_VERSION (torch.__version__).
#ifndef PYNAS_TORCH_VERSION
#define PYNAS_TORCH_VERSION "unknown"
#endif
#ifndef PYNAS_CUDA_ARCHS
#define PYNAS_CUDA_ARCHS ""
#endif

#ifdef PYNAS_WITH_CUDA
namespace pynas {
namespace cuda {
std::string compiled_cuda_version();  // csrc/cuda/mixed_sum.cu
}  // namespace cuda
}  // namespace pynas
#endif

namespace {

[[noreturn]] void fail_device(const char* op, const at::Tensor& x, const char* name) {
#ifndef PYNAS_WITH_CUDA
  if (x.is_cuda()) {
    TORCH_CHECK(false, op, ": pynas._C was built without CUDA, got ", name, " on ", x.device(),
                " (rebuild with a CUDA toolkit, see csrc/README.md)");
  }
#endif
  TORCH_CHECK(false, op, ": pynas._C has no kernel for device ", x.device(), " (got ", name, " on it)");
}

void check_mixed_sum_args(const char* op, const std::vector<at::Tensor>& xs, const at::Tensor& weights) {
  pynas::checks::check_tensor_list(op, xs, "xs");
  pynas::checks::check_vector(op, weights, "weights", static_cast<int64_t>(xs.size()), "one per tensor in xs",
                              xs[0], "xs[0]");
}

at::Tensor mixed_sum_forward(const std::vector<at::Tensor>& xs, const at::Tensor& weights) {
  constexpr const char* op = "mixed_sum_forward";
  check_mixed_sum_args(op, xs, weights);
  if (xs[0].is_cpu()) return pynas::cpu::mixed_sum_forward(xs, weights);
#ifdef PYNAS_WITH_CUDA
  if (xs[0].is_cuda()) return pynas::cuda::mixed_sum_forward(xs, weights);
#endif
  fail_device(op, xs[0], "xs[0]");
}

std::pair<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward(const at::Tensor& grad_out,
                                                                  const std::vector<at::Tensor>& xs,
                                                                  const at::Tensor& weights) {
  constexpr const char* op = "mixed_sum_backward";
  check_mixed_sum_args(op, xs, weights);
  pynas::checks::check_like(op, grad_out, "grad_out", xs[0], "xs[0]");
  if (xs[0].is_cpu()) return pynas::cpu::mixed_sum_backward(grad_out, xs, weights);
#ifdef PYNAS_WITH_CUDA
  if (xs[0].is_cuda()) return pynas::cuda::mixed_sum_backward(grad_out, xs, weights);
#endif
  fail_device(op, xs[0], "xs[0]");
}

// ---- the fused CNN edge (see csrc/include/pynas/cnn_edge.h; the 1x1 convs are CPU only) --------------

void check_activation(const char* op, const at::Tensor& t, const char* name) {
  pynas::checks::check_dense(op, t, name);
  TORCH_CHECK(t.dim() == 4, op, ": ", name, ": expected 4-D (N, C, H, W), got ", pynas::checks::describe(t));
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              ": expected dtype torch.float32 or torch.float64, got ", pynas::checks::describe(t));
  if (!t.is_cpu()) fail_device(op, t, name);
}

// The accumulation dtype of the edge kernels for activations `x`: that of mean/rstd, and of `sums` on a GPU.
at::ScalarType edge_acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// An activation of the edge kernels that run on both devices: float32 or float64 on the CPU, also
// float16 or bfloat16 on a CUDA device (when pynas._C has its CUDA part).
void check_edge_input(const char* op, const at::Tensor& t, const char* name) {
  pynas::checks::check_dense(op, t, name);
  TORCH_CHECK(t.dim() == 4, op, ": ", name, ": expected 4-D (N, C, H, W), got ", pynas::checks::describe(t));
#ifdef PYNAS_WITH_CUDA
  if (t.is_cuda()) {
    pynas::checks::check_supported_float(op, t, name);
    return;
  }
#endif
  if (!t.is_cpu()) fail_device(op, t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              ": expected dtype torch.float32 or torch.float64 on cpu (float16 and bfloat16 need a CUDA device), "
              "got ", pynas::checks::describe(t));
}

// One `dtype` value per channel of `x`, on `x`'s device.
void check_channel_vector(const char* op, const at::Tensor& t, const std::string& name, const at::Tensor& x,
                          at::ScalarType dtype) {
  pynas::checks::check_dense(op, t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.scalar_type() == dtype && t.device() == x.device(), op,
              ": ", name, ": expected 1-D with one ", pynas::checks::dtype_name(dtype), " value per channel (",
              x.size(1), ") on ", x.device(), ", got ", pynas::checks::describe(t));
  // running statistics are updated in place through their data pointer
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, ": expected a contiguous tensor");
}

void check_dw_args(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& ws,
                   const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                   const std::vector<int64_t>& dils, int64_t pre, const at::Tensor& mean, const at::Tensor& rstd) {
  check_edge_input(op, x, "x");
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op, ": x: expected a non-empty plane, got ",
              pynas::checks::describe(x));
  TORCH_CHECK(!ws.empty(), op, ": ws: expected at least one weight");
  TORCH_CHECK(strides.size() == ws.size() && pads.size() == ws.size() && dils.size() == ws.size(), op,
              ": strides, pads, dils: expected one entry per weight in ws (", ws.size(), "), got ",
              strides.size(), ", ", pads.size(), " and ", dils.size());
  TORCH_CHECK(pre >= pynas::edge::kPreNone && pre <= pynas::edge::kPreNormRelu, op,
              ": pre: expected 0 (none), 1 (relu) or 2 (normalise then relu), got ", pre);
  for (size_t m = 0; m < ws.size(); ++m) {
    const std::string name = "ws[" + std::to_string(m) + "]";
    pynas::checks::check_dense(op, ws[m], name);
    TORCH_CHECK(ws[m].dim() == 4 && ws[m].size(0) == x.size(1) && ws[m].size(1) == 1 &&
                    ws[m].size(2) == ws[m].size(3) && ws[m].size(2) >= 1 &&
                    ws[m].scalar_type() == x.scalar_type() && ws[m].device() == x.device(),
                op, ": ", name, ": expected a depthwise weight (", x.size(1),
                ", 1, k, k) with the dtype and device of x, got ", pynas::checks::describe(ws[m]));
    TORCH_CHECK(ws[m].size(2) <= pynas::edge::kMaxKernel, op, ": ", name, ": expected at most ", pynas::edge::kMaxKernel, "x",
                pynas::edge::kMaxKernel, " taps (the kernels' limit), got ", ws[m].size(2), "x", ws[m].size(3));
    TORCH_CHECK(strides[m] >= 1 && pads[m] >= 0 && dils[m] >= 1, op, ": strides[", m, "], pads[", m,
                "], dils[", m, "]: expected stride >= 1, pad >= 0, dilation >= 1, got ", strides[m], ", ", pads[m], ", ",
                dils[m]);
    // the window must fit in the padded input (out_size's division truncates where it should floor)
    const int64_t span = dils[m] * (ws[m].size(2) - 1) + 1;
    TORCH_CHECK(x.size(2) + 2 * pads[m] >= span && x.size(3) + 2 * pads[m] >= span, op, ": x: expected a plane that holds conv ", m,
                "'s window (", span, " pixels with dilation ", dils[m], ") when padded by ", pads[m], ", got ",
                pynas::checks::describe(x));
    const int64_t ho = pynas::edge::out_size(x.size(2), ws[m].size(2), strides[m], pads[m], dils[m]);
    const int64_t wo = pynas::edge::out_size(x.size(3), ws[m].size(3), strides[m], pads[m], dils[m]);
    TORCH_CHECK(ho >= 1 && wo >= 1, op, ": x: expected a plane that conv ", m,
                " maps to a non-empty output, got ", pynas::checks::describe(x));
  }
  if (pre == pynas::edge::kPreNormRelu) {
    check_channel_vector(op, mean, "mean", x, edge_acc_dtype(x));
    check_channel_vector(op, rstd, "rstd", x, edge_acc_dtype(x));
  }
}

std::vector<at::Tensor> cnn_edge_dw_forward(const at::Tensor& x, const std::vector<at::Tensor>& ws,
                                        const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                                        const std::vector<int64_t>& dils, int64_t pre, const at::Tensor& mean,
                                        const at::Tensor& rstd) {
  constexpr const char* op = "cnn_edge_dw_forward";
  check_dw_args(op, x, ws, strides, pads, dils, pre, mean, rstd);
  if (x.is_cpu()) return pynas::cpu::cnn_edge_dw_forward(x, ws, strides, pads, dils, pre, mean, rstd);
#ifdef PYNAS_WITH_CUDA
  if (x.is_cuda()) return pynas::cuda::cnn_edge_dw_forward(x, ws, strides, pads, dils, pre, mean, rstd);
#endif
  fail_device(op, x, "x");
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_dw_backward(
    const at::Tensor& x, const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& gs,
    const std::vector<int64_t>& strides, const std::vector<int64_t>& pads, const std::vector<int64_t>& dils,
    int64_t pre, const at::Tensor& mean, const at::Tensor& rstd, bool need_grad_w) {
  constexpr const char* op = "cnn_edge_dw_backward";
  check_dw_args(op, x, ws, strides, pads, dils, pre, mean, rstd);
  TORCH_CHECK(gs.size() == ws.size(), op, ": gs: expected one gradient per weight in ws (", ws.size(),
              "), got ", gs.size());
  for (size_t m = 0; m < ws.size(); ++m) {
    const std::string name = "gs[" + std::to_string(m) + "]";
    pynas::checks::check_dense(op, gs[m], name);
    const int64_t ho = pynas::edge::out_size(x.size(2), ws[m].size(2), strides[m], pads[m], dils[m]);
    const int64_t wo = pynas::edge::out_size(x.size(3), ws[m].size(3), strides[m], pads[m], dils[m]);
    TORCH_CHECK(gs[m].sizes() == at::IntArrayRef({x.size(0), x.size(1), ho, wo}) &&
                    gs[m].scalar_type() == x.scalar_type() && gs[m].device() == x.device(),
                op, ": ", name, ": expected the shape of conv ", m, "'s output [", x.size(0), ", ", x.size(1), ", ",
                ho, ", ", wo, "] with the dtype and device of x, got ", pynas::checks::describe(gs[m]));
  }
  if (x.is_cpu()) return pynas::cpu::cnn_edge_dw_backward(x, ws, gs, strides, pads, dils, pre, mean, rstd, need_grad_w);
#ifdef PYNAS_WITH_CUDA
  if (x.is_cuda()) return pynas::cuda::cnn_edge_dw_backward(x, ws, gs, strides, pads, dils, pre, mean, rstd, need_grad_w);
#endif
  fail_device(op, x, "x");
}

std::tuple<at::Tensor, at::Tensor> cnn_edge_bn_stats(const at::Tensor& p, double eps, double momentum,
                                                 const std::optional<at::Tensor>& running_mean,
                                                 const std::optional<at::Tensor>& running_var) {
  constexpr const char* op = "cnn_edge_bn_stats";
  check_edge_input(op, p, "p");
  TORCH_CHECK(p.size(0) * p.size(2) * p.size(3) > 1, op,
              ": p: expected more than one value per channel (BatchNorm in training), got ",
              pynas::checks::describe(p));
  TORCH_CHECK(eps > 0, op, ": eps: expected a positive value, got ", eps);
  const at::Tensor rm = running_mean.value_or(at::Tensor()), rv = running_var.value_or(at::Tensor());
  if (rm.defined()) check_channel_vector(op, rm, "running_mean", p, p.scalar_type());
  if (rv.defined()) check_channel_vector(op, rv, "running_var", p, p.scalar_type());
  if (p.is_cpu()) return pynas::cpu::cnn_edge_bn_stats(p, eps, momentum, rm, rv);
#ifdef PYNAS_WITH_CUDA
  if (p.is_cuda()) return pynas::cuda::cnn_edge_bn_stats(p, eps, momentum, rm, rv);
#endif
  fail_device(op, p, "p");
}

at::Tensor cnn_edge_bn_backward(const at::Tensor& g, const at::Tensor& p, const at::Tensor& mean, const at::Tensor& rstd,
                            const std::optional<at::Tensor>& sums) {
  constexpr const char* op = "cnn_edge_bn_backward";
  check_edge_input(op, p, "p");
  pynas::checks::check_like(op, g, "g", p, "p");
  check_channel_vector(op, mean, "mean", p, edge_acc_dtype(p));
  check_channel_vector(op, rstd, "rstd", p, edge_acc_dtype(p));
  const at::Tensor s = sums.value_or(at::Tensor());
  if (s.defined()) {
    // float64 on the CPU, the accumulation dtype on a GPU (as cnn_edge_dw_backward gives them)
    const at::ScalarType dtype = p.is_cpu() ? at::kDouble : edge_acc_dtype(p);
    pynas::checks::check_dense(op, s, "sums");
    TORCH_CHECK(s.dim() == 2 && s.size(0) == 2 && s.size(1) == p.size(1) && s.scalar_type() == dtype &&
                    s.device() == p.device(),
                op, ": sums: expected (2, C) = (2, ", p.size(1), ") ", pynas::checks::dtype_name(dtype), " on ",
                p.device(), ", got ", pynas::checks::describe(s));
  }
  if (p.is_cpu()) return pynas::cpu::cnn_edge_bn_backward(g, p, mean, rstd, s);
#ifdef PYNAS_WITH_CUDA
  if (p.is_cuda()) return pynas::cuda::cnn_edge_bn_backward(g, p, mean, rstd, s);
#endif
  fail_device(op, p, "p");
}

void check_pw_weight(const char* op, const at::Tensor& w, const at::Tensor& u) {
  pynas::checks::check_dense(op, w, "w");
  TORCH_CHECK(w.dim() == 4 && w.size(1) == u.size(1) && w.size(2) == 1 && w.size(3) == 1 &&
                  w.scalar_type() == u.scalar_type() && w.is_cpu(),
              op, ": w: expected a 1x1 conv weight (C_out, ", u.size(1), ", 1, 1) with u's dtype, got ",
              pynas::checks::describe(w));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cnn_edge_pw_forward(const at::Tensor& u, const at::Tensor& w, bool stats,
                                                               double eps, double momentum,
                                                               const std::optional<at::Tensor>& running_mean,
                                                               const std::optional<at::Tensor>& running_var) {
  constexpr const char* op = "cnn_edge_pw_forward";
  check_activation(op, u, "u");
  check_pw_weight(op, w, u);
  const at::Tensor rm = running_mean.value_or(at::Tensor()), rv = running_var.value_or(at::Tensor());
  if (stats) {
    TORCH_CHECK(u.size(0) * u.size(2) * u.size(3) > 1, op,
                ": u: expected more than one value per channel (BatchNorm in training), got ",
                pynas::checks::describe(u));
    TORCH_CHECK(eps > 0, op, ": eps: expected a positive value, got ", eps);
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(rm, "running_mean"), {rv, "running_var"}}) {
      if (!t.defined()) continue;
      TORCH_CHECK(t.dim() == 1 && t.size(0) == w.size(0) && t.scalar_type() == u.scalar_type() && t.is_cpu() &&
                      t.is_contiguous(),
                  op,
                  ": ", name, ": expected a contiguous tensor, 1-D with one value per output channel (", w.size(0), "), got ",
                  pynas::checks::describe(t));
    }
  }
  return pynas::cpu::cnn_edge_pw_forward(u, w, stats, eps, momentum, rm, rv);
}

std::tuple<at::Tensor, at::Tensor> cnn_edge_pw_backward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& w,
                                                    bool need_grad_w) {
  constexpr const char* op = "cnn_edge_pw_backward";
  check_activation(op, u, "u");
  check_pw_weight(op, w, u);
  pynas::checks::check_dense(op, g, "g");
  TORCH_CHECK(g.sizes() == at::IntArrayRef({u.size(0), w.size(0), u.size(2), u.size(3)}) &&
                  g.scalar_type() == u.scalar_type() && g.is_cpu(),
              op, ": g: expected the shape of the conv's output [", u.size(0), ", ", w.size(0), ", ", u.size(2), ", ",
              u.size(3), "] with u's dtype, got ", pynas::checks::describe(g));
  return pynas::cpu::cnn_edge_pw_backward(g, u, w, need_grad_w);
}

void check_mix_args(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& ps, const at::Tensor& w,
                    int64_t stride, bool has_skip) {
  check_edge_input(op, x, "x");
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op, ": x: expected a non-empty plane, got ",
              pynas::checks::describe(x));
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride: expected 1 or 2, got ", stride);
  TORCH_CHECK(!has_skip || stride == 1, op, ": has_skip: expected stride 1 (identity); at stride 2 the skip is a "
              "FactorizedReduce, pass its output in ps");
  const int64_t ho = pynas::edge::out_size(x.size(2), 3, stride, 1, 1);
  const int64_t wo = pynas::edge::out_size(x.size(3), 3, stride, 1, 1);
  for (size_t j = 0; j < ps.size(); ++j) {
    const std::string name = "ps[" + std::to_string(j) + "]";
    pynas::checks::check_dense(op, ps[j], name);
    TORCH_CHECK(ps[j].sizes() == at::IntArrayRef({x.size(0), x.size(1), ho, wo}) &&
                    ps[j].scalar_type() == x.scalar_type() && ps[j].device() == x.device(),
                op, ": ", name, ": expected [", x.size(0), ", ", x.size(1), ", ", ho, ", ", wo,
                "] (the edge's output shape) with the dtype and device of x, got ", pynas::checks::describe(ps[j]));
  }
  pynas::checks::check_vector(op, w, "w", static_cast<int64_t>(3 + ps.size()),
                              "max, avg, skip, then one per tensor in ps", x, "x");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cnn_edge_mix_forward(
    const at::Tensor& x, const std::vector<at::Tensor>& ps, const at::Tensor& w, int64_t stride, bool has_max,
    bool has_avg, bool has_skip, double eps, double momentum,
    const std::vector<std::optional<at::Tensor>>& running_means,
    const std::vector<std::optional<at::Tensor>>& running_vars) {
  constexpr const char* op = "cnn_edge_mix_forward";
  check_mix_args(op, x, ps, w, stride, has_skip);
  TORCH_CHECK(eps > 0, op, ": eps: expected a positive value, got ", eps);
  const size_t J = 2 + ps.size();
  TORCH_CHECK(running_means.size() == J && running_vars.size() == J, op,
              ": running_means, running_vars: expected 2 + len(ps) = ", J, " entries (None where absent), got ",
              running_means.size(), " and ", running_vars.size());
  std::vector<at::Tensor> rms, rvs;
  for (size_t j = 0; j < J; ++j) {
    rms.push_back(running_means[j].value_or(at::Tensor()));
    rvs.push_back(running_vars[j].value_or(at::Tensor()));
    if (rms.back().defined()) {
      check_channel_vector(op, rms.back(), "running_means[" + std::to_string(j) + "]", x, x.scalar_type());
    }
    if (rvs.back().defined()) {
      check_channel_vector(op, rvs.back(), "running_vars[" + std::to_string(j) + "]", x, x.scalar_type());
    }
  }
  const int64_t ho = pynas::edge::out_size(x.size(2), 3, stride, 1, 1);
  TORCH_CHECK(x.size(0) * ho * pynas::edge::out_size(x.size(3), 3, stride, 1, 1) > 1, op,
              ": x: expected more than one output value per channel (BatchNorm in training), got ", pynas::checks::describe(x));
  if (x.is_cpu()) {
    return pynas::cpu::cnn_edge_mix_forward(x, ps, w, stride, has_max, has_avg, has_skip, eps, momentum, rms, rvs);
  }
#ifdef PYNAS_WITH_CUDA
  if (x.is_cuda()) {
    return pynas::cuda::cnn_edge_mix_forward(x, ps, w, stride, has_max, has_avg, has_skip, eps, momentum, rms, rvs);
  }
#endif
  fail_device(op, x, "x");
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_mix_backward(
    const at::Tensor& g, const at::Tensor& x, const std::vector<at::Tensor>& ps, const at::Tensor& w, int64_t stride,
    bool has_max, bool has_avg, bool has_skip, const at::Tensor& mean, const at::Tensor& rstd) {
  constexpr const char* op = "cnn_edge_mix_backward";
  check_mix_args(op, x, ps, w, stride, has_skip);
  const int64_t ho = pynas::edge::out_size(x.size(2), 3, stride, 1, 1);
  const int64_t wo = pynas::edge::out_size(x.size(3), 3, stride, 1, 1);
  pynas::checks::check_dense(op, g, "g");
  TORCH_CHECK(g.sizes() == at::IntArrayRef({x.size(0), x.size(1), ho, wo}) && g.scalar_type() == x.scalar_type() &&
                  g.device() == x.device(),
              op, ": g: expected the shape of the edge's output [", x.size(0), ", ", x.size(1), ", ", ho, ", ", wo,
              "] with the dtype and device of x, got ", pynas::checks::describe(g));
  const int64_t J = static_cast<int64_t>(2 + ps.size());
  const at::ScalarType acc = edge_acc_dtype(x);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(mean, "mean"), {rstd, "rstd"}}) {
    pynas::checks::check_dense(op, t, name);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == J && t.size(1) == x.size(1) && t.scalar_type() == acc &&
                    t.device() == x.device(),
                op, ": ", name, ": expected (2 + len(ps), C) = (", J, ", ", x.size(1), ") ",
                pynas::checks::dtype_name(acc), " on ", x.device(), ", got ", pynas::checks::describe(t));
  }
  if (x.is_cpu()) return pynas::cpu::cnn_edge_mix_backward(g, x, ps, w, stride, has_max, has_avg, has_skip, mean, rstd);
#ifdef PYNAS_WITH_CUDA
  if (x.is_cuda()) return pynas::cuda::cnn_edge_mix_backward(g, x, ps, w, stride, has_max, has_avg, has_skip, mean, rstd);
#endif
  fail_device(op, x, "x");
}

// ---- partial_channel (see csrc/include/pynas/partial_channel.h) --------------------------------------------

// ---- the whole fused edge in one call (CPU) -----------------------------------------------------------------
// The forward and the backward of pynas/ops/cnn_edge.py (cnn_edge_forward_impl, cnn_edge_backward_impl) as one
// C++ sequence of the checked kernel calls above, for the cpu backend: the same kernels in the same order, so the
// same numbers, without ~20 Python-to-C++ crossings and the Python loops around them per edge call. The edge's
// candidates come as plain data (EdgeSpec): per conv its kind (0 sep, 1 dil, 2 FactorizedReduce), kernel,
// padding and dilation.

constexpr int64_t kEdgeSep = 0, kEdgeDil = 1, kEdgeFr = 2;
constexpr int64_t kPreRelu = 1, kPreNormRelu = 2;  // pynas::edge::kPreRelu, kPreNormRelu

// Each conv's first index in params (sep 4 weights, dil 2, FactorizedReduce 2), after checking the lists agree.
std::vector<int64_t> edge_conv_starts(const char* op, const std::vector<int64_t>& kinds, const std::vector<int64_t>& pads,
                     const std::vector<int64_t>& dils, size_t n_params) {
  TORCH_CHECK(pads.size() == kinds.size() && dils.size() == kinds.size(), op,
              ": kinds, pads, dils: expected one entry per conv each, got ", kinds.size(), ", ", pads.size(), ", ",
              dils.size());
  std::vector<int64_t> starts;
  int64_t total = 0;
  for (int64_t kind : kinds) {
    TORCH_CHECK(kind == kEdgeSep || kind == kEdgeDil || kind == kEdgeFr, op,
                ": kinds: expected 0 (sep), 1 (dil) or 2 (FactorizedReduce), got ", kind);
    starts.push_back(total);
    total += kind == kEdgeSep ? 4 : 2;
  }
  TORCH_CHECK(static_cast<size_t>(total) == n_params, op, ": params: expected ", total,
              " conv weights for these convs (sep 4, dil 2, FactorizedReduce 2 each), got ", n_params);
  return starts;
}

// relu(x[:, :, o::2, o::2]): a FactorizedReduce's input at offset o (0 or 1).
at::Tensor fr_input(const at::Tensor& x, int64_t o) {
  return x.slice(2, o, x.size(2), 2).slice(3, o, x.size(3), 2).relu();
}

// (out, wr, mean, rstd, ps, saved); updates the running statistics in place (counters: num_batches_tracked, + 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
cnn_edge_forward(const at::Tensor& x_in, const at::Tensor& weights, const std::vector<at::Tensor>& params,
                 const std::vector<at::Tensor>& running, const std::vector<at::Tensor>& counters, const at::Tensor& index,
                 int64_t stride, bool has_max, bool has_avg, bool has_skip, const std::vector<int64_t>& kinds,
                 const std::vector<int64_t>& pads, const std::vector<int64_t>& dils, double eps, double momentum) {
  constexpr const char* op = "cnn_edge_forward";
  check_edge_input(op, x_in, "x");
  TORCH_CHECK(x_in.is_cpu(), op, ": x: expected a CPU tensor (the one-call edge is the cpu backend's), got ",
              pynas::checks::describe(x_in));
  const std::vector<int64_t> starts = edge_conv_starts(op, kinds, pads, dils, params.size());
  const size_t n_bn = (has_max ? 1 : 0) + (has_avg ? 1 : 0) + kinds.size() +
                      std::count(kinds.begin(), kinds.end(), kEdgeSep);
  TORCH_CHECK(running.size() == 2 * n_bn, op, ": running: expected running_mean, running_var of each of the ", n_bn,
              " BatchNorms, got ", running.size(), " tensors");
  pynas::checks::check_dense(op, index, "index");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == static_cast<int64_t>(3 + kinds.size()) &&
                  index.scalar_type() == at::kLong && index.is_cpu(),
              op, ": index: expected a CPU int64 vector of 3 + len(kinds) columns, got ",
              pynas::checks::describe(index));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor wr = weights.detach().index_select(0, index);
  std::vector<at::Tensor> firsts;
  std::vector<int64_t> dw_strides, dw_pads, dw_dils;
  for (size_t i = 0; i < kinds.size(); ++i) {
    if (kinds[i] == kEdgeFr) continue;
    firsts.push_back(params[starts[i]]);
    dw_strides.push_back(stride), dw_pads.push_back(pads[i]), dw_dils.push_back(dils[i]);
  }
  const at::Tensor none;
  const std::vector<at::Tensor> us =
      firsts.empty() ? std::vector<at::Tensor>()
                     : cnn_edge_dw_forward(x, firsts, dw_strides, dw_pads, dw_dils, kPreRelu, none, none);
  // running = (mean, var) per BatchNorm: the pools' first, then per conv its own (sep: 2, others: 1)
  size_t pair = 0;
  auto next_pair = [&]() {
    const size_t k = pair++;
    return std::make_pair(running[2 * k], running[2 * k + 1]);
  };
  std::vector<std::optional<at::Tensor>> rms, rvs;
  for (bool present : {has_max, has_avg}) {
    if (present) {
      const auto p = next_pair();
      rms.emplace_back(p.first), rvs.emplace_back(p.second);
    } else {
      rms.emplace_back(std::nullopt), rvs.emplace_back(std::nullopt);
    }
  }
  std::vector<at::Tensor> ps, saved;
  auto pw = [&](const at::Tensor& w, const at::Tensor& u) {
    return std::get<0>(cnn_edge_pw_forward(u, w, false, 1.0, 0.0, std::nullopt, std::nullopt));
  };
  size_t d = 0;
  for (size_t i = 0; i < kinds.size(); ++i) {
    const int64_t at = starts[i];
    if (kinds[i] == kEdgeFr) {
      ps.push_back(at::cat({pw(params[at], fr_input(x, 0)), pw(params[at + 1], fr_input(x, 1))}, 1));
    } else if (kinds[i] == kEdgeDil) {
      const at::Tensor& u = us[d++];
      ps.push_back(pw(params[at + 1], u));
      saved.push_back(u);
    } else {
      const at::Tensor& u1 = us[d++];
      const auto [rm, rv] = next_pair();
      auto [p1, m1, r1] = cnn_edge_pw_forward(u1, params[at + 1], true, eps, momentum, rm, rv);
      const at::Tensor u2 = cnn_edge_dw_forward(p1, {params[at + 2]}, {1}, {pads[i]}, {1}, kPreNormRelu, m1, r1)[0];
      ps.push_back(pw(params[at + 3], u2));
      saved.insert(saved.end(), {u1, p1, m1, r1, u2});
    }
    const auto [rm, rv] = next_pair();
    rms.emplace_back(rm), rvs.emplace_back(rv);
  }
  auto [out, mean, rstd] = cnn_edge_mix_forward(x, ps, wr, stride, has_max, has_avg, has_skip, eps, momentum, rms, rvs);
  if (!counters.empty()) at::_foreach_add_(counters, 1);  // one call for all the counters
  return {out, wr, mean, rstd, ps, saved};
}

// (grad_x, grad_weights, grad_params); grad_params undefined (None) unless need_w.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> cnn_edge_backward(
    const at::Tensor& g_in, const at::Tensor& x_in, const at::Tensor& weights, const at::Tensor& wr,
    const at::Tensor& mean, const at::Tensor& rstd, const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& ps, const std::vector<at::Tensor>& saved, const at::Tensor& index, int64_t stride,
    bool has_max, bool has_avg, bool has_skip, const std::vector<int64_t>& kinds, const std::vector<int64_t>& pads,
    const std::vector<int64_t>& dils, bool need_w) {
  constexpr const char* op = "cnn_edge_backward";
  check_edge_input(op, x_in, "x");
  TORCH_CHECK(x_in.is_cpu(), op, ": x: expected a CPU tensor (the one-call edge is the cpu backend's), got ",
              pynas::checks::describe(x_in));
  const std::vector<int64_t> starts = edge_conv_starts(op, kinds, pads, dils, params.size());
  TORCH_CHECK(ps.size() == kinds.size(), op, ": ps: expected one tensor per conv (", kinds.size(), "), got ", ps.size());
  const size_t n_saved = 5 * std::count(kinds.begin(), kinds.end(), kEdgeSep) +
                         std::count(kinds.begin(), kinds.end(), kEdgeDil);
  TORCH_CHECK(saved.size() == n_saved, op, ": saved: expected ", n_saved, " tensors (sep 5, dil 1), got ", saved.size());
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous();
  auto [gx, gps, gwr] = cnn_edge_mix_backward(g, x, ps, wr, stride, has_max, has_avg, has_skip, mean, rstd);
  std::vector<at::Tensor> gparams(params.size());
  std::vector<int64_t> first_at, dw_strides, dw_pads, dw_dils;
  std::vector<at::Tensor> first_ws, first_gs;
  size_t s = 0;
  const at::Tensor none;
  for (size_t i = 0; i < kinds.size(); ++i) {
    const int64_t at = starts[i];
    if (kinds[i] == kEdgeFr) continue;
    if (kinds[i] == kEdgeDil) {
      auto [gu, gw] = cnn_edge_pw_backward(gps[i], saved[s], params[at + 1], need_w);
      gparams[at + 1] = gw;
      s += 1;
      first_gs.push_back(gu);
    } else {
      const at::Tensor &u1 = saved[s], &p1 = saved[s + 1], &m1 = saved[s + 2], &r1 = saved[s + 3], &u2 = saved[s + 4];
      s += 5;
      auto [gu2, gw3] = cnn_edge_pw_backward(gps[i], u2, params[at + 3], need_w);
      gparams[at + 3] = gw3;
      auto [ga, gdw2, sums] = cnn_edge_dw_backward(p1, {params[at + 2]}, {gu2}, {1}, {pads[i]}, {1}, kPreNormRelu, m1,
                                                   r1, need_w);
      if (need_w) gparams[at + 2] = gdw2[0];
      const at::Tensor gp1 = cnn_edge_bn_backward(ga, p1, m1, r1, sums);
      auto [gu1, gw1] = cnn_edge_pw_backward(gp1, u1, params[at + 1], need_w);
      gparams[at + 1] = gw1;
      first_gs.push_back(gu1);
    }
    first_at.push_back(at);
    first_ws.push_back(params[at]);
    dw_strides.push_back(stride), dw_pads.push_back(pads[i]), dw_dils.push_back(dils[i]);
  }
  if (!first_at.empty()) {
    auto [gx_conv, gfirst, unused] = cnn_edge_dw_backward(x, first_ws, first_gs, dw_strides, dw_pads, dw_dils,
                                                          kPreRelu, none, none, need_w);
    if (need_w) {
      for (size_t m = 0; m < first_at.size(); ++m) gparams[first_at[m]] = gfirst[m];
    }
    gx = gx.defined() ? gx.add_(gx_conv) : gx_conv;
  }
  for (size_t i = 0; i < kinds.size(); ++i) {
    if (kinds[i] != kEdgeFr) continue;
    const int64_t at = starts[i];
    if (!gx.defined()) gx = at::zeros_like(x);
    const at::Tensor xa = fr_input(x, 0), xb = fr_input(x, 1);
    const at::Tensor& gp = gps[i];
    const int64_t half = gp.size(1) / 2;
    auto [ga, gwa] = cnn_edge_pw_backward(gp.slice(1, 0, half).contiguous(), xa, params[at], need_w);
    auto [gb, gwb] = cnn_edge_pw_backward(gp.slice(1, half, gp.size(1)).contiguous(), xb, params[at + 1], need_w);
    gparams[at] = gwa, gparams[at + 1] = gwb;
    gx.slice(2, 0, x.size(2), 2).slice(3, 0, x.size(3), 2).add_(ga.mul(xa.gt(0)));
    gx.slice(2, 1, x.size(2), 2).slice(3, 1, x.size(3), 2).add_(gb.mul(xb.gt(0)));
  }
  at::Tensor gweights = at::zeros_like(weights).index_add_(0, index, gwr.to(weights.scalar_type()));
  return {gx, gweights, gparams};
}

// x, groups and stride of a partial-channel edge: x 4-D (float32/float64 on the CPU, also float16/bfloat16 on a
// CUDA device), groups a divisor of its channels, stride 1 or 2 (then an even height and width).
void check_partial_channel_geometry(const char* op, const at::Tensor& x, int64_t groups, int64_t stride) {
  check_edge_input(op, x, "x");
  TORCH_CHECK(groups >= 1, op, ": groups: expected a positive integer, got ", groups);
  TORCH_CHECK(x.size(1) % groups == 0, op, ": groups: expected a divisor of x's channels (", x.size(1), "), got ",
              groups);
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride: expected 1 or 2, got ", stride);
  TORCH_CHECK(stride == 1 || (x.size(2) % 2 == 0 && x.size(3) % 2 == 0), op,
              ": x: expected an even height and width at stride 2 (a 2x2 max pool), got ", pynas::checks::describe(x));
}

// A tensor of shape (N, channels, H / stride, W / stride) with the dtype and device of x.
void check_partial_channel_plane(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x,
                                 int64_t channels, int64_t stride, const char* what) {
  pynas::checks::check_dense(op, t, name);
  const int64_t ho = x.size(2) / stride, wo = x.size(3) / stride;
  TORCH_CHECK(t.sizes() == at::IntArrayRef({x.size(0), channels, ho, wo}) && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              op, ": ", name, ": expected [", x.size(0), ", ", channels, ", ", ho, ", ", wo, "] (", what,
              ") with the dtype and device of x, got ", pynas::checks::describe(t));
}

at::Tensor partial_channel_forward(const at::Tensor& t, const at::Tensor& x, int64_t groups, int64_t stride) {
  constexpr const char* op = "partial_channel_forward";
  check_partial_channel_geometry(op, x, groups, stride);
  check_partial_channel_plane(op, t, "t", x, x.size(1) / groups, stride, "N, C / groups, H / stride, W / stride");
  if (x.is_cpu()) return pynas::cpu::partial_channel_forward(t, x, groups, stride);
#ifdef PYNAS_WITH_CUDA
  if (x.is_cuda()) return pynas::cuda::partial_channel_forward(t, x, groups, stride);
#endif
  fail_device(op, x, "x");
}

std::tuple<at::Tensor, at::Tensor> partial_channel_backward(const at::Tensor& g, const at::Tensor& x, int64_t groups,
                                                            int64_t stride) {
  constexpr const char* op = "partial_channel_backward";
  check_partial_channel_geometry(op, x, groups, stride);
  check_partial_channel_plane(op, g, "g", x, x.size(1), stride, "the output's shape");
  if (x.is_cpu()) return pynas::cpu::partial_channel_backward(g, x, groups, stride);
#ifdef PYNAS_WITH_CUDA
  if (x.is_cuda()) return pynas::cuda::partial_channel_backward(g, x, groups, stride);
#endif
  fail_device(op, x, "x");
}

// ---- rnn_mix -------------------------------------------------------------------------------------------

void check_rnn_mix_args(const char* op, const at::Tensor& states, const at::Tensor& c, const at::Tensor& h,
                        const at::Tensor& probs) {
  pynas::checks::check_dense(op, states, "states");
  pynas::checks::check_supported_float(op, states, "states");
  TORCH_CHECK(states.dim() == 3, op, ": states: expected 3-D (J, B, H), got ", pynas::checks::describe(states));
  pynas::checks::check_like(op, c, "c", states, "states");
  pynas::checks::check_like(op, h, "h", states, "states");
  pynas::checks::check_dense(op, probs, "probs");
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == states.size(0) && probs.size(1) == pynas::rnn_mix::kFuncs &&
                  probs.is_floating_point() && probs.device() == states.device(),
              op, ": probs: expected a floating (J, 5) = (", states.size(0),
              ", 5) tensor over none, tanh, relu, sigmoid, identity on the device of states, got ",
              pynas::checks::describe(probs));
}

at::Tensor rnn_mix_forward(const at::Tensor& states, const at::Tensor& c, const at::Tensor& h,
                           const at::Tensor& probs) {
  constexpr const char* op = "rnn_mix_forward";
  check_rnn_mix_args(op, states, c, h, probs);
  if (states.is_cpu()) return pynas::cpu::rnn_mix_forward(states, c, h, probs);
#ifdef PYNAS_WITH_CUDA
  if (states.is_cuda()) return pynas::cuda::rnn_mix_forward(states, c, h, probs);
#endif
  fail_device(op, states, "states");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_mix_backward(const at::Tensor& grad_out,
                                                                            const at::Tensor& states,
                                                                            const at::Tensor& c,
                                                                            const at::Tensor& h,
                                                                            const at::Tensor& probs) {
  constexpr const char* op = "rnn_mix_backward";
  check_rnn_mix_args(op, states, c, h, probs);
  pynas::checks::check_dense(op, grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == states.size(1) && grad_out.size(1) == states.size(2) &&
                  grad_out.scalar_type() == states.scalar_type() && grad_out.device() == states.device(),
              op, ": grad_out: expected (B, H) = (", states.size(1), ", ", states.size(2),
              ") with the dtype and device of states, got ", pynas::checks::describe(grad_out));
  if (states.is_cpu()) return pynas::cpu::rnn_mix_backward(grad_out, states, c, h, probs);
#ifdef PYNAS_WITH_CUDA
  if (states.is_cuda()) return pynas::cuda::rnn_mix_backward(grad_out, states, c, h, probs);
#endif
  fail_device(op, states, "states");
}

// ---- rnn_cell ------------------------------------------------------------------------------------------

// The initial hidden state of a fused RNN sequence: (B, H) with the batch, dtype and device of xs; returns H.
int64_t check_rnn_h0(const char* op, const at::Tensor& xs, const at::Tensor& h0) {
  const int64_t B = xs.size(1);
  pynas::checks::check_dense(op, h0, "h0");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == B && h0.size(1) >= 1 && h0.scalar_type() == xs.scalar_type() &&
                  h0.device() == xs.device(),
              op, ": h0: expected (B, H) with B = ", B, " and the dtype and device of xs, got ",
              pynas::checks::describe(h0));
  return h0.size(1);
}


void check_rnn_cell_weights(const char* op, const at::Tensor& xs, const at::Tensor& probs, const at::Tensor& W0,
                            const std::vector<at::Tensor>& Ws, int64_t I, int64_t H) {
  const int64_t steps = static_cast<int64_t>(Ws.size());
  TORCH_CHECK(steps >= 1, op, ": Ws: expected at least one node weight, got none");
  TORCH_CHECK(W0.dim() == 2 && W0.size(0) == I + H && W0.size(1) == 2 * H && W0.scalar_type() == xs.scalar_type() &&
                  W0.device() == xs.device(),
              op, ": W0: expected (I + H, 2H) = (", I + H, ", ", 2 * H, ") with the dtype and device of xs, got ",
              pynas::checks::describe(W0));
  for (int64_t i = 0; i < steps; ++i) {
    const auto& w = Ws[i];
    TORCH_CHECK(w.dim() == 2 && w.size(0) == H && w.size(1) == 2 * H && w.scalar_type() == xs.scalar_type() &&
                    w.device() == xs.device(),
                op, ": Ws[", i, "]: expected (H, 2H) = (", H, ", ", 2 * H, ") with the dtype and device of xs, got ",
                pynas::checks::describe(w));
  }
  pynas::checks::check_dense(op, probs, "probs");
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == steps * (steps + 1) / 2 && probs.size(1) == pynas::rnn_mix::kFuncs &&
                  probs.scalar_type() == xs.scalar_type() && probs.device() == xs.device(),
              op, ": probs: expected (", steps * (steps + 1) / 2, ", 5) (one row per edge of ", steps,
              " nodes) with the dtype and device of xs, got ", pynas::checks::describe(probs));
}

void check_rnn_cell_masks(const char* op, const at::Tensor& xs, const at::Tensor& x_mask, const at::Tensor& h_mask,
                          int64_t B, int64_t I, int64_t H) {
  TORCH_CHECK(x_mask.dim() == 2 && x_mask.size(0) == B && x_mask.size(1) == I, op, ": x_mask: expected (B, I) = (",
              B, ", ", I, "), got ", pynas::checks::describe(x_mask));
  TORCH_CHECK(h_mask.dim() == 2 && h_mask.size(0) == B && h_mask.size(1) == H, op, ": h_mask: expected (B, H) = (",
              B, ", ", H, "), got ", pynas::checks::describe(h_mask));
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{x_mask, "x_mask"}, {h_mask, "h_mask"}}) {
    TORCH_CHECK(t.scalar_type() == xs.scalar_type() && t.device() == xs.device(), op, ": ", name,
                ": expected the dtype and device of xs, got ", pynas::checks::describe(t));
  }
}

std::vector<at::Tensor> rnn_cell_forward(const at::Tensor& xs, const at::Tensor& h0, const at::Tensor& x_mask,
                                         const at::Tensor& h_mask, const at::Tensor& probs, at::Tensor running_mean,
                                         at::Tensor running_var, const at::Tensor& W0, const std::vector<at::Tensor>& Ws,
                                         double momentum, double eps) {
  constexpr const char* op = "rnn_cell_forward";
  pynas::checks::check_dense(op, xs, "xs");
  pynas::checks::check_supported_float(op, xs, "xs");
  TORCH_CHECK(xs.dim() == 3 && xs.size(0) >= 1 && xs.size(1) >= 2 && xs.size(2) >= 1, op,
              ": xs: expected (T, B, I) with T >= 1 and B >= 2 (BatchNorm needs two samples), got ",
              pynas::checks::describe(xs));
  const int64_t B = xs.size(1), I = xs.size(2);
  const int64_t H = check_rnn_h0(op, xs, h0);
  check_rnn_cell_masks(op, xs, x_mask, h_mask, B, I, H);
  check_rnn_cell_weights(op, xs, probs, W0, Ws, I, H);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{running_mean, "running_mean"},
                                {running_var, "running_var"}}) {
    // BatchNorm keeps float32 statistics for float16/bfloat16 inputs; otherwise the input's dtype
    const bool reduced = xs.scalar_type() == at::kHalf || xs.scalar_type() == at::kBFloat16;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == H && t.is_contiguous() && t.device() == xs.device() &&
                    (t.scalar_type() == xs.scalar_type() || (reduced && t.scalar_type() == at::kFloat)),
                op, ": ", name, ": expected a contiguous (H,) = (", H, ",) tensor with the dtype of xs (float32 for ",
                "float16/bfloat16) on its device, got ", pynas::checks::describe(t));
  }
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, op, ": momentum: expected a value in [0, 1], got ", momentum);
  TORCH_CHECK(eps > 0.0, op, ": eps: expected a positive value, got ", eps);
  TORCH_CHECK(xs.is_cpu() || xs.is_cuda(), op, ": xs: expected a CPU or CUDA device, got ", xs.device());
#ifndef PYNAS_WITH_CUDA
  TORCH_CHECK(xs.is_cpu(), op, ": this build of pynas._C has no CUDA kernels; xs is on ", xs.device());
#endif
  return pynas::rnn_cell::forward(xs, h0, x_mask, h_mask, probs, running_mean, running_var, W0, Ws, momentum, eps);
}

std::vector<at::Tensor> rnn_cell_backward(const at::Tensor& grad_out, const at::Tensor& x_mask,
                                          const at::Tensor& h_mask, const at::Tensor& probs, const at::Tensor& W0,
                                          const std::vector<at::Tensor>& Ws, const std::vector<at::Tensor>& saved,
                                          double eps, bool need_w) {
  constexpr const char* op = "rnn_cell_backward";
  TORCH_CHECK(saved.size() == 10, op, ": saved: expected the 10 tensors rnn_cell_forward returned after the "
              "hiddens, got ", saved.size());
  const at::Tensor& xm = saved[0];
  const at::Tensor& S = saved[1];
  TORCH_CHECK(xm.dim() == 3 && S.dim() == 4 && S.size(0) == xm.size(0) && S.size(2) == xm.size(1) &&
                  S.size(1) == static_cast<int64_t>(Ws.size()) + 1,
              op, ": saved: expected what rnn_cell_forward returned with these Ws");
  const int64_t T = S.size(0), B = S.size(2), H = S.size(3), I = xm.size(2);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == T && grad_out.size(1) == B && grad_out.size(2) == H &&
                  grad_out.scalar_type() == xm.scalar_type() && grad_out.device() == xm.device(),
              op, ": grad_out: expected (T, B, H) = (", T, ", ", B, ", ", H, ") with the dtype and device of the "
              "hiddens, got ", pynas::checks::describe(grad_out));
  check_rnn_cell_masks(op, xm, x_mask, h_mask, B, I, H);
  check_rnn_cell_weights(op, xm, probs, W0, Ws, I, H);
  return pynas::rnn_cell::backward(grad_out, x_mask, h_mask, probs, W0, Ws, saved[0], saved[1], saved[2], saved[3],
                                   saved[4], saved[5], saved[6], saved[7], saved[8], saved[9], eps, need_w);
}

// ---- linear_nll (see csrc/include/pynas/linear_nll.h) --------------------------------------------------

at::Tensor linear_nll_rows_(at::Tensor& logits, const at::Tensor& target, at::Tensor& nll, bool grad, double scale) {
  constexpr const char* op = "linear_nll_rows_";
  pynas::checks::check_dense(op, logits, "logits");
  pynas::checks::check_supported_float(op, logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0, op,
              ": logits: expected a contiguous (R, V) tensor with V >= 1, got ", pynas::checks::describe(logits));
  const int64_t R = logits.size(0);
  pynas::checks::check_dense(op, target, "target");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == R && target.scalar_type() == at::kLong &&
                  target.is_contiguous() && target.device() == logits.device(),
              op, ": target: expected a contiguous (", R, ",) int64 tensor on logits' device, got ",
              pynas::checks::describe(target));
  pynas::checks::check_dense(op, nll, "nll");
  TORCH_CHECK(nll.dim() == 1 && nll.size(0) == R && nll.scalar_type() == logits.scalar_type() &&
                  nll.is_contiguous() && nll.device() == logits.device(),
              op, ": nll: expected a contiguous (", R, ",) tensor of logits' dtype and device, got ",
              pynas::checks::describe(nll));
  if (logits.is_cpu()) {
    TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
                ": logits: expected float32 or float64 on the CPU, got ", pynas::checks::describe(logits));
    pynas::cpu::linear_nll_rows_(logits, target, nll, grad, scale);
    return nll;
  }
#ifdef PYNAS_WITH_CUDA
  if (logits.is_cuda()) {
    pynas::cuda::linear_nll_rows_(logits, target, nll, grad, scale);
    return nll;
  }
#endif
  fail_device(op, logits, "logits");
}

// ---- rnn_path (see csrc/include/pynas/rnn_path.h) ------------------------------------------------------

// A contiguous (rows, cols) tensor with the dtype and device of ref (what the step kernels index).
void check_rnn_path_plane(const char* op, const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                          const at::Tensor& ref, const char* ref_name) {
  pynas::checks::check_dense(op, t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous() &&
                  t.scalar_type() == ref.scalar_type() && t.device() == ref.device(),
              op, ": ", name, ": expected a contiguous (", rows, ", ", cols, ") tensor with the dtype and device of ",
              ref_name, ", got ", pynas::checks::describe(t), t.is_contiguous() ? "" : " (not contiguous)");
}

void check_rnn_path_act(const char* op, int64_t act, const std::string& name) {
  TORCH_CHECK(act >= 1 && act <= 4, op, ": ", name,
              ": expected an activation code 1..4 (tanh, relu, sigmoid, identity), got ", act);
}

void check_rnn_path_genotype(const char* op, int64_t steps, const std::vector<int64_t>& preds,
                             const std::vector<int64_t>& acts, const std::vector<int64_t>& concat) {
  TORCH_CHECK(static_cast<int64_t>(preds.size()) == steps, op, ": preds: expected one predecessor per node (",
              steps, " = len(Ws)), got ", preds.size());
  TORCH_CHECK(static_cast<int64_t>(acts.size()) == steps, op, ": acts: expected one activation per node (", steps,
              " = len(Ws)), got ", acts.size());
  for (int64_t i = 0; i < steps; ++i) {
    TORCH_CHECK(preds[i] >= 0 && preds[i] <= i, op, ": preds[", i, "]: expected a state index in [0, ", i,
                "] (node ", i, " reads s_0 .. s_", i, "), got ", preds[i]);
    check_rnn_path_act(op, acts[i], "acts[" + std::to_string(i) + "]");
  }
  TORCH_CHECK(!concat.empty(), op, ": concat: expected at least one state index, got none");
  for (size_t k = 0; k < concat.size(); ++k) {
    TORCH_CHECK(concat[k] >= 0 && concat[k] <= steps, op, ": concat[", k, "]: expected a state index in [0, ",
                steps, "], got ", concat[k]);
  }
}

// xs (T, B, I), h0 (B, H), the optional masks, W0 (I + H, 2H) and Ws (steps x (H, 2H)), one dtype and device.
void check_rnn_path_tensors(const char* op, const at::Tensor& xs, const at::Tensor& h0,
                            const c10::optional<at::Tensor>& x_mask, const c10::optional<at::Tensor>& h_mask,
                            const at::Tensor& W0, const std::vector<at::Tensor>& Ws) {
  pynas::checks::check_dense(op, xs, "xs");
  pynas::checks::check_supported_float(op, xs, "xs");
  TORCH_CHECK(xs.dim() == 3 && xs.size(0) >= 1 && xs.size(1) >= 1 && xs.size(2) >= 1, op,
              ": xs: expected (T, B, I) with T, B, I >= 1, got ", pynas::checks::describe(xs));
  if (!xs.is_cpu()) {
#ifdef PYNAS_WITH_CUDA
    if (!xs.is_cuda()) fail_device(op, xs, "xs");
#else
    fail_device(op, xs, "xs");
#endif
  }
  const int64_t B = xs.size(1), I = xs.size(2);
  const int64_t H = check_rnn_h0(op, xs, h0);
  const auto check_mask = [&](const c10::optional<at::Tensor>& t, const char* name, const char* dims, int64_t cols) {
    if (!t.has_value()) return;
    pynas::checks::check_dense(op, *t, name);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == cols && t->scalar_type() == xs.scalar_type() &&
                    t->device() == xs.device(),
                op, ": ", name, ": expected ", dims, " = (", B, ", ", cols, ") with the dtype and device of xs, got ",
                pynas::checks::describe(*t));
  };
  check_mask(x_mask, "x_mask", "(B, I)", I);
  check_mask(h_mask, "h_mask", "(B, H)", H);
  TORCH_CHECK(x_mask.has_value() == h_mask.has_value(), op,
              ": x_mask, h_mask: expected both (training) or neither (eval), got only ",
              x_mask.has_value() ? "x_mask" : "h_mask");
  TORCH_CHECK(!Ws.empty(), op, ": Ws: expected at least one node weight, got none");
  pynas::checks::check_dense(op, W0, "W0");
  TORCH_CHECK(W0.dim() == 2 && W0.size(0) == I + H && W0.size(1) == 2 * H && W0.scalar_type() == xs.scalar_type() &&
                  W0.device() == xs.device(),
              op, ": W0: expected (I + H, 2H) = (", I + H, ", ", 2 * H, ") with the dtype and device of xs, got ",
              pynas::checks::describe(W0));
  for (size_t i = 0; i < Ws.size(); ++i) {
    pynas::checks::check_dense(op, Ws[i], "Ws[" + std::to_string(i) + "]");
    TORCH_CHECK(Ws[i].dim() == 2 && Ws[i].size(0) == H && Ws[i].size(1) == 2 * H &&
                    Ws[i].scalar_type() == xs.scalar_type() && Ws[i].device() == xs.device(),
                op, ": Ws[", i, "]: expected (H, 2H) = (", H, ", ", 2 * H, ") with the dtype and device of xs, got ",
                pynas::checks::describe(Ws[i]));
  }
}

std::vector<at::Tensor> rnn_path_forward(const at::Tensor& xs, const at::Tensor& h0,
                                         const c10::optional<at::Tensor>& x_mask,
                                         const c10::optional<at::Tensor>& h_mask, const at::Tensor& W0,
                                         const std::vector<at::Tensor>& Ws, const std::vector<int64_t>& preds,
                                         const std::vector<int64_t>& acts, const std::vector<int64_t>& concat,
                                         bool save) {
  constexpr const char* op = "rnn_path_forward";
  check_rnn_path_tensors(op, xs, h0, x_mask, h_mask, W0, Ws);
  check_rnn_path_genotype(op, static_cast<int64_t>(Ws.size()), preds, acts, concat);
  return pynas::rnn_path::forward(xs, h0, x_mask.value_or(at::Tensor()), h_mask.value_or(at::Tensor()), W0, Ws,
                                  preds, acts, concat, save);
}

std::vector<at::Tensor> rnn_path_backward(const at::Tensor& grad_out, const at::Tensor& xs, const at::Tensor& h0,
                                          const at::Tensor& hiddens, const c10::optional<at::Tensor>& x_mask,
                                          const c10::optional<at::Tensor>& h_mask, const at::Tensor& W0,
                                          const std::vector<at::Tensor>& Ws, const std::vector<int64_t>& preds,
                                          const std::vector<int64_t>& acts, const std::vector<int64_t>& concat,
                                          const std::vector<at::Tensor>& saved) {
  constexpr const char* op = "rnn_path_backward";
  check_rnn_path_tensors(op, xs, h0, x_mask, h_mask, W0, Ws);
  const int64_t steps = static_cast<int64_t>(Ws.size());
  check_rnn_path_genotype(op, steps, preds, acts, concat);
  const int64_t T = xs.size(0), B = xs.size(1), I = xs.size(2), H = h0.size(1);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"},
                                {hiddens, "hiddens"}}) {
    pynas::checks::check_dense(op, t, name);
    TORCH_CHECK(t.dim() == 3 && t.size(0) == T && t.size(1) == B && t.size(2) == H &&
                    t.scalar_type() == xs.scalar_type() && t.device() == xs.device(),
                op, ": ", name, ": expected (T, B, H) = (", T, ", ", B, ", ", H, ") with the dtype and device of xs, "
                "got ", pynas::checks::describe(t));
  }
  TORCH_CHECK(saved.size() == 3, op, ": saved: expected the 3 tensors (xm, S, CH) rnn_path_forward returned "
              "after the hiddens with save=True, got ", saved.size());
  const std::vector<std::pair<const char*, std::vector<int64_t>>> shapes{
      {"saved[0] (xm)", {T, B, I}}, {"saved[1] (S)", {steps + 1, T, B, H}}, {"saved[2] (CH)", {steps + 1, T, B, 2 * H}}};
  for (size_t k = 0; k < 3; ++k) {
    const at::Tensor& t = saved[k];
    pynas::checks::check_dense(op, t, shapes[k].first);
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shapes[k].second) && (k == 0 || t.is_contiguous()) &&
                    t.scalar_type() == xs.scalar_type() && t.device() == xs.device(),
                op, ": ", shapes[k].first, ": expected ", k == 0 ? "" : "a contiguous ",
                at::IntArrayRef(shapes[k].second), " with the dtype and device of xs (what rnn_path_forward saved "
                "for these xs and Ws), got ", pynas::checks::describe(t));
  }
  return pynas::rnn_path::backward(grad_out, h0, hiddens, x_mask.value_or(at::Tensor()),
                                   h_mask.value_or(at::Tensor()), W0, Ws, preds, acts, concat, saved[0], saved[1],
                                   saved[2]);
}

// The step kernels' prev: a dense (B, H) tensor of a supported float dtype, contiguous; returns (B, H).
std::pair<int64_t, int64_t> check_rnn_path_prev(const char* op, const at::Tensor& prev) {
  pynas::checks::check_dense(op, prev, "prev");
  pynas::checks::check_supported_float(op, prev, "prev");
  TORCH_CHECK(prev.dim() == 2, op, ": prev: expected (B, H), got ", pynas::checks::describe(prev));
  const int64_t B = prev.size(0), H = prev.size(1);
  check_rnn_path_plane(op, prev, "prev", B, H, prev, "prev");
  return {B, H};
}

void rnn_path_step_forward(const at::Tensor& ch, const at::Tensor& prev, int64_t act,
                           const c10::optional<at::Tensor>& h_mask, const at::Tensor& s,
                           const c10::optional<at::Tensor>& m) {
  constexpr const char* op = "rnn_path_step_forward";
  const auto [B, H] = check_rnn_path_prev(op, prev);
  check_rnn_path_plane(op, ch, "ch", B, 2 * H, prev, "prev");
  check_rnn_path_plane(op, s, "s", B, H, prev, "prev");
  TORCH_CHECK(h_mask.has_value() == m.has_value(), op, ": h_mask, m: expected both or neither, got only ",
              h_mask.has_value() ? "h_mask" : "m");
  if (h_mask.has_value()) {
    check_rnn_path_plane(op, *h_mask, "h_mask", B, H, prev, "prev");
    check_rnn_path_plane(op, *m, "m", B, H, prev, "prev");
  }
  check_rnn_path_act(op, act, "act");
  const at::Tensor mask = h_mask.value_or(at::Tensor()), mo = m.value_or(at::Tensor());
  if (prev.is_cpu()) return pynas::cpu::rnn_path_step_forward(ch, prev, act, mask, s, mo);
#ifdef PYNAS_WITH_CUDA
  if (prev.is_cuda()) return pynas::cuda::rnn_path_step_forward(ch, prev, act, mask, s, mo);
#endif
  fail_device(op, prev, "prev");
}

void rnn_path_step_backward(const at::Tensor& g, const at::Tensor& ch, const at::Tensor& prev, int64_t act,
                            const at::Tensor& gch, const at::Tensor& g_prev, bool accumulate) {
  constexpr const char* op = "rnn_path_step_backward";
  const auto [B, H] = check_rnn_path_prev(op, prev);
  check_rnn_path_plane(op, g, "g", B, H, prev, "prev");
  check_rnn_path_plane(op, ch, "ch", B, 2 * H, prev, "prev");
  check_rnn_path_plane(op, gch, "gch", B, 2 * H, prev, "prev");
  check_rnn_path_plane(op, g_prev, "g_prev", B, H, prev, "prev");
  check_rnn_path_act(op, act, "act");
  if (prev.is_cpu()) return pynas::cpu::rnn_path_step_backward(g, ch, prev, act, gch, g_prev, accumulate);
#ifdef PYNAS_WITH_CUDA
  if (prev.is_cuda()) return pynas::cuda::rnn_path_step_backward(g, ch, prev, act, gch, g_prev, accumulate);
#endif
  fail_device(op, prev, "prev");
}

// ---- the machine's roofs (pynas.bench's roofline rows; see csrc/include/pynas/roofline.h) ------------

constexpr int64_t kRooflineMaxThreads = 1024;
constexpr double kRooflineMaxSeconds = 60.0;

void check_roofline_run(const char* op, int64_t threads, double seconds) {
  TORCH_CHECK(threads >= 1 && threads <= kRooflineMaxThreads, op, ": threads: expected 1 to ", kRooflineMaxThreads,
              ", got ", threads);
  TORCH_CHECK(std::isfinite(seconds) && seconds > 0 && seconds <= kRooflineMaxSeconds, op,
              ": seconds: expected a duration in (0, ", kRooflineMaxSeconds, "], got ", seconds);
}

double roofline_fma_gflops(int64_t threads, double seconds) {
  check_roofline_run("roofline_fma_gflops", threads, seconds);
  return pynas::cpu::roofline_fma_gflops(threads, seconds);
}

double roofline_copy_gbs(int64_t bytes, int64_t threads, double seconds) {
  constexpr const char* op = "roofline_copy_gbs";
  constexpr int64_t kMaxBytes = int64_t(1) << 36;
  TORCH_CHECK(bytes >= 4096 && bytes <= kMaxBytes, op, ": bytes: expected a buffer of 4096 to ", kMaxBytes,
              " bytes, got ", bytes);
  check_roofline_run(op, threads, seconds);
  return pynas::cpu::roofline_copy_gbs(bytes, threads, seconds);
}

const char* host_compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " PYNAS_STRINGIFY(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef PYNAS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = pynas::cuda::compiled_cuda_version();
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["cuda_archs"] = std::string(PYNAS_CUDA_ARCHS);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version_built"] = std::string(PYNAS_TORCH_VERSION);
  info["compiler"] = std::string(host_compiler());
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pynas._C: C++/CUDA kernels of pynas's fused ops (see csrc/README.md).";
  // The kernels touch no Python objects: let other Python threads run meanwhile.
  m.def("mixed_sum_forward", &mixed_sum_forward, pybind11::arg("xs"), pybind11::arg("weights"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "sum_k weights[k] * xs[k], for K tensors xs of one shape, dtype and device and weights of shape (K,).");
  m.def("mixed_sum_backward", &mixed_sum_backward, pybind11::arg("grad_out"), pybind11::arg("xs"),
        pybind11::arg("weights"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "(grad_xs, grad_weights) with grad_xs[k] = weights[k] * grad_out and grad_weights[k] = sum(grad_out * xs[k]).");
  namespace py = pybind11;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("cnn_edge_dw_forward", &cnn_edge_dw_forward, py::arg("x"), py::arg("ws"), py::arg("strides"), py::arg("pads"),
        py::arg("dils"), py::arg("pre"), py::arg("mean"), py::arg("rstd"), nogil,
        "Depthwise convs of pre(x), one per weight (fused CNN edge, CPU and CUDA).");
  m.def("cnn_edge_dw_backward", &cnn_edge_dw_backward, py::arg("x"), py::arg("ws"), py::arg("gs"), py::arg("strides"),
        py::arg("pads"), py::arg("dils"), py::arg("pre"), py::arg("mean"), py::arg("rstd"),
        py::arg("need_grad_w") = true, nogil,
        "(grad_in, grad_ws, sums) of cnn_edge_dw_forward; grad_ws is empty unless need_grad_w.");
  m.def("cnn_edge_bn_stats", &cnn_edge_bn_stats, py::arg("p"), py::arg("eps"), py::arg("momentum"),
        py::arg("running_mean"), py::arg("running_var"), nogil,
        "(mean, rstd) per channel of p; updates the running statistics in place.");
  m.def("cnn_edge_bn_backward", &cnn_edge_bn_backward, py::arg("g"), py::arg("p"), py::arg("mean"), py::arg("rstd"),
        py::arg("sums"), nogil, "Affine-free training BatchNorm backward.");
  m.def("cnn_edge_mix_forward", &cnn_edge_mix_forward, py::arg("x"), py::arg("ps"), py::arg("w"), py::arg("stride"),
        py::arg("has_max"), py::arg("has_avg"), py::arg("has_skip"), py::arg("eps"), py::arg("momentum"),
        py::arg("running_means"), py::arg("running_vars"), nogil,
        "(out, mean, rstd): the weighted sum of BN(pools(x)), x and BN(ps) (fused CNN edge, CPU and CUDA).");
  m.def("cnn_edge_mix_backward", &cnn_edge_mix_backward, py::arg("g"), py::arg("x"), py::arg("ps"), py::arg("w"),
        py::arg("stride"), py::arg("has_max"), py::arg("has_avg"), py::arg("has_skip"), py::arg("mean"),
        py::arg("rstd"), nogil, "(grad_x, grad_ps, grad_w) of cnn_edge_mix_forward; pools recomputed.");
  m.def("cnn_edge_forward", &cnn_edge_forward, py::arg("x"), py::arg("weights"), py::arg("params"), py::arg("running"),
        py::arg("counters"), py::arg("index"), py::arg("stride"), py::arg("has_max"), py::arg("has_avg"),
        py::arg("has_skip"), py::arg("kinds"), py::arg("pads"), py::arg("dils"), py::arg("eps"), py::arg("momentum"),
        nogil, "(out, wr, mean, rstd, ps, saved): the whole fused edge's forward in one call (CPU).");
  m.def("cnn_edge_backward", &cnn_edge_backward, py::arg("g"), py::arg("x"), py::arg("weights"), py::arg("wr"),
        py::arg("mean"), py::arg("rstd"), py::arg("params"), py::arg("ps"), py::arg("saved"), py::arg("index"),
        py::arg("stride"), py::arg("has_max"), py::arg("has_avg"), py::arg("has_skip"), py::arg("kinds"),
        py::arg("pads"), py::arg("dils"), py::arg("need_w"), nogil,
        "(grad_x, grad_weights, grad_params) of cnn_edge_forward (grad_params None unless need_w; CPU).");
  m.def("cnn_edge_pw_forward", &cnn_edge_pw_forward, py::arg("u"), py::arg("w"), py::arg("stats"), py::arg("eps"),
        py::arg("momentum"), py::arg("running_mean"), py::arg("running_var"), nogil,
        "(p, mean, rstd): 1x1 conv, with the per-channel batch statistics of p when stats (fused CNN edge, CPU).");
  m.def("cnn_edge_pw_backward", &cnn_edge_pw_backward, py::arg("g"), py::arg("u"), py::arg("w"),
        py::arg("need_grad_w") = true, nogil,
        "(grad_u, grad_w) of a 1x1 conv (fused CNN edge, CPU); grad_w is None unless need_grad_w.");
  m.def("partial_channel_forward", &partial_channel_forward, py::arg("t"), py::arg("x"), py::arg("groups"),
        py::arg("stride"), nogil,
        "The PC-DARTS partial-channel edge's output: channel_shuffle(cat([t, bypass(x[:, C/groups:])]), groups), "
        "bypass the identity (stride 1) or a 2x2 max pool (stride 2), in one pass (CPU and CUDA).");
  m.def("partial_channel_backward", &partial_channel_backward, py::arg("g"), py::arg("x"), py::arg("groups"),
        py::arg("stride"), nogil,
        "(g_t, g_x) of partial_channel_forward: g_x's first C/groups channels are zero (CPU and CUDA).");
  m.def("cpu_isa", &pynas::cpu::isa, "The instruction set of the CPU edge kernels in use: 'base' or 'avx2'.");
  m.def("set_cpu_isa", &pynas::cpu::set_isa, py::arg("name"),
        "Force the CPU edge kernels' instruction set: 'auto', 'base' or 'avx2' (PYNAS_CPU_ISA=base at startup).");
  m.def("rnn_mix_forward", &rnn_mix_forward, py::arg("states"), py::arg("c"), py::arg("h"), py::arg("probs"), nogil,
        "sum_j sum_{f != none} probs[j, f] * (states[j] + c[j] * (f(h[j]) - states[j])) of (J, B, H) inputs.");
  m.def("rnn_mix_backward", &rnn_mix_backward, py::arg("grad_out"), py::arg("states"), py::arg("c"), py::arg("h"),
        py::arg("probs"), nogil, "(d states, d c, d h, d probs) of rnn_mix_forward; activations recomputed.");
  m.def("rnn_cell_forward", &rnn_cell_forward, py::arg("xs"), py::arg("h0"), py::arg("x_mask"), py::arg("h_mask"),
        py::arg("probs"), py::arg("running_mean"), py::arg("running_var"), py::arg("W0"), py::arg("Ws"),
        py::arg("momentum"), py::arg("eps"), nogil,
        "The training-mode DARTS RNN search cell over a sequence: [hiddens, saved...]; updates the running stats.");
  m.def("rnn_cell_backward", &rnn_cell_backward, py::arg("grad_out"), py::arg("x_mask"), py::arg("h_mask"),
        py::arg("probs"), py::arg("W0"), py::arg("Ws"), py::arg("saved"), py::arg("eps"), py::arg("need_w") = true,
        nogil, "[d xs, d h0, d probs, d W0, d Ws...] of rnn_cell_forward (the weights' None unless need_w).");
  m.def("linear_nll_rows_", &linear_nll_rows_, py::arg("logits"), py::arg("target"), py::arg("nll"), py::arg("grad"),
        py::arg("scale"), nogil,
        "nll[r] = logsumexp(logits[r]) - logits[r, target[r]] into nll; with grad, logits[r] <- (softmax - onehot) * "
        "scale in place. Returns nll.");
  m.def("rnn_path_forward", &rnn_path_forward, py::arg("xs"), py::arg("h0"), py::arg("x_mask"), py::arg("h_mask"),
        py::arg("W0"), py::arg("Ws"), py::arg("preds"), py::arg("acts"), py::arg("concat"), py::arg("save"), nogil,
        "The DARTS RNN evaluation cell of a genotype (preds, acts, concat) over a sequence: [hiddens] or, with "
        "save, [hiddens, xm, S, CH]; masks None in eval mode.");
  m.def("rnn_path_backward", &rnn_path_backward, py::arg("grad_out"), py::arg("xs"), py::arg("h0"),
        py::arg("hiddens"), py::arg("x_mask"), py::arg("h_mask"), py::arg("W0"), py::arg("Ws"), py::arg("preds"),
        py::arg("acts"), py::arg("concat"), py::arg("saved"), nogil,
        "[d xs, d h0, d W0, d Ws...] of rnn_path_forward from its saved [xm, S, CH].");
  m.def("rnn_path_step_forward", &rnn_path_step_forward, py::arg("ch"), py::arg("prev"), py::arg("act"),
        py::arg("h_mask"), py::arg("s"), py::arg("m"), nogil,
        "In place: s = prev + sigmoid(ch[:, :H]) * (f_act(ch[:, H:]) - prev), and m = s * h_mask unless None.");
  m.def("rnn_path_step_backward", &rnn_path_step_backward, py::arg("g"), py::arg("ch"), py::arg("prev"),
        py::arg("act"), py::arg("gch"), py::arg("g_prev"), py::arg("accumulate"), nogil,
        "In place: gch = d ch and g_prev = (or +=) d prev of rnn_path_step_forward for d s = g.");
  m.def("roofline_fma_gflops", &roofline_fma_gflops, py::arg("threads"), py::arg("seconds"), nogil,
        "GFLOP/s of independent float32 FMA chains (2 flops per FMA per lane, the cpu_isa() variant) on threads "
        "threads for about seconds.");
  m.def("roofline_copy_gbs", &roofline_copy_gbs, py::arg("bytes"), py::arg("threads"), py::arg("seconds"), nogil,
        "GB/s (read plus write) of the best of several passes copying a buffer of bytes bytes on threads threads, "
        "for about seconds (3 passes at least).");
  m.def("build_info", &build_info,
        "How pynas._C was built: dict of cuda, cuda_version, cuda_archs, openmp, torch_version_built, compiler.");
}
