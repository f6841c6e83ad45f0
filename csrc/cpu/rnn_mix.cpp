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

// ---- the fused node epilogues of the RNN cell sequence (declared in pynas/rnn_cell.h) ---------------------
namespace pynas {
namespace cpu {
namespace {

// Rows of the batch per parallel chunk: a fixed number (not the thread count) so d probs, summed per
// chunk and then in chunk order, does not depend on how many threads ran.
int64_t rows_per_chunk(int64_t H) { return std::max<int64_t>(1, kTile / std::max<int64_t>(H, 1)); }

// Training BatchNorm (no affine) of u (B x H) into s, with the batch mean and inverse std, and the running
// statistics updated as torch does (unbiased variance in running_var). Column sums in double.
template <typename T>
void batch_norm_rows(const T* u, int64_t B, int64_t H, double momentum, double eps, T* s, T* mean, T* invstd,
                     T* running_mean, T* running_var) {
  std::vector<double> m(static_cast<size_t>(H), 0.0), v(static_cast<size_t>(H), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < H; ++k) m[k] += static_cast<double>(u[b * H + k]);
  for (int64_t k = 0; k < H; ++k) m[k] /= static_cast<double>(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < H; ++k) {
      const double d = static_cast<double>(u[b * H + k]) - m[k];
      v[k] += d * d;
    }
  for (int64_t k = 0; k < H; ++k) {
    const double var = v[k] / static_cast<double>(B);
    const double is = 1.0 / std::sqrt(var + eps);
    mean[k] = static_cast<T>(m[k]);
    invstd[k] = static_cast<T>(is);
    v[k] = is;
    running_mean[k] = static_cast<T>((1.0 - momentum) * static_cast<double>(running_mean[k]) + momentum * m[k]);
    running_var[k] = static_cast<T>((1.0 - momentum) * static_cast<double>(running_var[k]) +
                                    momentum * var * static_cast<double>(B) / static_cast<double>(B - 1));
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < H; ++k)
      s[b * H + k] = static_cast<T>((static_cast<double>(u[b * H + k]) - m[k]) * v[k]);
}

// d u of the BatchNorm above from d s (g) and its output x_hat = s: invstd (g - mean(g) - x_hat mean(g x_hat)).
template <typename T>
void batch_norm_backward_rows(const T* g, const T* xhat, const T* invstd, int64_t B, int64_t H, T* gu) {
  std::vector<double> sg(static_cast<size_t>(H), 0.0), sgx(static_cast<size_t>(H), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < H; ++k) {
      const double gv = static_cast<double>(g[b * H + k]);
      sg[k] += gv;
      sgx[k] += gv * static_cast<double>(xhat[b * H + k]);
    }
  for (int64_t k = 0; k < H; ++k) {
    sg[k] /= static_cast<double>(B);
    sgx[k] /= static_cast<double>(B);
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < H; ++k) {
      const int64_t i = b * H + k;
      gu[i] = static_cast<T>(static_cast<double>(invstd[k]) *
                             (static_cast<double>(g[i]) - sg[k] - static_cast<double>(xhat[i]) * sgx[k]));
    }
}

}  // namespace

bool rnn_node_supported(const at::Tensor& xs, const at::Tensor& running_mean, const at::Tensor& running_var) {
  const auto t = xs.scalar_type();
  return xs.is_cpu() && (t == at::kFloat || t == at::kDouble) && running_mean.scalar_type() == t &&
         running_var.scalar_type() == t;
}

void rnn_node_forward(const at::Tensor& ch, const at::Tensor& states, const at::Tensor& probs, at::Tensor& c,
                      at::Tensor& hh, at::Tensor& u, at::Tensor& s, at::Tensor& mean, at::Tensor& invstd,
                      at::Tensor& running_mean, at::Tensor& running_var, double momentum, double eps) {
  const int64_t J = states.size(0), B = states.size(1), H = states.size(2), n = B * H;
  AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "rnn_node_forward_cpu", [&] {
    const std::vector<scalar_t> p = probs_table<scalar_t>(probs);
    const scalar_t* chp = ch.const_data_ptr<scalar_t>();
    const scalar_t* sp = states.const_data_ptr<scalar_t>();
    scalar_t* cp = c.mutable_data_ptr<scalar_t>();
    scalar_t* hp = hh.mutable_data_ptr<scalar_t>();
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    const int64_t rows = J * B, chunk = rows_per_chunk(H);
    at::parallel_for(0, (rows + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
      const int64_t r0 = c0 * chunk, r1 = std::min(rows, c1 * chunk);
      if constexpr (std::is_same_v<scalar_t, float>) {
        PYNAS_RNN_ISA_CALL(sigmoid_split_rows, reinterpret_cast<const float*>(chp), H, r0, r1,
                           reinterpret_cast<float*>(cp), reinterpret_cast<float*>(hp));
      } else {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t k = 0; k < H; ++k) {
            cp[r * H + k] = scalar_t(1) / (scalar_t(1) + std::exp(-chp[r * 2 * H + k]));
            hp[r * H + k] = chp[r * 2 * H + H + k];
          }
      }
    });
    mix_forward_tiles<scalar_t, scalar_t>(sp, cp, hp, p.data(), J, n, up);
    batch_norm_rows<scalar_t>(up, B, H, momentum, eps, s.mutable_data_ptr<scalar_t>(),
                              mean.mutable_data_ptr<scalar_t>(), invstd.mutable_data_ptr<scalar_t>(),
                              running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>());
  });
}

