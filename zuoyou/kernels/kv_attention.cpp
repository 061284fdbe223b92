// Decode attention (one query token per row) over a KV cache, AVX-512: the int8 cache of zuoyou/kvcache.py
// (``Int8KVCache``) or a plain one in the compute dtype (``KernelKVCache``).
//
// Why: each decode step reads the whole KV cache of every row. int8: when several images are drawn at
// once that is as much as the int4 weights (8 rows for 4 images with CFG: ~0.5 GB per step at the end of a
// Janus-Pro-1B image in bf16); stored as int8 with one fp32 scale per (row, head, slot) the cache takes half
// the memory and half the reads, and this kernel reads it as it is (no dequantised copy). Plain (fp32 /
// bf16): PyTorch's CPU attention reads a one-query bf16 cache at about half this machine's bandwidth (2 rows,
// 16 heads, 600 slots, hs 128: 9.8 MB in 0.96 ms) and adds ~0.1-0.2 ms per call of mask conversion and
// dispatch at short lengths, with a separate index_copy_ per key and value: 24 layers per step.
//
// Layout: k, v caches (B, nkv, S, hs), contiguous; int8: k8, v8 int8 plus ks, vs (B, nkv, S) fp32, with
// key or value x ~ x8 * scale, scale = max |x| / 127 over the head's hs values (symmetric).
// One call: write the new token's keys and values into ``slot``, then for every row b and head h
//   y[b, h] = sum_s softmax_s(q . k[s] / sqrt(hs), masked) v[s]   over slots s < n_read.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

// e^x for 16 floats, Cephes' expf: 2^n * p(f), f = x - n ln2 (|rel. error| ~1e-7); -inf -> 0
inline __m512 exp16(__m512 x) {
  const __mmask16 finite = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(finite, _mm512_scalef_ps(p, n));
}

inline __m512 load_i8(const int8_t* p) {  // 16 int8 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// quantise hs values (any dtype) to int8 with one scale
template <typename T>
void quantise(const T* x, int64_t hs, int8_t* out, float* scale) {
  float amax = 0.0f;
  for (int64_t d = 0; d < hs; ++d) amax = std::max(amax, std::fabs(to_float(x[d])));
  const float s = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int64_t d = 0; d < hs; ++d) out[d] = static_cast<int8_t>(std::nearbyint(to_float(x[d]) * inv));
  *scale = s;
}

// Slots ahead to prefetch: a task reads one (row, head)'s slots in order, a few pages of them, and the
// hardware prefetcher stops at each 4 KiB page; without this one core read the cache at ~6.5 GB/s.
constexpr int64_t PREFETCH = 8;

