// SwiGLU's elementwise half for decode rows, silu(gate) * up, in one CPU kernel call instead of three
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

#include <cmath>

#ifndef OPS_NAMESPACE
#error "build with -DOPS_NAMESPACE=<op namespace>"
#endif

namespace {

template <typename T>
void swiglu_rows(const T* gate_up, int64_t M, int64_t I, T* out) {
  at::parallel_for(0, M * I, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / I, j = i % I;
      const float g = static_cast<float>(gate_up[m * 2 * I + j]);
      const float silu = static_cast<float>(static_cast<T>(g / (1.0f + std::exp(-g))));
      out[i] = static_cast<T>(silu * static_cast<float>(gate_up[m * 2 * I + I + j]));
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
