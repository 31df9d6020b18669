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
//   - bfloat16 widened to float32 in registers (a shift): the loads are the limit, not the arithmetic;
//   - int8 against float32 activations widened too (a sign-extend and a convert: on AVX2 that is
//     compute-bound near 23 GB/s a core); against bfloat16 activations, which carry 8 significant
//     bits, x goes to int16 blocks and the products sum in integers (BlockedX below), ~1.9x faster;
//   - all M rows of x against a group of W rows while it is in cache, a few rows of x at a time;
//   - bfloat16 x bfloat16 from 2 rows on, where the CPU has AVX512_BF16: its dot product instruction
//     (dot_rows_bf16), twice the multiply-adds of an FMA, for batched decode, which is compute-bound.
// The vector width is the build's (vec.h): AVX-512 (16 floats) or AVX2 + FMA (8 floats); tails in scalar code.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
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

// bfloat16 activations against int8 weights: x = q * 2^(e - 15) per block of kBlock elements, e the
// exponent with max|x| < 2^e, q int16. The int8 x int16 products then sum in integers (vpmaddwd), 32
// weights in 7 instructions (AVX2) where widening each to float32 takes 12: on an AMD EPYC (AVX2)
// a core multiplies int8 rows at 44 GB/s instead of 23 from cache, past what memory delivers.
// A bfloat16 value carries 8 significant bits, so every element within 2^7 of its block's largest
// converts exactly; a smaller one rounds to the nearest 2^(e - 15), at most 2^-16 of the block's
// largest (tests/test_cpu_kernels.py bounds it). Float32 activations keep the exact float path.
struct BlockedX {
  std::vector<int16_t> q;    // [M, blocks * kBlock]
  std::vector<float> scale;  // [M, blocks]
  int64_t blocks = 0;
};