template <typename C>
inline void prefetch_slot(const C* p, int64_t hs) {  // (past the cache's end is harmless: a hint, never a fault)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < hs * static_cast<int64_t>(sizeof(C)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

// How a cache stores a head's slot: ``load`` 16 values as fp32, ``scale`` per slot, ``write`` a new one.
struct Int8Store {
  int8_t* x;
  float* s;
  static __m512 load(const int8_t* p) { return load_i8(p); }
  const int8_t* row(int64_t r, int64_t S, int64_t hs) const { return x + r * S * hs; }
  const float* scales(int64_t r, int64_t S) const { return s + r * S; }
  template <typename T>
  void write(const T* v, int64_t r, int64_t S, int64_t slot, int64_t hs) {
    quantise(v, hs, x + (r * S + slot) * hs, s + r * S + slot);
  }
};

template <typename C>
struct PlainStore {  // the compute dtype: no scale
  C* x;
  static __m512 load(const C* p) { return load16(p); }
  const C* row(int64_t r, int64_t S, int64_t hs) const { return x + r * S * hs; }
  const float* scales(int64_t, int64_t) const { return nullptr; }
  void write(const C* v, int64_t r, int64_t S, int64_t slot, int64_t hs) {
    std::memcpy(x + (r * S + slot) * hs, v, hs * sizeof(C));
  }
};

template <typename T, typename Store>
void attend(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new, Store kc, Store vc,
            int64_t nkv, int64_t S, int64_t slot, const uint8_t* mask, int64_t mask_row, int64_t n_read,
            torch::Tensor& y) {
  const int64_t B = q.size(0), nh = q.size(1), hs = q.size(3);
  const int64_t per_kv = nh / nkv, chunks = hs / 16;
  const T *qp = q.data_ptr<T>(), *kn = k_new.data_ptr<T>(), *vn = v_new.data_ptr<T>();
  T* out = y.data_ptr<T>();
  // 1. the new token's keys and values into their slot (before any head reads it)
  at::parallel_for(0, B * nkv, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      kc.write(kn + r * hs, r, S, slot, hs);
      vc.write(vn + r * hs, r, S, slot, hs);
    }
  });
  // 2. one (row, head) per task: scores, softmax, weighted sum of the values
  const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(hs));
  at::parallel_for(0, B * nh, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc(n_read + 16);
    __m512 qv[16], acc[16];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nh, h = t % nh, r = b * nkv + h / per_kv;
      const T* qrow = qp + t * hs;
      for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_mul_ps(load16(qrow + c * 16), _mm512_set1_ps(inv_sqrt));
      const auto* krow = kc.row(r, S, hs);
      const float* kscale = kc.scales(r, S);
      const uint8_t* m = mask ? mask + b * mask_row : nullptr;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < n_read; ++s) {
        if (m && !m[s]) {
          sc[s] = -std::numeric_limits<float>::infinity();
          continue;
        }
        prefetch_slot(krow + (s + PREFETCH) * hs, hs);
        __m512 a = _mm512_mul_ps(qv[0], Store::load(krow + s * hs));
        for (int64_t c = 1; c < chunks; ++c) a = _mm512_fmadd_ps(qv[c], Store::load(krow + s * hs + c * 16), a);
        sc[s] = _mm512_reduce_add_ps(a) * (kscale ? kscale[s] : 1.0f);
        best = std::max(best, sc[s]);
      }
      T* o = out + t * hs;
      if (best == -std::numeric_limits<float>::infinity()) {  // no slot visible (a padded row): zeros, not NaN
        for (int64_t d = 0; d < hs; ++d) o[d] = static_cast<T>(0.0f);
        continue;
      }
      for (int64_t s = n_read; s < n_read + 16; ++s) sc[s] = -std::numeric_limits<float>::infinity();
      __m512 total = _mm512_setzero_ps();
      const __m512 mx = _mm512_set1_ps(best);
      for (int64_t s = 0; s < n_read; s += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(&sc[s]), mx));
        _mm512_storeu_ps(&sc[s], e);
        total = _mm512_add_ps(total, e);
      }
      const float sum = _mm512_reduce_add_ps(total);
      const auto* vrow = vc.row(r, S, hs);
      const float* vscale = vc.scales(r, S);
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t s = 0; s < n_read; ++s) {
        prefetch_slot(vrow + (s + PREFETCH) * hs, hs);
        if (sc[s] == 0.0f) continue;  // masked slots
        const __m512 w = _mm512_set1_ps(vscale ? sc[s] * vscale[s] : sc[s]);
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(w, Store::load(vrow + s * hs + c * 16), acc[c]);
      }
      const float inv = 1.0f / sum;
      for (int64_t c = 0; c < chunks; ++c) {
        float tmp[16];
        _mm512_storeu_ps(tmp, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        for (int i = 0; i < 16; ++i) o[c * 16 + i] = static_cast<T>(tmp[i]);
      }
    }
  });
}

}  // namespace

namespace {

// the checks and the mask both entry points share; returns the mask's data (or null) and its row stride
const uint8_t* check_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t B_c,
                          int64_t nkv, int64_t S, int64_t hs_c, int64_t slot, int64_t n_read,
                          const c10::optional<torch::Tensor>& mask, int64_t* mrow) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "q: (B, nh, 1, hs)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat || q.scalar_type() == torch::kBFloat16, "q: fp32 or bf16");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes");
  const int64_t B = q.size(0), nh = q.size(1), hs = q.size(3);
  TORCH_CHECK(hs % 16 == 0 && hs <= 256 && nh % nkv == 0, "head size a multiple of 16 (<= 256), heads a multiple of kv heads");
  TORCH_CHECK(B_c == B && hs_c == hs && k.size(0) == B && k.size(1) == nkv && k.size(2) == 1 &&
              v.sizes() == k.sizes(), "cache / new keys shapes");
  TORCH_CHECK(slot >= 0 && slot < S && n_read > 0 && n_read <= S, "slot / n_read out of the cache");
  *mrow = 0;
  if (!mask.has_value() || !mask->defined()) return nullptr;
  const auto& m = *mask;
  TORCH_CHECK(m.scalar_type() == torch::kBool && m.dim() == 4 && m.size(0) == B && m.size(2) == 1 &&
              m.size(3) >= n_read && m.stride(3) == 1, "mask: (B, 1, 1, >= n_read) bool, last dim contiguous");
  *mrow = m.stride(0);
  return reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
}

}  // namespace

