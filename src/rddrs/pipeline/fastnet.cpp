// Two kernels for convolution -> ReLU -> 2x2 max-pool networks on the CPU (rddrs.pipeline.fastnet).
//
// pool_relu: p = relu(maxpool2x2(z)) in one pass over a channels-last z, with a one-byte code per
// output: the window position of the maximum (0..3 in row-major order, the first maximum as
// torch's max_pool2d takes it), or 4 where the maximum is <= 0 (ReLU passes no gradient there).
//
// input_grad: d(sum_k g_k logit_k)/dx of the MnistCNN stack (conv1 -> pool_relu -> conv2 ->
// pool_relu -> linear), image by image in small buffers. Below each pool only the coded position
// of each window receives a gradient, so each convolution's input gradient is a scatter of its
// weights at those positions: a quarter of the multiply-adds of a dense transposed convolution.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr uint8_t NO_GRADIENT = 4;

void check(const at::Tensor& t, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == type, name, " has the wrong dtype");
}

}  // namespace

std::vector<at::Tensor> pool_relu(const at::Tensor& z) {
  check(z, at::kFloat, "z");
  TORCH_CHECK(z.dim() == 4 && z.size(2) % 2 == 0 && z.size(3) % 2 == 0, "z must be N x C x H x W with H, W even");
  TORCH_CHECK(z.is_contiguous(at::MemoryFormat::ChannelsLast), "z must be channels-last");
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), h = H / 2, w = W / 2;
  auto out = at::empty({N, C, h, w}, z.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto code = at::empty({N, C, h, w}, z.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
  const float* zp = z.data_ptr<float>();
  float* op = out.data_ptr<float>();
  uint8_t* cp = code.data_ptr<uint8_t>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t py = 0; py < h; ++py) {
        for (int64_t px = 0; px < w; ++px) {
          const float* q0 = zp + ((n * H + 2 * py) * W + 2 * px) * C;
          const float* q1 = q0 + C;
          const float* q2 = q0 + W * C;
          const float* q3 = q2 + C;
          const int64_t at_ = ((n * h + py) * w + px) * C;
          float* o = op + at_;
          uint8_t* k = cp + at_;
          int64_t c = 0;
#ifdef __AVX2__
          const __m256 zero = _mm256_setzero_ps(), none = _mm256_set1_ps(NO_GRADIENT), nans = _mm256_set1_ps(nan);
          for (; c + 8 <= C; c += 8) {
            const __m256 v0 = _mm256_loadu_ps(q0 + c), v1 = _mm256_loadu_ps(q1 + c);
            const __m256 v2 = _mm256_loadu_ps(q2 + c), v3 = _mm256_loadu_ps(q3 + c);
            __m256 m = v0, a = zero, t;
            t = _mm256_cmp_ps(v1, m, _CMP_GT_OQ); m = _mm256_blendv_ps(m, v1, t); a = _mm256_blendv_ps(a, _mm256_set1_ps(1), t);
            t = _mm256_cmp_ps(v2, m, _CMP_GT_OQ); m = _mm256_blendv_ps(m, v2, t); a = _mm256_blendv_ps(a, _mm256_set1_ps(2), t);
            t = _mm256_cmp_ps(v3, m, _CMP_GT_OQ); m = _mm256_blendv_ps(m, v3, t); a = _mm256_blendv_ps(a, _mm256_set1_ps(3), t);
            const __m256 is_nan = _mm256_or_ps(_mm256_cmp_ps(v0, v1, _CMP_UNORD_Q), _mm256_cmp_ps(v2, v3, _CMP_UNORD_Q));
            const __m256 positive = _mm256_andnot_ps(is_nan, _mm256_cmp_ps(m, zero, _CMP_GT_OQ));
            _mm256_storeu_ps(o + c, _mm256_blendv_ps(_mm256_and_ps(m, positive), nans, is_nan));
            const __m256i codes = _mm256_cvttps_epi32(_mm256_blendv_ps(none, a, positive));
            const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
            _mm_storel_epi64(reinterpret_cast<__m128i*>(k + c), _mm_packus_epi16(words, words));
          }
#endif
          for (; c < C; ++c) {
            float m = q0[c];
            uint8_t a = 0;
            const float v1 = q1[c], v2 = q2[c], v3 = q3[c];
            if (v1 > m) { m = v1; a = 1; }
            if (v2 > m) { m = v2; a = 2; }
            if (v3 > m) { m = v3; a = 3; }
            const bool is_nan = std::isnan(q0[c]) || std::isnan(v1) || std::isnan(v2) || std::isnan(v3);
            const bool positive = m > 0.f && !is_nan;
            o[c] = is_nan ? nan : (positive ? m : 0.f);
            k[c] = positive ? a : NO_GRADIENT;
          }
        }
      }
    }
  });
  return {out, code};
}

