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
#include <cstdlib>
#include <cstring>
#include <type_traits>
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "simd.h"

namespace {

constexpr int G = 64;  // inputs per group (weights and activations)

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
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ybf + m * N + b * 16), to_bf16_bits(v));
  } else {
    _mm512_storeu_ps(y + m * N + b * 16, v);
  }
}

// One group's int32 sums of one row into its fp32 accumulator (VNNI and AMX paths alike).
// int4: acc += dot * (scale * xs) + zero * xsum (zero points with the exact float sum of the group)
inline __m512 add_group4(__m512 acc, __m512i dot, __m512 s, __m512 z, float xs, float xsum) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(xs)), acc);
  return _mm512_fmadd_ps(z, _mm512_set1_ps(xsum), acc);
}

// int8: acc += (dot - 128 * sum of xq) * xs (the +128 of the unsigned weight bytes taken back)
inline __m512 add_group8(__m512 acc, __m512i dot, int32_t xqsum, float xs) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot, _mm512_set1_epi32(128 * xqsum))),
                         _mm512_set1_ps(xs), acc);
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
        acc[m] = add_group4(acc[m], sum2<M>(dlo[m], dhi[m]), s, z, xs[m * groups + g], xsum[m * groups + g]);
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
        acc[m] = add_group8(acc[m], sum2<M>(d0[m], d1[m]), xqsum[m * groups + g], xs[m * groups + g]);
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

// ---------------------------------------------------------------------------------------- AMX (5-8 rows)
// From 5 rows on, the VPDPBUSD kernels above are compute-bound (one instruction per row per 64 weight
// bytes). An AMX TDPBSUD multiplies a whole (rows x 64) int8 activation tile by a (64 x 16) weight tile:
// per group of 64 inputs and block of 16 outputs, one instruction for all rows. The weights' VNNI
// layout is already AMX's B-tile layout (16 rows of 4 inputs x 16 outputs): int8 weights load as they
// are; int4 ones are unpacked into a 1 KiB buffer first (low nibbles: inputs 8t..8t+3, high: 8t+4..).
// The group's int32 tile is stored and scaled exactly as in the VNNI kernels, so both paths give the
// same sums. Used where the CPU has AMX-INT8 and Linux grants the tile state (``amx_available``).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool request_amx() {
#if defined(__linux__) && defined(__x86_64__)
  if (const char* env = std::getenv("ZUOYOU_AMX"); env && std::strcmp(env, "0") == 0) return false;
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool tile = d & (1u << 24), int8 = d & (1u << 25);  // CPUID.(7,0):EDX AMX-TILE, AMX-INT8
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return tile && int8 && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}

bool amx_ok() {
  static const bool ok = request_amx();
  return ok;
}

