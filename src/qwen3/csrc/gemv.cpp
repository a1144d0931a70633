// Linear layers on x86 CPUs: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), for bf16 and fp32 weights and any M
// (decode steps of a few rows, prompt chunks of hundreds), batch-invariant by construction.
//
// Why our own kernel:
//   * decode: at batch 1 a linear layer is a matrix-vector product that reads every weight once and does
//     two flops per weight, so its speed is the speed at which the weights stream from memory; torch's CPU
//     paths reach a third to a half of the machine's read bandwidth;
//   * batch invariance: a row's result must not depend on how many other rows share the call (other
//     requests in the step, how a prompt was chunked). torch's GEMMs switch algorithms, blockings and
//     reduction splits with M, so one row's output changes in its last bits with the batch. Here every
//     output element is one fp32 accumulator chain over k = 0, 1, 2, ... K-1 whatever M is, whatever tile
//     or thread the row lands in. Only the instruction set changes the arithmetic (AVX512-BF16's
//     `vdpbf16ps` adds a pair of products at a time), and a machine always runs the same path.
//
// Packed layouts (made once, at load, by qwen3/kernels.py). Output rows come in blocks of 16, and blocks in
// groups of G (kGroup: 4 on the AVX-512 path, 2 on AVX2; the ``kernel_group`` op says which). W is padded
// with zeros to N_pad = a multiple of 16 G rows and K_pad = ceil(K/32)*32 columns, then stored per group:
//
//     bf16:  packed[N_pad/16G][K_pad/2][G][16][2]   for each k pair, the G blocks' 16 rows' two weights
//     fp32:  packed[N_pad/16G][K_pad][G][16]        for each k, the G blocks' 16 rows' weights
//
//   * one group is one contiguous run of memory, read front to back whatever the tile: each thread
//     streams long runs that the hardware prefetchers follow (helped by a software prefetch,
//     QWEN3_PREFETCH), one stream however many blocks a tile takes at once;
//   * one 64-byte load (one cache line, one zmm) holds the 16 rows' weights for one k pair (bf16) or one k
//     (fp32): the operand shape of `vdpbf16ps` / an FMA with the activation broadcast to every lane, so no
//     horizontal reductions are needed: after the k loop each lane holds the dot product of one row;
//   * the AVX2 path uses the same layout: a bf16 pair's two halves become fp32 with one shift (even k) and
//     one mask (odd k) — bf16 is the top half of an fp32 — and feed two FMAs, even k first.
// Zero padding removes every tail from the inner loops: padded weights and activations are zero.
//
// Tiles: a micro-kernel multiplies NB blocks of a group (NB*16 output rows) by MT rows of x, keeping the
// NB*MT accumulators in registers (AVX-512: up to 4 x 6 = 24 zmm; AVX2: up to 2 blocks or 3 rows), so each
// weight vector loaded feeds MT rows and each broadcast activation NB blocks: compute-bound shapes
// (prefill) run near the FMA / dot-product peak, and with one row (decode) NB independent chains keep the
// loads in flight. Threads take contiguous chunks of groups as they finish (qwen3::balanced_for, on
// torch's own thread pool and count); a thread runs all M rows through a group tile by tile (the group's
// weights come from memory once, then from L2), and moves on.
//
// Instruction set: the file is compiled for the machine that runs it (kernels.py picks the -m flags from
// /proc/cpuinfo); AVX512-BF16 when __AVX512BF16__ is defined, else AVX2+FMA. QWEN3_EMULATE_AVX512BF16 swaps
// the AVX-512 intrinsics for scalar code so that the AVX-512 path's indexing can be tested on a machine
// without AVX-512 (slow; tests only).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(QWEN3_EMULATE_AVX512BF16)
#define QWEN3_PATH_AVX512BF16 1
#define QWEN3_PATH_NAME "avx512bf16-emulated"
#elif defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define QWEN3_PATH_AVX512BF16 1
#define QWEN3_PATH_NAME "avx512bf16"
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QWEN3_PATH_AVX2 1
#define QWEN3_PATH_NAME "avx2"
#else
#error "qwen3 gemv kernels need AVX512-BF16 or AVX2+FMA"
#endif
#if !defined(QWEN3_EMULATE_AVX512BF16)
#include <immintrin.h>
#endif