void rnn_node_backward(const at::Tensor& g_s, const at::Tensor& xhat, const at::Tensor& invstd,
                       const at::Tensor& states, const at::Tensor& c, const at::Tensor& hh, const at::Tensor& probs,
                       at::Tensor& g_states, at::Tensor& g_ch, at::Tensor& g_probs) {
  const int64_t J = states.size(0), B = states.size(1), H = states.size(2);
  AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "rnn_node_backward_cpu", [&] {
    const std::vector<scalar_t> p = probs_table<scalar_t>(probs);
    std::vector<scalar_t> gu(static_cast<size_t>(B * H));
    batch_norm_backward_rows<scalar_t>(g_s.const_data_ptr<scalar_t>(), xhat.const_data_ptr<scalar_t>(),
                                       invstd.const_data_ptr<scalar_t>(), B, H, gu.data());
    const scalar_t* sp = states.const_data_ptr<scalar_t>();
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* hp = hh.const_data_ptr<scalar_t>();
    scalar_t* gsp = g_states.mutable_data_ptr<scalar_t>();
    scalar_t* gchp = g_ch.mutable_data_ptr<scalar_t>();
    const int64_t chunk = rows_per_chunk(H), chunks = (B + chunk - 1) / chunk;
    std::vector<scalar_t> partial(static_cast<size_t>(chunks * J * kFuncs), scalar_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ci = c0; ci < c1; ++ci) {
        const int64_t r0 = ci * chunk, r1 = std::min(B, r0 + chunk);
        scalar_t* dp = partial.data() + ci * J * kFuncs;
        if constexpr (std::is_same_v<scalar_t, float>) {
          PYNAS_RNN_ISA_CALL(node_backward_rows, reinterpret_cast<const float*>(gu.data()),
                             reinterpret_cast<const float*>(sp), reinterpret_cast<const float*>(cp),
                             reinterpret_cast<const float*>(hp), reinterpret_cast<const float*>(p.data()), J, B, H,
                             r0, r1, reinterpret_cast<float*>(gsp), reinterpret_cast<float*>(gchp),
                             reinterpret_cast<float*>(dp));
        } else {
          for (int64_t j = 0; j < J; ++j)
            for (int64_t r = r0; r < r1; ++r)
              for (int64_t k = 0; k < H; ++k) {
                const int64_t q = (j * B + r) * H + k;
                scalar_t ds, dc, dh;
                rnn_mix::backward_term<scalar_t>(gu[r * H + k], sp[q], cp[q], hp[q], p.data() + j * kFuncs, &ds, &dc,
                                                 &dh, dp + j * kFuncs);
                gsp[q] += ds;
                scalar_t* row = gchp + (j * B + r) * 2 * H;
                row[k] = dc * cp[q] * (scalar_t(1) - cp[q]);
                row[H + k] = dh;
              }
        }
      }
    });
    // d probs: chunks in order, in double, added to the rows of g_probs
    scalar_t* gp = g_probs.mutable_data_ptr<scalar_t>();
    for (int64_t q = 0; q < J * kFuncs; ++q) {
      double sum = 0;
      for (int64_t ci = 0; ci < chunks; ++ci) sum += static_cast<double>(partial[ci * J * kFuncs + q]);
      gp[q] += static_cast<scalar_t>(sum);
    }
  });
}

}  // namespace cpu
}  // namespace pynas
