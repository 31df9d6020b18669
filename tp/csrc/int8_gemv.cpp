// Weight-only int8 GEMV for decode and short prefills on AVX-512 CPUs (tp/cpu_kernels.py builds it).
//
//   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]      x float32 [M, K], q int8 [N, K], scale float32 [N]
//
// Meant for few rows of x (tp/quant.py sends it up to MAX_ROWS = 16): each weight row is read from
// memory once, and the arithmetic grows with M; past ~17 rows a dequantized GEMM is faster here.
//
// Why not torch._weight_int8pack_mm: when the weights stream from memory (a decode step reads each
// matrix once, so nothing stays in cache) that kernel reaches ~15 G weights/s on 2 cores, the speed
// of a bfloat16 GEMV, because the hardware prefetcher does not keep up with its row streams. This one
// walks 4 rows at a time and prefetches the next 4 rows by hand: ~22 G weights/s on 2 cores (a probe
// over InternLM's matrix shapes; bench/decode.py shows the whole decode step).
// Products are formed and summed in float32, as a float GEMV would; only the weights are int8.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kRows = 4;  // rows of q per step: 4 independent streams, x loaded once for all

// 16 int8 weights (the first `mask` of them) as 16 floats.
inline __m512 load_weights(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// Rows [n, n + R) of q against the M rows of x.
template <int R, int M>
void dot_rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t N, int64_t K,
              int64_t n) {
  const bool ahead_in_q = n + 2 * R <= N;  // the rows to prefetch exist
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const int8_t* row = q + n * K;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    if (ahead_in_q && (k & 63) == 0)  // one cache line per row every 4 steps, one group of rows ahead
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(row + r * K + k + R * K), _MM_HINT_T0);
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 w = load_weights(row + r * K + k, mask);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(xv[m], w, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) * scale[n + r];
}

// Rows [n, n + R) of q against all M rows of x, 4 rows of x at a time: the R weight rows come from
// memory once and from cache for every further 4 rows of x.
template <int R>
void dot_rows_all(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N,
                  int64_t K, int64_t n) {
  for (int64_t m = 0; m < M; m += 4) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: dot_rows<R, 1>(xm, q, scale, ym, N, K, n); break;
      case 2: dot_rows<R, 2>(xm, q, scale, ym, N, K, n); break;
      case 3: dot_rows<R, 3>(xm, q, scale, ym, N, K, n); break;
      default: dot_rows<R, 4>(xm, q, scale, ym, N, K, n); break;
    }
  }
}

void gemv(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t groups = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (kRows * K));  // >= 64 KiB of weights a thread
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = g * kRows;
      if (n + kRows <= N) {
        dot_rows_all<kRows>(x, q, scale, y, M, N, K, n);
      } else {
        for (int64_t i = n; i < N; ++i) dot_rows_all<1>(x, q, scale, y, M, N, K, i);
      }
    }
  });
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(), "int8_gemv runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q: contiguous int8 [N, K]");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale: float32 [N]");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && scale.size(0) == N, "shapes: x [M, K], q [N, K], scale [N]");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0 || K == 0) return y.zero_();
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  gemv(xp, qp, sp, yp, M, N, K);
  return y;
}

}  // namespace

TORCH_LIBRARY(internlm_tp, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scale) -> Tensor", int8_gemv);
}
