// Rotary position embedding (rotate-half layout) in one CPU kernel call instead of torch's six
// (slice, slice, neg, cat, mul, mul, add: ~20 us per q or k at decode on an AMD EPYC; tp/model.py
// calls it through tp/cpu_kernels.py).
//
// rope(x, cos, sin) -> out
//   x         [B, H, T, D] float32 or bfloat16, any strides but the last dimension's (q or k as
//             split from the fused qkv projection)
//   cos, sin  [B, 1, T, D] contiguous, x's dtype
//   out       [B, H, T, D] contiguous: x * cos + rotate_half(x) * sin, each product and the sum
//             rounded to x's dtype as torch's elementwise ops do (built with -ffp-contract=off)
//
// rope_into_cache(qkv, cos, sin, k_cache, v_cache, slots, heads) -> q   (decode: one token a sequence)
//   qkv       [B, (heads + 2 KVH) D] contiguous: the fused projection's output, q then k then v heads
//   cos, sin  [B, 1, 1, D] contiguous, qkv's dtype
//   k_cache, v_cache  [B, KVH, S, D] contiguous, qkv's dtype: slot slots[b] of row b gets k with
//             the rotary embedding (as rope) and v as it is
//   slots     [B] int64: each row's own slot (rows need not be at the same point of their sequence)
//   q         [B, heads, 1, D] contiguous, with the rotary embedding
// The same values as rope on q and k and two cache copies; one call instead of ~12 per layer and
// step (view, transpose, split, two ropes, slices, two copies), whose dispatch was most of it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#ifndef OPS_NAMESPACE
#error "build with -DOPS_NAMESPACE=<op namespace>"
#endif

namespace {

template <typename T>
T rounded(float v) { return static_cast<T>(v); }

// o[0, D) = x * c + rotate_half(x) * s, with torch's roundings.
template <typename T>
void rotate_row(const T* xr, const T* c, const T* s, T* o, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float rotated = d < half ? -static_cast<float>(xr[d + half]) : static_cast<float>(xr[d - half]);
    const float a = static_cast<float>(rounded<T>(static_cast<float>(xr[d]) * static_cast<float>(c[d])));
    const float r = static_cast<float>(rounded<T>(rotated * static_cast<float>(s[d])));
    o[d] = rounded<T>(a + r);
  }
}

template <typename T>
void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t H = x.size(1), T_ = x.size(2), D = x.size(3);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, x.size(0) * H * T_, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (H * T_), h = row / T_ % H, t = row % T_;
      const T* xr = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
      rotate_row(xr, cp + (b * T_ + t) * D, sp + (b * T_ + t) * D, op + row * D, D);
    }
  });
}

// Rows (b, head) of qkv for head < heads + KVH: q heads into q, k heads into the key cache; then the
// v heads copied. A decode step's few thousand elements stay on the calling thread (the grain) where
// waking another would cost more than it saves.
template <typename T>
void rotate_into_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                       at::Tensor& v_cache, const int64_t* slot, int64_t heads, at::Tensor& q) {
  const int64_t B = qkv.size(0), KVH = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  const int64_t rotated = heads + KVH, per_row = (heads + 2 * KVH) * D;
  const T* xp = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  T* kp = k_cache.data_ptr<T>();
  T* vp = v_cache.data_ptr<T>();
  at::parallel_for(0, B * rotated, std::max<int64_t>(1, (16 << 10) / D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rotated, h = row % rotated;
      T* o = h < heads ? qp + (b * heads + h) * D : kp + ((b * KVH + h - heads) * S + slot[b]) * D;
      rotate_row(xp + b * per_row + h * D, cp + b * D, sp + b * D, o, D);
    }
  });
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KVH; ++h)
      std::memcpy(vp + ((b * KVH + h) * S + slot[b]) * D, xp + b * per_row + (heads + KVH + h) * D, D * sizeof(T));
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

at::Tensor rope_into_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                           at::Tensor v_cache, const at::Tensor& slots, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "rope_into_cache runs on the CPU");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, "qkv: float32 or bfloat16");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
              v_cache.is_contiguous() && k_cache.scalar_type() == qkv.scalar_type() &&
              v_cache.scalar_type() == qkv.scalar_type(), "k_cache, v_cache: contiguous [B, KVH, S, D] in qkv's dtype");
  const int64_t B = k_cache.size(0), KVH = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(D % 2 == 0, "D even");
  TORCH_CHECK(heads > 0 && qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(0) == B &&
              qkv.size(1) == (heads + 2 * KVH) * D, "qkv: contiguous [B, (heads + 2 KVH) D]");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type() && t->is_contiguous() && t->dim() == 4 && t->size(0) == B &&
                t->size(1) == 1 && t->size(2) == 1 && t->size(3) == D, "cos, sin: contiguous [B, 1, 1, D] in qkv's dtype");
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == B &&
              slots.is_contiguous(), "slots: contiguous int64 [B]");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(0 <= slot[b] && slot[b] < S, "slot ", slot[b], " outside the cache's ", S);
  at::Tensor q = at::empty({B, heads, 1, D}, qkv.options());
  if (qkv.scalar_type() == at::kFloat) rotate_into_cache<float>(qkv, cos, sin, k_cache, v_cache, slot, heads, q);
  else rotate_into_cache<c10::BFloat16>(qkv, cos, sin, k_cache, v_cache, slot, heads, q);
  return q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(OPS_NAMESPACE, m) {
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", rope);
  m.def("rope_into_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
        "int heads) -> Tensor", rope_into_cache);
}