float power_of_two(int e) {  // 2^e for a normal float32's exponent range
  const int32_t bits = (e + 127) << 23;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// x's rows as int16 blocks of `width` elements (a multiple of kBlock), a power-of-two scale each.
BlockedX block_quantize(const float* x, int64_t M, int64_t K, int64_t width = kBlock) {
  BlockedX b;
  b.blocks = K / width;
  b.q.resize(M * b.blocks * width);
  b.scale.resize(M * b.blocks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < b.blocks; ++i) {
      const float* p = x + m * K + i * width;
      int16_t* q = b.q.data() + (m * b.blocks + i) * width;
      int32_t amax = 0;  // float32 bits of max|x|
      for (int64_t j = 0; j < width; j += kBlock) amax = std::max(amax, max_abs_bits(p + j));
      if (amax >= 0x7f800000) {  // an inf or a NaN in x: NaN out (a float product gives inf or NaN)
        std::fill(q, q + width, int16_t(0));
        b.scale[m * b.blocks + i] = NAN;
        continue;
      }
      // max|x| < 2^e for e = its biased exponent - 126; clamped so that both scales stay normal
      // floats (elements under 2^-115 round to 0).
      const int e = std::clamp((amax >> 23) - 126, -100, 128);
      b.scale[m * b.blocks + i] = power_of_two(e - 15);
      for (int64_t j = 0; j < width; j += kBlock) round_block(p + j, power_of_two(15 - e), q + j);
    }
  return b;
}

// acc[r][m] as dot_rows, for int8 rows of W against x's int16 blocks (rows m0.. of x); K's tail past
// the last whole block in float32 from x itself.
template <int R, int MX>
void dot_rows_blocked(const BlockedX& bx, const float* x, int64_t m0, const int8_t* w, int64_t K, int64_t n,
                      int64_t stride, float (*out)[MX]) {
  const int64_t blocked_end = bx.blocks * kBlock;
  const int8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = w + (n + r * stride) * K;
  vec acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = zero();
  for (int64_t i = 0; i < bx.blocks; ++i) {
    i16_block xb[MX];
    vec xs[MX];
    for (int m = 0; m < MX; ++m) {
      xb[m] = load_block(bx.q.data() + ((m0 + m) * bx.blocks + i) * kBlock);
      xs[m] = broadcast(bx.scale[(m0 + m) * bx.blocks + i]);
    }
    for (int r = 0; r < R; ++r) {
      const i16_block wb = widen_block(row[r] + i * kBlock);
      for (int m = 0; m < MX; ++m) acc[r][m] = fma(dot_block(xb[m], wb), xs[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) {
      float s = sum(acc[r][m]);
      for (int64_t k = blocked_end; k < K; ++k) s += x[(m0 + m) * K + k] * scalar(row[r][k]);
      out[r][m] = s;
    }
}

#if defined(__AVX512F__)
// bfloat16 activations against bfloat16 weights where the CPU has AVX512_BF16 (chosen at run time,
// host_has_bf16_dot): vdpbf16ps multiplies 32 bfloat16 pairs into 16 float32 lanes in one
// instruction, where widening W and a float FMA take three for 16. Several rows of x (a batch's decode)
// make the step compute-bound, so this is what matters there. Measured on an AMD EPYC (2 threads,
// 11008x2048): 16 rows 2.97 ms against 4.45 widening (1.5x), 8 rows 1.2x, 2 rows 1.1x, 1 row 0.9-1.0x
// (so one row stays on the widening path); 6 or 8 rows of x per pass, or K in L1-sized chunks, were no
// faster. The products are exact in float32 as on the float
// path; the sums run in another order, and inputs and results under 2^-126 count as 0 (the
// instruction's DAZ/FTZ), as bfloat16 GEMMs on such CPUs (oneDNN) compute them.
#define BF16_DOT __attribute__((target("avx512bf16")))
constexpr int kPairs = 32;  // bfloat16 elements a vdpbf16ps takes from each operand

template <int R, int MX>
BF16_DOT void dot_rows_bf16(const c10::BFloat16* x, const c10::BFloat16* w, int64_t K, int64_t n, int64_t stride,
                            float (*out)[MX]) {
  const int64_t vector_end = K - K % kPairs;
  const c10::BFloat16* row[R];
  for (int r = 0; r < R; ++r) row[r] = w + (n + r * stride) * K;
  __m512 acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < vector_end; k += kPairs) {
    __m512bh xv[MX];
    for (int m = 0; m < MX; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(row[r] + k);
      for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv[m], wv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t k = vector_end; k < K; ++k) s += scalar(x[m * K + k]) * scalar(row[r][k]);
      out[r][m] = s;
    }
}

bool host_has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#else
bool host_has_bf16_dot() { return false; }
#endif

// Rows of x per pass on the blocked path: AVX2's 16 registers hold 4 rows' accumulators, one row's
// two-register x block and scale, and a widened W block; AVX-512's 32 hold kXRows rows.
constexpr int kBlockedXRows = kWidth == 8 ? 1 : kXRows;

template <typename T, typename Out>
struct Gemv {
  const float* x;
  const BlockedX* blocked;  // int8 W with bfloat16 x: x's int16 blocks; nullptr: float32 products
  const c10::BFloat16* x16;  // bfloat16 W and x where the CPU has AVX512_BF16: x itself; else nullptr
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
    if (blocked) rows_by<R, kBlockedXRows>(n, stride);
    else rows_by<R, kXRows>(n, stride);  // 4 on the dot path too: 6 and 8 measured no faster
  }

  template <int R, int XR>
  void rows_by(int64_t n, int64_t stride) const {
    for (int64_t m = 0; m < M; m += XR) run_up_to<R, XR>(std::min<int64_t>(XR, M - m), m, n, stride);
  }

  // run<R, mx> for a count known only at run time, mx <= MX
  template <int R, int MX>
  void run_up_to(int64_t mx, int64_t m, int64_t n, int64_t stride) const {
    if (mx == MX) run<R, MX>(m, n, stride);
    else if constexpr (MX > 1) run_up_to<R, MX - 1>(mx, m, n, stride);
  }

  template <int R, int MX>
  void run(int64_t m, int64_t n, int64_t stride) const {
    float out[R][MX];
    if constexpr (std::is_same_v<T, int8_t>) {
      if (blocked) dot_rows_blocked<R, MX>(*blocked, x, m, w, K, n, stride, out);
      else dot_rows<T, R, MX>(x + m * K, w, K, n, stride, out);
    } else if constexpr (std::is_same_v<T, c10::BFloat16> && kWidth == 16) {
      if (x16) dot_rows_bf16<R, MX>(x16 + m * K, w, K, n, stride, out);
      else dot_rows<T, R, MX>(x + m * K, w, K, n, stride, out);
    } else {
      dot_rows<T, R, MX>(x + m * K, w, K, n, stride, out);
    }
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
void dispatch_out(const float* xp, const BlockedX* blocked, const c10::BFloat16* x16, int64_t M, int64_t K, const at::Tensor& w,
                  const float* scale, const at::Tensor& bias, at::Tensor& y) {
  const int64_t N = w.size(0);
  const T* wp = reinterpret_cast<const T*>(w.data_ptr());
  if (y.scalar_type() == at::kFloat) {
    Gemv<T, float>{xp, blocked, x16, wp, scale, bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K}();
  } else {
    using B = c10::BFloat16;
    Gemv<T, B>{xp, blocked, x16, wp, scale, bias.defined() ? bias.data_ptr<B>() : nullptr, y.data_ptr<B>(), M, N, K}();
  }
}

// bias, where given: [N] in x's dtype; an undefined tensor otherwise.
at::Tensor checked_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias.has_value()) return {};
  TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
              "bias: [N] in x's dtype");
  return *bias;
}

// bfloat16 activations widened once, into a buffer of the call's own: an ATen conversion costs a few
// us of dispatch, 33 times a decode step.
const float* widen(const at::Tensor& x, std::vector<float>& buffer) {
  buffer.resize(x.numel());
  const c10::BFloat16* source = x.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < x.numel(); ++i) buffer[i] = static_cast<float>(source[i]);
  return buffer.data();
}

