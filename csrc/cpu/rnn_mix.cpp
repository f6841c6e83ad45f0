// CPU backend of rnn_mix (math in csrc/include/pynas/rnn_mix.h).
//
// The B*H elements are cut into fixed tiles that at::parallel_for hands to threads; every tile loops
// over the J nodes. The gradient of probs is summed per tile and the tiles are added in order (in
// double), so it does not depend on the number of threads.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/cnn_edge.h"  // isa_is_avx2
#include "pynas/rnn_mix.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace pynas {
namespace cpu {
namespace {

constexpr int64_t kTile = 2048;
using rnn_mix::kFuncs;

template <typename acc_t>
std::vector<acc_t> probs_table(const at::Tensor& probs) {
  const at::Tensor p = probs.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return std::vector<acc_t>(p.const_data_ptr<acc_t>(), p.const_data_ptr<acc_t>() + p.numel());
}

}  // namespace

// The float loops, once per instruction set (as csrc/cpu/cnn_edge.cpp does for its planes).
namespace rnn_isa_base {
#include "rnn_mix_loops.h"
}  // namespace rnn_isa_base
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace rnn_isa_avx2 {
#include "rnn_mix_loops.h"
}  // namespace rnn_isa_avx2
#pragma GCC pop_options
#define PYNAS_RNN_ISA_CALL(fn, ...) \
  (isa_is_avx2() ? rnn_isa_avx2::fn(__VA_ARGS__) : rnn_isa_base::fn(__VA_ARGS__))
#else
#define PYNAS_RNN_ISA_CALL(fn, ...) rnn_isa_base::fn(__VA_ARGS__)
#endif

namespace {

// out[i] = sum_j forward_term(s, c, h at [j, i]) for i < n, in fixed tiles over the threads (float: the
// 8-lane loops; other dtypes: the scalar math of rnn_mix.h in acc_t).
template <typename scalar_t, typename acc_t>
void mix_forward_tiles(const scalar_t* sp, const scalar_t* cp, const scalar_t* hp, const acc_t* p, int64_t J,
                       int64_t n, scalar_t* op) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t * kTile, e = std::min(n, b + kTile);
      if constexpr (std::is_same_v<scalar_t, float>) {
        PYNAS_RNN_ISA_CALL(forward_tile, sp, cp, hp, p, J, n, b, e, op);
      } else {
        for (int64_t i = b; i < e; ++i) {
          acc_t acc = 0;
          for (int64_t j = 0; j < J; ++j) {
            const int64_t q = j * n + i;
            acc += rnn_mix::forward_term<acc_t>(static_cast<acc_t>(sp[q]), static_cast<acc_t>(cp[q]),
                                                static_cast<acc_t>(hp[q]), p + j * kFuncs);
          }
          op[i] = static_cast<scalar_t>(acc);
        }
      }
    }
  });
}

}  // namespace

at::Tensor rnn_mix_forward(const at::Tensor& states_in, const at::Tensor& c_in, const at::Tensor& h_in,
                           const at::Tensor& probs) {
  const at::Tensor states = states_in.contiguous(), c = c_in.contiguous(), h = h_in.contiguous();
  const int64_t J = states.size(0), n = states.size(1) * states.size(2);
  at::Tensor out = at::empty({states.size(1), states.size(2)}, states.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, states.scalar_type(), "rnn_mix_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> p = probs_table<acc_t>(probs);
    const scalar_t* sp = states.const_data_ptr<scalar_t>();
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    mix_forward_tiles<scalar_t, acc_t>(sp, cp, hp, p.data(), J, n, op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_mix_backward(const at::Tensor& grad_in,
                                                                            const at::Tensor& states_in,
                                                                            const at::Tensor& c_in,
                                                                            const at::Tensor& h_in,
                                                                            const at::Tensor& probs) {
  const at::Tensor g = grad_in.contiguous(), states = states_in.contiguous(), c = c_in.contiguous(),
                   h = h_in.contiguous();
  const int64_t J = states.size(0), n = states.size(1) * states.size(2);
  at::Tensor ds = at::empty_like(states), dc = at::empty_like(states), dh = at::empty_like(states);
  at::Tensor dprobs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, states.scalar_type(), "rnn_mix_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> p = probs_table<acc_t>(probs);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = states.const_data_ptr<scalar_t>();
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* dsp = ds.mutable_data_ptr<scalar_t>();
    scalar_t* dcp = dc.mutable_data_ptr<scalar_t>();
    scalar_t* dhp = dh.mutable_data_ptr<scalar_t>();
    const int64_t tiles = (n + kTile - 1) / kTile;
    std::vector<acc_t> partial(static_cast<size_t>(tiles * J * kFuncs), acc_t(0));
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t * kTile, e = std::min(n, b + kTile);
        acc_t* dp = partial.data() + t * J * kFuncs;
        if constexpr (std::is_same_v<scalar_t, float>) {
          PYNAS_RNN_ISA_CALL(backward_tile, reinterpret_cast<const float*>(gp), reinterpret_cast<const float*>(sp),
                             reinterpret_cast<const float*>(cp), reinterpret_cast<const float*>(hp),
                             reinterpret_cast<const float*>(p.data()), J, n, b, e, reinterpret_cast<float*>(dsp),
                             reinterpret_cast<float*>(dcp), reinterpret_cast<float*>(dhp),
                             reinterpret_cast<float*>(dp));
          continue;
        }
        for (int64_t j = 0; j < J; ++j) {
          for (int64_t i = b; i < e; ++i) {
            const int64_t q = j * n + i;
            acc_t a, bb, cc;
            rnn_mix::backward_term<acc_t>(static_cast<acc_t>(gp[i]), static_cast<acc_t>(sp[q]),
                                          static_cast<acc_t>(cp[q]), static_cast<acc_t>(hp[q]), p.data() + j * kFuncs,
                                          &a, &bb, &cc, dp + j * kFuncs);
            dsp[q] = static_cast<scalar_t>(a);
            dcp[q] = static_cast<scalar_t>(bb);
            dhp[q] = static_cast<scalar_t>(cc);
          }
        }
      }
    });
    at::Tensor d = at::empty({J, kFuncs}, states.options().dtype(at::kDouble));
    double* dd = d.mutable_data_ptr<double>();
    for (int64_t k = 0; k < J * kFuncs; ++k) {
      double s = 0;
      for (int64_t t = 0; t < tiles; ++t) s += static_cast<double>(partial[t * J * kFuncs + k]);
      dd[k] = s;
    }
    dprobs = d.to(probs.scalar_type());
  });
  return {ds, dc, dh, dprobs};
}

}  // namespace cpu
}  // namespace pynas
