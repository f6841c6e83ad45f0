// CPU backend of rnn_path's highway step (math in csrc/include/pynas/rnn_path.h).
//
// The B rows are split among threads by at::parallel_for; each row is one loop over H elements with the
// activation a template argument, so the compiler sees a plain elementwise loop. No reductions: the result
// does not depend on the thread count.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/rnn_path.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace pynas {
namespace cpu {
namespace {

// Rows per parallel chunk: about 4096 elements, so tiny batches stay on one thread.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)); }

template <int ACT, typename scalar_t>
void forward_rows(const scalar_t* ch, const scalar_t* prev, const scalar_t* mask, scalar_t* s, scalar_t* m,
                  int64_t B, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* c = ch + b * 2 * H;
      const scalar_t* g = c + H;
      const int64_t o = b * H;
      for (int64_t k = 0; k < H; ++k) {
        const scalar_t v = static_cast<scalar_t>(rnn_path::step_forward<ACT, acc_t>(
            static_cast<acc_t>(prev[o + k]), static_cast<acc_t>(c[k]), static_cast<acc_t>(g[k])));
        s[o + k] = v;
        // from the stored (rounded) s, as the module path masks the stored state
        if (m != nullptr) m[o + k] = static_cast<scalar_t>(static_cast<acc_t>(v) * static_cast<acc_t>(mask[o + k]));
      }
    }
  });
}

template <int ACT, typename scalar_t>
void backward_rows(const scalar_t* gs, const scalar_t* ch, const scalar_t* prev, scalar_t* gch, scalar_t* gp,
                   bool accumulate, int64_t B, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* c = ch + b * 2 * H;
      const scalar_t* g = c + H;
      scalar_t* dc = gch + b * 2 * H;
      scalar_t* dg = dc + H;
      const int64_t o = b * H;
      for (int64_t k = 0; k < H; ++k) {
        acc_t vc, vg, vp;
        rnn_path::step_backward<ACT, acc_t>(static_cast<acc_t>(gs[o + k]), static_cast<acc_t>(prev[o + k]),
                                            static_cast<acc_t>(c[k]), static_cast<acc_t>(g[k]), &vc, &vg, &vp);
        dc[k] = static_cast<scalar_t>(vc);
        dg[k] = static_cast<scalar_t>(vg);
        gp[o + k] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(gp[o + k]) + vp : vp);
      }
    }
  });
}

}  // namespace

void rnn_path_step_forward(const at::Tensor& ch, const at::Tensor& prev, int64_t act, const at::Tensor& h_mask,
                           const at::Tensor& s, const at::Tensor& m) {
  const int64_t B = prev.size(0), H = prev.size(1);
  const bool masked = h_mask.defined() && m.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prev.scalar_type(), "rnn_path_step_forward_cpu", [&] {
    rnn_path::dispatch_activation(act, [&](auto a) {
      forward_rows<decltype(a)::value, scalar_t>(
          ch.const_data_ptr<scalar_t>(), prev.const_data_ptr<scalar_t>(),
          masked ? h_mask.const_data_ptr<scalar_t>() : nullptr, s.mutable_data_ptr<scalar_t>(),
          masked ? m.mutable_data_ptr<scalar_t>() : nullptr, B, H);
    });
  });
}

void rnn_path_step_backward(const at::Tensor& g, const at::Tensor& ch, const at::Tensor& prev, int64_t act,
                            const at::Tensor& gch, const at::Tensor& g_prev, bool accumulate) {
  const int64_t B = prev.size(0), H = prev.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prev.scalar_type(), "rnn_path_step_backward_cpu", [&] {
    rnn_path::dispatch_activation(act, [&](auto a) {
      backward_rows<decltype(a)::value, scalar_t>(g.const_data_ptr<scalar_t>(), ch.const_data_ptr<scalar_t>(),
                                                   prev.const_data_ptr<scalar_t>(), gch.mutable_data_ptr<scalar_t>(),
                                                   g_prev.mutable_data_ptr<scalar_t>(), accumulate, B, H);
    });
  });
}

}  // namespace cpu
}  // namespace pynas
