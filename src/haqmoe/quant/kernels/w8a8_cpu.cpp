// W8A8 linear for few tokens (decode) on x86 CPUs with AVX512-VNNI: dynamic per-token activation
// quantization, int8 dot products with vpdpbusd, zero-point corrections and the float epilogue, in one
// call. Why a kernel of our own: oneDNN's int8 GEMM behind torch._int_mm streams a one-token GEMV at
// ~12.5 GB/s on 2 cores here, llama.cpp's VNNI loops at ~18 GB/s; decode time is that GEMV.
//
// Every integer and float step is the one haqmoe/quant/int8.py takes (quantize_tokens and
// int8_matmul), so outputs are bit-identical to the _int_mm path: same IEEE divisions and
// round-half-even, integer arithmetic exact, epilogue ((acc * s_a) * s_w) + bias in that order
// (built with -ffp-contract=off so no FMA changes a rounding).
//
// vpdpbusd multiplies unsigned by signed bytes, so activations are stored as u = q + 128 and the
// extra 128 * colsum[o] is subtracted with the other zero-point terms.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;   // bytes per zmm register
constexpr int64_t kRowBlock = 4;  // output rows sharing one activation load
constexpr int64_t kMaxVnniRows = 16;  // above: oneDNN's GEMM, which also blocks over tokens
constexpr int64_t kMaxK = 16384;  // as int8.py's _INT32_SAFE_K

struct TokenQuant {
  float scale;
  int32_t zero;
  int32_t rowsum;
};

inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }
inline __mmask64 tail_mask64(int64_t n) { return n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1); }

// One token [k] -> int8 codes [k_alloc] (zero padding meets zero weight columns).
TokenQuant quantize_token(const float* x, int64_t k, int64_t k_alloc, int qmin, int qmax, bool symmetric,
                          int8_t* q) {
  float scale;
  float zf = 0.f;
  if (symmetric) {
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
      __m512 v = _mm512_maskz_loadu_ps(tail_mask16(k - i), x + i);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    scale = amax > 0.f ? amax / static_cast<float>(qmax) : 1.f;
  } else {
    // masked-out lanes read 0, which the range clamps below include anyway
    __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
      __m512 v = _mm512_maskz_loadu_ps(tail_mask16(k - i), x + i);
      vlo = _mm512_min_ps(vlo, v);
      vhi = _mm512_max_ps(vhi, v);
    }
    const float lo = std::min(_mm512_reduce_min_ps(vlo), 0.f);
    const float hi = std::max(_mm512_reduce_max_ps(vhi), 0.f);
    scale = (hi - lo) / static_cast<float>(qmax - qmin);
    zf = std::nearbyint(static_cast<float>(qmin) - lo / std::max(scale, 1e-12f));
    zf = std::min(std::max(zf, static_cast<float>(qmin)), static_cast<float>(qmax));
    if (!(scale > 0.f)) scale = 1.f;
  }
  const __m512 vscale = _mm512_set1_ps(scale), vzf = _mm512_set1_ps(zf);
  const __m512 vqmin = _mm512_set1_ps(static_cast<float>(qmin)), vqmax = _mm512_set1_ps(static_cast<float>(qmax));
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 m = tail_mask16(k - i);
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), vscale);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vzf), vqmin), vqmax);
    const __m512i qi = _mm512_maskz_cvtps_epi32(m, v);
    vsum = _mm512_add_epi32(vsum, qi);
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtepi32_epi8(qi));
  }
  std::fill(q + k, q + k_alloc, static_cast<int8_t>(0));
  return {scale, static_cast<int32_t>(zf), _mm512_reduce_add_epi32(vsum)};
}

// The second level of a residual quantization (ResidualInt8Linear): x - (q - z)·s, symmetric.
TokenQuant quantize_residual(const float* x, const int8_t* q, const TokenQuant& hi, int64_t k, int64_t k_alloc,
                             int8_t* out) {
  std::vector<float> r(static_cast<size_t>(k));
  const float z = static_cast<float>(hi.zero);
  for (int64_t i = 0; i < k; ++i) r[i] = x[i] - (static_cast<float>(q[i]) - z) * hi.scale;
  return quantize_token(r.data(), k, k_alloc, -127, 127, true, out);
}

