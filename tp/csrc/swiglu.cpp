// SwiGLU's elementwise half, silu(gate) * up, for decode and prefill rows, in one CPU kernel call instead of three
// (chunk, silu, mul: ~14 us at intermediate 5504 on an AMD EPYC; tp/model.py calls it through
// tp/cpu_kernels.py).
//
//   gate_up  [M, 2I] float32 or bfloat16, contiguous: gate in columns [0, I), up in [I, 2I)
//   out      [M, I]: silu(gate) rounded to the dtype, times up, rounded again (torch's two ops)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef OPS_NAMESPACE
#error "build with -DOPS_NAMESPACE=<op namespace>"
#endif

namespace {

// e^x for silu: Cephes' polynomial (within 2 float32 ulps of e^x over the range) written without
// branches, so the compiler vectorizes the loop that calls it; std::exp is a scalar library call
// (a std::exp per element made this kernel slower than torch's three vectorized ops). Below
// -87.3 it returns 0 instead of a subnormal e^x: 1 + e^-g is 1 there either way.
inline float exp_for_silu(float x) {
  const float clamped = std::min(std::max(x, -87.3f), 88.72f);  // 88.72: e^x is the largest float
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln 2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // 2^n as 2^(n-1) * 2: n reaches 128 at the top of the range, past a float's largest exponent
  const int32_t bits = (static_cast<int32_t>(n) + 126) << 23;
  float half_scale;
  std::memcpy(&half_scale, &bits, sizeof half_scale);
  const float e = y * half_scale * 2.0f;
  return x > 88.72f ? INFINITY : (x == x ? e : x);  // overflow to inf; NaN stays NaN
}

template <typename T>
void swiglu_rows(const T* gate_up, int64_t M, int64_t I, T* out) {
  // Rows split over threads only when there are many: a decode row is a few us on one core.
  at::parallel_for(0, M, std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, I)), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* gate = gate_up + m * 2 * I;
      const T* up = gate + I;
      T* o = out + m * I;
      for (int64_t j = 0; j < I; ++j) {
        const float g = static_cast<float>(gate[j]);
        const float silu = static_cast<float>(static_cast<T>(g / (1.0f + exp_for_silu(-g))));
        o[j] = static_cast<T>(silu * static_cast<float>(up[j]));
      }
    }
  });
}

at::Tensor swiglu(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "swiglu runs on the CPU");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up: contiguous [M, 2I]");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "gate_up: float32 or bfloat16");
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({M, I}, gate_up.options());
  if (out.numel() == 0) return out;
  if (gate_up.scalar_type() == at::kFloat) swiglu_rows(gate_up.data_ptr<float>(), M, I, out.data_ptr<float>());
  else swiglu_rows(gate_up.data_ptr<c10::BFloat16>(), M, I, out.data_ptr<c10::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(OPS_NAMESPACE, m) {
  m.def("swiglu(Tensor gate_up) -> Tensor", swiglu);
}
