// Few-row (decode) products of x with frugalflow's packed 4- and 8-bit weights, on the CPU.
//
// The weights are read as pack.py stores them, nothing converted: qweight uint8 [out, in * bits / 8]
// (4 bits: byte j holds code 2j in its low nibble and code 2j+1 in its high one), scales [out, groups]
// (float16 or float32), zeros uint8 [out, groups]; W = (q - zero) * scale. So
//   y[m, n] = sum_g scale[n, g] * (sum_{k in g} q[n, k] * x[m, k]  -  zero[n, g] * xsum[m, g]).
// One call takes a list of such weights that read the same x (a layer's q/k/v) and writes their
// outputs side by side. x: float32 or bfloat16 [rows, in], rows <= 8; y: x's dtype [rows, sum of outs].
// Output rows are split over torch's intra-op threads; each output is summed in one fixed order,
// whatever the split, so a layer's columns do not depend on what they are computed with.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;

struct Weight {
  const uint8_t* q;
  const void* scale;
  bool half;  // scale is float16 (else float32)
  const uint8_t* zero;
  int64_t out;
  int64_t start;  // first output column
};

inline float scale_at(const Weight& w, int64_t i) {
  return w.half ? float(static_cast<const c10::Half*>(w.scale)[i]) : static_cast<const float*>(w.scale)[i];
}

// x as float32, for 4 bits in "nibble order": within each run of 32 inputs, the 16 even ones then
// the 16 odd ones, matching the low and high nibbles of 16 packed bytes.
template <typename T>
void prepare_x(const T* x, int64_t rows, int64_t in, int bits, int64_t group, float* xp, float* xs) {
  const int64_t G = in / group;
  for (int64_t m = 0; m < rows; ++m) {
    const T* xm = x + m * in;
    float* pm = xp + m * in;
    if (bits == 4) {
      for (int64_t b = 0; b < in; b += 32)
        for (int64_t j = 0; j < 16; ++j) {
          pm[b + j] = float(xm[b + 2 * j]);
          pm[b + 16 + j] = float(xm[b + 2 * j + 1]);
        }
    } else {
      for (int64_t k = 0; k < in; ++k) pm[k] = float(xm[k]);
    }
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += pm[k];
      xs[m * G + g] = s;
    }
  }
}

// codes k0..k1 of one weight row times x (codes in nibble order for 4 bits, bytes for 8), added to
// acc[m] for every row m of x
#if defined(__AVX512F__)
template <int Bits>
inline void dots(const uint8_t* q, const float* xp, int64_t rows, int64_t in, int64_t k0, int64_t k1, __m512* acc) {
  if (Bits == 4) {
    for (int64_t k = k0; k < k1; k += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      for (int64_t m = 0; m < rows; ++m) {
        acc[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + m * in + k), acc[m]);
        acc[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + m * in + k + 16), acc[m]);
      }
    }
  } else {
    for (int64_t k = k0; k < k1; k += 16) {
      const __m512 a = _mm512_cvtepi32_ps(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
      for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xp + m * in + k), acc[m]);
    }
  }
}
#else
template <int Bits>
inline void dots(const uint8_t* q, const float* xp, int64_t rows, int64_t in, int64_t k0, int64_t k1, float (*acc)[16]) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = xp + m * in;
    if (Bits == 4) {
      for (int64_t k = k0; k < k1; k += 32)
        for (int64_t j = 0; j < 16; ++j) {
          const uint8_t b = q[k / 2 + j];
          acc[m][j] += float(b & 0xF) * xm[k + j] + float(b >> 4) * xm[k + 16 + j];
        }
    } else {
      for (int64_t k = k0; k < k1; k += 16)
        for (int64_t j = 0; j < 16; ++j) acc[m][j] += float(q[k + j]) * xm[k + j];
    }
  }
}
#endif

