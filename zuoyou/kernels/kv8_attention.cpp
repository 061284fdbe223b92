// Decode attention (one query token per row) over an int8 KV cache, AVX-512.
//
// Why: when several images are drawn at once, each decode step reads the whole KV cache of every
// row (8 rows for 4 images with CFG: ~0.5 GB per step at the end of a Janus-Pro-1B image in bf16),
// as much as the int4 weights. Stored as int8 with one fp32 scale per (row, head, slot), the cache
// takes half the memory and half the reads; this kernel reads it as it is (no dequantised copy).
//
// Layout (zuoyou/kvcache.py): k8, v8 (B, nkv, S, hs) int8; ks, vs (B, nkv, S) fp32;
// key or value x ~ x8 * scale, scale = max |x| / 127 over the head's hs values (symmetric).
// One call: quantise the new token's keys and values into ``slot``, then for every row b and head h
//   y[b, h] = sum_s softmax_s(q . k[s] / sqrt(hs), masked) v[s]   over slots s < n_read.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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

template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new, torch::Tensor& k8,
            torch::Tensor& ks, torch::Tensor& v8, torch::Tensor& vs, int64_t slot, const uint8_t* mask,
            int64_t mask_row, int64_t n_read, torch::Tensor& y) {
  const int64_t B = q.size(0), nh = q.size(1), hs = q.size(3), nkv = k8.size(1), S = k8.size(2);
  const int64_t per_kv = nh / nkv, chunks = hs / 16;
  const T *qp = q.data_ptr<T>(), *kn = k_new.data_ptr<T>(), *vn = v_new.data_ptr<T>();
  int8_t *K8 = k8.data_ptr<int8_t>(), *V8 = v8.data_ptr<int8_t>();
  float *KS = ks.data_ptr<float>(), *VS = vs.data_ptr<float>();
  T* out = y.data_ptr<T>();
  // 1. the new token's keys and values into their slot (before any head reads it)
  at::parallel_for(0, B * nkv, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      quantise(kn + r * hs, hs, K8 + (r * S + slot) * hs, KS + r * S + slot);
      quantise(vn + r * hs, hs, V8 + (r * S + slot) * hs, VS + r * S + slot);
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
      for (int64_t c = 0; c < chunks; ++c) {
        float tmp[16];
        for (int i = 0; i < 16; ++i) tmp[i] = to_float(qrow[c * 16 + i]) * inv_sqrt;
        qv[c] = _mm512_loadu_ps(tmp);
      }
      const int8_t* krow = K8 + r * S * hs;
      const float* kscale = KS + r * S;
      const uint8_t* m = mask ? mask + b * mask_row : nullptr;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < n_read; ++s) {
        if (m && !m[s]) {
          sc[s] = -std::numeric_limits<float>::infinity();
          continue;
        }
        __m512 a = _mm512_mul_ps(qv[0], load_i8(krow + s * hs));
        for (int64_t c = 1; c < chunks; ++c) a = _mm512_fmadd_ps(qv[c], load_i8(krow + s * hs + c * 16), a);
        sc[s] = _mm512_reduce_add_ps(a) * kscale[s];
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
      const int8_t* vrow = V8 + r * S * hs;
      const float* vscale = VS + r * S;
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t s = 0; s < n_read; ++s) {
        if (sc[s] == 0.0f) continue;  // masked slots
        const __m512 w = _mm512_set1_ps(sc[s] * vscale[s]);
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(w, load_i8(vrow + s * hs + c * 16), acc[c]);
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

// q (B, nh, 1, hs), k_new / v_new (B, nkv, 1, hs), fp32 or bf16; caches as in the header; ``mask``
// (B, 1, 1, >= n_read) bool, True = may attend, or undefined = every slot below n_read.
// Returns y (B, nh, 1, hs) in q's dtype. Writes slot ``slot`` of the caches.
torch::Tensor kv8_attend(torch::Tensor q_in, torch::Tensor k_in, torch::Tensor v_in, torch::Tensor k8, torch::Tensor ks,
                         torch::Tensor v8, torch::Tensor vs, int64_t slot, c10::optional<torch::Tensor> mask_in,
                         int64_t n_read) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1, "q: (B, nh, 1, hs)");
  TORCH_CHECK(q_in.scalar_type() == torch::kFloat || q_in.scalar_type() == torch::kBFloat16, "q: fp32 or bf16");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(), "q, k, v dtypes");
  TORCH_CHECK(k8.scalar_type() == torch::kChar && v8.scalar_type() == torch::kChar && k8.is_contiguous() &&
              v8.is_contiguous(), "k8 / v8: contiguous int8");
  TORCH_CHECK(ks.scalar_type() == torch::kFloat && vs.scalar_type() == torch::kFloat && ks.is_contiguous() &&
              vs.is_contiguous(), "ks / vs: contiguous fp32");
  const int64_t B = q_in.size(0), nh = q_in.size(1), hs = q_in.size(3), nkv = k8.size(1), S = k8.size(2);
  TORCH_CHECK(hs % 16 == 0 && hs <= 256 && nh % nkv == 0, "head size a multiple of 16 (<= 256), heads a multiple of kv heads");
  TORCH_CHECK(k8.size(0) == B && k8.size(3) == hs && k_in.size(0) == B && k_in.size(1) == nkv && k_in.size(2) == 1,
              "cache / new keys shapes");
  TORCH_CHECK(slot >= 0 && slot < S && n_read > 0 && n_read <= S, "slot / n_read out of the cache");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  torch::Tensor mask;
  const uint8_t* mp = nullptr;
  int64_t mrow = 0;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = *mask_in;
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.dim() == 4 && mask.size(0) == B && mask.size(2) == 1 &&
                mask.size(3) >= n_read && mask.stride(3) == 1, "mask: (B, 1, 1, >= n_read) bool, last dim contiguous");
    mp = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    mrow = mask.stride(0);
  }
  auto y = torch::empty({B, nh, 1, hs}, q.scalar_type());
  if (q.scalar_type() == torch::kBFloat16) {
    attend<at::BFloat16>(q, k, v, k8, ks, v8, vs, slot, mp, mrow, n_read, y);
  } else {
    attend<float>(q, k, v, k8, ks, v8, vs, slot, mp, mrow, n_read, y);
  }
  return y;
}