// ---- int4 (tp/int4.py): w = q * scale[g] + offset[g] per group g of input channels, offset = -zero * scale --
// y[m, n] = sum_g scale[n, g] * (sum_{k in g} q[n, k] x[m, k]) + sum_g offset[n, g] * xsum[m, g], with
// xsum the activations' sum over each group, once per call (llama.cpp's Q4_1 folds its minimum so):
// the inner loop is the nibbles' products only. Groups are whole blocks of 32 channels (16 bytes).
constexpr int kInt4XRows = kWidth == 8 ? 1 : 2;  // rows of x per pass: AVX2's 16 registers hold one

// A weight's float16 scales and integer zeros [N, groups], as stored (3 bytes a group: float32 copies
// of both would add an eighth to what a step reads); w = q * scale + offset, offset = -zero * scale,
// exact in float32. Each of the three is read through its own row stride: on the CPU they are views
// into one buffer whose rows hold a row's scales and zeros ahead of its packed bytes (tp/int4.py's
// fused_rows), so that the R rows a kernel walks are R monotonic streams, not 3R.
struct GroupTerms {
  const c10::Half* s;
  const uint8_t* z;
  int64_t groups;
  int64_t s_row, z_row, w_row;  // row strides of scale, zero (elements) and the packed weight (bytes)
  // F16C's conversion (every AVX2 CPU has it): c10::Half's own is a dozen scalar instructions with
  // branches, once per group per row, which on AVX2 cost as much as the group's products.
  float scale(int64_t n, int64_t g) const { return _cvtsh_ss(s[n * s_row + g].x); }
  float offset(int64_t n, int64_t g) const { return -static_cast<float>(z[n * z_row + g]) * scale(n, g); }
};

// out[r][m] = the lanes of acc[r][m] summed, plus the zero terms: sum_g offset[n_r, g] * xsum[m, g],
// kWidth groups a step (a scalar loop here cost a third of the kernel's time on AVX2).
template <int R, int MX>
void int4_finish(vec (*acc)[MX], const GroupTerms& terms, const float* xsum, int64_t groups, int64_t n, int64_t stride,
                 float (*out)[MX]) {
  for (int r = 0; r < R; ++r) {
    const int64_t row = n + r * stride;
    const c10::Half* s = terms.s + row * terms.s_row;
    const uint8_t* z = terms.z + row * terms.z_row;
    for (int m = 0; m < MX; ++m) {
      vec zs = zero();  // sum_g zero * scale * xsum: offset = -zero * scale
      int64_t g = 0;
      for (; g + kWidth <= groups; g += kWidth) zs = fma(load(z + g) * load(s + g), load(xsum + m * groups + g), zs);
      float total = sum(acc[r][m]) - sum(zs);
      for (; g < groups; ++g) total += terms.offset(row, g) * xsum[m * groups + g];
      out[r][m] = total;
    }
  }
}

// The start of every int4 kernel: the R rows of W it walks, and their accumulators at 0.
template <int R, int MX>
void int4_start(const uint8_t* w, int64_t w_row, int64_t n, int64_t stride, const uint8_t** row, vec (*acc)[MX]) {
  for (int r = 0; r < R; ++r) row[r] = w + (n + r * stride) * w_row;
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = zero();
}

// The end of a group on the integer paths: acc[r][m] += float(part[r][m]) * the weight's scale * x's,
// for x rounded per group with scale xscale[m * groups + g].
template <int R, int MX>
void int4_add_group(vec (*acc)[MX], const ivec (*part)[MX], const GroupTerms& terms, const float* xscale,
                    int64_t groups, int64_t g, int64_t n, int64_t stride) {
  for (int r = 0; r < R; ++r) {
    const float s = terms.scale(n + r * stride, g);
    for (int m = 0; m < MX; ++m) acc[r][m] = fma(to_float(part[r][m]), broadcast(s * xscale[m * groups + g]), acc[r][m]);
  }
}

template <int R, int MX>
void dot_rows_int4(const float* x, const float* xsum, const uint8_t* w, const GroupTerms& terms,
                   int64_t K, int64_t groups, int64_t n, int64_t stride, float (*out)[MX]) {
  const int64_t group = K / groups;
  const uint8_t* row[R];
  vec acc[R][MX];
  int4_start<R, MX>(w, terms.w_row, n, stride, row, acc);
  for (int64_t g = 0; g < groups; ++g) {
    vec part[R][MX];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MX; ++m) part[r][m] = zero();
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      for (int h = 0; h < 16; h += kWidth) {
        vec xl[MX], xh[MX];
        for (int m = 0; m < MX; ++m) {
          xl[m] = load(x + m * K + k + h);
          xh[m] = load(x + m * K + k + 16 + h);
        }
        for (int r = 0; r < R; ++r) {
          vec lo, hi;
          nibbles(row[r] + k / 2 + h, lo, hi);
          for (int m = 0; m < MX; ++m) part[r][m] = fma(xh[m], hi, fma(xl[m], lo, part[r][m]));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const vec s = broadcast(terms.scale(n + r * stride, g));
      for (int m = 0; m < MX; ++m) acc[r][m] = fma(part[r][m], s, acc[r][m]);
    }
  }
  int4_finish<R, MX>(acc, terms, xsum, groups, n, stride, out);
}