// acc[t * n + o] = sum_i u[t][i] * w[o][i] for rows [o0, o1) and every token.
void dot_rows(const uint8_t* u, int64_t m, int64_t u_stride, const int8_t* w, int64_t kp, int64_t o0, int64_t o1,
              int32_t* acc, int64_t n) {
  const int64_t full = kp / kChunk * kChunk;
  const __mmask64 tail = tail_mask64(kp - full);
  int64_t o = o0;
  for (; o + kRowBlock <= o1; o += kRowBlock) {
    const int8_t* w0 = w + o * kp;
    for (int64_t t = 0; t < m; ++t) {
      const uint8_t* ut = u + t * u_stride;
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < full; i += kChunk) {
        const __m512i x = _mm512_loadu_si512(ut + i);
        a0 = _mm512_dpbusd_epi32(a0, x, _mm512_loadu_si512(w0 + i));
        a1 = _mm512_dpbusd_epi32(a1, x, _mm512_loadu_si512(w0 + kp + i));
        a2 = _mm512_dpbusd_epi32(a2, x, _mm512_loadu_si512(w0 + 2 * kp + i));
        a3 = _mm512_dpbusd_epi32(a3, x, _mm512_loadu_si512(w0 + 3 * kp + i));
      }
      if (full < kp) {
        const __m512i x = _mm512_loadu_si512(ut + full);
        a0 = _mm512_dpbusd_epi32(a0, x, _mm512_maskz_loadu_epi8(tail, w0 + full));
        a1 = _mm512_dpbusd_epi32(a1, x, _mm512_maskz_loadu_epi8(tail, w0 + kp + full));
        a2 = _mm512_dpbusd_epi32(a2, x, _mm512_maskz_loadu_epi8(tail, w0 + 2 * kp + full));
        a3 = _mm512_dpbusd_epi32(a3, x, _mm512_maskz_loadu_epi8(tail, w0 + 3 * kp + full));
      }
      int32_t* at = acc + t * n + o;
      at[0] = _mm512_reduce_add_epi32(a0);
      at[1] = _mm512_reduce_add_epi32(a1);
      at[2] = _mm512_reduce_add_epi32(a2);
      at[3] = _mm512_reduce_add_epi32(a3);
    }
  }
  for (; o < o1; ++o) {
    const int8_t* wo = w + o * kp;
    for (int64_t t = 0; t < m; ++t) {
      const uint8_t* ut = u + t * u_stride;
      __m512i a = _mm512_setzero_si512();
      for (int64_t i = 0; i < full; i += kChunk)
        a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(ut + i), _mm512_loadu_si512(wo + i));
      if (full < kp)
        a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(ut + full), _mm512_maskz_loadu_epi8(tail, wo + full));
      acc[t * n + o] = _mm512_reduce_add_epi32(a);
    }
  }
}