namespace {

using qwen3::bf16_bits_to_float;
using qwen3::float_to_bf16_bits;
using qwen3::grain_for;
using qwen3::silu_mul;

// Software prefetch distance in bytes (0 = off) and hint. The L2 stream prefetcher does not cross 4 KiB
// pages, so each page's first lines would be demand misses; one prefetch per 64-byte line hides that.
// Measured, Qwen3-0.6B decode shapes: Zen 3 (AVX2 path), 1 KiB ahead into L1 ~5% faster than none; a
// Granite Rapids-class Xeon (AVX-512 path), 2 KiB ahead into L2 (T1) 18% faster than none, 5% faster
// than into L1 (an L1 prefetch holds a fill buffer, of which a core has few, until the line arrives).
#if defined(QWEN3_PATH_AVX512BF16)
#define QWEN3_PF_DEFAULT_DISTANCE 2048
#define QWEN3_PF_DEFAULT_HINT _MM_HINT_T1
#else
#define QWEN3_PF_DEFAULT_DISTANCE 1024
#define QWEN3_PF_DEFAULT_HINT _MM_HINT_T0
#endif
#ifndef QWEN3_PF_HINT
#define QWEN3_PF_HINT QWEN3_PF_DEFAULT_HINT
#endif
#ifndef QWEN3_PREFETCH
#define QWEN3_PREFETCH QWEN3_PF_DEFAULT_DISTANCE
#endif
constexpr int64_t kRows = 16;    // output rows per packed block
constexpr int64_t kKAlign = 32;  // K is padded to a multiple of this


// --- 16 fp32 lanes: one zmm, two ymm, or scalars (emulation) ---------------------------------------------

#if defined(QWEN3_EMULATE_AVX512BF16)
struct V16 {
  float f[16];
};
inline V16 vzero() {
  V16 v;
  for (float& f : v.f) f = 0.f;
  return v;
}
inline V16 vload(const float* p) {
  V16 v;
  std::memcpy(v.f, p, sizeof(v.f));
  return v;
}
inline void vstore(float* p, V16 v) { std::memcpy(p, v.f, sizeof(v.f)); }
inline V16 vfma(V16 acc, V16 w, float x) {
  for (int i = 0; i < 16; ++i) acc.f[i] = std::fma(w.f[i], x, acc.f[i]);
  return acc;
}
// vdpbf16ps: lane i += a.bf16[2i] * b.bf16[2i] + a.bf16[2i+1] * b.bf16[2i+1] (fp32).
inline V16 vdpbf16(V16 acc, const uint32_t* w, uint32_t xpair) {
  const float x0 = bf16_bits_to_float(xpair & 0xffff), x1 = bf16_bits_to_float(xpair >> 16);
  for (int i = 0; i < 16; ++i)
    acc.f[i] += bf16_bits_to_float(w[i] & 0xffff) * x0 + bf16_bits_to_float(w[i] >> 16) * x1;
  return acc;
}
inline void prefetch(const void*) {}
#elif defined(QWEN3_PATH_AVX512BF16)
struct V16 {
  __m512 v;
};
inline V16 vzero() { return {_mm512_setzero_ps()}; }
inline V16 vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, V16 v) { _mm512_storeu_ps(p, v.v); }
inline V16 vfma(V16 acc, V16 w, float x) { return {_mm512_fmadd_ps(w.v, _mm512_set1_ps(x), acc.v)}; }
inline V16 vdpbf16(V16 acc, const uint32_t* w, uint32_t xpair) {
  const __m512i wv = _mm512_loadu_si512(w);
  const __m512i xv = _mm512_set1_epi32(static_cast<int>(xpair));
  return {_mm512_dpbf16_ps(acc.v, reinterpret_cast<__m512bh>(wv), reinterpret_cast<__m512bh>(xv))};
}
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), QWEN3_PF_HINT); }
#else
struct V16 {
  __m256 lo, hi;
};
inline V16 vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, V16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline V16 vfma(V16 acc, V16 w, float x) {
  const __m256 xb = _mm256_set1_ps(x);
  return {_mm256_fmadd_ps(w.lo, xb, acc.lo), _mm256_fmadd_ps(w.hi, xb, acc.hi)};
}
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), QWEN3_PF_HINT); }
#endif

// --- micro-kernels: NB blocks x MT rows of x, one accumulator chain per output element ------------------

