#pragma once
// Input checks shared by every op binding. Each message names the op, the argument and what it got,
// in one wording, "op: name: expected ..., got ...", e.g. "mixed_sum_forward: weights: expected 1-D with 3
// elements (one per tensor in xs), got shape [3, 1]". TORCH_CHECK raises RuntimeError in Python.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace pynas {
namespace checks {

// The dtype as Python spells it, so messages read like the user's code.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return c10::toString(t);
  }
}

// "shape [2, 3], dtype torch.float32, device cpu"
inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::ostringstream s;
  s << "shape " << t.sizes() << ", dtype " << dtype_name(t.scalar_type()) << ", device " << t.device();
  if (t.layout() != at::kStrided) s << ", layout " << t.layout();
  return s.str();
}

inline void check_dense(const char* op, const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(t.defined(), op, ": ", name, ": expected a defined tensor, got an undefined one");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, ": expected a dense (strided) tensor, got ",
              describe(t));
}

// float16, bfloat16, float32, float64: the dtypes every backend of every op supports.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_supported_float(const char* op, const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              ": expected dtype torch.float16, torch.bfloat16, torch.float32 or torch.float64, got ",
              describe(t));
}

// `t` has the same shape, dtype and device as `ref` (for lists of inputs and for incoming gradients).
inline void check_like(const char* op, const at::Tensor& t, const std::string& name, const at::Tensor& ref,
                       const std::string& ref_name) {
  check_dense(op, t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, ": expected the shape of ", ref_name, " ",
              ref.sizes(), ", got ", describe(t));
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, ": expected the dtype of ", ref_name,
              " ", dtype_name(ref.scalar_type()), ", got ", describe(t));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, ": expected the device of ", ref_name, " ",
              ref.device(), ", got ", describe(t));
}

// A non-empty list of dense floating tensors that share shape, dtype and device.
inline void check_tensor_list(const char* op, const std::vector<at::Tensor>& xs, const std::string& name) {
  TORCH_CHECK(!xs.empty(), op, ": ", name, ": expected at least one tensor, got an empty list");
  const std::string first = name + "[0]";
  check_dense(op, xs[0], first);
  check_supported_float(op, xs[0], first);
  for (size_t k = 1; k < xs.size(); ++k) {
    check_like(op, xs[k], name + "[" + std::to_string(k) + "]", xs[0], first);
  }
}

// A 1-D tensor of any floating dtype, of length `len`, on `ref`'s device.
inline void check_vector(const char* op, const at::Tensor& t, const std::string& name, int64_t len,
                         const char* len_reason, const at::Tensor& ref, const std::string& ref_name) {
  check_dense(op, t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, op, ": ", name, ": expected 1-D with ", len, " elements (",
              len_reason, "), got ", describe(t));
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, ": expected a floating dtype, got ", describe(t));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, ": expected the device of ", ref_name, " ",
              ref.device(), ", got ", describe(t));
}

}  // namespace checks
}  // namespace pynas
