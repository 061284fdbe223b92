// int4- and int8-weight x int8-activation matrix products for decode-sized inputs (a few rows), AVX-512 VNNI.
//
// Why: ATen's CPU int4 kernel converts every weight to fp32 and is compute-bound on small CPUs
// (about half the memory bandwidth on 2 cores). Here the activations are quantised to int8 per row
// and per group of 64 inputs (like llama.cpp's Q8 blocks), and one VPDPBUSD multiplies 64 weight
// nibbles with 64 activation bytes, so reading the weights stays the limit.
//
// Weight layout (built by zuoyou/kernels/int4.py, ``pack``), for N outputs, K inputs, groups of 64:
//   packed (N/16, K/8, 64) uint8: block b of 16 outputs, octet t of inputs k0 = 8t .. 8t+7;
//     byte 4*c + i holds q[16b + c, k0 + i] in its low nibble and q[16b + c, k0 + 4 + i] in its high one;
//   scale, zero (N/16, K/64, 16) bf16: w[n, k] = q[n, k] * scale[n, g] + zero[n, g], g = k / 64.
// y[m, n] = sum_g scale[n,g] * xs[m,g] * sum_{k in g} q[n,k] * xq[m,k] + zero[n,g] * sum_{k in g} x[m,k]
//
// int8 weights (``int8_mm``; symmetric, one scale per output): packed (N/16, K/4, 64) uint8, block b of
// 16 outputs, quad t of inputs k0 = 4t .. 4t+3; byte 4*c + i holds q[16b + c, k0 + i] + 128 (VPDPBUSD
// multiplies unsigned by signed bytes: the +128 is taken back with the group's sum of xq).
// y[m, n] = scale[n] * sum_g xs[m,g] * (sum_{k in g} (q[n,k] + 128) * xq[m,k] - 128 * sum_{k in g} xq[m,k])
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <type_traits>

namespace {

constexpr int G = 64;  // inputs per group (weights and activations)

inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (bf16 is the top half of an fp32)
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

inline __m256i to_bf16(__m512 v) {  // round to nearest even (no NaN inputs here)
  const __m512i i = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(i, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// Up to 4 rows, two chains of dependent VPDPBUSDs per row (a and b) halve the chain length; from 5
// rows on, one chain per row: the rows give enough independent chains, and two would not fit in the
// 32 vector registers (8 rows spilled 43 of them). ``dot2`` adds xm[0] . wa and xm[1] . wb (4 bytes
// each, broadcast) to the row's chains; ``sum2`` is the row's total.
template <int M>
__attribute__((always_inline)) inline void dot2(__m512i& a, __m512i& b, __m512i wa, __m512i wb, const int32_t* xm) {
  a = _mm512_dpbusd_epi32(a, wa, _mm512_set1_epi32(xm[0]));
  if constexpr (M <= 4) {
    b = _mm512_dpbusd_epi32(b, wb, _mm512_set1_epi32(xm[1]));
  } else {
    a = _mm512_dpbusd_epi32(a, wb, _mm512_set1_epi32(xm[1]));
  }
}

template <int M>
__attribute__((always_inline)) inline __m512i sum2(__m512i a, __m512i b) {
  if constexpr (M <= 4) {
    return _mm512_add_epi32(a, b);
  } else {
    return a;
  }
}

// 16 outputs of row m, block b: to y (fp32) or ybf (bf16; the other is null)
inline void store16(__m512 v, float* y, uint16_t* ybf, int64_t m, int64_t N, int64_t b) {
  if (ybf) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ybf + m * N + b * 16), to_bf16(v));
  } else {
    _mm512_storeu_ps(y + m * N + b * 16, v);
  }
}

// y: fp32 output, or ybf: bf16 output (the other is null)
template <int M>
void block_rows(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w, const uint16_t* scale,
                const uint16_t* zero, float* y, uint16_t* ybf, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  const int64_t groups = K / G;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = b0; b < b1; ++b) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* wb = w + b * (K / 8) * 64;
    const uint16_t* sb = scale + b * groups * 16;
    const uint16_t* zb = zero + b * groups * 16;
    for (int64_t g = 0; g < groups; ++g) {
      __m512i dlo[M], dhi[M];  // per row: low nibbles' and high nibbles' chains (see dot2)
      for (int m = 0; m < M; ++m) dlo[m] = dhi[m] = _mm512_setzero_si512();
      const uint8_t* wg = wb + g * 8 * 64;
      _mm_prefetch(reinterpret_cast<const char*>(sb + (g + 4) * 16), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(zb + (g + 4) * 16), _MM_HINT_T0);
      for (int t = 0; t < 8; ++t) {
        _mm_prefetch(reinterpret_cast<const char*>(wg + t * 64 + 2048), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(wg + t * 64);
        const __m512i lo = _mm512_and_si512(v, low);                         // inputs k0 .. k0+3
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);   // inputs k0+4 .. k0+7
        for (int m = 0; m < M; ++m) {
          dot2<M>(dlo[m], dhi[m], lo, hi, reinterpret_cast<const int32_t*>(xq + m * K + g * G + t * 8));
        }
      }
      const __m512 s = load_bf16(sb + g * 16), z = load_bf16(zb + g * 16);
      for (int m = 0; m < M; ++m) {
        const __m512 sx = _mm512_mul_ps(s, _mm512_set1_ps(xs[m * groups + g]));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum2<M>(dlo[m], dhi[m])), sx, acc[m]);
        acc[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum[m * groups + g]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) store16(acc[m], y, ybf, m, N, b);
  }
}