// bfloat16 activations (8 significant bits): x as int16 per group with a power-of-two scale (BlockedX,
// as the int8 path, whose bounds hold here), the nibbles widened to int16 and the group's products
// summed in integers (vpmaddwd), one conversion a group: 32 weights in ~5 vector instructions where
// the float path above takes ~9 (827M model, AMD EPYC, 2 threads: 13.6-17 ms a token against 27 through
// the float path, which is bound by arithmetic; bench/decode.py). Each int32 lane sums at most 16 products
// of 15 * 32767 for groups up to 128: under 2^24, so the conversion is exact there.
template <int R, int MX>
void dot_rows_int4_blocked(const BlockedX& bx, int64_t m0, const float* xsum, const uint8_t* w, const GroupTerms& terms, int64_t K, int64_t groups, int64_t n, int64_t stride, float (*out)[MX]) {
  const int64_t group = K / groups;
  const uint8_t* row[R];
  vec acc[R][MX];
  int4_start<R, MX>(w, terms.w_row, n, stride, row, acc);
  for (int64_t g = 0; g < groups; ++g) {
    ivec part[R][MX];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MX; ++m) part[r][m] = izero();
    for (int64_t k = g * group; k < (g + 1) * group; k += kBlock) {
      i16_block xb[MX];
      for (int m = 0; m < MX; ++m) xb[m] = load_block(bx.q.data() + (m0 + m) * K + k);
      for (int r = 0; r < R; ++r) {
        const i16_block wb = nibble_block(row[r] + k / 2);
        for (int m = 0; m < MX; ++m) part[r][m] = idot_add(xb[m], wb, part[r][m]);
      }
    }
    int4_add_group<R, MX>(acc, part, terms, bx.scale.data() + m0 * groups, groups, g, n, stride);
  }
  int4_finish<R, MX>(acc, terms, xsum + m0 * groups, groups, n, stride, out);
}

#if defined(__AVX512F__)
// AVX-512, groups of a multiple of 64: two blocks' 32 bytes widened at once, 32 int16 lanes whose low
// nibbles are channels 0-15 and 32-47 of the 64 and whose high ones 16-31 and 48-63; x's int16 groups
// are put in that order once per call (wide_order), so no lane moves between registers.
constexpr int64_t kWide = 64;

void wide_order(std::vector<int16_t>& q) {  // per 64: [0-15, 32-47, 16-31, 48-63]
  int16_t t[kWide];
  for (size_t i = 0; i + kWide <= q.size(); i += kWide) {
    std::memcpy(t, q.data() + i, sizeof t);
    std::memcpy(q.data() + i + 16, t + 32, 16 * sizeof(int16_t));
    std::memcpy(q.data() + i + 32, t + 16, 16 * sizeof(int16_t));
  }
}

template <int R, int MX>
void dot_rows_int4_wide(const BlockedX& bx, int64_t m0, const float* xsum, const uint8_t* w, const GroupTerms& terms, int64_t K, int64_t groups, int64_t n, int64_t stride, float (*out)[MX]) {
  const int64_t group = K / groups;
  const uint8_t* row[R];
  vec acc[R][MX];
  int4_start<R, MX>(w, terms.w_row, n, stride, row, acc);
  const __m512i low = _mm512_set1_epi16(15);
  for (int64_t g = 0; g < groups; ++g) {
    ivec part[R][MX];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MX; ++m) part[r][m] = izero();
    for (int64_t k = g * group; k < (g + 1) * group; k += kWide) {
      __m512i xl[MX], xh[MX];
      for (int m = 0; m < MX; ++m) {
        xl[m] = _mm512_loadu_si512(bx.q.data() + (m0 + m) * K + k);
        xh[m] = _mm512_loadu_si512(bx.q.data() + (m0 + m) * K + k + 32);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + k / 2)));
        const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_srli_epi16(b, 4);
        for (int m = 0; m < MX; ++m)
          part[r][m] = _mm512_add_epi32(part[r][m], _mm512_add_epi32(_mm512_madd_epi16(xl[m], lo), _mm512_madd_epi16(xh[m], hi)));
      }
    }
    int4_add_group<R, MX>(acc, part, terms, bx.scale.data() + m0 * groups, groups, g, n, stride);
  }
  int4_finish<R, MX>(acc, terms, xsum + m0 * groups, groups, n, stride, out);
}

#endif

// bfloat16 x as int8 per group where the host multiplies unsigned by signed bytes in one instruction
// (AVX512_VNNI's vpdpbusd, AVX2's vpmaddubsw): a power-of-two scale a group, so each element is off by
// at most 2^-6 of its group's largest |x|, the nibbles meet x as bytes, and a group's products sum in
// integers. This is llama.cpp's Q4 x Q8 design, with the group's own scale. The packed bytes of one
// span (128 channels on AVX-512, 64 on AVX2) hold in their low nibbles channels 0-15, 32-47, ... and in
// their high ones 16-31, 48-63, ...: x is put in that order when it is rounded, so no lane moves.
struct Int8X {
  std::vector<int8_t> q;     // [M, K], each span in the nibbles' lane order
  std::vector<float> scale;  // [M, groups]
};