// Tile shapes per path and weight format: kGroup blocks per group, up to max_mt rows, nb_for(mt) blocks per tile.
#if defined(QWEN3_PATH_AVX512BF16)
constexpr int kGroup = 4;  // 4 blocks x 6 rows = 24 zmm accumulators + 4 weight vectors, in 32 zmm
constexpr int kBf16MaxMT = 6, kF32MaxMT = 6;
inline int bf16_rows_for(int64_t left) { return static_cast<int>(std::min<int64_t>(left, kBf16MaxMT)); }
inline int bf16_nb_for(int /*mt*/) { return 4; }
inline int f32_nb_for(int /*mt*/) { return 4; }
#else
// AVX2 has 16 ymm. bf16: even and odd k get an accumulator each (summed at the end, whatever the tile),
// so 3 rows x 2 halves x 2 = 12 accumulators, plus 2 converted weight halves; with 1 row, 2 blocks.
// fp32: 4 rows x 2 halves = 8 accumulators; with 1-2 rows, 2 blocks.
constexpr int kGroup = 2;
constexpr int kBf16MaxMT = 3, kF32MaxMT = 4;
// 1 or 2 rows left: one row at a time over both blocks (the group is in L2 after the first).
inline int bf16_rows_for(int64_t left) { return left >= kBf16MaxMT ? kBf16MaxMT : 1; }
inline int bf16_nb_for(int mt) { return mt == 1 ? 2 : 1; }
inline int f32_nb_for(int mt) { return mt <= 2 ? 2 : 1; }
#endif
constexpr int64_t kStep = kGroup * kRows;  // W elements (pairs or floats) per k step of a group

// bf16 weights, one k pair per step. x holds MT rows of activations: bf16 pairs (AVX512-BF16) or fp32.
#if defined(QWEN3_PATH_AVX512BF16)
using XBf16 = uint16_t;  // the activations as the dot-product instruction takes them
template <int NB, int MT, bool PF>
inline void tile_bf16(const uint32_t* const* w, int64_t kp_count, const XBf16* x16, int64_t xs, float* out,
                      int64_t os) {
  const auto* x = reinterpret_cast<const uint32_t*>(x16);  // pairs
  const int64_t xp = xs / 2;
  V16 acc[MT][NB];
  for (int m = 0; m < MT; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = vzero();
  for (int64_t kp = 0; kp < kp_count; ++kp) {
    for (int b = 0; b < NB; ++b) {
      const uint32_t* wb = w[b] + kp * kStep;
      if (PF && QWEN3_PREFETCH > 0) prefetch(reinterpret_cast<const char*>(wb) + QWEN3_PREFETCH);
      for (int m = 0; m < MT; ++m) acc[m][b] = vdpbf16(acc[m][b], wb, x[m * xp + kp]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int b = 0; b < NB; ++b) vstore(out + m * os + b * kRows, acc[m][b]);
}
#else
using XBf16 = float;
template <int NB, int MT, bool PF>
inline void tile_bf16(const uint32_t* const* w, int64_t kp_count, const XBf16* x, int64_t xs, float* out,
                      int64_t os) {
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  V16 even_acc[MT][NB], odd_acc[MT][NB];
  for (int m = 0; m < MT; ++m)
    for (int b = 0; b < NB; ++b) even_acc[m][b] = odd_acc[m][b] = vzero();
  for (int64_t kp = 0; kp < kp_count; ++kp) {
    for (int b = 0; b < NB; ++b) {
      const uint32_t* wb = w[b] + kp * kStep;
      if (PF && QWEN3_PREFETCH > 0) prefetch(reinterpret_cast<const char*>(wb) + QWEN3_PREFETCH);
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 8));
      // Low 16 bits of each 32-bit lane = the weight for k = 2kp, high 16 bits = k = 2kp + 1.
      const V16 even = {_mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)),
                        _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16))};
      for (int m = 0; m < MT; ++m) even_acc[m][b] = vfma(even_acc[m][b], even, x[m * xs + 2 * kp]);
      const V16 odd = {_mm256_castsi256_ps(_mm256_and_si256(w0, hi_mask)),
                       _mm256_castsi256_ps(_mm256_and_si256(w1, hi_mask))};
      for (int m = 0; m < MT; ++m) odd_acc[m][b] = vfma(odd_acc[m][b], odd, x[m * xs + 2 * kp + 1]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int b = 0; b < NB; ++b) {
      const V16 e = even_acc[m][b], o = odd_acc[m][b];
      vstore(out + m * os + b * kRows, {_mm256_add_ps(e.lo, o.lo), _mm256_add_ps(e.hi, o.hi)});
    }
}
#endif