// g: N x K; wfc: K x (h2 * w2 * C2), columns in channels-last order (position-major);
// code2: N x C2 x h2 x w2 channels-last; w2t: C2 x k x k x C1 (w2t[o][y][x][i] = W2[o][i][y][x]);
// code1: N x C1 x h1 x w1 channels-last; w1: C1 x k x 8 (conv1's weights, one input channel, each kernel
// row padded with zeros to 8).
at::Tensor input_grad(const at::Tensor& g, const at::Tensor& wfc, const at::Tensor& code2, const at::Tensor& w2t,
                      const at::Tensor& code1, const at::Tensor& w1) {
  check(g, at::kFloat, "g");
  check(wfc, at::kFloat, "wfc");
  check(w2t, at::kFloat, "w2t");
  check(w1, at::kFloat, "w1");
  check(code1, at::kByte, "code1");
  check(code2, at::kByte, "code2");
  TORCH_CHECK(g.is_contiguous() && wfc.is_contiguous() && w2t.is_contiguous() && w1.is_contiguous(),
              "g and the weights must be contiguous");
  TORCH_CHECK(code1.is_contiguous(at::MemoryFormat::ChannelsLast) && code2.is_contiguous(at::MemoryFormat::ChannelsLast),
              "the codes must be channels-last");
  const int64_t N = g.size(0), K = g.size(1);
  const int64_t C2 = code2.size(1), h2 = code2.size(2), w2 = code2.size(3);
  const int64_t C1 = code1.size(1), h1 = code1.size(2), w1n = code1.size(3);
  const int64_t k = w1.size(1);
  const int64_t H1 = 2 * h1, W1 = 2 * w1n;           // conv1's output
  const int64_t H0 = H1 + k - 1, W0 = W1 + k - 1;    // the image
  const int64_t F = h2 * w2 * C2;
  TORCH_CHECK(wfc.size(0) == K && wfc.size(1) == F, "wfc must be K x (h2 w2 C2)");
  TORCH_CHECK(w2t.size(0) == C2 && w2t.size(1) == k && w2t.size(2) == k && w2t.size(3) == C1, "w2t has the wrong shape");
  TORCH_CHECK(2 * h2 + k - 1 == h1 && 2 * w2 + k - 1 == w1n, "conv2's input must be pool1's output");
  TORCH_CHECK(w1.size(0) == C1 && w1.size(2) == 8 && k <= 8, "w1 has the wrong shape");
  TORCH_CHECK(code1.size(0) == N && code2.size(0) == N, "the codes must have N rows");
  auto gx = at::empty({N, 1, H0, W0}, g.options());
  const float* gp = g.data_ptr<float>();
  const float* fc = wfc.data_ptr<float>();
  const uint8_t* c2p = code2.data_ptr<uint8_t>();
  const float* w2p = w2t.data_ptr<float>();
  const uint8_t* c1p = code1.data_ptr<uint8_t>();
  const float* w1p = w1.data_ptr<float>();
  float* out = gx.data_ptr<float>();
  const int64_t row = k * C1;
  const int64_t pad = W0 + 8;  // room for an 8-wide update at the last column  // one kernel row of w2t, and k neighbouring positions of ga1
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> gp2(F), ga1(h1 * w1n * C1), dx(H0 * pad);
    for (int64_t n = begin; n < end; ++n) {
      // the pooled features' gradient: g_n @ wfc
      std::fill(gp2.begin(), gp2.end(), 0.f);
      for (int64_t j = 0; j < K; ++j) {
        const float gj = gp[n * K + j];
        const float* wrow = fc + j * F;
        for (int64_t f = 0; f < F; ++f) gp2[f] += gj * wrow[f];
      }
      // conv2's input gradient, at each window's coded position
      std::fill(ga1.begin(), ga1.end(), 0.f);
      const uint8_t* c2 = c2p + n * F;
      for (int64_t p = 0; p < h2 * w2; ++p) {
        const int64_t py = p / w2, px = p % w2;
        for (int64_t o = 0; o < C2; ++o) {
          const uint8_t a = c2[p * C2 + o];
          if (a >= NO_GRADIENT) continue;
          const float v = gp2[p * C2 + o];
          const int64_t y = 2 * py + (a >> 1), x = 2 * px + (a & 1);
          for (int64_t ky = 0; ky < k; ++ky) {
            float* dst = ga1.data() + ((y + ky) * w1n + x) * C1;
            const float* src = w2p + (o * k + ky) * row;
            for (int64_t j = 0; j < row; ++j) dst[j] += v * src[j];
          }
        }
      }
      // conv1's input gradient, at each window's coded position: one 8-wide row update per kernel row
      // (w1 rows padded with zeros to 8, the image buffer to PAD columns)
      std::fill(dx.begin(), dx.end(), 0.f);
      const uint8_t* c1 = c1p + n * h1 * w1n * C1;
      for (int64_t p = 0; p < h1 * w1n; ++p) {
        const int64_t py = p / w1n, px = p % w1n;
        for (int64_t c = 0; c < C1; ++c) {
          const uint8_t a = c1[p * C1 + c];
          if (a >= NO_GRADIENT) continue;
          const float v = ga1[p * C1 + c];
          const int64_t y = 2 * py + (a >> 1), x = 2 * px + (a & 1);
          const float* wc = w1p + c * k * 8;
          for (int64_t ky = 0; ky < k; ++ky) {
            float* d = dx.data() + (y + ky) * pad + x;
            const float* wr = wc + ky * 8;
            for (int j = 0; j < 8; ++j) d[j] += v * wr[j];
          }
        }
      }
      for (int64_t y = 0; y < H0; ++y) std::copy(dx.data() + y * pad, dx.data() + y * pad + W0, out + (n * H0 + y) * W0);
    }
  });
  return gx;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool_relu", &pool_relu, "relu(maxpool2x2(z)) of a channels-last z, with the window codes");
  m.def("input_grad", &input_grad, "the input gradient of conv -> pool_relu -> conv -> pool_relu -> linear");
}