Int8X int8_groups(const float* x, int64_t M, int64_t K, int64_t group, int64_t span) {
  Int8X b;
  const int64_t groups = K / group;
  b.q.resize(M * K);
  b.scale.resize(M * groups);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* p = x + m * K + g * group;
      int32_t amax = 0;
      for (int64_t j = 0; j < group; j += kBlock) amax = std::max(amax, max_abs_bits(p + j));
      const bool finite = amax < 0x7f800000;
      const int e = std::clamp((amax >> 23) - 126, -100, 128);  // max|x| < 2^e
      b.scale[m * groups + g] = finite ? power_of_two(e - 7) : NAN;
      const float up = power_of_two(7 - e);
      for (int64_t j = 0; j < group; j += 16) {  // 16 channels from c of their span land side by side
        // Positions within x's row: a group may be shorter than a span (AVX2's groups of 32), and a
        // row's last span shorter than the others (32 channels), laid out by the same rule at its width.
        const int64_t k = g * group + j, start = k / span * span, c = k % span;
        const int64_t width = std::min(span, K - start);
        int8_t* lanes = b.q.data() + m * K + start + (c % 32 < 16 ? 0 : width / 2) + c / 32 * 16;
        if (finite) round16_int8(p + j, up, lanes);
        else std::fill(lanes, lanes + 16, int8_t(0));
      }
    }
  return b;
}

#if defined(__AVX512F__)
// AVX512_VNNI, groups of a multiple of 128: vpdpbusd multiplies 64 nibbles by 64 bytes of x and adds
// them in fours into 16 int32 lanes, one instruction: 128 weights in 6 where the int16 path takes 14.
#define INT4_VNNI __attribute__((target("avx512vnni,avx512bw")))
constexpr int64_t kInt8XSpan = 128;

template <int R, int MX>
INT4_VNNI void dot_rows_int4_int8x(const Int8X& xq, int64_t m0, const float* xsum, const uint8_t* w, const GroupTerms& terms, int64_t K,
                                   int64_t groups, int64_t n, int64_t stride, float (*out)[MX]) {
  const int64_t group = K / groups;
  const uint8_t* row[R];
  vec acc[R][MX];
  int4_start<R, MX>(w, terms.w_row, n, stride, row, acc);
  const __m512i low = _mm512_set1_epi8(15);
  for (int64_t g = 0; g < groups; ++g) {
    ivec part[R][MX];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MX; ++m) part[r][m] = izero();
    for (int64_t k = g * group; k < (g + 1) * group; k += kInt8XSpan) {
      __m512i xl[MX], xh[MX];
      for (int m = 0; m < MX; ++m) {
        xl[m] = _mm512_loadu_si512(xq.q.data() + (m0 + m) * K + k);
        xh[m] = _mm512_loadu_si512(xq.q.data() + (m0 + m) * K + k + 64);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_loadu_si512(row[r] + k / 2);
        const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        for (int m = 0; m < MX; ++m) part[r][m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(part[r][m], lo, xl[m]), hi, xh[m]);
      }
    }
    int4_add_group<R, MX>(acc, part, terms, xq.scale.data() + m0 * groups, groups, g, n, stride);
  }
  int4_finish<R, MX>(acc, terms, xsum + m0 * groups, groups, n, stride, out);
}

bool int4_int8_x(int64_t group) {
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni && group % kInt8XSpan == 0;
}
#else
// AVX2, groups of 32 or a multiple of 64: vpmaddubsw multiplies 32 nibbles by 32 bytes of x and adds them
// in pairs into int16 lanes (at most 2 * 15 * 127 = 3810, no saturation); up to 256 channels' pairs
// are summed in int16 (8 per lane, at most 30480 < 2^15) before vpmaddwd by ones widens them to
// int32: 64 weights in 8 instructions where the int16 path takes 18.
// Groups of 64 and 128 (SPANS 1 and 2) are unrolled when compiled: the generic loops over runs and
// spans of a runtime group size cost as much as the products here (spills and loop exits twice a
// group of 128). AMD EPYC (Zen 3, AVX2), 2 threads, group 128, x bfloat16: 2048 x 5504 in cache
// 33 -> 44 GB/s of packed weights; the 33 matrices of the 827M model's step (322 MB) from memory,
// alternated in one process, 1.11x faster (int4 21.3 GB/s, int8 rows 24.9 in the same minutes).
constexpr int64_t kInt8XSpan = 64;
constexpr int64_t kInt16Run = 256;  // channels summed in int16 lanes before widening