template <int M>
void run_rows(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w, const uint16_t* scale,
              const uint16_t* zero, float* y, uint16_t* ybf, int64_t N, int64_t K) {
  at::parallel_for(0, N / 16, 8, [&](int64_t b0, int64_t b1) {
    block_rows<M>(xq, xs, xsum, w, scale, zero, y, ybf, N, K, b0, b1);
  });
}


template <int M>
void block_rows8(const int8_t* xq, const float* xs, const int32_t* xqsum, const uint8_t* w, const uint16_t* scale,
                 float* y, uint16_t* ybf, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  const int64_t groups = K / G;
  for (int64_t b = b0; b < b1; ++b) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* wb = w + b * (K / 4) * 64;
    for (int64_t g = 0; g < groups; ++g) {
      __m512i d0[M], d1[M];  // per row: even and odd quads' chains (see dot2)
      for (int m = 0; m < M; ++m) d0[m] = d1[m] = _mm512_setzero_si512();
      const uint8_t* wg = wb + g * 16 * 64;
      for (int t = 0; t < 16; t += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(wg + t * 64 + 4096), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wg + t * 64 + 4160), _MM_HINT_T0);
        const __m512i v0 = _mm512_loadu_si512(wg + t * 64), v1 = _mm512_loadu_si512(wg + (t + 1) * 64);
        for (int m = 0; m < M; ++m) {
          dot2<M>(d0[m], d1[m], v0, v1, reinterpret_cast<const int32_t*>(xq + m * K + g * G + t * 4));
        }
      }
      for (int m = 0; m < M; ++m) {
        const __m512i dot = _mm512_sub_epi32(sum2<M>(d0[m], d1[m]),
                                             _mm512_set1_epi32(128 * xqsum[m * groups + g]));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[m * groups + g]), acc[m]);
      }
    }
    const __m512 s = load_bf16(scale + b * 16);
    for (int m = 0; m < M; ++m) store16(_mm512_mul_ps(acc[m], s), y, ybf, m, N, b);
  }
}

template <int M>
void run_rows8(const int8_t* xq, const float* xs, const int32_t* xqsum, const uint8_t* w, const uint16_t* scale,
               float* y, uint16_t* ybf, int64_t N, int64_t K) {
  at::parallel_for(0, N / 16, 8, [&](int64_t b0, int64_t b1) {
    block_rows8<M>(xq, xs, xqsum, w, scale, y, ybf, N, K, b0, b1);
  });
}

// per (row, group of 64): int8 activations, their scale, the exact sum of the group (int4's zero points)
// and the sum of the int8 values (int8's +128 offset)
struct QuantRows {
  torch::Tensor xq, xs, xsum, xqsum;
};

QuantRows quantize_rows(const torch::Tensor& x) {
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const int64_t M = x.size(0), K = x.size(1), groups = K / G;
  QuantRows r{torch::empty({M, K}, torch::kChar), torch::empty({M, groups}, torch::kFloat),
              torch::empty({M, groups}, torch::kFloat), torch::empty({M, groups}, torch::kInt)};
  const float* xf = bf16 ? nullptr : x.data_ptr<float>();
  const at::BFloat16* xb = bf16 ? x.data_ptr<at::BFloat16>() : nullptr;
  int8_t* qp = r.xq.data_ptr<int8_t>();
  float* sp = r.xs.data_ptr<float>();
  float* up = r.xsum.data_ptr<float>();
  int32_t* ip = r.xqsum.data_ptr<int32_t>();
  for (int64_t i = 0; i < M * groups; ++i) {
    float src[G];
    for (int j = 0; j < G; ++j) src[j] = bf16 ? static_cast<float>(xb[i * G + j]) : xf[i * G + j];
    float amax = 0.f, sum = 0.f;
    for (int j = 0; j < G; ++j) {
      amax = std::max(amax, std::fabs(src[j]));
      sum += src[j];
    }
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    int32_t qsum = 0;
    for (int j = 0; j < G; ++j) {
      qp[i * G + j] = static_cast<int8_t>(std::nearbyint(src[j] / s));
      qsum += qp[i * G + j];
    }
    sp[i] = s;
    up[i] = sum;
    ip[i] = qsum;
  }
  return r;
}

// x checked against the weights: (M, K) fp32 or bf16, K a multiple of 64, ``per_slot`` inputs per
// 64-byte slot of ``packed`` (int4: 8, int8: 4); returned contiguous
torch::Tensor checked_x(const torch::Tensor& x, const torch::Tensor& packed, int64_t per_slot) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x: (M, K) fp32 or bf16");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 3 && packed.size(2) == 64, "packed layout");
  TORCH_CHECK(x.size(1) % G == 0 && packed.size(1) * per_slot == x.size(1),
              "K must be a multiple of 64 and match the weights");
  return x.contiguous();
}

