// The small per-layer steps of a Qwen3 decoder on CPU (bf16 or fp32), fused: RMSNorm, and the q/k RMSNorm + RoPE.
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
// so the only difference from torch is the order in which mean(x^2) is summed (fp32 rounding). For fp32
// tensors every "round to bf16" is the identity. Each row is computed alone, in a fixed order, so a row's
// result does not depend on the other rows (batch invariance).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "common.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using qwen3::bf16_bits_to_float;
using qwen3::float_to_bf16_bits;

// The element types: bf16 (its bits) and fp32. For each: to fp32, from fp32, and rounding to the type.
using bf16_t = uint16_t;
inline float to_float(bf16_t v) { return bf16_bits_to_float(v); }
inline float to_float(float v) { return v; }
inline void store(bf16_t* dst, float f) { *dst = float_to_bf16_bits(f); }
inline void store(float* dst, float f) { *dst = f; }
template <typename T>
inline float round_to(float f) {
  if constexpr (sizeof(T) == 2)
    return bf16_bits_to_float(float_to_bf16_bits(f));
  else
    return f;
}
inline __m256 load8(const bf16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// 1 / sqrt(mean(x^2) + eps) over n values, summed in fp32 in 8 lanes.
template <typename T>
inline float inv_rms(const T* x, int64_t n, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 f = load8(x + i);
    acc = _mm256_fmadd_ps(f, f, acc);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.0f;
  for (float l : lanes) sum += l;
  for (; i < n; ++i) sum += to_float(x[i]) * to_float(x[i]);
  return 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
}

// out[i] = round(w[i] * round(x[i] * inv)) for one row of n values (round: to T).
template <typename T>
inline void norm_row(const T* x, const T* w, int64_t n, float eps, float* out) {
  const float inv = inv_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = round_to<T>(to_float(w[i]) * round_to<T>(to_float(x[i]) * inv));
}

// Rows of ``hidden`` elements each, split over threads only when there is enough work.
template <typename F>
void for_rows(int64_t rows, int64_t hidden, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, rows, grain, fn);
}

void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && (dtype == at::kBFloat16 || dtype == at::kFloat),
              "qwen3 ", name, ": CPU tensors, all bf16 or all fp32");
}

// x [..., H] (rows contiguous), weight [H] -> y like x.
template <typename T>
at::Tensor rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.numel() == hidden && weight.is_contiguous(), "qwen3 rms_norm: weight must be [H]");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  const int64_t rows = hidden == 0 ? 0 : xc.numel() / hidden;
  const auto* xp = static_cast<const T*>(xc.data_ptr());
  const auto* wp = static_cast<const T*>(weight.data_ptr());
  auto* yp = static_cast<T*>(y.data_ptr());
  const float feps = static_cast<float>(eps);
  for_rows(rows, hidden, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(hidden);
    for (int64_t r = r0; r < r1; ++r) {
      norm_row(xp + r * hidden, wp, hidden, feps, row.data());
      for (int64_t i = 0; i < hidden; ++i) store(yp + r * hidden + i, row[i]);
    }
  });
  return y;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_dtype(x, x.scalar_type(), "rms_norm");
  check_dtype(weight, x.scalar_type(), "rms_norm");
  return x.scalar_type() == at::kFloat ? rms_norm_impl<float>(x, weight, eps) : rms_norm_impl<bf16_t>(x, weight, eps);
}

// qkv [T, (Hq + 2 Hkv) * D] (the fused projection's output), per-head norm weights [D], cos/sin [T, D]
// (in qkv's dtype, as the reference casts them) -> q [T, Hq, D], k [T, Hkv, D], normalised and rotated.
template <typename E>
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_impl(const at::Tensor& qkv, const at::Tensor& q_weight,
                                                     const at::Tensor& k_weight, const at::Tensor& cos,
                                                     const at::Tensor& sin, int64_t hq, int64_t hkv, double eps) {
  const int64_t d_size = q_weight.numel();
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (hq + 2 * hkv) * d_size && qkv.stride(1) == 1 && d_size % 2 == 0,
              "qwen3 qk_norm_rope: qkv must be [T, (Hq + 2 Hkv) * D] with contiguous rows");
  const int64_t tokens = qkv.size(0);
  const at::Tensor c = cos.reshape({tokens, d_size}).contiguous(), s = sin.reshape({tokens, d_size}).contiguous();
  TORCH_CHECK(k_weight.numel() == d_size && q_weight.is_contiguous() && k_weight.is_contiguous(),
              "qwen3 qk_norm_rope: norm weights must be [D]");
  at::Tensor q = at::empty({tokens, hq, d_size}, qkv.options());
  at::Tensor k = at::empty({tokens, hkv, d_size}, qkv.options());
  const auto* src = static_cast<const E*>(qkv.data_ptr());
  const auto* qw = static_cast<const E*>(q_weight.data_ptr());
  const auto* kw = static_cast<const E*>(k_weight.data_ptr());
  const auto* cp = static_cast<const E*>(c.data_ptr());
  const auto* sp = static_cast<const E*>(s.data_ptr());
  auto* qp = static_cast<E*>(q.data_ptr());
  auto* kp = static_cast<E*>(k.data_ptr());
  const int64_t row_stride = qkv.stride(0), half = d_size / 2;
  const float feps = static_cast<float>(eps);
  for_rows(tokens, (hq + hkv) * d_size, [&](int64_t t0, int64_t t1) {
    std::vector<float> n(d_size);
    for (int64_t t = t0; t < t1; ++t) {
      const E* ct = cp + t * d_size;
      const E* st = sp + t * d_size;
      for (int64_t h = 0; h < hq + hkv; ++h) {
        const bool is_q = h < hq;
        norm_row(src + t * row_stride + h * d_size, is_q ? qw : kw, d_size, feps, n.data());
        E* dst = is_q ? qp + (t * hq + h) * d_size : kp + (t * hkv + h - hq) * d_size;
        for (int64_t i = 0; i < d_size; ++i) {
          const float rotated = i < half ? -n[i + half] : n[i - half];
          const float a = round_to<E>(n[i] * to_float(ct[i]));
          const float b = round_to<E>(rotated * to_float(st[i]));
          store(dst + i, a + b);
        }
      }
    }
  });
  return {q, k};
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& qkv, const at::Tensor& q_weight,
                                                const at::Tensor& k_weight, const at::Tensor& cos,
                                                const at::Tensor& sin, int64_t hq, int64_t hkv, double eps) {
  for (const at::Tensor* t : {&qkv, &q_weight, &k_weight, &cos, &sin})
    check_dtype(*t, qkv.scalar_type(), "qk_norm_rope");
  if (qkv.scalar_type() == at::kFloat) return qk_norm_rope_impl<float>(qkv, q_weight, k_weight, cos, sin, hq, hkv, eps);
  return qk_norm_rope_impl<bf16_t>(qkv, q_weight, k_weight, cos, sin, hq, hkv, eps);
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