// fp32 weights, one k per step; x in fp32.
template <int NB, int MT, bool PF>
inline void tile_f32(const float* const* w, int64_t k_count, const float* x, int64_t xs, float* out, int64_t os) {
  V16 acc[MT][NB];
  for (int m = 0; m < MT; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = vzero();
  for (int64_t k = 0; k < k_count; ++k) {
    for (int b = 0; b < NB; ++b) {
      const float* wb = w[b] + k * kStep;
      if (PF && QWEN3_PREFETCH > 0) prefetch(reinterpret_cast<const char*>(wb) + QWEN3_PREFETCH);
      const V16 wv = vload(wb);
      for (int m = 0; m < MT; ++m) acc[m][b] = vfma(acc[m][b], wv, x[m * xs + k]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int b = 0; b < NB; ++b) vstore(out + m * os + b * kRows, acc[m][b]);
}

// The weight formats: how a block is addressed, what x looks like, which micro-kernel runs.
struct Bf16Weights {
  using W = uint32_t;  // a bf16 pair
  using X = XBf16;
  static int rows_for(int64_t left) { return bf16_rows_for(left); }
  static int nb_for(int mt) { return bf16_nb_for(mt); }
  static int64_t steps(int64_t k_pad) { return k_pad / 2; }
  template <int NB, int MT, bool PF>
  static void tile(const W* const* w, int64_t n, const X* x, int64_t xs, float* out, int64_t os) {
    tile_bf16<NB, MT, PF>(w, n, x, xs, out, os);
  }
};
struct F32Weights {
  using W = float;
  using X = float;
  static int rows_for(int64_t left) { return static_cast<int>(std::min<int64_t>(left, kF32MaxMT)); }
  static int nb_for(int mt) { return f32_nb_for(mt); }
  static int64_t steps(int64_t k_pad) { return k_pad; }
  template <int NB, int MT, bool PF>
  static void tile(const W* const* w, int64_t n, const X* x, int64_t xs, float* out, int64_t os) {
    tile_f32<NB, MT, PF>(w, n, x, xs, out, os);
  }
};

template <class F, int NB, int MT>
inline void tile_pf(bool pf, const typename F::W* const* w, int64_t n, const typename F::X* x, int64_t xs,
                    float* out, int64_t os) {
  if (pf)
    F::template tile<NB, MT, true>(w, n, x, xs, out, os);
  else
    F::template tile<NB, MT, false>(w, n, x, xs, out, os);
}

template <class F, int NB>
inline void tile_mt(int mt, bool pf, const typename F::W* const* w, int64_t n, const typename F::X* x, int64_t xs,
                    float* out, int64_t os) {
  switch (mt) {
    case 1: tile_pf<F, NB, 1>(pf, w, n, x, xs, out, os); break;
    case 2: tile_pf<F, NB, 2>(pf, w, n, x, xs, out, os); break;
    case 3: tile_pf<F, NB, 3>(pf, w, n, x, xs, out, os); break;
    case 4: tile_pf<F, NB, 4>(pf, w, n, x, xs, out, os); break;
#if defined(QWEN3_PATH_AVX512BF16)  // (AVX2 never asks for more rows than its formats' max_mt)
    case 5: tile_pf<F, NB, 5>(pf, w, n, x, xs, out, os); break;
    case 6: tile_pf<F, NB, 6>(pf, w, n, x, xs, out, os); break;
#endif
    default: TORCH_CHECK(false, "qwen3 gemv: bad tile height ", mt);
  }
}

template <class F>
inline void tile_any(int nb, int mt, bool pf, const typename F::W* const* w, int64_t n, const typename F::X* x,
                     int64_t xs, float* out, int64_t os) {
  switch (nb) {
    case 1: tile_mt<F, 1>(mt, pf, w, n, x, xs, out, os); break;
    case 2: tile_mt<F, 2>(mt, pf, w, n, x, xs, out, os); break;
#if defined(QWEN3_PATH_AVX512BF16)
    case 3: tile_mt<F, 3>(mt, pf, w, n, x, xs, out, os); break;
    case 4: tile_mt<F, 4>(mt, pf, w, n, x, xs, out, os); break;
#endif
    default: TORCH_CHECK(false, "qwen3 gemv: bad tile width ", nb);
  }
}

// out[m][16 j + r] for the kGroup blocks of the group at `group` and every row m of x: tiles of
// F::rows_for(rows left) rows, each over sub-groups of F::nb_for(mt) blocks. The first tile reads the group from memory (with
// prefetch), later ones find it in L2.
template <class F>
void group_all_rows(const typename F::W* group, int64_t k_pad, const typename F::X* x, int64_t m_rows,
                    float* out /* [M][kGroup * 16] */) {
  constexpr int g = kGroup;
  const int64_t steps = F::steps(k_pad), os = g * kRows;
  const typename F::W* blocks[g];
  for (int b = 0; b < g; ++b) blocks[b] = group + b * kRows;
  for (int64_t m0 = 0, mt; m0 < m_rows; m0 += mt) {
    mt = F::rows_for(m_rows - m0);
    const int nb = F::nb_for(static_cast<int>(mt));
    for (int b0 = 0; b0 < g; b0 += nb)
      tile_any<F>(std::min(nb, g - b0), static_cast<int>(mt), m0 == 0, blocks + b0, steps, x + m0 * k_pad, k_pad,
                  out + m0 * os + b0 * kRows, os);
  }
}

// x[M, K] (bf16 or fp32, any strides) as the kernel reads it: [M, K_pad], zero-padded, in F::X.
template <class X>
std::vector<X> prepare_x(const at::Tensor& x, int64_t k_pad) {
  const int64_t m_rows = x.size(0), k = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  std::vector<X> buf(static_cast<size_t>(m_rows * k_pad));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const auto* src16 = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  const float* src32 = bf16 ? nullptr : x.data_ptr<float>();
  for (int64_t m = 0; m < m_rows; ++m) {
    X* dst = buf.data() + m * k_pad;
    if constexpr (sizeof(X) == 2) {  // bf16 activations for vdpbf16ps
      if (bf16 && s1 == 1)
        std::memcpy(dst, src16 + m * s0, k * sizeof(uint16_t));
      else if (bf16)
        for (int64_t i = 0; i < k; ++i) dst[i] = src16[m * s0 + i * s1];
      else
        for (int64_t i = 0; i < k; ++i) dst[i] = float_to_bf16_bits(src32[m * s0 + i * s1]);
    } else {
      if (!bf16 && s1 == 1)
        std::memcpy(dst, src32 + m * s0, k * sizeof(float));
      else if (!bf16)
        for (int64_t i = 0; i < k; ++i) dst[i] = src32[m * s0 + i * s1];
      else
        for (int64_t i = 0; i < k; ++i) dst[i] = bf16_bits_to_float(src16[m * s0 + i * s1]);
    }
    std::fill(dst + k, dst + k_pad, X{0});
  }
  return buf;
}

// y[m][n0 + r] = acc[m][r] (+ bias), r < count, in y's dtype.
inline void store_row(const float* acc, int64_t count, const float* bias, float* y) {
  for (int64_t r = 0; r < count; ++r) y[r] = bias ? acc[r] + bias[r] : acc[r];
}
inline void store_row(const float* acc, int64_t count, const float* bias, uint16_t* y) {
  for (int64_t r = 0; r < count; ++r) y[r] = float_to_bf16_bits(bias ? acc[r] + bias[r] : acc[r]);
}


struct Packed {
  bool f32;  // fp32 [groups][K_pad][G][16], else bf16 pairs [groups][K_pad/2][G][16][2]
  int64_t k_pad, groups, group_elems;  // group_elems: W elements (pairs or floats) per group
};

Packed check_packed(const at::Tensor& packed) {
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous(), "qwen3 gemv: packed weight must be contiguous CPU");
  if (packed.scalar_type() == at::kFloat) {
    TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kGroup && packed.size(3) == kRows,
                "qwen3 gemv: fp32 packed weight must be [groups, K_pad, ", kGroup, ", 16] (packed for another path?)");
    return {true, packed.size(1), packed.size(0), packed.size(1) * kStep};
  }
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 5 && packed.size(2) == kGroup &&
                  packed.size(3) == kRows && packed.size(4) == 2,
              "qwen3 gemv: bf16 packed weight must be [groups, K_pad/2, ", kGroup, ", 16, 2] (packed for another path?)");
  return {false, packed.size(1) * 2, packed.size(0), packed.size(1) * kStep};
}

