// RMSNorm and rotary embedding as one call each, for the eager decode step (zuoyou/fused.py), AVX-512.
//
// Why: in eager PyTorch a Janus-Pro-1B decode step runs ~700 small element-wise ops besides its
// matrix products (an RMSNorm with HF's roundings is ~9 of them, RoPE on q and k ~13), each with a
// few microseconds of dispatch on 2 x 2048 values. Same roundings as the PyTorch code they replace
// (zuoyou/models/llama.py): bf16 inputs are computed in fp32 and rounded to bf16 where PyTorch rounds.
// no fused multiply-adds: PyTorch rounds the products before adding them
#pragma GCC optimize("fp-contract=off")
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace {

// the value a T-typed op would produce: fp32 as is, bf16 rounded
inline __m512 round_as(float*, __m512 v) { return v; }
inline __m512 round_as(at::BFloat16*, __m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
}

template <typename T>
void rms_rows(const T* x, const T* w, T* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 v = load16(xr + d);
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / D + eps);
      for (int64_t d = 0; d < D; d += 16) {
        // normalised in fp32, cast to T, then scaled by the weight in T (HF Llama's order)
        const __m512 n = round_as(static_cast<T*>(nullptr), _mm512_mul_ps(load16(xr + d), _mm512_set1_ps(inv)));
        store16(y + r * D + d, _mm512_mul_ps(load16(w + d), n));
      }
    }
  });
}

// y = x * cos + roll(x, hs / 2) * sin (signed sin table), each product and the sum rounded to T
template <typename T>
void rope_rows(const T* x, const T* cos, const T* sin, T* y, int64_t B, int64_t H, int64_t L, int64_t hs) {
  const int64_t half = hs / 2;
  at::parallel_for(0, B * H * L, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * L), t = i % L;
      const T *xr = x + i * hs, *c = cos + (b * L + t) * hs, *s = sin + (b * L + t) * hs;
      for (int64_t d = 0; d < hs; d += 16) {
        const int64_t src = d < half ? d + half : d - half;  // roll by half: out[d] = x[d - half]
        const __m512 a = round_as(static_cast<T*>(nullptr), _mm512_mul_ps(load16(xr + d), load16(c + d)));
        const __m512 r = round_as(static_cast<T*>(nullptr), _mm512_mul_ps(load16(xr + src), load16(s + d)));
        store16(y + i * hs + d, _mm512_add_ps(a, r));
      }
    }
  });
}

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16, name, ": fp32 or bf16");
}

}  // namespace

// x (..., D), w (D,), same dtype, D a multiple of 16 -> HF Llama's RMSNorm of x
torch::Tensor rms_norm(torch::Tensor x_in, torch::Tensor w_in, double eps) {
  check_float(x_in, "x");
  TORCH_CHECK(w_in.scalar_type() == x_in.scalar_type() && w_in.dim() == 1 && w_in.size(0) == x_in.size(-1) &&
              x_in.size(-1) % 16 == 0, "weight: (D,) in x's dtype, D a multiple of 16");
  const auto x = x_in.contiguous(), w = w_in.contiguous();
  auto y = torch::empty_like(x);
  const int64_t D = x.size(-1), rows = x.numel() / D;
  if (x.scalar_type() == torch::kBFloat16) {
    rms_rows(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), rows, D, eps);
  } else {
    rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, D, eps);
  }
  return y;
}

// x (B, H, L, hs); cos, signed sin (B, 1, L, hs) in x's dtype; hs a multiple of 32 -> rotated x
torch::Tensor rope(torch::Tensor x_in, torch::Tensor cos_in, torch::Tensor sin_in) {
  check_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 4 && x_in.size(3) % 32 == 0, "x: (B, H, L, hs), hs a multiple of 32");
  const int64_t B = x_in.size(0), H = x_in.size(1), L = x_in.size(2), hs = x_in.size(3);
  for (const auto* t : {&cos_in, &sin_in}) {
    TORCH_CHECK(t->scalar_type() == x_in.scalar_type() && t->dim() == 4 && t->size(0) == B && t->size(1) == 1 &&
                t->size(2) == L && t->size(3) == hs, "cos / sin: (B, 1, L, hs) in x's dtype");
  }
  const auto x = x_in.contiguous(), c = cos_in.contiguous(), s = sin_in.contiguous();
  auto y = torch::empty_like(x);
  if (x.scalar_type() == torch::kBFloat16) {
    rope_rows(x.data_ptr<at::BFloat16>(), c.data_ptr<at::BFloat16>(), s.data_ptr<at::BFloat16>(),
              y.data_ptr<at::BFloat16>(), B, H, L, hs);
  } else {
    rope_rows(x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr<float>(), B, H, L, hs);
  }
  return y;
}