// output columns n0..n1 of weight w: per group, the code dot products scaled, less zero * xsum
template <int Bits, typename T>
void rows_of(const Weight& w, const float* xp, const float* xs, int64_t rows, int64_t in, int64_t group,
             T* y, int64_t y_cols, int64_t n0, int64_t n1) {
  const int64_t G = in / group, row_bytes = in * Bits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = w.q + n * row_bytes;
    float corr[kMaxRows] = {0.f};
#if defined(__AVX512F__)
    __m512 total[kMaxRows], acc[kMaxRows];
    for (int64_t m = 0; m < rows; ++m) total[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
      dots<Bits>(qn, xp, rows, in, g * group, (g + 1) * group, acc);
      const float s = scale_at(w, n * G + g), sz = s * float(w.zero[n * G + g]);
      const __m512 sv = _mm512_set1_ps(s);
      for (int64_t m = 0; m < rows; ++m) {
        total[m] = _mm512_fmadd_ps(acc[m], sv, total[m]);
        corr[m] += sz * xs[m * G + g];
      }
    }
    for (int64_t m = 0; m < rows; ++m) y[m * y_cols + w.start + n] = T(_mm512_reduce_add_ps(total[m]) - corr[m]);
#else
    float total[kMaxRows][16] = {{0.f}}, acc[kMaxRows][16];
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t m = 0; m < rows; ++m)
        for (int j = 0; j < 16; ++j) acc[m][j] = 0.f;
      dots<Bits>(qn, xp, rows, in, g * group, (g + 1) * group, acc);
      const float s = scale_at(w, n * G + g), sz = s * float(w.zero[n * G + g]);
      for (int64_t m = 0; m < rows; ++m) {
        for (int j = 0; j < 16; ++j) total[m][j] += acc[m][j] * s;
        corr[m] += sz * xs[m * G + g];
      }
    }
    for (int64_t m = 0; m < rows; ++m) {
      float t = 0.f;
      for (int j = 0; j < 16; ++j) t += total[m][j];
      y[m * y_cols + w.start + n] = T(t - corr[m]);
    }
#endif
  }
}

template <typename T>
torch::Tensor run(const torch::Tensor& x, const std::vector<Weight>& ws, int bits, int64_t group, int64_t cols) {
  const int64_t rows = x.size(0), in = x.size(1), G = in / group;
  std::vector<float> xp(rows * in), xs(rows * G);
  prepare_x(x.data_ptr<T>(), rows, in, bits, group, xp.data(), xs.data());
  auto y = torch::empty({rows, cols}, x.options());
  T* yp = y.data_ptr<T>();
  // one index space over every weight's rows, split over the threads in chunks of >= 16 rows
  at::parallel_for(0, cols, 16, [&](int64_t c0, int64_t c1) {
    for (const Weight& w : ws) {
      const int64_t a = std::max(c0, w.start) - w.start, b = std::min(c1, w.start + w.out) - w.start;
      if (a >= b) continue;
      if (bits == 4)
        rows_of<4, T>(w, xp.data(), xs.data(), rows, in, group, yp, cols, a, b);
      else
        rows_of<8, T>(w, xp.data(), xs.data(), rows, in, group, yp, cols, a, b);
    }
  });
  return y;
}

}  // namespace

torch::Tensor packed_gemv(torch::Tensor x, std::vector<torch::Tensor> qweights, std::vector<torch::Tensor> scales,
                          std::vector<torch::Tensor> zeros, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() &&
              (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x must be a contiguous 2-D float32 or bfloat16 CPU tensor");
  const int64_t rows = x.size(0), in = x.size(1);
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "x must have 1..", kMaxRows, " rows, got ", rows);
  TORCH_CHECK(group > 0 && in % group == 0 && group % (bits == 4 ? 32 : 16) == 0,
              "group ", group, " must divide in (", in, ") and be a multiple of ", bits == 4 ? 32 : 16);
  TORCH_CHECK(!qweights.empty() && qweights.size() == scales.size() && qweights.size() == zeros.size(),
              "one scale and zero tensor per weight");
  std::vector<Weight> ws;
  int64_t cols = 0;
  for (size_t i = 0; i < qweights.size(); ++i) {
    const auto &q = qweights[i], &s = scales[i], &z = zeros[i];
    const int64_t out = q.size(0);
    TORCH_CHECK(q.scalar_type() == torch::kByte && q.is_contiguous() && q.dim() == 2 && q.size(1) == in * bits / 8,
                "qweight ", i, " must be contiguous uint8 [out, ", in * bits / 8, "]");
    TORCH_CHECK((s.scalar_type() == torch::kHalf || s.scalar_type() == torch::kFloat) && s.is_contiguous() &&
                s.numel() == out * (in / group), "scales ", i, " must be contiguous float16/32 [out, ", in / group, "]");
    TORCH_CHECK(z.scalar_type() == torch::kByte && z.is_contiguous() && z.numel() == s.numel(),
                "zeros ", i, " must be contiguous uint8 like its scales");
    ws.push_back({q.data_ptr<uint8_t>(), s.data_ptr(), s.scalar_type() == torch::kHalf, z.data_ptr<uint8_t>(), out, cols});
    cols += out;
  }
  return x.scalar_type() == torch::kFloat ? run<float>(x, ws, bits, group, cols)
                                          : run<c10::BFloat16>(x, ws, bits, group, cols);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_gemv", &packed_gemv, "x [rows <= 8, in] times packed 4/8-bit weights, outputs side by side");
}