void check_x(const at::Tensor& x, const Packed& p) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "qwen3 gemv: x must be a CPU [M, K] tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "qwen3 gemv: x must be bfloat16 or float32");
  TORCH_CHECK(p.k_pad % kKAlign == 0 && x.size(1) <= p.k_pad && x.size(1) > p.k_pad - kKAlign,
              "qwen3 gemv: x has ", x.size(1), " features, the packed weight was made for K_pad=", p.k_pad);
}


// Runs every group through `epilogue(group, acc)` after computing acc[M][kGroup * 16].
template <class F, class Epilogue>
void run_groups(const at::Tensor& x, const at::Tensor& packed, const Packed& p, const Epilogue& epilogue) {
  const int64_t m_rows = x.size(0);
  const std::vector<typename F::X> xbuf = prepare_x<typename F::X>(x, p.k_pad);
  const auto* w = reinterpret_cast<const typename F::W*>(packed.data_ptr());
  qwen3::balanced_for(p.groups, [&](int64_t g0, int64_t g1) {
    std::vector<float> acc(static_cast<size_t>(m_rows * kStep));
    for (int64_t group = g0; group < g1; ++group) {
      group_all_rows<F>(w + group * p.group_elems, p.k_pad, xbuf.data(), m_rows, acc.data());
      epilogue(group, acc.data());
    }
  });
}

