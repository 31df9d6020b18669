// The vector width of a build and the few operations the CPU kernels use (tp/csrc/gemv.cpp,
// tp/csrc/decode_attention.cpp): AVX-512 (16 floats) where the build has it, else AVX2 + FMA (8).
// bfloat16 and int8 values are widened to float32 in registers (a shift, or a sign-extend and
// convert), or int8 meets int16 in integer multiply-adds (dot_block: gemv.cpp's blocked int8 path).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <cstdint>

namespace cpu_vec {

// Elements in one int8 x int16 block (dot_block). Each float lane of dot_block sums at most 4 products
// of |int8| <= 127 and |int16| <= 32767: under 16.7M < 2^24, so the conversion to float32 is exact.
constexpr int kBlock = 32;

#if defined(__AVX512F__)
constexpr int kWidth = 16;
constexpr int kXRows = 4;  // rows of x per pass: 4 x 4 accumulators of 32 registers
using vec = __m512;
inline vec zero() { return _mm512_setzero_ps(); }
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline vec load(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vec load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vec load(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vec load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec maximum(vec a, vec b) { return _mm512_max_ps(a, b); }  // b where either is NaN
inline vec broadcast(float v) { return _mm512_set1_ps(v); }
inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline float sum(vec v) { return _mm512_reduce_add_ps(v); }
// int8 weights against int16 activations, kBlock of each (gemv.cpp's blocked int8 path).
struct i16_block { __m512i v; };
inline i16_block load_block(const int16_t* p) { return {_mm512_loadu_si512(p)}; }
inline i16_block widen_block(const int8_t* p) {
  return {_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
// The largest |x| of a block, as its float32 bits (an integer compare orders non-negative floats, inf
// and NaN above every finite value).
inline int32_t max_abs_bits(const float* p) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  const __m512i a = _mm512_and_si512(_mm512_loadu_si512(p), magnitude);
  const __m512i b = _mm512_and_si512(_mm512_loadu_si512(p + 16), magnitude);
  return _mm512_reduce_max_epi32(_mm512_max_epi32(a, b));
}
// q = round(x * up) for a block (round to nearest even; |x * up| < 2^15 by the caller's choice of up).
inline void round_block(const float* p, float up, int16_t* q) {
  const __m512 u = _mm512_set1_ps(up);
  for (int h = 0; h < 2; ++h)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16 * h),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p + 16 * h), u))));
}
// q = round(x * up) for 16 elements, clamped to [-127, 127] (round to nearest even, as nearbyint).
inline void round16_int8(const float* p, float up, int8_t* q) {
  const __m512 v = _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(_mm512_loadu_ps(p), _mm512_set1_ps(up)), _mm512_set1_ps(127.f)),
                                 _mm512_set1_ps(-127.f));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
}
// The block's 32 products summed in pairs, 16 lanes of float32.
inline vec dot_block(i16_block a, i16_block b) { return _mm512_cvtepi32_ps(_mm512_madd_epi16(a.v, b.v)); }
// int32 lanes for int4 x int16 sums (a group's products summed in integers, then one conversion).
using ivec = __m512i;
inline ivec izero() { return _mm512_setzero_si512(); }
inline ivec idot_add(i16_block a, i16_block b, ivec acc) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a.v, b.v)); }
inline vec to_float(ivec v) { return _mm512_cvtepi32_ps(v); }
// 32 channels of packed int4 (16 bytes, tp/int4.py's order) as int16, in channel order.
inline i16_block nibble_block(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(b, 4);
  return {_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)};
}
// kWidth bytes of packed int4 weights (tp/int4.py's order): their low nibbles and their high ones as floats.
inline void nibbles(const uint8_t* p, vec& lo, vec& hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kWidth = 8;
constexpr int kXRows = 2;  // 4 x 2 accumulators, leaving registers for x and W among AVX2's 16
using vec = __m256;
inline vec zero() { return _mm256_setzero_ps(); }
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline vec load(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vec load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vec load(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vec load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec maximum(vec a, vec b) { return _mm256_max_ps(a, b); }  // b where either is NaN
inline vec broadcast(float v) { return _mm256_set1_ps(v); }
inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline float sum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline int32_t max_abs_bits(const float* p) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  __m256i m = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), magnitude);
  for (int i = 1; i < 4; ++i)
    m = _mm256_max_epi32(m, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8 * i)), magnitude));
  __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0xb1));
  return _mm_cvtsi128_si32(h);
}
inline void round_block(const float* p, float up, int16_t* q) {
  const __m256 u = _mm256_set1_ps(up);
  for (int h = 0; h < 2; ++h) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + 16 * h), u));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + 16 * h + 8), u));
    // packs works per 128-bit lane: a0-3 b0-3 a4-7 b4-7; the permute puts a before b.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16 * h), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
  }
}
inline void round16_int8(const float* p, float up, int8_t* q) {
  const __m256 u = _mm256_set1_ps(up), top = _mm256_set1_ps(127.f), bottom = _mm256_set1_ps(-127.f);
  const __m256i a = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(p), u), top), bottom));
  const __m256i b = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(p + 8), u), top), bottom));
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);  // as round_block: a before b
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}
struct i16_block { __m256i lo, hi; };
inline i16_block load_block(const int16_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))};
}
inline i16_block widen_block(const int8_t* p) {
  return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
}
// The block's 32 products summed in fours, 8 lanes of float32.
inline vec dot_block(i16_block a, i16_block b) {
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(a.lo, b.lo), _mm256_madd_epi16(a.hi, b.hi)));
}
using ivec = __m256i;
inline ivec izero() { return _mm256_setzero_si256(); }
inline ivec idot_add(i16_block a, i16_block b, ivec acc) {
  return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(a.lo, b.lo), _mm256_madd_epi16(a.hi, b.hi)));
}
inline vec to_float(ivec v) { return _mm256_cvtepi32_ps(v); }
inline i16_block nibble_block(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_and_si256(b, _mm256_set1_epi16(15)), _mm256_srli_epi16(b, 4)};
}
inline void nibbles(const uint8_t* p, vec& lo, vec& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#else
#error "the CPU kernels need AVX-512 or AVX2 + FMA"
#endif

inline float scalar(float v) { return v; }
inline float scalar(c10::BFloat16 v) { return static_cast<float>(v); }
inline float scalar(int8_t v) { return static_cast<float>(v); }

}  // namespace cpu_vec
