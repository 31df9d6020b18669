// The vector width of a build and the few operations the CPU kernels use (tp/csrc/gemv.cpp,
// tp/csrc/decode_attention.cpp): AVX-512 (16 floats) where the build has it, else AVX2 + FMA (8).
// bfloat16 and int8 values are widened to float32 in registers (a shift, or a sign-extend and
// convert): these kernels are limited by loads, not by arithmetic.
#pragma once
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <cstdint>

namespace cpu_vec {

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
inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec broadcast(float v) { return _mm512_set1_ps(v); }
inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline float sum(vec v) { return _mm512_reduce_add_ps(v); }
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
inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec broadcast(float v) { return _mm256_set1_ps(v); }
inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline float sum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#error "the CPU kernels need AVX-512 or AVX2 + FMA"
#endif

inline float scalar(float v) { return v; }
inline float scalar(c10::BFloat16 v) { return static_cast<float>(v); }
inline float scalar(int8_t v) { return static_cast<float>(v); }

}  // namespace cpu_vec
