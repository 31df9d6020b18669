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
//   - 4 rows of W at a time, x loaded once for all four, each from its own long sequential stream
//     (a thread's rows cut in 4 parts, see Gemv::operator()). Measured on an AMD EPYC, 2 threads,
//     400 MB of bfloat16 rows of 2048: 4 adjacent rows per step read 47 GB/s (44 with a software
//     prefetch one group ahead, the previous design), 4 parts 60-65 GB/s, where a plain float32
//     sum reads 48; int8 33-36 -> 47 GB/s, float32 52 -> 67;
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
#include <vector>

#include "vec.h"

#ifndef OPS_NAMESPACE
#error "build with -DOPS_NAMESPACE=<op namespace>"
#endif

namespace {

using namespace cpu_vec;

// Rows of W per step: independent streams and accumulator chains.
constexpr int kRows = 4;

// acc[r][m] = sum_k x[m, k] * w[n + r * stride, k] for R rows of W and MX rows of x.
template <typename T, int R, int MX>
void dot_rows(const float* x, const T* w, int64_t K, int64_t n, int64_t stride, float (*out)[MX]) {
  const int64_t vector_end = K - K % kWidth;
  const T* row[R];
  for (int r = 0; r < R; ++r) row[r] = w + (n + r * stride) * K;
  vec acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = zero();
  for (int64_t k = 0; k < vector_end; k += kWidth) {
    vec xv[MX];
    for (int m = 0; m < MX; ++m) xv[m] = load(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const vec wv = load(row[r] + k);
      for (int m = 0; m < MX; ++m) acc[r][m] = fma(xv[m], wv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) {
      float s = sum(acc[r][m]);
      for (int64_t k = vector_end; k < K; ++k) s += x[m * K + k] * scalar(row[r][k]);
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

  // Rows n, n + stride, ... (R of them) of W against every row of x, kXRows rows of x at a time: W's
  // rows come from memory once, then from cache.
  template <int R>
  void rows(int64_t n, int64_t stride) const {
    for (int64_t m = 0; m < M; m += kXRows) {
      const int64_t mx = std::min<int64_t>(kXRows, M - m);
      if (mx == kXRows) run<R, kXRows>(m, n, stride);
      else if (mx == 1) run<R, 1>(m, n, stride);
      else if (mx == 2) run<R, (kXRows > 2 ? 2 : 1)>(m, n, stride);  // reached only when kXRows > 2
      else run<R, (kXRows > 3 ? 3 : 1)>(m, n, stride);               // reached only when kXRows > 3
    }
  }

  template <int R, int MX>
  void run(int64_t m, int64_t n, int64_t stride) const {
    float out[R][MX];
    dot_rows<T, R, MX>(x + m * K, w, K, n, stride, out);
    for (int r = 0; r < R; ++r)
      for (int mm = 0; mm < MX; ++mm) store(m + mm, n + r * stride, out[r][mm]);
  }

  // Each thread takes one contiguous block of rows and cuts it into kRows equal parts, one stream
  // each: step i reads row i of every part. So every stream walks on through consecutive rows, one
  // long sequential read the hardware prefetchers follow, instead of kRows adjacent rows per step
  // (a new short stream per row: 4 KiB for a bfloat16 row of 2048).
  void operator()() const {
    const int64_t row_bytes = std::max<int64_t>(1, K) * int64_t(sizeof(T));
    const int64_t grain = std::max<int64_t>(kRows, (256 << 10) / row_bytes);  // >= 256 KiB a thread
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      const int64_t part = (end - begin) / kRows;
      for (int64_t i = 0; i < part; ++i) rows<kRows>(begin + i, part);
      for (int64_t n = begin + kRows * part; n < end; ++n) rows<1>(n, 0);
    });
  }
};

template <typename T>
void dispatch_out(const float* xp, int64_t M, int64_t K, const at::Tensor& w, const float* scale,
                  const at::Tensor& bias, at::Tensor& y) {
  const int64_t N = w.size(0);
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
  // bfloat16 activations widened once, into a buffer of this call's own: an ATen conversion costs
  // a few us of dispatch, 33 times a decode step.
  const int64_t K = x.size(1);
  std::vector<float> widened;
  const float* xp = nullptr;
  if (x.scalar_type() == at::kFloat) {
    xp = x.data_ptr<float>();
  } else {
    widened.resize(M * K);
    const c10::BFloat16* source = x.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * K; ++i) widened[i] = static_cast<float>(source[i]);
    xp = widened.data();
  }
  if (wt == at::kFloat) dispatch_out<float>(xp, M, K, w, sp, b, y);
  else if (wt == at::kBFloat16) dispatch_out<c10::BFloat16>(xp, M, K, w, sp, b, y);
  else dispatch_out<int8_t>(xp, M, K, w, sp, b, y);
  return y;
}

}  // namespace

TORCH_LIBRARY(OPS_NAMESPACE, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? scale=None, Tensor? bias=None) -> Tensor", gemv);
}
