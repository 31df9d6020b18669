// RMSNorm of rows on the CPU, one call instead of torch's seven (tp/model.py calls it through
// tp/cpu_kernels.py): for a decode row 30-35 us a call on an AMD EPYC with torch's path, mostly per-op
// set-up; rows are split over threads, so prefill's hundreds of rows take it too.
//
//   x       [M, D] float32 or bfloat16, contiguous;  weight [D], x's dtype
//   out     weight * to_dtype(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm: normalised in
//           float32, rounded to x's dtype, then scaled (the product rounded once more)
//
// add_rms_norm(x, residual, weight, eps) -> out: the residual stream's add and the next norm at once
//   residual [M, D] contiguous, x's dtype: becomes x + residual (rounded to the dtype, as torch's add);
//   out      rms_norm of that sum. One call where a decoder layer made two (and their reshapes).
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

// Row `row` of out = weight * to_dtype(row * rsqrt(mean(row^2) + eps)).
template <typename T>
void normalise_row(const T* row, const T* w, int64_t D, float eps, T* o) {
  const int64_t vector_end = D - D % kWidth;
  vec acc = zero();
  for (int64_t d = 0; d < vector_end; d += kWidth) {
    const vec v = load(row + d);
    acc = fma(v, v, acc);
  }
  float squares = sum(acc);
  for (int64_t d = vector_end; d < D; ++d) squares += scalar(row[d]) * scalar(row[d]);
  const float r = 1.0f / std::sqrt(squares / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(scalar(w[d]) * scalar(static_cast<T>(scalar(row[d]) * r)));
}

// residual: nullptr for a plain norm of x; else the rows of x are first added into it.
template <typename T>
void normalise(const T* x, T* residual, const T* w, int64_t M, int64_t D, double eps, T* out) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * D;
      if (residual) {
        T* r = residual + m * D;
        for (int64_t d = 0; d < D; ++d) r[d] = static_cast<T>(scalar(row[d]) + scalar(r[d]));
        row = r;
      }
      normalise_row(row, w, D, static_cast<float>(eps), out + m * D);
    }
  });
}

at::Tensor run(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [M, D]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
              weight.is_contiguous(), "weight: [D] in x's dtype");
  if (residual)
    TORCH_CHECK(residual->device().is_cpu() && residual->sizes() == x.sizes() && residual->is_contiguous() &&
                residual->scalar_type() == x.scalar_type(), "residual: contiguous, x's shape and dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat)
    normalise(x.data_ptr<float>(), residual ? residual->data_ptr<float>() : nullptr, weight.data_ptr<float>(),
              x.size(0), x.size(1), eps, out.data_ptr<float>());
  else
    normalise(x.data_ptr<c10::BFloat16>(), residual ? residual->data_ptr<c10::BFloat16>() : nullptr,
              weight.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), eps, out.data_ptr<c10::BFloat16>());
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) { return run(x, nullptr, weight, eps); }

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight, double eps) {
  return run(x, &residual, weight, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(OPS_NAMESPACE, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor", add_rms_norm);
}
