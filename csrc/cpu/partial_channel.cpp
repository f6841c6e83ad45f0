// CPU backend of partial_channel (math and index maps in csrc/include/pynas/partial_channel.h).
//
// Work is split by (n, channel) plane with at::parallel_for. The forward takes the planes of `out`: each
// is a copy of one plane of t, of x, or the 2x2 max pool of one plane of x. The backward takes the planes
// of g_x: plane (n, a) with a < Cg is zeroed and the matching plane of g_t copied from g; any other gets
// its bypass gradient from one plane of g. Every output value is written exactly once, and nothing is
// summed, so the results do not depend on the thread count.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/partial_channel.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <tuple>

namespace pynas {
namespace cpu {
namespace {

using partial_channel::ans_channel;
using partial_channel::out_channel;
using partial_channel::tap_offset;
using partial_channel::window_argmax;

// About this many values per task: below it, a thread's start costs more than its copies.
constexpr int64_t kGrainValues = 32768;

int64_t grain_for(int64_t values_per_plane) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, values_per_plane));
}

template <typename scalar_t>
void copy_plane(const scalar_t* src, scalar_t* dst, int64_t n) {
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(scalar_t));
}

// dst (Ho, Wo) = the 2x2 max pool (stride 2) of src (2 Ho, W): the value at each window's argmax.
template <typename scalar_t>
void max_pool_plane(const scalar_t* src, scalar_t* dst, int64_t Ho, int64_t Wo, int64_t W) {
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const scalar_t* row = src + 2 * oh * W;
    scalar_t* o = dst + oh * Wo;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const scalar_t* p = row + 2 * ow;
      o[ow] = p[tap_offset(window_argmax<scalar_t>(p, W), W)];
    }
  }
}

// dst (2 Ho, W) = the max pool's backward of g (Ho, Wo) for the input x (2 Ho, W): each window's
// gradient at its argmax, zeros at its three other positions.
template <typename scalar_t>
void max_pool_backward_plane(const scalar_t* g, const scalar_t* x, scalar_t* dst, int64_t Ho, int64_t Wo, int64_t W) {
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const scalar_t* xrow = x + 2 * oh * W;
    scalar_t* drow = dst + 2 * oh * W;
    const scalar_t* grow = g + oh * Wo;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const int arg = window_argmax<scalar_t>(xrow + 2 * ow, W);
      scalar_t* d = drow + 2 * ow;
      d[0] = d[1] = d[W] = d[W + 1] = scalar_t(0);
      d[tap_offset(arg, W)] = grow[ow];
    }
  }
}

}  // namespace

at::Tensor partial_channel_forward(const at::Tensor& t_in, const at::Tensor& x_in, int64_t groups, int64_t stride) {
  const at::Tensor t = t_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t cg = C / groups, Ho = H / stride, Wo = W / stride, HW = H * W, HWo = Ho * Wo;
  at::Tensor out = at::empty({N, C, Ho, Wo}, x.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "partial_channel_forward_cpu", [&] {
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, grain_for(stride == 2 ? 4 * HWo : HWo), [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t n = plane / C, oc = plane % C;
        const int64_t a = ans_channel(oc, groups, cg);
        scalar_t* dst = op + plane * HWo;
        if (a < cg) {
          copy_plane(tp + (n * cg + a) * HWo, dst, HWo);
        } else if (stride == 1) {
          copy_plane(xp + (n * C + a) * HW, dst, HWo);
        } else {
          max_pool_plane(xp + (n * C + a) * HW, dst, Ho, Wo, W);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> partial_channel_backward(const at::Tensor& g_in, const at::Tensor& x_in,
                                                            int64_t groups, int64_t stride) {
  const at::Tensor g = g_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t cg = C / groups, Ho = H / stride, Wo = W / stride, HW = H * W, HWo = Ho * Wo;
  at::Tensor g_t = at::empty({N, cg, Ho, Wo}, g.options());
  at::Tensor g_x = at::empty({N, C, H, W}, g.options());
  if (g_x.numel() == 0) return {g_t, g_x};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "partial_channel_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gtp = g_t.mutable_data_ptr<scalar_t>();
    scalar_t* gxp = g_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, grain_for(HW + HWo), [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t n = plane / C, a = plane % C;
        const scalar_t* src = gp + (n * C + out_channel(a, groups, cg)) * HWo;
        scalar_t* dst = gxp + plane * HW;
        if (a < cg) {
          copy_plane(src, gtp + (n * cg + a) * HWo, HWo);
          std::fill(dst, dst + HW, scalar_t(0));
        } else if (stride == 1) {
          copy_plane(src, dst, HW);
        } else {
          max_pool_backward_plane(src, xp + plane * HW, dst, Ho, Wo, W);
        }
      }
    });
  });
  return {g_t, g_x};
}

}  // namespace cpu
}  // namespace pynas