// tiles: 0 and 1 = C (M x 16 int32, even and odd groups), 2 = A (M x 64 int8 activations), 3 = B (16 x 64 weights)
__attribute__((target("amx-tile,amx-int8"))) inline void amx_configure(int M) {
  TileConfig cfg;
  for (int t = 0; t < 3; ++t) {
    cfg.rows[t] = M;
    cfg.colsb[t] = 64;
  }
  cfg.rows[3] = 16;
  cfg.colsb[3] = 64;
  // gcc does not see ldtilecfg read the whole 64 bytes and drops the stores above without this barrier
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// One block of 16 outputs, software-pipelined over the groups: while group g's tile product runs, the
// int4 weights of group g+1 are unpacked (into the other half of ``wbuf``) and group g-1's sums (stored
// from the other C tile) are scaled into ``acc``: a tile load never waits on stores just made.
template <int M, bool INT4>
struct AmxBlock {
  const int8_t* xq;
  const float *xs, *xsum;
  const int32_t* xqsum;
  const uint16_t *scale, *zero;
  int64_t K, groups, b;
  const uint8_t* wb;
  alignas(64) uint8_t wbuf[2][16 * 64];
  alignas(64) int32_t cbuf[2][M * 16];
  __m512 acc[M];

  __attribute__((target("amx-tile,amx-int8"))) const uint8_t* weights(int64_t g) {
    if constexpr (INT4) {
      const __m512i low = _mm512_set1_epi8(0x0F);
      const uint8_t* wg = wb + g * 8 * 64;
      uint8_t* dst = wbuf[g & 1];
      for (int t = 0; t < 8; ++t) {
        _mm_prefetch(reinterpret_cast<const char*>(wg + t * 64 + 2048), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(wg + t * 64);
        _mm512_store_si512(dst + (2 * t) * 64, _mm512_and_si512(v, low));
        _mm512_store_si512(dst + (2 * t + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
      }
      return dst;
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(wb + g * 16 * 64 + 4096), _MM_HINT_T0);
      return wb + g * 16 * 64;
    }
  }

  __attribute__((target("amx-tile,amx-int8"))) void scale_into_acc(int64_t g) {
    const int32_t* c = cbuf[g & 1];
    if constexpr (INT4) {
      const __m512 s = load_bf16(scale + (b * groups + g) * 16), z = load_bf16(zero + (b * groups + g) * 16);
      for (int m = 0; m < M; ++m) {
        acc[m] = add_group4(acc[m], _mm512_load_si512(c + m * 16), s, z, xs[m * groups + g], xsum[m * groups + g]);
      }
    } else {
      for (int m = 0; m < M; ++m) {
        acc[m] = add_group8(acc[m], _mm512_load_si512(c + m * 16), xqsum[m * groups + g], xs[m * groups + g]);
      }
    }
  }

  // group g on C tile 0 (even g) or 1 (odd g): gcc's tile intrinsics paste the tile number into the
  // instruction text, so it must be a literal
#define ZUOYOU_AMX_GROUP(T)                                                                \
  __attribute__((target("amx-tile,amx-int8"))) void group##T(int64_t g, const uint8_t*& next) { \
    _tile_loadd(3, next, 64);                                                              \
    _tile_loadd(2, xq + g * G, K);                                                         \
    _tile_zero(T);                                                                         \
    _tile_dpbsud(T, 2, 3); /* signed activations x unsigned weights (int4: 0..15, int8: q + 128) */ \
    if (g + 1 < groups) next = weights(g + 1);                                             \
    if (g > 0) scale_into_acc(g - 1);                                                      \
    _tile_stored(T, cbuf[g & 1], 64);                                                      \
  }
  ZUOYOU_AMX_GROUP(0)
  ZUOYOU_AMX_GROUP(1)
#undef ZUOYOU_AMX_GROUP

  __attribute__((target("amx-tile,amx-int8"))) void run(float* y, uint16_t* ybf, int64_t N) {
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* next = weights(0);
    for (int64_t g = 0; g < groups; g += 2) {
      group0(g, next);
      if (g + 1 < groups) group1(g + 1, next);
    }
    scale_into_acc(groups - 1);
    if constexpr (INT4) {
      for (int m = 0; m < M; ++m) store16(acc[m], y, ybf, m, N, b);
    } else {
      const __m512 s = load_bf16(scale + b * 16);
      for (int m = 0; m < M; ++m) store16(_mm512_mul_ps(acc[m], s), y, ybf, m, N, b);
    }
  }
};

template <int M, bool INT4>
__attribute__((target("amx-tile,amx-int8"))) void block_rows_amx(
    const int8_t* xq, const float* xs, const float* xsum, const int32_t* xqsum, const uint8_t* w,
    const uint16_t* scale, const uint16_t* zero, float* y, uint16_t* ybf, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  amx_configure(M);
  AmxBlock<M, INT4> blk;
  blk.xq = xq, blk.xs = xs, blk.xsum = xsum, blk.xqsum = xqsum, blk.scale = scale, blk.zero = zero;
  blk.K = K, blk.groups = K / G;
  for (int64_t b = b0; b < b1; ++b) {
    blk.b = b;
    blk.wb = w + b * (K / (INT4 ? 8 : 4)) * 64;  // int4: K/8 slots of 64 bytes, int8: K/4
    blk.run(y, ybf, N);
  }
  _tile_release();
}

template <int M, bool INT4>
void run_rows_amx(const int8_t* xq, const float* xs, const float* xsum, const int32_t* xqsum, const uint8_t* w,
                  const uint16_t* scale, const uint16_t* zero, float* y, uint16_t* ybf, int64_t N, int64_t K) {
  at::parallel_for(0, N / 16, 8, [&](int64_t b0, int64_t b1) {
    block_rows_amx<M, INT4>(xq, xs, xsum, xqsum, w, scale, zero, y, ybf, N, K, b0, b1);
  });
}

constexpr int AMX_MIN_ROWS = 5;

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
    constexpr int R = decltype(rows)::value;
    const int8_t* xq = qr.xq.data_ptr<int8_t>() + m0 * K;
    const float *xs = qr.xs.data_ptr<float>() + m0 * groups, *xsum = qr.xsum.data_ptr<float>() + m0 * groups;
    if (R >= AMX_MIN_ROWS && amx_ok()) {
      run_rows_amx<R, true>(xq, xs, xsum, nullptr, w, sc, ze, o.f, o.b, N, K);
    } else {
      run_rows<R>(xq, xs, xsum, w, sc, ze, o.f, o.b, N, K);
    }
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
    constexpr int R = decltype(rows)::value;
    const int8_t* xq = qr.xq.data_ptr<int8_t>() + m0 * K;
    const float* xs = qr.xs.data_ptr<float>() + m0 * groups;
    const int32_t* xqsum = qr.xqsum.data_ptr<int32_t>() + m0 * groups;
    if (R >= AMX_MIN_ROWS && amx_ok()) {
      run_rows_amx<R, false>(xq, xs, nullptr, xqsum, w, sc, nullptr, o.f, o.b, N, K);
    } else {
      run_rows8<R>(xq, xs, xqsum, w, sc, o.f, o.b, N, K);
    }
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

// kv_attention.cpp
torch::Tensor kv8_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k8, torch::Tensor ks,
                         torch::Tensor v8, torch::Tensor vs, int64_t slot, c10::optional<torch::Tensor> mask,
                         int64_t n_read);
torch::Tensor kv_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kc, torch::Tensor vc,
                        int64_t slot, c10::optional<torch::Tensor> mask, int64_t n_read);
// gemv.cpp
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
// fused_ops.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4_mm, "int4 weights x int8 activations (AVX-512 VNNI)");
  m.def("int4_unpack", &int4_unpack, "the weights as a dense bf16 matrix");
  m.def("int8_mm", &int8_mm, "int8 weights x int8 activations (AVX-512 VNNI)");
  m.def("kv8_attend", &kv8_attend, "one-token attention over an int8 KV cache (writes the new token first)");
  m.def("kv_attend", &kv_attend, "one-token attention over a KV cache in the compute dtype (writes the new token first)");
  m.def("bf16_gemv", &bf16_gemv, "x @ w.T + b for 1-4 rows and dense bf16 weights");
  m.def("rms_norm", &rms_norm, "HF Llama's RMSNorm in one call (fp32 or bf16)");
  m.def("rope", &rope, "rotate-half RoPE with a signed sin table in one call (fp32 or bf16)");
  m.def("amx_available", &amx_ok, "AMX-INT8 used for 5-8 row inputs (the CPU has it, Linux granted it, ZUOYOU_AMX != 0)");
}