// The int16 pair sums p[r][m] of the span of 64 channels from k, for R rows of W and MX rows of x (x
// in int8_groups' lane order: the low nibbles meet its first 32 bytes, the high ones the next 32).
template <int R, int MX>
inline void span_pairs(const int8_t* x8, int64_t K, const uint8_t* const* row, int64_t k, __m256i (*p)[MX]) {
  const __m256i low = _mm256_set1_epi8(15);
  __m256i xl[MX], xh[MX];
  for (int m = 0; m < MX; ++m) {
    xl[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x8 + m * K + k));
    xh[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x8 + m * K + k + 32));
  }
  for (int r = 0; r < R; ++r) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + k / 2));
    const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    for (int m = 0; m < MX; ++m) p[r][m] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl[m]), _mm256_maddubs_epi16(hi, xh[m]));
  }
}

template <int R, int MX, int SPANS>
void dot_rows_int4_int8x_avx2(const Int8X& xq, int64_t m0, const float* xsum, const uint8_t* w, const GroupTerms& terms,
                              int64_t K, int64_t groups, int64_t n, int64_t stride, float (*out)[MX]) {
  const int64_t group = K / groups;
  const uint8_t* row[R];
  vec acc[R][MX];
  int4_start<R, MX>(w, terms.w_row, n, stride, row, acc);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x8 = xq.q.data() + m0 * K;
  // pairs[r][m] (+)= the pair sums of the span from k; `first` starts them.
  auto span = [&](int64_t k, __m256i (*pairs)[MX], bool first) {
    __m256i p[R][MX];
    span_pairs<R, MX>(x8, K, row, k, p);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MX; ++m) pairs[r][m] = first ? p[r][m] : _mm256_add_epi16(pairs[r][m], p[r][m]);
  };
  for (int64_t g = 0; g < groups; ++g) {
    __m256i pairs[R][MX];
    ivec part[R][MX];
    if constexpr (SPANS > 0) {
      for (int s = 0; s < SPANS; ++s) span(g * group + s * kInt8XSpan, pairs, s == 0);
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MX; ++m) part[r][m] = _mm256_madd_epi16(pairs[r][m], ones);
    } else {
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MX; ++m) part[r][m] = izero();
      for (int64_t run = g * group; run < (g + 1) * group; run += kInt16Run) {
        for (int64_t k = run; k < std::min(run + kInt16Run, (g + 1) * group); k += kInt8XSpan) span(k, pairs, k == run);
        for (int r = 0; r < R; ++r)
          for (int m = 0; m < MX; ++m) part[r][m] = _mm256_add_epi32(part[r][m], _mm256_madd_epi16(pairs[r][m], ones));
      }
    }
    int4_add_group<R, MX>(acc, part, terms, xq.scale.data() + m0 * groups, groups, g, n, stride);
  }
  int4_finish<R, MX>(acc, terms, xsum + m0 * groups, groups, n, stride, out);
}

// Groups of 32: a span of 64 channels holds two, the first in the low 128 bits of every vector (its
// bytes 0-15 hold channels 0-15 and 16-31), the second in the high ones; the pair sums widen to int32
// (lanes 0-3 the first group, 4-7 the second) and meet a vector of the two groups' scales. An odd
// last group is a span of its own, 32 channels, in 128-bit registers. (Zen 3 EPYC, 2 threads: 1.3-1.35x
// the int16 path these groups took, 23 -> 31 GB/s of packed weights and scales for 2048 x 5504.)
template <int R, int MX>
void dot_rows_int4_int8x_g32(const Int8X& xq, int64_t m0, const float* xsum, const uint8_t* w, const GroupTerms& terms,
                             int64_t K, int64_t groups, int64_t n, int64_t stride, float (*out)[MX]) {
  const uint8_t* row[R];
  vec acc[R][MX];
  int4_start<R, MX>(w, terms.w_row, n, stride, row, acc);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x8 = xq.q.data() + m0 * K;
  const float* xscale = xq.scale.data() + m0 * groups;
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    __m256i p[R][MX];
    span_pairs<R, MX>(x8, K, row, g * 32, p);
    for (int r = 0; r < R; ++r) {
      const float s0 = terms.scale(n + r * stride, g), s1 = terms.scale(n + r * stride, g + 1);
      for (int m = 0; m < MX; ++m) {
        const __m256 scales = _mm256_setr_m128(_mm_set1_ps(s0 * xscale[m * groups + g]), _mm_set1_ps(s1 * xscale[m * groups + g + 1]));
        acc[r][m] = fma(to_float(_mm256_madd_epi16(p[r][m], ones)), scales, acc[r][m]);
      }
    }
  }
  if (g < groups) {
    const int64_t k = g * 32;
    const __m128i low16 = _mm_set1_epi8(15), ones8 = _mm_set1_epi16(1);
    for (int r = 0; r < R; ++r) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + k / 2));
      const __m128i lo = _mm_and_si128(b, low16), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low16);
      const float s = terms.scale(n + r * stride, g);
      for (int m = 0; m < MX; ++m) {
        const __m128i xl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x8 + m * K + k));
        const __m128i xh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x8 + m * K + k + 16));
        const __m128i p = _mm_add_epi16(_mm_maddubs_epi16(lo, xl), _mm_maddubs_epi16(hi, xh));
        const __m256 sums = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_cvtepi32_ps(_mm_madd_epi16(p, ones8)), 0);
        acc[r][m] = fma(sums, broadcast(s * xscale[m * groups + g]), acc[r][m]);
      }
    }
  }
  int4_finish<R, MX>(acc, terms, xsum + m0 * groups, groups, n, stride, out);
}

