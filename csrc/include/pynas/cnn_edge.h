#pragma once
// The fused DARTS CNN edge (MixedOp): contracts of its kernels. pynas/ops/cnn_edge.py composes them into
// one autograd node per edge; its docstring gives the whole forward and backward.
//
// All activations are NCHW and contiguous; `pre` names what a depthwise conv applies to its input as
// it reads it: kPreNone (x), kPreRelu (max(x, 0)), kPreNormRelu (max((x - mean[c]) * rstd[c], 0)).
// BatchNorms are affine-free, in training mode (batch statistics, biased variance to normalise,
// running statistics updated with the unbiased variance, as torch's BatchNorm2d does).
// Every sum over the batch is made per (n, c) plane and then added in plane order, in double, so the
// results do not depend on the number of threads.
//
// dtypes: the CPU kernels take float32 and float64; GPU kernels (csrc/cuda, kernels/cnn_edge.py)
// also float16 and bfloat16. `mean` and `rstd` (per-channel statistics) are in the accumulation type:
// float64 for float64 activations, float32 otherwise; running statistics have the BatchNorm module's
// dtype (the activations' dtype after module.to(dtype)); `sums` are float64 on the CPU and the
// accumulation type on a GPU; `w` any floating dtype, grad_w returned in w's dtype.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace pynas {
namespace edge {

constexpr int64_t kPreNone = 0;
constexpr int64_t kPreRelu = 1;
constexpr int64_t kPreNormRelu = 2;

// The largest depthwise kernel side the CPU kernels take.
constexpr int64_t kMaxKernel = 9;

// Output size of a conv or pool window (PyTorch's formula, floor mode).
inline int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

}  // namespace edge

namespace cpu {

// Depthwise convs of one input: ys[m] = dwconv(pre(x), ws[m]; strides[m], pads[m], dils[m]).
std::vector<at::Tensor> cnn_edge_dw_forward(const at::Tensor& x, const std::vector<at::Tensor>& ws,
                                        const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                                        const std::vector<int64_t>& dils, int64_t pre, const at::Tensor& mean,
                                        const at::Tensor& rstd);

// Their backward: grad_in = pre'(x) * sum_m dwconv^T(gs[m], ws[m]) (the gradient w.r.t. x, or w.r.t. the
// normalised input for kPreNormRelu), grad_ws[m] (an empty list unless need_grad_w); with kPreNormRelu also sums (2, C) float64:
// per channel sum(grad_in) and sum(grad_in * (x - mean) * rstd), the BatchNorm backward's reductions.
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_dw_backward(
    const at::Tensor& x, const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& gs,
    const std::vector<int64_t>& strides, const std::vector<int64_t>& pads, const std::vector<int64_t>& dils,
    int64_t pre, const at::Tensor& mean, const at::Tensor& rstd, bool need_grad_w = true);

// 1x1 conv p = w * u (w: (Co, Ci, 1, 1)); with `stats` also (mean, rstd) of p per channel, computed in
// the same pass, running statistics updated as by cnn_edge_bn_stats (undefined mean/rstd otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cnn_edge_pw_forward(const at::Tensor& u, const at::Tensor& w, bool stats,
                                                               double eps, double momentum,
                                                               const at::Tensor& running_mean,
                                                               const at::Tensor& running_var);

// Its backward: (grad_u = w^T g, grad_w = sum_n g[n] u[n]^T); grad_w undefined unless need_grad_w.
std::tuple<at::Tensor, at::Tensor> cnn_edge_pw_backward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& w,
                                                    bool need_grad_w = true);

// The instruction set the CPU kernels use ("base" or "avx2") and a way to force one ("auto", "base",
// "avx2"), for tests and comparisons.
std::string isa();
// Whether the AVX2+FMA variants of the CPU loops are in use (the choice isa()/set_isa() report and make).
bool isa_is_avx2();
void set_isa(const std::string& name);

