// CPU backend of the multi-tensor ops (contracts in csrc/include/pynas/multi_tensor.h).
//
// The elements of all tensors are cut into chunks of at most kChunk elements (a chunk never spans two
// tensors); one at::parallel_for runs over all chunks of all tensors. Sums are made per chunk, in
// double, and added in chunk order.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pynas/multi_tensor.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace pynas {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> chunks_of(const std::vector<at::Tensor>& ts) {
  std::vector<Chunk> out;
  for (int64_t t = 0; t < static_cast<int64_t>(ts.size()); ++t) {
    const int64_t n = ts[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) out.push_back({t, b, std::min(n, b + kChunk)});
  }
  return out;
}

// Chunks per parallel task: about 4 chunks' worth of elements, so small tensors are batched.
int64_t grain(const std::vector<Chunk>& chunks) { return chunks.size() > 64 ? 4 : 1; }

double scalar_of(const at::Tensor& t) { return t.to(at::kDouble).const_data_ptr<double>()[0]; }

}  // namespace

void mt_virtual_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& bufs, double eta, double momentum, double weight_decay,
                      const at::Tensor& grad_scale) {
  if (params.empty()) return;
  const auto chunks = chunks_of(params);
  const double s = grad_scale.defined() ? scalar_of(grad_scale) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "mt_virtual_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t e = static_cast<acc_t>(eta), m = static_cast<acc_t>(momentum);
    const acc_t wd = static_cast<acc_t>(weight_decay), sc = static_cast<acc_t>(s);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain(chunks), [&](int64_t b, int64_t en) {
      for (int64_t c = b; c < en; ++c) {
        const Chunk& k = chunks[c];
        scalar_t* w = params[k.tensor].mutable_data_ptr<scalar_t>();
        const scalar_t* g = grads[k.tensor].const_data_ptr<scalar_t>();
        const at::Tensor& bt = bufs.empty() ? at::Tensor() : bufs[k.tensor];
        const scalar_t* buf = bt.defined() ? bt.const_data_ptr<scalar_t>() : nullptr;
        if (buf != nullptr && m != acc_t(0)) {
          for (int64_t i = k.begin; i < k.end; ++i) {
            const acc_t wi = static_cast<acc_t>(w[i]);
            const acc_t d = sc * static_cast<acc_t>(g[i]) + wd * wi + m * static_cast<acc_t>(buf[i]);
            w[i] = static_cast<scalar_t>(wi - e * d);
          }
        } else {
          for (int64_t i = k.begin; i < k.end; ++i) {
            const acc_t wi = static_cast<acc_t>(w[i]);
            w[i] = static_cast<scalar_t>(wi - e * (sc * static_cast<acc_t>(g[i]) + wd * wi));
          }
        }
      }
    });
  });
}

at::Tensor mt_sum_squares(const std::vector<at::Tensor>& xs) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  *o = 0.0;
  if (xs.empty()) return out;
  const auto chunks = chunks_of(xs);
  std::vector<double> partial(chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "mt_sum_squares", [&] {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain(chunks), [&](int64_t b, int64_t en) {
      for (int64_t c = b; c < en; ++c) {
        const Chunk& k = chunks[c];
        const scalar_t* x = xs[k.tensor].const_data_ptr<scalar_t>();
        constexpr int kLanes = 8;
        double lanes[kLanes] = {};
        int64_t i = k.begin;
        for (; i + kLanes <= k.end; i += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const double v = static_cast<double>(x[i + l]);
            lanes[l] += v * v;
          }
        }
        double s = 0;
        for (; i < k.end; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
        for (int l = 0; l < kLanes; ++l) s += lanes[l];
        partial[c] = s;
      }
    });
  });
  double total = 0;
  for (double p : partial) total += p;
  *o = total;
  return out;
}

at::Tensor mt_perturb_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& base,
                       const std::vector<at::Tensor>& v, const at::Tensor& sum_sq, double r, double sign) {
  const double norm = std::sqrt(scalar_of(sum_sq));
  const double R = r / std::max(norm, std::numeric_limits<double>::min());
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  out.mutable_data_ptr<double>()[0] = R;
  if (params.empty()) return out;
  const auto chunks = chunks_of(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "mt_perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = static_cast<acc_t>(sign * R);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain(chunks), [&](int64_t b, int64_t en) {
      for (int64_t c = b; c < en; ++c) {
        const Chunk& k = chunks[c];
        scalar_t* w = params[k.tensor].mutable_data_ptr<scalar_t>();
        const scalar_t* w0 = base[k.tensor].const_data_ptr<scalar_t>();
        const scalar_t* vv = v[k.tensor].const_data_ptr<scalar_t>();
        for (int64_t i = k.begin; i < k.end; ++i)
          w[i] = static_cast<scalar_t>(static_cast<acc_t>(w0[i]) + a * static_cast<acc_t>(vv[i]));
      }
    });
  });
  return out;
}

void mt_copy_(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  if (dst.empty()) return;
  const auto chunks = chunks_of(dst);
  const int64_t item = dst[0].element_size();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain(chunks), [&](int64_t b, int64_t en) {
    for (int64_t c = b; c < en; ++c) {
      const Chunk& k = chunks[c];
      char* d = static_cast<char*>(dst[k.tensor].data_ptr());
      const char* s = static_cast<const char*>(src[k.tensor].const_data_ptr());
      std::memcpy(d + k.begin * item, s + k.begin * item, static_cast<size_t>((k.end - k.begin) * item));
    }
  });
}

}  // namespace cpu
}  // namespace pynas

// ---- registration: torch.ops.pynas.mt_* (custom ops in C++; the CPU kernels above) ----------------------

#include "pynas/multi_tensor_checks.h"

#include <torch/library.h>

namespace {

// The CPU kernels above, as CheckedOps (multi_tensor_checks.h) expects them.
struct CpuKernels {
  static constexpr auto virtual_step_ = &pynas::cpu::mt_virtual_step_;
  static constexpr auto sum_squares = &pynas::cpu::mt_sum_squares;
  static constexpr auto perturb_ = &pynas::cpu::mt_perturb_;
  static constexpr auto copy_ = &pynas::cpu::mt_copy_;
};
using Ops = pynas::multi_tensor::CheckedOps<CpuKernels>;

}  // namespace

TORCH_LIBRARY_FRAGMENT(pynas, m) {
  m.def("mt_virtual_step_(Tensor(a!)[] params, Tensor[] grads, Tensor?[] bufs, float eta, float momentum, "
        "float weight_decay, Tensor? grad_scale=None) -> ()");
  m.def("mt_sum_squares(Tensor[] xs) -> Tensor");
  m.def("mt_perturb_(Tensor(a!)[] params, Tensor[] base, Tensor[] v, Tensor sum_sq, float r, float sign) -> Tensor");
  m.def("mt_copy_(Tensor(a!)[] dst, Tensor[] src) -> ()");
}

TORCH_LIBRARY_IMPL(pynas, CPU, m) {
  m.impl("mt_virtual_step_", &Ops::virtual_step_);
  m.impl("mt_sum_squares", &Ops::sum_squares);
  m.impl("mt_perturb_", &Ops::perturb_);
  m.impl("mt_copy_", &Ops::copy_);
}