template <class F>
void linear_impl(const at::Tensor& x, const at::Tensor& packed, const Packed& p, int64_t n, const float* bias,
                 at::Tensor& y) {
  const int64_t m_rows = x.size(0);
  const bool out_bf16 = y.scalar_type() == at::kBFloat16;
  void* y_raw = y.data_ptr();
  run_groups<F>(x, packed, p, [&](int64_t group, const float* acc) {
    const int64_t os = kStep, n0 = group * kStep, count = std::min<int64_t>(os, n - n0);
    if (count <= 0) return;
    const float* bp = bias ? bias + n0 : nullptr;
    for (int64_t m = 0; m < m_rows; ++m) {
      if (out_bf16)
        store_row(acc + m * os, count, bp, static_cast<uint16_t*>(y_raw) + m * n + n0);
      else
        store_row(acc + m * os, count, bp, static_cast<float*>(y_raw) + m * n + n0);
    }
  });
}

template <class F>
void gate_up_impl(const at::Tensor& x, const at::Tensor& packed, const Packed& p, int64_t n, at::Tensor& y) {
  const int64_t m_rows = x.size(0);
  const bool out_bf16 = y.scalar_type() == at::kBFloat16;
  void* y_raw = y.data_ptr();
  run_groups<F>(x, packed, p, [&](int64_t group, const float* acc) {
    // Blocks alternate gate, up: block 2j of the group is pair (group * G / 2 + j)'s gate, 2j + 1 its up.
    const int64_t os = kStep;
    float gate[kRows];
    for (int j = 0; 2 * j < kGroup; ++j) {
      const int64_t n0 = (group * kGroup / 2 + j) * kRows, count = std::min<int64_t>(kRows, n - n0);
      if (count <= 0) break;
      for (int64_t m = 0; m < m_rows; ++m) {
        const float* row = acc + m * os + 2 * j * kRows;
        std::memcpy(gate, row, sizeof(gate));
        silu_mul(gate, row + kRows, kRows);
        if (out_bf16)
          store_row(gate, count, nullptr, static_cast<uint16_t*>(y_raw) + m * n + n0);
        else
          store_row(gate, count, nullptr, static_cast<float*>(y_raw) + m * n + n0);
      }
    }
  });
}

// y[M, N] = x[M, K] @ W^T (+ bias), W given packed. Output dtype = x's dtype.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const std::optional<at::Tensor>& bias) {
  const Packed p = check_packed(packed);
  check_x(x, p);
  TORCH_CHECK(n > (p.groups - 1) * kStep && n <= p.groups * kStep, "qwen3 gemv: N does not match the packed weight");
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "qwen3 gemv: bias must have N elements");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bias_p = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  if (p.f32)
    linear_impl<F32Weights>(x, packed, p, n, bias_p, y);
  else
    linear_impl<Bf16Weights>(x, packed, p, n, bias_p, y);
  return y;
}

