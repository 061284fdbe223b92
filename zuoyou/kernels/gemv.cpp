// y = x @ W.T + b for a few rows of x (a decode step) and dense bf16 weights W, AVX-512 (zuoyou/fused.py).
//
// Why: the float layers left in an int4 model are read once per decode step for 2 rows (CFG), e.g.
// Janus-Pro-1B's image head (16384 x 2048 bf16, 64 MiB). PyTorch's bf16 matmul reads such a matrix at about
// half this machine's bandwidth for 2 rows (5.8 ms, 11.5 GB/s, where fp32 weights of twice the bytes take
// 6.1 ms): each 2048-wide bf16 row is one 4 KiB page, where the hardware prefetcher stops. Here every task
// streams its rows with software prefetch a few rows ahead, converts bf16 to fp32 in registers and
// accumulates in fp32; the result is rounded to x's dtype once, as PyTorch's bf16 linear rounds it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

#include "simd.h"

namespace {

constexpr int64_t MAX_ROWS = 4;  // rows of x per call (more: PyTorch's GEMM is the better tool)
constexpr int64_t AHEAD = 4;     // weight rows prefetched ahead of the one being read

template <typename T, int M>  // M: rows, a constant so that the loops over them unroll
void gemv(const T* x, const at::BFloat16* w, const at::BFloat16* bias, T* y, int64_t N, int64_t K) {
  const int64_t chunks = K / 16;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    // x as fp32, once per task (M x K floats: 32 KiB for 4 x 2048)
    std::vector<float> xf(M * K);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(x[i]);
    for (int64_t n = n0; n < n1; ++n) {
      const at::BFloat16* wr = w + n * K;
      const char* ahead = reinterpret_cast<const char*>(w + std::min(n + AHEAD, N - 1) * K);
      __m512 acc[M][2];
      for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        if ((c & 1) == 0) _mm_prefetch(ahead + c * 32, _MM_HINT_T0);  // the row ahead's 64 bytes per 2 chunks
        const __m512 wv = load16(wr + c * 16);
        for (int m = 0; m < M; ++m)  // two accumulators per row: half the dependency chain
          acc[m][c & 1] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(&xf[m * K + c * 16]), acc[m][c & 1]);
      }
      const float b = bias ? static_cast<float>(bias[n]) : 0.0f;
      for (int m = 0; m < M; ++m)
        y[m * N + n] = static_cast<T>(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + b);
    }
  });
}

template <typename T>
void run(const T* x, const at::BFloat16* w, const at::BFloat16* bias, T* y, int64_t M, int64_t N, int64_t K) {
  switch (M) {
    case 1: return gemv<T, 1>(x, w, bias, y, N, K);
    case 2: return gemv<T, 2>(x, w, bias, y, N, K);
    case 3: return gemv<T, 3>(x, w, bias, y, N, K);
    default: return gemv<T, 4>(x, w, bias, y, N, K);
  }
}

}  // namespace

// x (M, K) fp32 or bf16, M <= 4, contiguous; w (N, K) bf16 contiguous, K a multiple of 16; bias (N,) bf16
// or undefined. Returns (M, N) in x's dtype.
torch::Tensor bf16_gemv(torch::Tensor x_in, torch::Tensor w, c10::optional<torch::Tensor> bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) >= 1 && x_in.size(0) <= MAX_ROWS, "x: (M, K), 1 <= M <= 4");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat || x_in.scalar_type() == torch::kBFloat16, "x: fp32 or bf16");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.size(1) == x_in.size(1) &&
              w.size(1) % 16 == 0, "w: contiguous (N, K) bf16, K a multiple of 16");
  const int64_t M = x_in.size(0), N = w.size(0), K = w.size(1);
  const at::BFloat16* bp = nullptr;
  torch::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == torch::kBFloat16 && bias.numel() == N, "bias: (N,) bf16");
    bp = bias.data_ptr<at::BFloat16>();
  }
  const auto x = x_in.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (x.scalar_type() == torch::kBFloat16) {
    run<at::BFloat16>(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), bp, y.data_ptr<at::BFloat16>(), M, N, K);
  } else {
    run<float>(x.data_ptr<float>(), w.data_ptr<at::BFloat16>(), bp, y.data_ptr<float>(), M, N, K);
  }
  return y;
}
