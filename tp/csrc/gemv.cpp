// Decode matmuls on the CPU: y = x W^T (* scale) (+ bias) for a few rows of x (tp/cpu_kernels.py builds
// it, tp/layers.py calls it through tp/cpu_kernels.py's choice of path).
//
//   x   float32 or bfloat16 [M, K], M small (1 in batch-1 decode, up to MAX_ROWS = 16)
//   W   float32, bfloat16, or int8 with one float32 scale per row  [N, K]
//   y   x's dtype [M, N]; products and sums in float32, rounded once at the end
//
// Batch-1 decode reads every weight once per token, so this is a memory-streaming problem: the time
// is the bytes of W over the bandwidth a core can pull. Why not torch's GEMV: on the hosts measured it
// reads 20-26 GB/s where a plain sum reads 33-56 (bench/decode.py prints both). What this does:
//   - 4 rows of W at a time: 4 independent streams, x loaded once for all four;
//   - a software prefetch one group of rows ahead (the hardware prefetcher alone falls behind with
//     many interleaved row streams; measured on Intel, kept where it does not hurt on AMD);
//   - bfloat16 and int8 widened to float32 in registers (a shift, or a sign-extend and convert):
//     the arithmetic is far below what the cores can do, the loads are the limit;
//   - all M rows of x against a group of W rows while it is in cache, a few rows of x at a time.
// The vector width is the build's (vec.h): AVX-512 (16 floats) or AVX2 + FMA (8 floats); tails in scalar code.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>

#include "vec.h"

#ifndef OPS_NAMESPACE
#error "build with -DOPS_NAMESPACE=<op namespace>"
#endif

namespace {

using namespace cpu_vec;

// Rows of W per step: independent streams and accumulator chains. int8 takes 8: its rows are a quarter
// of float32's bytes, and 4 chains of FMAs were its limit (measured: 28 -> 29+ GB/s on an AMD EPYC).
template <typename T> constexpr int64_t kRows = sizeof(T) == 1 ? 8 : 4;
#ifndef GEMV_AHEAD
#define GEMV_AHEAD 1  // prefetch distance in groups of rows; 0: no software prefetch
#endif

// acc[r][m] = sum_k x[m, k] * w[n + r, k] for R rows of W and MX rows of x.
template <typename T, int R, int MX>
void dot_rows(const float* x, const T* w, int64_t K, int64_t n, bool prefetch, float (*out)[MX]) {
  const int64_t vector_end = K - K % kWidth;
  const T* row = w + n * K;
  // One cache line per row of the next group, every 64 bytes of this group's rows.
  constexpr int64_t kLine = 64 / sizeof(T);
  vec acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = zero();
  for (int64_t k = 0; k < vector_end; k += kWidth) {
    if (GEMV_AHEAD > 0 && prefetch && k % kLine == 0)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(row + (r + GEMV_AHEAD * R) * K + k), _MM_HINT_T0);
    vec xv[MX];
    for (int m = 0; m < MX; ++m) xv[m] = load(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const vec wv = load(row + r * K + k);
      for (int m = 0; m < MX; ++m) acc[r][m] = fma(xv[m], wv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) {
      float s = sum(acc[r][m]);
      for (int64_t k = vector_end; k < K; ++k) s += x[m * K + k] * scalar(row[r * K + k]);
      out[r][m] = s;
    }
}

template <typename T, typename Out>
struct Gemv {
  const float* x;
  const T* w;
  const float* scale;  // nullptr: 1
  const Out* bias;     // nullptr: none
  Out* y;
  int64_t M, N, K;

  void store(int64_t m, int64_t n, float v) const {
    if (scale) v *= scale[n];
    if (bias) v += static_cast<float>(bias[n]);
    y[m * N + n] = static_cast<Out>(v);
  }

  // Rows [n, n + R) of W against every row of x, kXRows rows of x at a time: W's rows come from
  // memory once, then from cache.
  template <int R>
  void rows(int64_t n) const {
    const bool prefetch = n + (GEMV_AHEAD + 1) * R <= N;
    for (int64_t m = 0; m < M; m += kXRows) {
      const int64_t mx = std::min<int64_t>(kXRows, M - m);
      if (mx == kXRows) run<R, kXRows>(m, n, prefetch);
      else if (mx == 1) run<R, 1>(m, n, prefetch);
      else if (mx == 2) run<R, (kXRows > 2 ? 2 : 1)>(m, n, prefetch);  // reached only when kXRows > 2
      else run<R, (kXRows > 3 ? 3 : 1)>(m, n, prefetch);               // reached only when kXRows > 3
    }
  }

  template <int R, int MX>
  void run(int64_t m, int64_t n, bool prefetch) const {
    float out[R][MX];
    dot_rows<T, R, MX>(x + m * K, w, K, n, prefetch, out);
    for (int r = 0; r < R; ++r)
      for (int mm = 0; mm < MX; ++mm) store(m + mm, n + r, out[r][mm]);
  }

  void operator()() const {
    const int64_t groups = (N + kRows<T> - 1) / kRows<T>;
    const int64_t grain = std::max<int64_t>(1, (64 << 10) / (kRows<T> * std::max<int64_t>(1, K) * int64_t(sizeof(T))));  // >= 64 KiB a task
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t n = g * kRows<T>;
        if (n + kRows<T> <= N) {
          rows<kRows<T>>(n);
        } else {
          for (int64_t i = n; i < N; ++i) rows<1>(i);
        }
      }
    });
  }
};

template <typename T>
void dispatch_out(const at::Tensor& xf, const at::Tensor& w, const float* scale, const at::Tensor& bias,
                  at::Tensor& y) {
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  const float* xp = xf.data_ptr<float>();
  const T* wp = reinterpret_cast<const T*>(w.data_ptr());
  if (y.scalar_type() == at::kFloat) {
    Gemv<T, float>{xp, wp, scale, bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K}();
  } else {
    using B = c10::BFloat16;
    Gemv<T, B>{xp, wp, scale, bias.defined() ? bias.data_ptr<B>() : nullptr, y.data_ptr<B>(), M, N, K}();
  }
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w: contiguous [N, K] with x's K");
  const auto wt = w.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kChar, "w: float32, bfloat16 or int8");
  const int64_t M = x.size(0), N = w.size(0);
  const float* sp = nullptr;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 1 && scale->size(0) == N &&
                scale->is_contiguous(), "scale: float32 [N]");
    sp = scale->data_ptr<float>();
  }
  TORCH_CHECK(wt != at::kChar || sp != nullptr, "int8 weights need their per-row scale");
  at::Tensor b;
  if (bias.has_value()) {
    b = *bias;
    TORCH_CHECK(b.scalar_type() == x.scalar_type() && b.dim() == 1 && b.size(0) == N && b.is_contiguous(),
                "bias: [N] in x's dtype");
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  if (wt == at::kFloat) dispatch_out<float>(xf, w, sp, b, y);
  else if (wt == at::kBFloat16) dispatch_out<c10::BFloat16>(xf, w, sp, b, y);
  else dispatch_out<int8_t>(xf, w, sp, b, y);
  return y;
}

}  // namespace

TORCH_LIBRARY(OPS_NAMESPACE, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? scale=None, Tensor? bias=None) -> Tensor", gemv);
}
