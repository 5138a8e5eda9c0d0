// W8A8 linear on x86 CPUs with AVX512-VNNI, written for decode's few tokens: dynamic per-token activation
// quantization, int8 dot products with vpdpbusd, zero-point corrections and the float epilogue, in one
// call (more than 16 token rows go to oneDNN's GEMM, at::_int_mm, inside the same op). Why a kernel of
// our own: oneDNN's int8 GEMM behind torch._int_mm streams a one-token GEMV at ~12.5 GB/s on 2 cores
// here, llama.cpp's VNNI loops at ~18 GB/s; decode time is that GEMV.
//
// Every integer and float step is the one haqmoe/exec/int8.py takes (quantize_tokens and
// int8_matmul), so outputs are bit-identical to the _int_mm path: same IEEE divisions and
// round-half-even, integer arithmetic exact, epilogue ((acc * s_a) * s_w) + bias in that order
// (built with -ffp-contract=off so no FMA changes a rounding).
//
// vpdpbusd multiplies unsigned by signed bytes, so activations are stored as u = q + 128 and the
// extra 128 * colsum[o] is subtracted with the other zero-point terms.
//
// moe_w8a8 runs one MoE layer's routed experts on top of it (moe_w8a8_cpu below): one op instead of
// ~8 Python-dispatched ops per expert, and an op of static shapes that torch.export can trace.

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
constexpr int64_t kBlock = 16;     // output rows per parallel work item
// Software prefetch of the weight rows this far ahead: over SmolLM2's 135 MB of one-token GEMVs, 2 threads
// stream 19-21 GB/s on the hardware prefetchers alone and 24-25.5 with this (best of 4-64 rows tried).
constexpr int64_t kPrefetchRows = 16;
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

// acc[t * acc_stride + o - o0] = sum_i u[t][i] * w[o][i] for output rows [o0, o1) and every token t < m.
void dot_rows(const uint8_t* u, int64_t m, int64_t u_stride, const int8_t* w, int64_t kp, int64_t o0, int64_t o1,
              int32_t* acc, int64_t acc_stride) {
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
        for (int64_t r = 0; r < kRowBlock; ++r)  // the same chunk of rows kPrefetchRows ahead
          _mm_prefetch(reinterpret_cast<const char*>(w0 + (kPrefetchRows + r) * kp + i), _MM_HINT_T0);
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
      int32_t* at = acc + t * acc_stride + (o - o0);
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
      acc[t * acc_stride + (o - o0)] = _mm512_reduce_add_epi32(a);
    }
  }
}

const void* optional_data(const c10::optional<at::Tensor>& t, at::ScalarType dtype, int64_t n, const char* message) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == dtype && t->dim() == 1 && t->size(0) == n && t->is_contiguous(), message);
  return t->data_ptr();
}