at::Tensor w8a8_linear_cpu(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& w_scale,
                           const c10::optional<at::Tensor>& w_zero, const at::Tensor& colsum,
                           const c10::optional<at::Tensor>& bias, int64_t k, int64_t qmin, int64_t qmax,
                           bool symmetric, bool residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "w8a8_linear: x must be float32 [M, K]");
  const at::Tensor w = wt.t();  // wt is _int_mm's column-major B: the weight [N_pad, K_pad] transposed
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.stride(1) == 1 && w.stride(0) == w.size(1),
              "w8a8_linear: wt must be an int8 weight [N_pad, K_pad] with contiguous rows, transposed");
  TORCH_CHECK(x.size(1) == k && k <= w.size(1), "w8a8_linear: x has ", x.size(1), " features, expected ", k);
  TORCH_CHECK(k <= kMaxK, "w8a8_linear: K > ", kMaxK, " could overflow int32 zero-point terms");
  TORCH_CHECK(qmin >= -128 && qmax <= 127, "w8a8_linear: activation codes must fit int8");
  const int64_t m = x.size(0), n = w_scale.size(0), kp = w.size(1);
  TORCH_CHECK(n <= w.size(0) && colsum.size(0) == n, "w8a8_linear: w_scale / colsum do not match w");
  TORCH_CHECK(!residual || !w_zero.has_value(), "w8a8_linear: residual activations need symmetric weights");
  const at::Tensor xc = x.contiguous();
  const at::Tensor ws = w_scale.to(at::kFloat).contiguous(), cs = colsum.to(at::kInt).contiguous();
  const at::Tensor wz = w_zero.has_value() ? w_zero->to(at::kInt).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  // rows [0, m): the tokens' codes; with `residual`, rows [m, 2m): their residuals' codes
  const int64_t levels = residual ? 2 : 1, rows = levels * m;
  const int64_t q_stride = (kp + kChunk - 1) / kChunk * kChunk;
  std::vector<int8_t> q(static_cast<size_t>(rows * q_stride));
  std::vector<TokenQuant> tq(static_cast<size_t>(rows));
  const float* xp = xc.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int8_t* qt = q.data() + t * q_stride;
      tq[t] = quantize_token(xp + t * k, k, q_stride, static_cast<int>(qmin), static_cast<int>(qmax), symmetric, qt);
      if (residual) tq[m + t] = quantize_residual(xp + t * k, qt, tq[t], k, q_stride, qt + m * q_stride);
    }
  });

  at::Tensor y = at::empty({m, n}, x.options());
  const float* wsp = ws.data_ptr<float>();
  const int32_t* csp = cs.data_ptr<int32_t>();
  const int32_t* wzp = wz.defined() ? wz.data_ptr<int32_t>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  std::vector<int32_t> acc(static_cast<size_t>(rows * n));
  const bool vnni = rows <= kMaxVnniRows;

  // y[t, o0:o1] from the integer products: zero-point terms, then ((acc·s_a)·s_w) (+ residual) (+ bias)
  auto epilogue = [&](int64_t t, int64_t o0, int64_t o1) {
    float* yt = yp + t * n;
    for (int64_t l = 0; l < levels; ++l) {
      const TokenQuant& tqr = tq[l * m + t];
      const int32_t za = tqr.zero + (vnni ? 128 : 0);  // VNNI products carry + 128·c[o]
      const int32_t r = tqr.rowsum - static_cast<int32_t>(k) * tqr.zero;
      const int32_t* at_ = acc.data() + (l * m + t) * n;
      for (int64_t o = o0; o < o1; ++o) {
        int32_t a = at_[o] - za * csp[o];  // - z_a·c[o]
        if (wzp) a -= wzp[o] * r;         // - z_w[o]·(r - K·z_a)
        float v = static_cast<float>(a) * tqr.scale;
        v = v * wsp[o];
        yt[o] = l == 0 ? v : yt[o] + v;
      }
    }
    if (bp)
      for (int64_t o = o0; o < o1; ++o) yt[o] = yt[o] + bp[o];
  };

  if (vnni) {
    std::vector<uint8_t> u(q.size());
    for (size_t i = 0; i < q.size(); ++i) u[i] = static_cast<uint8_t>(q[i]) ^ 0x80u;  // q + 128
    const int8_t* wp = w.data_ptr<int8_t>();
    // blocks of 16 output rows: each thread streams a contiguous slab of the weight
    at::parallel_for(0, (n + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
      const int64_t o0 = b0 * 16, o1 = std::min(n, b1 * 16);
      dot_rows(u.data(), rows, q_stride, wp, kp, o0, o1, acc.data(), n);
      for (int64_t t = 0; t < m; ++t) epilogue(t, o0, o1);
    });
  } else {
    const at::Tensor qa = at::from_blob(q.data(), {rows, q_stride}, at::kChar).narrow(1, 0, kp).contiguous();
    at::from_blob(acc.data(), {rows, n}, at::kInt).copy_(at::_int_mm(qa, wt.narrow(1, 0, n)));
    at::parallel_for(0, m, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) epilogue(t, 0, n);
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(haqmoe, m) {
  m.def("w8a8_linear(Tensor x, Tensor wt, Tensor w_scale, Tensor? w_zero, Tensor colsum, Tensor? bias, "
        "int k, int qmin, int qmax, bool symmetric, bool residual=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(haqmoe, CPU, m) { m.impl("w8a8_linear", &w8a8_linear_cpu); }