template <int R, int MX>
void dot_rows_int4_int8x(const Int8X& xq, int64_t m0, const float* xsum, const uint8_t* w, const GroupTerms& terms, int64_t K,
                         int64_t groups, int64_t n, int64_t stride, float (*out)[MX]) {
  switch (K / groups) {
    case 32: return dot_rows_int4_int8x_g32<R, MX>(xq, m0, xsum, w, terms, K, groups, n, stride, out);
    case 64: return dot_rows_int4_int8x_avx2<R, MX, 1>(xq, m0, xsum, w, terms, K, groups, n, stride, out);
    case 128: return dot_rows_int4_int8x_avx2<R, MX, 2>(xq, m0, xsum, w, terms, K, groups, n, stride, out);
    default: return dot_rows_int4_int8x_avx2<R, MX, 0>(xq, m0, xsum, w, terms, K, groups, n, stride, out);
  }
}

bool int4_int8_x(int64_t group) { return group == 32 || group % kInt8XSpan == 0; }
#endif

template <typename Out>
struct Gemv4 {
  const float* x;
  const float* xsum;  // [M, groups]
  const BlockedX* blocked;  // bfloat16 x: its int16 groups; nullptr: the float path
  bool wide;                // blocked in wide_order (AVX-512, groups of a multiple of 64)
  const Int8X* x8;          // bfloat16 x as int8 groups where int4_int8_x(group); else nullptr
  const uint8_t* w;
  GroupTerms terms;
  const Out* bias;
  Out* y;
  int64_t M, N, K, groups;

  template <int R, int MX>
  void run(int64_t m, int64_t n, int64_t stride) const {
    float out[R][MX];
#if defined(__AVX512F__)
    if (blocked && wide) dot_rows_int4_wide<R, MX>(*blocked, m, xsum, w, terms, K, groups, n, stride, out);
    else
#endif
    if (x8) dot_rows_int4_int8x<R, MX>(*x8, m, xsum, w, terms, K, groups, n, stride, out);
    else if (blocked) dot_rows_int4_blocked<R, MX>(*blocked, m, xsum, w, terms, K, groups, n, stride, out);
    else dot_rows_int4<R, MX>(x + m * K, xsum + m * groups, w, terms, K, groups, n, stride, out);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MX; ++i) {
        float v = out[r][i];
        if (bias) v += static_cast<float>(bias[n + r * stride]);
        y[(m + i) * N + n + r * stride] = static_cast<Out>(v);
      }
  }

  template <int R>
  void rows(int64_t n, int64_t stride) const {
    int64_t m = 0;
    for (; m + kInt4XRows <= M; m += kInt4XRows) run<R, kInt4XRows>(m, n, stride);
    for (; m < M; ++m) run<R, 1>(m, n, stride);
  }

  void operator()() const {  // as Gemv: a thread's rows in kRows long sequential streams
    const int64_t grain = std::max<int64_t>(kRows, (256 << 10) / std::max<int64_t>(1, K / 2));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      const int64_t part = (end - begin) / kRows;
      for (int64_t i = 0; i < part; ++i) rows<kRows>(begin + i, part);
      for (int64_t n = begin + kRows * part; n < end; ++n) rows<1>(n, 0);
    });
  }
};

// The checks both int4 ops make of a weight's three tensors (K its input channels), and their terms.
GroupTerms int4_terms(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, int64_t K) {
  TORCH_CHECK(w.device().is_cpu(), "int4 weights: on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.stride(1) == 1 && w.size(1) * 2 == K,
              "w: uint8 [N, K / 2], rows contiguous");
  const int64_t N = w.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.dim() == 2 && scale.size(0) == N && scale.stride(1) == 1,
              "scale: float16 [N, groups], rows contiguous");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % 32 == 0, "groups: whole blocks of 32 channels of K");
  TORCH_CHECK(zero.scalar_type() == at::kByte && zero.sizes() == scale.sizes() && zero.stride(1) == 1,
              "zero: uint8, scale's shape, rows contiguous");
  return {scale.data_ptr<c10::Half>(), zero.data_ptr<uint8_t>(), groups, scale.stride(0), zero.stride(0), w.stride(0)};
}

