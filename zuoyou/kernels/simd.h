// 16-lane fp32 loads / stores of fp32 and bf16 data (AVX-512), shared by the kernels of this folder.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>

inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 bit patterns -> fp32: the 16 bits are the top of the float
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) { return load_bf16(reinterpret_cast<const uint16_t*>(p)); }

// fp32 -> bf16 bits, round to nearest even (as PyTorch's conversion, for finite values)
inline __m256i to_bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v));
}