// Batch statistics of p per channel: (mean, rstd = 1/sqrt(var + eps)); running_mean/var (may be
// undefined) updated in place with `momentum`.
std::tuple<at::Tensor, at::Tensor> cnn_edge_bn_stats(const at::Tensor& p, double eps, double momentum,
                                                 const at::Tensor& running_mean, const at::Tensor& running_var);

// Affine-free training BatchNorm backward: rstd * (g - mean(g) - xhat * mean(g * xhat)), per channel.
// `sums` as cnn_edge_dw_backward gives them, or undefined to compute them here.
at::Tensor cnn_edge_bn_backward(const at::Tensor& g, const at::Tensor& p, const at::Tensor& mean,
                            const at::Tensor& rstd, const at::Tensor& sums);

// The mix: out = w[0] * BN(maxpool(x)) + w[1] * BN(avgpool(x)) + w[2] * x + sum_j w[3 + j] * BN(ps[j]),
// terms present by has_max / has_avg / has_skip (skip only at stride 1); pools 3x3, padding 1,
// avg without the padding in its count. Returns (out, mean, rstd), mean/rstd (2 + K, C): rows 0 and 1
// the pools' (zeros when absent), row 2 + j ps[j]'s. running_means/vars: 2 + K tensors (undefined
// where absent or not tracked), updated in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cnn_edge_mix_forward(
    const at::Tensor& x, const std::vector<at::Tensor>& ps, const at::Tensor& w, int64_t stride, bool has_max,
    bool has_avg, bool has_skip, double eps, double momentum, const std::vector<at::Tensor>& running_means,
    const std::vector<at::Tensor>& running_vars);

// Its backward: (grad_x from the pools and skip (undefined when none of them is present),
// grad_ps, grad_w (3 + K,), zero where a term is absent). The pools are recomputed from x.
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_mix_backward(
    const at::Tensor& g, const at::Tensor& x, const std::vector<at::Tensor>& ps, const at::Tensor& w,
    int64_t stride, bool has_max, bool has_avg, bool has_skip, const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace cpu

// The same six kernels on a CUDA device (csrc/cuda/cnn_edge.cu), with the dtypes of the paragraph above:
// activations float16, bfloat16, float32 or float64; mean/rstd and `sums` in the accumulation type. Declared
// only where they are compiled: nvcc's side, and the C++ side of a build with the CUDA part.
#if defined(PYNAS_WITH_CUDA) || defined(__CUDACC__)
namespace cuda {

std::vector<at::Tensor> cnn_edge_dw_forward(const at::Tensor& x, const std::vector<at::Tensor>& ws,
                                        const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                                        const std::vector<int64_t>& dils, int64_t pre, const at::Tensor& mean,
                                        const at::Tensor& rstd);

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_dw_backward(
    const at::Tensor& x, const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& gs,
    const std::vector<int64_t>& strides, const std::vector<int64_t>& pads, const std::vector<int64_t>& dils,
    int64_t pre, const at::Tensor& mean, const at::Tensor& rstd, bool need_grad_w = true);

std::tuple<at::Tensor, at::Tensor> cnn_edge_bn_stats(const at::Tensor& p, double eps, double momentum,
                                                 const at::Tensor& running_mean, const at::Tensor& running_var);

at::Tensor cnn_edge_bn_backward(const at::Tensor& g, const at::Tensor& p, const at::Tensor& mean,
                            const at::Tensor& rstd, const at::Tensor& sums);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cnn_edge_mix_forward(
    const at::Tensor& x, const std::vector<at::Tensor>& ps, const at::Tensor& w, int64_t stride, bool has_max,
    bool has_avg, bool has_skip, double eps, double momentum, const std::vector<at::Tensor>& running_means,
    const std::vector<at::Tensor>& running_vars);

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> cnn_edge_mix_backward(
    const at::Tensor& g, const at::Tensor& x, const std::vector<at::Tensor>& ps, const at::Tensor& w,
    int64_t stride, bool has_max, bool has_avg, bool has_skip, const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace cuda
#endif

}  // namespace pynas