// Prefill's dequantization (tp/int4.py's dequantize_rows, into the float GEMM): w = q * scale + offset
// in float32, where q * scale is exact, so one fma rounds as torch's mul_ then add_ do: the same bits.
// torch's unpack, widen, scale and add took ~0.6 ns a weight in cache and ~1.7 into a fresh block (AMD
// EPYC Zen 3, 2 threads), a quarter of the 512-row GEMM the weights then meet; this loop ~0.1.
// Into `out` (float32 [N, K], contiguous): the caller's reused scratch, whose pages are already there.
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, at::Tensor out) {
  const int64_t N = w.size(0), K = w.dim() == 2 ? w.size(1) * 2 : 0;
  const GroupTerms terms = int4_terms(w, scale, zero, K);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
              out.size(0) == N && out.size(1) == K, "out: contiguous float32 [N, K]");
  const int64_t group = K / terms.groups;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = wp + n * terms.w_row;
      float* o = op + n * K;
      for (int64_t g = 0; g < terms.groups; ++g) {
        const vec s = broadcast(terms.scale(n, g)), offset = broadcast(terms.offset(n, g));
        for (int64_t k = g * group; k < (g + 1) * group; k += 32)
          for (int h = 0; h < 16; h += kWidth) {
            vec lo, hi;
            nibbles(row + k / 2 + h, lo, hi);
            store(o + k + h, fma(lo, s, offset));
            store(o + k + 16 + h, fma(hi, s, offset));
          }
      }
    }
  });
  return out;
}

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "gemv_int4 runs on the CPU");  // the weight's checks: int4_terms
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  const GroupTerms terms = int4_terms(w, scale, zero, K);
  const int64_t N = w.size(0), groups = terms.groups;
  const at::Tensor b = checked_bias(bias, x, N);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  std::vector<float> widened;
  const float* xp = x.scalar_type() == at::kFloat ? x.data_ptr<float>() : widen(x, widened);
  const int64_t group = K / groups;
  std::vector<float> xsum(M * groups);  // in kWidth lanes: a scalar sum is one long chain of adds
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      vec s = cpu_vec::zero();  // `zero` is the tensor here
      for (int64_t k = g * group; k < (g + 1) * group; k += kWidth) s = add(s, load(xp + m * K + k));
      xsum[m * groups + g] = sum(s);
    }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  BlockedX bx;
  Int8X x8;
  const bool int8x = x.scalar_type() == at::kBFloat16 && int4_int8_x(group);
  const BlockedX* blocked = x.scalar_type() == at::kBFloat16 && !int8x ? &bx : nullptr;
  const bool wide = blocked && kWidth == 16 && group % 64 == 0;
  if (blocked) bx = block_quantize(xp, M, K, group);
#if defined(__AVX512F__)
  if (wide) wide_order(bx.q);
#endif
  if (int8x) x8 = int8_groups(xp, M, K, group, kInt8XSpan);
  if (y.scalar_type() == at::kFloat) {
    Gemv4<float>{xp, xsum.data(), blocked, wide, int8x ? &x8 : nullptr, wp, terms, b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K, groups}();
  } else {
    using B = c10::BFloat16;
    Gemv4<B>{xp, xsum.data(), blocked, wide, int8x ? &x8 : nullptr, wp, terms, b.defined() ? b.data_ptr<B>() : nullptr, y.data_ptr<B>(), M, N, K, groups}();
  }
  return y;
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias, bool bf16_dot) {
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
  const at::Tensor b = checked_bias(bias, x, N);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t K = x.size(1);
  std::vector<float> widened;
  const float* xp = nullptr;
  // One row is a memory stream, where the widening path reads as fast (measured: 0.9-1.0x);
  // from two rows on the products are the work.
  const bool dot = wt == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && M >= 2 && bf16_dot && host_has_bf16_dot();
  if (x.scalar_type() == at::kFloat) {
    xp = x.data_ptr<float>();
  } else if (!dot) {  // the dot path reads x as it is
    xp = widen(x, widened);
  }
  if (wt == at::kFloat) {
    dispatch_out<float>(xp, nullptr, nullptr, M, K, w, sp, b, y);
  } else if (wt == at::kBFloat16) {
    dispatch_out<c10::BFloat16>(xp, nullptr, dot ? x.data_ptr<c10::BFloat16>() : nullptr, M, K, w, sp, b, y);
  } else if (x.scalar_type() == at::kBFloat16) {
    const BlockedX blocked = block_quantize(xp, M, K);
    dispatch_out<int8_t>(xp, &blocked, nullptr, M, K, w, sp, b, y);
  } else {
    dispatch_out<int8_t>(xp, nullptr, nullptr, M, K, w, sp, b, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(OPS_NAMESPACE, m) {
  // bf16_dot=False keeps bfloat16 x bfloat16 on the widening float path (tests compare the two).
  m.def("gemv(Tensor x, Tensor w, Tensor? scale=None, Tensor? bias=None, bool bf16_dot=True) -> Tensor", gemv);
  m.def("has_bf16_dot() -> bool", [] { return host_has_bf16_dot(); });
  m.def("gemv_int4(Tensor x, Tensor w, Tensor scale, Tensor zero, Tensor? bias=None) -> Tensor", gemv_int4);
  m.def("int4_int8_x(int group) -> bool", [](int64_t group) { return int4_int8_x(group); });
  m.def("dequantize_int4(Tensor w, Tensor scale, Tensor zero, Tensor(a!) out) -> Tensor(a!)", dequantize_int4);
}