// y's rows from m0 on, as fp32 or as bf16 (read and written as such: no conversion calls; the other is null)
struct OutRows {
  float* f;
  uint16_t* b;
};

OutRows out_rows(torch::Tensor& y, int64_t m0) {
  const int64_t N = y.size(1);
  if (y.scalar_type() == torch::kBFloat16) return {nullptr, reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) + m0 * N};
  return {y.data_ptr<float>() + m0 * N, nullptr};
}

// f(m0, rows) for rows m0 .. m0 + rows - 1, 8 at a time (each pass reads the weights once); ``rows``
// is a std::integral_constant, so that f can pick the kernel compiled for that many rows
template <typename F>
void by_8_rows(int64_t M, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: f(m0, std::integral_constant<int, 1>{}); break;
      case 2: f(m0, std::integral_constant<int, 2>{}); break;
      case 3: f(m0, std::integral_constant<int, 3>{}); break;
      case 4: f(m0, std::integral_constant<int, 4>{}); break;
      case 5: f(m0, std::integral_constant<int, 5>{}); break;
      case 6: f(m0, std::integral_constant<int, 6>{}); break;
      case 7: f(m0, std::integral_constant<int, 7>{}); break;
      default: f(m0, std::integral_constant<int, 8>{}); break;
    }
  }
}

}  // namespace

// x (M, K) fp32 or bf16 -> y (M, N) in x's dtype, int4 weights (layout above).
torch::Tensor int4_mm(torch::Tensor x_in, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero) {
  const auto x = checked_x(x_in, packed, 8);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 16, groups = K / G;
  TORCH_CHECK(scale.numel() == N * groups && zero.numel() == N * groups, "scale / zero sizes");
  TORCH_CHECK(scale.scalar_type() == torch::kBFloat16 && zero.scalar_type() == torch::kBFloat16, "bf16 scale / zero");
  const QuantRows qr = quantize_rows(x);
  auto y = torch::empty({M, N}, x.scalar_type());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  const uint16_t* ze = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::BFloat16>());
  by_8_rows(M, [&](int64_t m0, auto rows) {
    const OutRows o = out_rows(y, m0);
    run_rows<decltype(rows)::value>(qr.xq.data_ptr<int8_t>() + m0 * K, qr.xs.data_ptr<float>() + m0 * groups,
                                    qr.xsum.data_ptr<float>() + m0 * groups, w, sc, ze, o.f, o.b, N, K);
  });
  return y;
}

// x (M, K) fp32 or bf16 -> y (M, N) in x's dtype, int8 weights (layout above), bf16 scale per output.
torch::Tensor int8_mm(torch::Tensor x_in, torch::Tensor packed, torch::Tensor scale) {
  const auto x = checked_x(x_in, packed, 4);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 16, groups = K / G;
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == torch::kBFloat16, "bf16 scale per output");
  const QuantRows qr = quantize_rows(x);
  auto y = torch::empty({M, N}, x.scalar_type());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  by_8_rows(M, [&](int64_t m0, auto rows) {
    const OutRows o = out_rows(y, m0);
    run_rows8<decltype(rows)::value>(qr.xq.data_ptr<int8_t>() + m0 * K, qr.xs.data_ptr<float>() + m0 * groups,
                                     qr.xqsum.data_ptr<int32_t>() + m0 * groups, w, sc, o.f, o.b, N, K);
  });
  return y;
}

// The weights as a dense (N, K) bf16 matrix, for prefill (many rows: one bf16 GEMM is faster there).
torch::Tensor int4_unpack(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 3 && packed.size(2) == 64, "packed layout");
  const int64_t NB = packed.size(0), K = packed.size(1) * 8, N = NB * 16, groups = K / G;
  auto w = torch::empty({N, K}, torch::kBFloat16);
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const at::BFloat16* sc = scale.data_ptr<at::BFloat16>();
  const at::BFloat16* ze = zero.data_ptr<at::BFloat16>();
  at::BFloat16* dst = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, NB, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t g = 0; g < groups; ++g) {
        for (int c = 0; c < 16; ++c) {
          const float s = sc[(b * groups + g) * 16 + c], z = ze[(b * groups + g) * 16 + c];
          at::BFloat16* row = dst + (b * 16 + c) * K + g * G;
          for (int t = 0; t < 8; ++t) {
            const uint8_t* bytes = src + (b * (K / 8) + g * 8 + t) * 64 + c * 4;
            for (int i = 0; i < 4; ++i) {
              row[t * 8 + i] = static_cast<at::BFloat16>((bytes[i] & 0x0F) * s + z);
              row[t * 8 + 4 + i] = static_cast<at::BFloat16>((bytes[i] >> 4) * s + z);
            }
          }
        }
      }
    }
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4_mm, "int4 weights x int8 activations (AVX-512 VNNI)");
  m.def("int4_unpack", &int4_unpack, "the weights as a dense bf16 matrix");
  m.def("int8_mm", &int8_mm, "int8 weights x int8 activations (AVX-512 VNNI)");
}