// q (B, nh, 1, hs), k_new / v_new (B, nkv, 1, hs), fp32 or bf16; caches as in the header; ``mask``
// (B, 1, 1, >= n_read) bool, True = may attend, or undefined = every slot below n_read.
// Returns y (B, nh, 1, hs) in q's dtype. Writes slot ``slot`` of the caches.
torch::Tensor kv8_attend(torch::Tensor q_in, torch::Tensor k_in, torch::Tensor v_in, torch::Tensor k8, torch::Tensor ks,
                         torch::Tensor v8, torch::Tensor vs, int64_t slot, c10::optional<torch::Tensor> mask,
                         int64_t n_read) {
  TORCH_CHECK(k8.scalar_type() == torch::kChar && v8.scalar_type() == torch::kChar && k8.is_contiguous() &&
              v8.is_contiguous() && k8.sizes() == v8.sizes() && k8.dim() == 4, "k8 / v8: contiguous int8 (B, nkv, S, hs)");
  TORCH_CHECK(ks.scalar_type() == torch::kFloat && vs.scalar_type() == torch::kFloat && ks.is_contiguous() &&
              vs.is_contiguous(), "ks / vs: contiguous fp32");
  const int64_t nkv = k8.size(1), S = k8.size(2);
  int64_t mrow;
  const uint8_t* mp = check_step(q_in, k_in, v_in, k8.size(0), nkv, S, k8.size(3), slot, n_read, mask, &mrow);
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto y = torch::empty_like(q);
  const Int8Store kc{k8.data_ptr<int8_t>(), ks.data_ptr<float>()}, vc{v8.data_ptr<int8_t>(), vs.data_ptr<float>()};
  if (q.scalar_type() == torch::kBFloat16) {
    attend<at::BFloat16>(q, k, v, kc, vc, nkv, S, slot, mp, mrow, n_read, y);
  } else {
    attend<float>(q, k, v, kc, vc, nkv, S, slot, mp, mrow, n_read, y);
  }
  return y;
}

// The same over a cache in q's dtype: kc, vc (B, nkv, S, hs), contiguous (zuoyou/kvcache.py ``KernelKVCache``).
torch::Tensor kv_attend(torch::Tensor q_in, torch::Tensor k_in, torch::Tensor v_in, torch::Tensor kc,
                        torch::Tensor vc, int64_t slot, c10::optional<torch::Tensor> mask, int64_t n_read) {
  TORCH_CHECK(kc.scalar_type() == q_in.scalar_type() && vc.scalar_type() == q_in.scalar_type() && kc.is_contiguous() &&
              vc.is_contiguous() && kc.sizes() == vc.sizes() && kc.dim() == 4, "kc / vc: contiguous (B, nkv, S, hs) in q's dtype");
  const int64_t nkv = kc.size(1), S = kc.size(2);
  int64_t mrow;
  const uint8_t* mp = check_step(q_in, k_in, v_in, kc.size(0), nkv, S, kc.size(3), slot, n_read, mask, &mrow);
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto y = torch::empty_like(q);
  if (q.scalar_type() == torch::kBFloat16) {
    using C = at::BFloat16;
    attend<C>(q, k, v, PlainStore<C>{kc.data_ptr<C>()}, PlainStore<C>{vc.data_ptr<C>()}, nkv, S, slot, mp, mrow, n_read, y);
  } else {
    attend<float>(q, k, v, PlainStore<float>{kc.data_ptr<float>()}, PlainStore<float>{vc.data_ptr<float>()}, nkv, S,
                  slot, mp, mrow, n_read, y);
  }
  return y;
}