// Dispatch-free on purpose (no .t(), .to(), .contiguous() on the way): decode calls this ~210 times per
// token, and each ATen call inside would cost about a microsecond.
at::Tensor w8a8_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                           const c10::optional<at::Tensor>& w_zero, const at::Tensor& colsum,
                           const c10::optional<at::Tensor>& bias, int64_t k, int64_t qmin, int64_t qmax,
                           bool symmetric, bool residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "w8a8_linear: x must be contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.stride(1) == 1 && w.stride(0) == w.size(1),
              "w8a8_linear: w must be an int8 weight [N_pad, K_pad] with contiguous rows");
  TORCH_CHECK(x.size(1) == k && k <= w.size(1), "w8a8_linear: x has the wrong number of features, expected k");
  TORCH_CHECK(k <= kMaxK, "w8a8_linear: K > 16384 could overflow int32 zero-point terms");
  TORCH_CHECK(qmin >= -128 && qmax <= 127, "w8a8_linear: activation codes must fit int8");
  const int64_t m = x.size(0), n = w_scale.size(0), kp = w.size(1);
  TORCH_CHECK(n <= w.size(0), "w8a8_linear: more scales than weight rows");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 && w_scale.is_contiguous(),
              "w8a8_linear: w_scale must be a contiguous float32 vector");
  TORCH_CHECK(colsum.scalar_type() == at::kInt && colsum.dim() == 1 && colsum.size(0) == n && colsum.is_contiguous(),
              "w8a8_linear: colsum must be a contiguous int32 vector, one per output");
  TORCH_CHECK(!residual || !w_zero.has_value(), "w8a8_linear: residual activations need symmetric weights");
  const float* wsp = w_scale.data_ptr<float>();
  const int32_t* csp = colsum.data_ptr<int32_t>();
  const auto* wzp = static_cast<const int32_t*>(
      optional_data(w_zero, at::kInt, n, "w8a8_linear: w_zero must be a contiguous int32 vector, one per output"));
  const auto* bp = static_cast<const float*>(
      optional_data(bias, at::kFloat, n, "w8a8_linear: bias must be a contiguous float32 vector, one per output"));

  // rows [0, m): the tokens' codes; with `residual`, rows [m, 2m): their residuals' codes
  const int64_t levels = residual ? 2 : 1, rows = levels * m;
  const int64_t q_stride = (kp + kChunk - 1) / kChunk * kChunk;
  thread_local std::vector<int8_t> q;
  thread_local std::vector<TokenQuant> tq;
  q.resize(static_cast<size_t>(rows * q_stride));
  tq.resize(static_cast<size_t>(rows));
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data();
  TokenQuant* tqp = tq.data();
  at::parallel_for(0, m, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int8_t* qt = qp + t * q_stride;
      tqp[t] = quantize_token(xp + t * k, k, q_stride, static_cast<int>(qmin), static_cast<int>(qmax), symmetric, qt);
      if (residual) tqp[m + t] = quantize_residual(xp + t * k, qt, tqp[t], k, q_stride, qt + m * q_stride);
    }
  });

  at::Tensor y = at::empty({m, n}, x.options());
  float* yp = y.data_ptr<float>();
  const bool vnni = rows <= kMaxVnniRows;

  // y[t, o0:o1] from the integer products acc[(l·m + t)·stride + o - o0]: zero-point terms, then
  // ((acc·s_a)·s_w) (+ the residual level's) (+ bias)
  auto epilogue = [&](int64_t t, int64_t o0, int64_t o1, const int32_t* acc, int64_t stride) {
    float* yt = yp + t * n;
    for (int64_t l = 0; l < levels; ++l) {
      const TokenQuant& tqr = tqp[l * m + t];
      const int32_t za = tqr.zero + (vnni ? 128 : 0);  // VNNI products carry + 128·c[o]
      const int32_t r = tqr.rowsum - static_cast<int32_t>(k) * tqr.zero;
      const int32_t* at_ = acc + (l * m + t) * stride - o0;
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
    thread_local std::vector<uint8_t> u;
    u.resize(q.size());
    for (size_t i = 0; i < q.size(); ++i) u[i] = static_cast<uint8_t>(qp[i]) ^ 0x80u;  // q + 128
    const uint8_t* up = u.data();
    const int8_t* wp = w.data_ptr<int8_t>();
    // blocks of 16 output rows: each thread streams a contiguous slab of the weight
    at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
      int32_t acc[kMaxVnniRows * kBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o0 = b * kBlock, o1 = std::min(n, o0 + kBlock);
        dot_rows(up, rows, q_stride, wp, kp, o0, o1, acc, kBlock);
        for (int64_t t = 0; t < m; ++t) epilogue(t, o0, o1, acc, kBlock);
      }
    });
  } else {
    const at::Tensor qa = at::from_blob(qp, {rows, q_stride}, at::kChar).narrow(1, 0, kp).contiguous();
    const at::Tensor acc = at::_int_mm(qa, w.narrow(0, 0, n).t());  // oneDNN; [rows, n] int32
    const int32_t* ap = acc.data_ptr<int32_t>();
    at::parallel_for(0, m, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) epilogue(t, 0, n, ap, n);
    });
  }
  return y;
}

// The routed experts' inputs, grouped as int8.py's GroupedExperts.forward groups them: one token in its
// top-k slot order; more tokens per expert in ascending expert order, each expert's tokens in ascending
// (token, slot) order. Ids outside [0, experts) are padding and skipped.
struct ExpertRows {
  int64_t expert;
  std::vector<int64_t> tokens;
  std::vector<float> weights;
};

std::vector<ExpertRows> group_routes(const int64_t* ids, const float* weights, int64_t tokens, int64_t top_k,
                                     int64_t experts) {
  std::vector<ExpertRows> groups;
  if (tokens == 1) {
    for (int64_t j = 0; j < top_k; ++j)
      if (ids[j] >= 0 && ids[j] < experts) groups.push_back({ids[j], {0}, {weights[j]}});
    return groups;
  }
  std::vector<ExpertRows> by_expert(static_cast<size_t>(experts));
  for (int64_t p = 0; p < tokens * top_k; ++p) {
    const int64_t e = ids[p];
    if (e < 0 || e >= experts) continue;
    by_expert[e].tokens.push_back(p / top_k);
    by_expert[e].weights.push_back(weights[p]);
  }
  for (int64_t e = 0; e < experts; ++e)
    if (!by_expert[e].tokens.empty()) {
      by_expert[e].expert = e;
      groups.push_back(std::move(by_expert[e]));
    }
  return groups;
}

void check_list(size_t n, size_t experts, const char* message) { TORCH_CHECK(n == experts, message); }

