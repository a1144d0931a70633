// The small per-layer steps of a bf16 Qwen3 decoder on CPU, fused: RMSNorm, and the q/k RMSNorm + RoPE.
//
// At batch 1 a decode step runs ~70 small torch ops per layer around the matrix products (an RMSNorm
// alone is eight: cast, pow, mean, add, rsqrt, mul, cast, mul), each a few microseconds of dispatch
// for a few kilobytes of work: ~10 ms per token for Qwen3-0.6B, a third of the time its weights take
// to stream. These ops do the same arithmetic in one pass, rounding to bf16 exactly where the
// reference (transformers' modelling code, and qwen3's torch path) does:
//
//     rms_norm:     y = w * bf16(x * rsqrt(mean(x^2) + eps))        (x in fp32; the product rounded)
//     qk_norm_rope: n = rms_norm(head); y = bf16(bf16(n * cos) + bf16(rotate_half(n) * sin))
//
// so the only difference from torch is the order in which mean(x^2) is summed (fp32 rounding).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

inline float from_bf16(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as torch does (finite values; a NaN stays a NaN unless its payload is in the
// low half only, which nothing here produces).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

// 1 / sqrt(mean(x^2) + eps) over n bf16 values, summed in fp32 in 8 lanes.
inline float inv_rms(const uint16_t* x, int64_t n, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    const __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    acc = _mm256_fmadd_ps(f, f, acc);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.0f;
  for (float l : lanes) sum += l;
  for (; i < n; ++i) sum += from_bf16(x[i]) * from_bf16(x[i]);
  return 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
}

// out[i] = bf16(w[i] * bf16(x[i] * inv)) for one row of n values.
inline void norm_row(const uint16_t* x, const uint16_t* w, int64_t n, float eps, float* out) {
  const float inv = inv_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = round_bf16(from_bf16(w[i]) * round_bf16(from_bf16(x[i]) * inv));
}

// Rows of ``hidden`` elements each, split over threads only when there is enough work.
template <typename F>
void for_rows(int64_t rows, int64_t hidden, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, rows, grain, fn);
}

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, "qwen3 ", name, ": CPU bf16 tensors only");
}

// x [..., H] (rows contiguous), weight [H] -> y like x.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_bf16(x, "rms_norm");
  check_bf16(weight, "rms_norm");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.numel() == hidden && weight.is_contiguous(), "qwen3 rms_norm: weight must be [H]");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  const int64_t rows = hidden == 0 ? 0 : xc.numel() / hidden;
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const float feps = static_cast<float>(eps);
  for_rows(rows, hidden, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(hidden);
    for (int64_t r = r0; r < r1; ++r) {
      norm_row(xp + r * hidden, wp, hidden, feps, row.data());
      for (int64_t i = 0; i < hidden; ++i) yp[r * hidden + i] = to_bf16(row[i]);
    }
  });
  return y;
}

// qkv [T, (Hq + 2 Hkv) * D] (the fused projection's output), per-head norm weights [D], cos/sin [T, D]
// (bf16, as the reference casts them) -> q [T, Hq, D], k [T, Hkv, D], normalised and rotated.
std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& qkv, const at::Tensor& q_weight,
                                                const at::Tensor& k_weight, const at::Tensor& cos,
                                                const at::Tensor& sin, int64_t hq, int64_t hkv, double eps) {
  for (const at::Tensor* t : {&qkv, &q_weight, &k_weight, &cos, &sin}) check_bf16(*t, "qk_norm_rope");
  const int64_t d_size = q_weight.numel();
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (hq + 2 * hkv) * d_size && qkv.stride(1) == 1 && d_size % 2 == 0,
              "qwen3 qk_norm_rope: qkv must be [T, (Hq + 2 Hkv) * D] with contiguous rows");
  const int64_t tokens = qkv.size(0);
  const at::Tensor c = cos.reshape({tokens, d_size}).contiguous(), s = sin.reshape({tokens, d_size}).contiguous();
  TORCH_CHECK(k_weight.numel() == d_size && q_weight.is_contiguous() && k_weight.is_contiguous(),
              "qwen3 qk_norm_rope: norm weights must be [D]");
  at::Tensor q = at::empty({tokens, hq, d_size}, qkv.options());
  at::Tensor k = at::empty({tokens, hkv, d_size}, qkv.options());
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
  const auto* qw = reinterpret_cast<const uint16_t*>(q_weight.data_ptr<at::BFloat16>());
  const auto* kw = reinterpret_cast<const uint16_t*>(k_weight.data_ptr<at::BFloat16>());
  const auto* cp = reinterpret_cast<const uint16_t*>(c.data_ptr<at::BFloat16>());
  const auto* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
  auto* qp = reinterpret_cast<uint16_t*>(q.data_ptr<at::BFloat16>());
  auto* kp = reinterpret_cast<uint16_t*>(k.data_ptr<at::BFloat16>());
  const int64_t row_stride = qkv.stride(0), half = d_size / 2;
  const float feps = static_cast<float>(eps);
  for_rows(tokens, (hq + hkv) * d_size, [&](int64_t t0, int64_t t1) {
    std::vector<float> n(d_size);
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* ct = cp + t * d_size;
      const uint16_t* st = sp + t * d_size;
      for (int64_t h = 0; h < hq + hkv; ++h) {
        const bool is_q = h < hq;
        norm_row(src + t * row_stride + h * d_size, is_q ? qw : kw, d_size, feps, n.data());
        uint16_t* dst = is_q ? qp + (t * hq + h) * d_size : kp + (t * hkv + h - hq) * d_size;
        for (int64_t i = 0; i < d_size; ++i) {
          const float rotated = i < half ? -n[i + half] : n[i - half];
          const float a = round_bf16(n[i] * from_bf16(ct[i]));
          const float b = round_bf16(rotated * from_bf16(st[i]));
          dst[i] = to_bf16(a + b);
        }
      }
    }
  });
  return {q, k};
}

}  // namespace

#ifndef QWEN3_OPS_NAMESPACE
#define QWEN3_OPS_NAMESPACE qwen3_kernels
#endif
#define QWEN3_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define QWEN3_FRAGMENT_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

QWEN3_FRAGMENT(QWEN3_OPS_NAMESPACE, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "qk_norm_rope(Tensor qkv, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, int hq, int hkv, "
      "float eps) -> (Tensor, Tensor)");
}

QWEN3_FRAGMENT_IMPL(QWEN3_OPS_NAMESPACE, CPU, m) {
  m.impl("rms_norm", TORCH_FN(rms_norm));
  m.impl("qk_norm_rope", TORCH_FN(qk_norm_rope));
}
