// RMSNorm of a few rows on the CPU (decode), one call instead of torch's seven (tp/model.py calls it
// through tp/cpu_kernels.py): 30-35 us a call on an AMD EPYC with torch's path, mostly per-op set-up.
//
//   x       [M, D] float32 or bfloat16, contiguous;  weight [D], x's dtype
//   out     weight * to_dtype(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm: normalised in
//           float32, rounded to x's dtype, then scaled (the product rounded once more)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>

#include "vec.h"

#ifndef OPS_NAMESPACE
#error "build with -DOPS_NAMESPACE=<op namespace>"
#endif

namespace {

using namespace cpu_vec;

template <typename T>
void normalise(const T* x, const T* w, int64_t M, int64_t D, double eps, T* out) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * D;
      const int64_t vector_end = D - D % kWidth;
      vec acc = zero();
      for (int64_t d = 0; d < vector_end; d += kWidth) {
        const vec v = load(row + d);
        acc = fma(v, v, acc);
      }
      float squares = sum(acc);
      for (int64_t d = vector_end; d < D; ++d) squares += scalar(row[d]) * scalar(row[d]);
      const float r = 1.0f / std::sqrt(squares / static_cast<float>(D) + static_cast<float>(eps));
      T* o = out + m * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(scalar(w[d]) * scalar(static_cast<T>(scalar(row[d]) * r)));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [M, D]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
              weight.is_contiguous(), "weight: [D] in x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat)
    normalise(x.data_ptr<float>(), weight.data_ptr<float>(), x.size(0), x.size(1), eps, out.data_ptr<float>());
  else
    normalise(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), eps,
              out.data_ptr<c10::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(OPS_NAMESPACE, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
}