// The whole routed-expert block of one MoE layer in one call: for each expert its tokens' gate/up product,
// silu(gate) * up, the down product (each product quantizing its input per token, as w8a8_linear does)
// and the router-weighted sum. Every step is the one GroupedExperts.forward / Int8Experts.expert_forward
// takes in Python, in the same order, so the output is bit-identical: the products are w8a8_linear_cpu
// itself, silu is ATen's on the same strided view of the gate/up output (its vectorized and scalar
// parts then fall on the same elements), the product with up and the weighting are single float
// multiplications, and each token's sum runs in Python's order (one token: its first expert's term, then
// the others added in slot order; more tokens: zeros, then every expert's term added in expert order).
at::Tensor moe_w8a8_cpu(const at::Tensor& x, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                        at::TensorList gate_up_w, at::TensorList gate_up_scale,
                        const c10::List<c10::optional<at::Tensor>>& gate_up_zero, at::TensorList gate_up_colsum,
                        at::TensorList down_w, at::TensorList down_scale,
                        const c10::List<c10::optional<at::Tensor>>& down_zero, at::TensorList down_colsum,
                        int64_t qmin, int64_t qmax, bool symmetric) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "moe_w8a8: x must be contiguous float32 [T, H]");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  TORCH_CHECK(top_k_index.dim() == 2 && top_k_index.size(0) == tokens && top_k_index.scalar_type() == at::kLong &&
                  top_k_index.is_contiguous(),
              "moe_w8a8: top_k_index must be contiguous int64 [T, K]");
  TORCH_CHECK(top_k_weights.sizes() == top_k_index.sizes() && top_k_weights.scalar_type() == at::kFloat &&
                  top_k_weights.is_contiguous(),
              "moe_w8a8: top_k_weights must be contiguous float32 [T, K]");
  const size_t experts = gate_up_w.size();
  const char* lists = "moe_w8a8: every weight list needs one entry per expert";
  for (size_t n : {gate_up_scale.size(), gate_up_zero.size(), gate_up_colsum.size(), down_w.size(),
                   down_scale.size(), down_zero.size(), down_colsum.size()})
    check_list(n, experts, lists);
  at::Tensor out = at::zeros({tokens, hidden}, x.options());
  float* op = out.data_ptr<float>();
  const auto groups = group_routes(top_k_index.data_ptr<int64_t>(), top_k_weights.data_ptr<float>(), tokens,
                                   top_k_index.size(1), static_cast<int64_t>(experts));
  const float* xp = x.data_ptr<float>();
  bool first = true;
  for (const ExpertRows& g : groups) {
    const int64_t e = g.expert, n = static_cast<int64_t>(g.tokens.size());
    const int64_t inter = gate_up_scale[e].size(0) / 2;
    TORCH_CHECK(gate_up_scale[e].size(0) == 2 * inter && down_scale[e].size(0) == hidden,
                "moe_w8a8: expert ", e, " has gate/up or down outputs that do not fit [2I] and [H]");
    at::Tensor rows = x;
    if (tokens > 1) {
      rows = at::empty({n, hidden}, x.options());
      float* rp = rows.data_ptr<float>();
      for (int64_t r = 0; r < n; ++r) std::copy_n(xp + g.tokens[r] * hidden, hidden, rp + r * hidden);
    }
    const at::Tensor gate_up = w8a8_linear_cpu(rows, gate_up_w[e], gate_up_scale[e], gate_up_zero.get(e),
                                               gate_up_colsum[e], c10::nullopt, hidden, qmin, qmax, symmetric, false);
    at::Tensor h = at::silu(gate_up.narrow(1, 0, inter));  // [n, I], contiguous
    float* hp = h.data_ptr<float>();
    const float* upp = gate_up.data_ptr<float>() + inter;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < inter; ++i) hp[r * inter + i] = hp[r * inter + i] * upp[r * 2 * inter + i];
    const at::Tensor y = w8a8_linear_cpu(h, down_w[e], down_scale[e], down_zero.get(e), down_colsum[e],
                                         c10::nullopt, inter, qmin, qmax, symmetric, false);
    const float* yp = y.data_ptr<float>();
    for (int64_t r = 0; r < n; ++r) {
      float* ot = op + g.tokens[r] * hidden;
      const float* yr = yp + r * hidden;
      const float w = g.weights[r];
      if (tokens == 1 && first)
        for (int64_t o = 0; o < hidden; ++o) ot[o] = yr[o] * w;
      else
        for (int64_t o = 0; o < hidden; ++o) ot[o] = ot[o] + yr[o] * w;
    }
    first = false;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(haqmoe, m) {
  m.def("w8a8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? w_zero, Tensor colsum, Tensor? bias, "
        "int k, int qmin, int qmax, bool symmetric, bool residual=False) -> Tensor");
  m.def("moe_w8a8(Tensor x, Tensor top_k_index, Tensor top_k_weights, Tensor[] gate_up_w, Tensor[] gate_up_scale, "
        "Tensor?[] gate_up_zero, Tensor[] gate_up_colsum, Tensor[] down_w, Tensor[] down_scale, Tensor?[] down_zero, "
        "Tensor[] down_colsum, int qmin, int qmax, bool symmetric) -> Tensor");
}

TORCH_LIBRARY_IMPL(haqmoe, CPU, m) {
  m.impl("w8a8_linear", &w8a8_linear_cpu);
  m.impl("moe_w8a8", &moe_w8a8_cpu);
}