// silu(x @ Wg^T) * (x @ Wu^T) in one pass. The packed tensor interleaves the two matrices block by block
// (gate block i, then up block i), so the thread that owns output rows [16i, 16i+16) streams both halves
// and applies the activation while the results are in L1. g and u stay in fp32 (the reference rounds each
// to the activation dtype first: slightly more accurate here, never less).
at::Tensor packed_gate_up_silu(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  const Packed p = check_packed(packed);
  check_x(x, p);
  const int64_t pairs = p.groups * kGroup / 2;
  TORCH_CHECK(n > (pairs - kGroup / 2) * kRows && n <= pairs * kRows, "qwen3 gemv: N does not match the packed weight");
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  if (p.f32)
    gate_up_impl<F32Weights>(x, packed, p, n, y);
  else
    gate_up_impl<Bf16Weights>(x, packed, p, n, y);
  return y;
}

// Streams a bf16 buffer and returns a checksum: the memory-read roofline for the benchmark, using the same
// threads and the same 64-byte loads as the kernels, with no arithmetic to speak of.
double read_bandwidth_probe(const at::Tensor& buf) {
  TORCH_CHECK(buf.is_contiguous() && buf.scalar_type() == at::kBFloat16, "read probe: contiguous bf16 tensor");
  const auto* p = reinterpret_cast<const uint32_t*>(buf.data_ptr<at::BFloat16>());
  const int64_t words = buf.numel() / 2;
  const int64_t chunk = 16 * 1024;  // 64 KiB per task
  const int64_t chunks = words / chunk;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<uint32_t> sums(static_cast<size_t>(threads), 0u);
  at::parallel_for(0, chunks, grain_for(chunks), [&](int64_t c0, int64_t c1) {
#if defined(QWEN3_PATH_AVX512BF16) && !defined(QWEN3_EMULATE_AVX512BF16)
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = c0 * chunk; i < c1 * chunk; i += 64) {
      a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
      a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 16));
      a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 32));
      a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 48));
    }
    const uint32_t s = static_cast<uint32_t>(
        _mm512_reduce_add_epi32(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3))));
#elif defined(QWEN3_PATH_AVX2)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = c0 * chunk; i < c1 * chunk; i += 32) {
      a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
      a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
      a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 16)));
      a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 24)));
    }
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                       _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3)));
    uint32_t s = 0;
    for (uint32_t l : lanes) s ^= l;
#else
    uint32_t s = 0;
    for (int64_t i = c0 * chunk; i < c1 * chunk; ++i) s ^= p[i];
#endif
    sums[static_cast<size_t>(at::get_thread_num()) % sums.size()] ^= s;
  });
  uint32_t total = 0;
  for (uint32_t s : sums) total ^= s;
  return static_cast<double>(total);
}

std::string kernel_path() { return QWEN3_PATH_NAME; }
int64_t kernel_group() { return kGroup; }

}  // namespace

// The op namespace is a macro so that test builds (e.g. the emulated AVX-512 path) can be loaded into the
// same process as the real one; the extra level of macros makes the preprocessor expand it.
#ifndef QWEN3_OPS_NAMESPACE
#define QWEN3_OPS_NAMESPACE qwen3_kernels
#endif
#define QWEN3_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define QWEN3_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

QWEN3_LIBRARY(QWEN3_OPS_NAMESPACE, m) {
  m.def("packed_linear(Tensor x, Tensor packed, int n, Tensor? bias=None) -> Tensor");
  m.def("packed_gate_up_silu(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("read_bandwidth_probe(Tensor buf) -> float");
  m.def("kernel_path() -> str", &kernel_path);
  m.def("kernel_group() -> int", &kernel_group);
}

QWEN3_LIBRARY_IMPL(QWEN3_OPS_NAMESPACE, CPU, m) {
  m.impl("packed_linear", TORCH_FN(packed_linear));
  m.impl("packed_gate_up_silu", TORCH_FN(packed_gate_up_silu));
  m.impl("read_bandwidth_probe", TORCH_FN(read_bandwidth_probe));
}
