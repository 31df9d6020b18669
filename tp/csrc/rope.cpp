// Rotary position embedding (rotate-half layout) in one CPU kernel call instead of torch's six
// (slice, slice, neg, cat, mul, mul, add: ~20 us per q or k at decode on an AMD EPYC; tp/model.py
// calls it through tp/cpu_kernels.py).
//
//   x         [B, H, T, D] float32 or bfloat16, any strides but the last dimension's (q or k as
//             split from the fused qkv projection)
//   cos, sin  [B, 1, T, D] contiguous, x's dtype
//   out       [B, H, T, D] contiguous: x * cos + rotate_half(x) * sin, each product and the sum
//             rounded to x's dtype as torch's elementwise ops do (built with -ffp-contract=off)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#ifndef OPS_NAMESPACE
#error "build with -DOPS_NAMESPACE=<op namespace>"
#endif

namespace {

template <typename T>
T rounded(float v) { return static_cast<T>(v); }

template <typename T>
void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t H = x.size(1), T_ = x.size(2), D = x.size(3), half = D / 2;
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, x.size(0) * H * T_, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (H * T_), h = row / T_ % H, t = row % T_;
      const T* xr = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
      const T* c = cp + (b * T_ + t) * D;
      const T* s = sp + (b * T_ + t) * D;
      T* o = op + row * D;
      for (int64_t d = 0; d < D; ++d) {
        const float rotated = d < half ? -static_cast<float>(xr[d + half]) : static_cast<float>(xr[d - half]);
        const float a = static_cast<float>(rounded<T>(static_cast<float>(xr[d]) * static_cast<float>(c[d])));
        const float r = static_cast<float>(rounded<T>(rotated * static_cast<float>(s[d])));
        o[d] = rounded<T>(a + r);
      }
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "rope runs on the CPU");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "x: [B, H, T, D], D even, last dim contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous() && t->dim() == 4 && t->size(0) == x.size(0) &&
                t->size(1) == 1 && t->size(2) == x.size(2) && t->size(3) == x.size(3),
                "cos, sin: contiguous [B, 1, T, D] in x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat) rotate<float>(x, cos, sin, out);
  else rotate<c10::BFloat16>(x, cos, sin, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(OPS_NAMESPACE, m) {
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", rope);
}
