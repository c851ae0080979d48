// y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]: a weight-only int8 linear for decode-shaped rows on CPU.
//
// Decode multiplies a few rows by every weight, so the step is bound by how fast the int8 weights stream
// from memory. Each block of weight rows is read once, widened to float32 in registers, and multiplied by
// every activation row while it sits in L1 (activations stay float32: no bfloat16 rounding of x).
// torch's `_weight_int8pack_mm` reads these weights at about half the machine's bandwidth at one row
// (docs/quantization.md); this loop reads them near it.
//
// Built on first use by kernels/native.py with -march=native; without AVX-512 the portable loop
// below is what the compiler vectorizes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define KUBELLM_AVX512 1
#endif

namespace {

// One core's misses on a stream of int8 rows run at about 7 GB/s here, well below its share of the
// bandwidth; software prefetches 8 KiB ahead into L2 bring it to 10-11 (docs/quantization.md).
constexpr int64_t kPrefetchAhead = 8 * 1024;

// acc[t * R + r] = sum_k x[t][k] * w[r][k] for T activation rows and R int8 weight rows, each k_size long.
template <int T, int R>
inline void dot_block(const float* x, const int8_t* w, int64_t k_size, float* acc) {
#ifdef KUBELLM_AVX512
  // U independent sums per output when T x R alone would not hide the FMA latency
  constexpr int U = T * R >= 4 ? 1 : 4 / (T * R);
  __m512 sum[U][T][R];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) sum[u][t][r] = _mm512_setzero_ps();
  auto step = [&](int64_t at, __mmask16 mask, int u) {
    // the R rows' bytes lie together: prefetch the same share of the block kPrefetchAhead further on
    if (R * 16 >= 64 || at % (64 / (R * 16) * 16) == 0)
      for (int64_t off = 0; off < R * 16; off += 64) __builtin_prefetch(w + kPrefetchAhead + at * R + off, 0, 2);
    __m512 wv[R];  // 16 weights of each row, widened to float32 in registers
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + r * k_size + at)));
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + t * k_size + at);
      for (int r = 0; r < R; ++r) sum[u][t][r] = _mm512_fmadd_ps(xv, wv[r], sum[u][t][r]);
    }
  };
  int64_t k = 0;
  for (; k + 16 * U <= k_size; k += 16 * U)
    for (int u = 0; u < U; ++u) step(k + 16 * u, 0xFFFF, u);
  for (; k + 16 <= k_size; k += 16) step(k, 0xFFFF, 0);
  if (k < k_size) step(k, static_cast<__mmask16>((1u << (k_size - k)) - 1), 0);
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      __m512 total = sum[0][t][r];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, sum[u][t][r]);
      acc[t * R + r] = _mm512_reduce_add_ps(total);
    }
#else
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      const float* xt = x + t * k_size;
      const int8_t* wr = w + r * k_size;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < k_size; ++k) s += xt[k] * static_cast<float>(wr[k]);
      acc[t * R + r] = s;
    }
#endif
}

// Output columns [n0, n0 + R) for every activation row, in tiles of up to 4 activation rows;
// w points at weight row n0.
template <int R>
inline void rows_block(const float* x, int64_t m_size, int64_t k_size, const int8_t* w, const float* scale,
                       float* y, int64_t n_size, int64_t n0) {
  float acc[4 * R];
  int64_t m = 0;
  auto emit = [&](int tiles) {
    for (int t = 0; t < tiles; ++t)
      for (int r = 0; r < R; ++r) y[(m + t) * n_size + n0 + r] = acc[t * R + r] * scale[r];
  };
  for (; m + 4 <= m_size; m += 4) {
    dot_block<4, R>(x + m * k_size, w, k_size, acc);
    emit(4);
  }
  switch (m_size - m) {
    case 3: dot_block<3, R>(x + m * k_size, w, k_size, acc); emit(3); break;
    case 2: dot_block<2, R>(x + m * k_size, w, k_size, acc); emit(2); break;
    case 1: dot_block<1, R>(x + m * k_size, w, k_size, acc); emit(1); break;
    default: break;
  }
}

float to_float(const float v) { return v; }
float to_float(const c10::BFloat16 v) { return static_cast<float>(v); }

template <typename S>
void int8_linear_impl(const float* x, int64_t m_size, int64_t k_size, const int8_t* q, const S* scales,
                      int64_t n_size, float* y) {
  constexpr int64_t kRows = 4;  // output columns per block: 4 x 4 accumulators when there are tokens to reuse
  const int64_t blocks = (n_size + kRows - 1) / kRows;
  // about 64 KiB of weights per task, so two threads split even the smallest projection
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, kRows * k_size));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows;
      const int64_t rows = std::min(kRows, n_size - n0);
      const int8_t* block = q + n0 * k_size;
      float scale[kRows];
      for (int64_t r = 0; r < rows; ++r) scale[r] = to_float(scales[n0 + r]);
      if (rows == kRows && m_size > 1) {
        rows_block<kRows>(x, m_size, k_size, block, scale, y, n_size, n0);
      } else {  // one row at a time reads the weights as one sequential stream
        for (int64_t r = 0; r < rows; ++r)
          rows_block<1>(x, m_size, k_size, block + r * k_size, scale + r, y, n_size, n0 + r);
      }
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "int8_linear: x must be a contiguous float32 CPU matrix [rows, in]");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous(),
              "int8_linear: qweight must be a contiguous int8 matrix [out, in]");
  TORCH_CHECK(qweight.size(1) == x.size(1), "int8_linear: x has ", x.size(1), " columns, qweight ",
              qweight.size(1));
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == qweight.size(0) && scales.is_contiguous() &&
                  (scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16),
              "int8_linear: scales must be float32 or bfloat16 [out]");
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  if (scales.scalar_type() == at::kFloat) {
    int8_linear_impl(x.data_ptr<float>(), m, k, qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), n,
                     y.data_ptr<float>());
  } else {
    int8_linear_impl(x.data_ptr<float>(), m, k, qweight.data_ptr<int8_t>(), scales.data_ptr<c10::BFloat16>(),
                     n, y.data_ptr<float>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(kubellm, m) { m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor"); }

TORCH_LIBRARY_IMPL(kubellm, CPU, m) { m.impl("int8_linear", int8_linear); }
