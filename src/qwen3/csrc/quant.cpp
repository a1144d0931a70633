// Linear layers and MoE experts on quantized weights (GGUF's Q8_0, Q4_0 ... Q6_K), kept quantized in memory.
//
// Why integer dot products: at batch 1 a layer reads each weight once, so 4-bit weights decode about 3.5x
// faster than bf16 only if the arithmetic per weight costs less than the read. Expanding each weight to a
// float costs three instructions per 8 weights; multiplying 8-bit integers costs two per 32. So, as
// llama.cpp does, the activations are quantized too, per row and per 32 values (per 256 for the K types,
// as llama.cpp's Q8_K), to int8 with one fp32 scale (dx = max|x| / 127), and each block of the product is
// an integer dot product scaled once:
//
//     sum_k w[n,k] x[m,k] = sum_blocks  scale[n,b] dx[m,b] sum_k q[n,k] c[m,k]  +  min[n,b] dx[m,b] sum_k c[m,k]
//
// where the weight is w = scale * q + min within a block of B (16 or 32) values of k, q its code and c
// the activation's code. Every GGUF type is this, losslessly, for some block size, code width and
// optional min (see qwen3/quantized.py, which repacks GGUF blocks into the layout below):
//
//     type   codes            B    scale            min
//     Q8_0   int8             32   d                -
//     Q5_0   int8 (q - 16)    32   d                -
//     Q4_0   4-bit q          32   d                -8 d
//     Q4_1   4-bit q          32   d                m
//     Q5_1   int8 (q)         32   d                m
//     Q4_K   4-bit q          32   d * sc[j]        -dmin * m[j]
//     Q5_K   int8 (q)         32   d * sc[j]        -dmin * m[j]
//     Q6_K   int8 (q - 32)    16   d * sc[j]        -
//     Q3_K   4-bit (q + 4)    16   d * sc[j]        d * (-4 sc[j])
//     Q2_K   4-bit (q)        16   d * sc[j]        dmin * (-m[j])
//
// d, dmin and m are fp16 per super-block (256 values of k for the K types, one block for the others), sc
// and m[j] int8 per block. For the K types the block's int8 factor sc[j] multiplies its integer dot product
// inside the widening vpmaddwd, the super-block's sum stays int32 and d * dx is applied once per 256.
//
// Layout, per group of 8 output rows (one 256-bit register of int32 / fp32 lanes, one lane per row):
//     codes  8-bit: [K/4][8 rows][4]  the 4 codes of k = 4s..4s+3 of each row: one 32-byte load per step
//            4-bit: [K/8][8 rows][4]  byte j of a row holds k = 8s+j (low nibble) and 8s+4+j (high)
//     d, m   [K/super][8] fp16;  sc, mc  [K/B][8] int8   (only for the K types: super-block != block)
// A step multiplies the 8 rows' 4 codes by 4 activation codes broadcast to every lane, so no horizontal
// sums are needed: on AVX2, vpmaddubsw (unsigned x signed bytes, pairwise into int16) then vpmaddwd into
// int32; on the AVX-512 build, VNNI's vpdpbusd does both in one instruction. 8-bit codes are signed: |q|
// goes in as the unsigned operand and the activation takes q's sign (vpsignb), as the products then stay
// within int16. Experts of a MoE layer are stacked: [E][groups][...].
//
// Batch invariance: an output element is one fixed sequence of operations over its blocks whatever the
// number of rows in the call, the tile it lands in or the thread that runs it, and a row's activation
// scales depend on that row alone. The integer dot products are exact (no intermediate saturates), so
// the AVX2 and VNNI paths give the same integers and, after them, the same floating-point operations:
// both kernel builds produce identical results.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "common.h"

// The AVX-512 build has VNNI (every AVX512-BF16 CPU does): vpdpbusd on 256-bit registers.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QWEN3_QUANT_VNNI 1
#endif

namespace {

using qwen3::bf16_bits_to_float;
using qwen3::float_to_bf16_bits;
using qwen3::silu_mul;

constexpr int64_t kLanes = 8;  // output rows per group
// Activation rows per tile: an int32 and an fp32 accumulator each (and a block accumulator on VNNI), in
// AVX2's 16 ymm registers for 4 rows, in AVX-512's 32 for 8.
#if defined(QWEN3_QUANT_VNNI)
constexpr int kMaxMT = 8;
#else
constexpr int kMaxMT = 4;
#endif
// Software prefetch distance (bytes) of the codes stream, one prefetch per 64-byte line: the L2 streamer
// stops at 4 KiB pages and keeps too few lines in flight for DRAM at batch 1.
#ifndef QWEN3_QUANT_PREFETCH
#define QWEN3_QUANT_PREFETCH 2048
#endif
#ifndef QWEN3_QUANT_PF_HINT  // into L1; into L2 (T1) measured the same on the Xeon, unlike the bf16 kernel
#define QWEN3_QUANT_PF_HINT _MM_HINT_T0
#endif

// --- the weights -----------------------------------------------------------------------------------------

// One quantized matrix (or a stack of E experts' matrices) as the kernel reads it.
struct QMatrix {
  const uint8_t* codes;
  const uint16_t* d;
  const int8_t* sc;   // null unless super-block != block
  const uint16_t* m;  // null: no min
  const int8_t* mc;   // null unless min and super-block != block
  int64_t k, groups, bits, block, super;
  // elements per group of each array, and per expert
  int64_t codes_g, d_g, sc_g;
  int64_t codes_e, d_e, sc_e;
};

// Tensors: codes uint8 [E, G, K*bits], d (and m) int16 [E, G, K/super, 8], sc (and mc) int8 [E, G, K/B, 8].
using Parts = c10::List<std::optional<at::Tensor>>;

QMatrix check_matrix(const Parts& list, std::array<int64_t, 3> fmt, int64_t k, const char* what) {
  TORCH_CHECK(list.size() == 5, "qwen3 quant: ", what, " must be [codes, d, sc, m, mc]");
  std::vector<std::optional<at::Tensor>> parts;
  for (size_t i = 0; i < 5; ++i) parts.push_back(list.get(i));
  TORCH_CHECK(parts[0].has_value() && parts[1].has_value(), "qwen3 quant: ", what, " needs codes and d");
  const int64_t bits = fmt[0], block = fmt[1], super = fmt[2];
  TORCH_CHECK((bits == 8 || bits == 4) && (block == 16 || block == 32) && super % block == 0 &&
                  k % super == 0 && k % 32 == 0,
              "qwen3 quant: bad format bits=", bits, " block=", block, " super=", super, " for K=", k);
  const at::Tensor& codes = *parts[0];
  const at::Tensor& d = *parts[1];
  TORCH_CHECK( codes.is_contiguous() && codes.scalar_type() == at::kByte && codes.dim() == 3 &&
                  codes.size(2) == k * bits,
              "qwen3 quant: ", what, " codes must be contiguous uint8 [E, G, K*bits]");
  const int64_t e = codes.size(0), g = codes.size(1);
  auto check_scales = [&](const at::Tensor& t, int64_t per_group, at::ScalarType type, const char* name) {
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == type && t.numel() == e * g * per_group * kLanes,
                "qwen3 quant: ", what, " ", name, " has the wrong size or type");
  };
  check_scales(d, k / super, at::kShort, "d");
  const bool sub = super != block;
  QMatrix q{codes.data_ptr<uint8_t>(),
            reinterpret_cast<const uint16_t*>(d.data_ptr<int16_t>()),
            nullptr,
            nullptr,
            nullptr,
            k,
            g,
            bits,
            block,
            super,
            k * bits,
            k / super * kLanes,
            k / block * kLanes,
            0,
            0,
            0};
  q.codes_e = g * q.codes_g;
  q.d_e = g * q.d_g;
  q.sc_e = g * q.sc_g;
  if (sub) {
    TORCH_CHECK(parts[2].has_value(), "qwen3 quant: ", what, " needs sub-block scales");
    check_scales(*parts[2], k / block, at::kChar, "sc");
    q.sc = parts[2]->data_ptr<int8_t>();
  }
  if (parts[3].has_value()) {
    check_scales(*parts[3], k / super, at::kShort, "m");
    q.m = reinterpret_cast<const uint16_t*>(parts[3]->data_ptr<int16_t>());
    if (sub) {
      TORCH_CHECK(parts[4].has_value(), "qwen3 quant: ", what, " needs sub-block mins");
      check_scales(*parts[4], k / block, at::kChar, "mc");
      q.mc = parts[4]->data_ptr<int8_t>();
    }
  }
  return q;
}

// --- the activations -------------------------------------------------------------------------------------

// Rows of x quantized per `block` values (32 for the one-scale types, 256 for the K types, whose sub-block
// factors are then applied in the integer domain, as llama.cpp's Q8_K does): codes, scale dx per block, and
// dx * (sum of codes) per 16 and per 32 values (the min term's factor).
struct QActs {
  std::vector<int8_t> codes;
  std::vector<float> dx, sum16, sum32;
  int64_t k = 0, block = 32;
};

inline int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// codes c = round-to-nearest-even(x / dx), which vcvtps2dq computes in the default rounding mode (as
// std::nearbyint would, one value at a time), clamped to [-127, 127] (|x| / dx <= 127 up to rounding).
void quantize_row(const float* x, int64_t k, int64_t block, int8_t* q, float* dx, float* sum16, float* sum32) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t b = 0; b < k / block; ++b) {
    const float* xb = x + b * block;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < block; i += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    float a = 0.f;
    for (float l : lanes) a = std::max(a, l);
    const float d = a / 127.f, id = a > 0.f ? 127.f / a : 0.f;
    const __m256 idv = _mm256_set1_ps(id);
    dx[b] = d;
    for (int64_t j = 0; j < block / 16; ++j) {
      const float* xj = xb + j * 16;
      const __m256i c0 = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xj), idv))));
      const __m256i c1 = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xj + 8), idv))));
      const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(c0, c1), 0xD8);  // 16 int16, in order
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * block + j * 16),
                       _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1)));
      sum16[(b * block) / 16 + j] = d * static_cast<float>(hsum_epi32(_mm256_add_epi32(c0, c1)));
    }
  }
  for (int64_t j = 0; j < k / 32; ++j) {  // sum of the two 16s: the same dx (a block holds both)
    const float d = dx[(j * 32) / block];
    int s = 0;
    for (int64_t i = j * 32; i < j * 32 + 32; ++i) s += q[i];
    sum32[j] = d * static_cast<float>(s);
  }
}

// Quantizes every row of x [M, K] (bf16 or fp32, any strides), rows in parallel.
QActs quantize_acts(const at::Tensor& x, int64_t block) {
  const int64_t m_rows = x.size(0), k = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  QActs a;
  a.k = k;
  a.block = block;
  a.codes.resize(static_cast<size_t>(m_rows * k));
  a.dx.resize(static_cast<size_t>(m_rows * k / block));
  a.sum16.resize(static_cast<size_t>(m_rows * k / 16));
  a.sum32.resize(static_cast<size_t>(m_rows * k / 32));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const auto* src16 = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  const float* src32 = bf16 ? nullptr : x.data_ptr<float>();
  at::parallel_for(0, m_rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = r0; r < r1; ++r) {
      int64_t i = 0;
      if (bf16 && s1 == 1)  // bf16 is the top half of an fp32: widen and shift, 8 at a time
        for (; i + 8 <= k; i += 8)
          _mm256_storeu_ps(row.data() + i, _mm256_castsi256_ps(_mm256_slli_epi32(
              _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src16 + r * s0 + i))), 16)));
      for (; i < k; ++i)
        row[i] = bf16 ? bf16_bits_to_float(src16[r * s0 + i * s1]) : src32[r * s0 + i * s1];
      quantize_row(row.data(), k, block, a.codes.data() + r * k, a.dx.data() + r * k / block,
                   a.sum16.data() + r * k / 16, a.sum32.data() + r * k / 32);
    }
  });
  return a;
}

// Activations are quantized per 32 values for one-scale types, per super-block for the K types.
inline int64_t act_block(const QMatrix& w) { return w.super == w.block ? 32 : w.super; }

// --- the micro-kernel: one group of 8 rows x MT activation rows --------------------------------------------

inline __m256 load_f16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load_i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

#if defined(QWEN3_QUANT_VNNI)
inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) { return _mm256_dpbusd_epi32(acc, u8, s8); }
#else
// A lane's int32 factor f as the (f, f) int16 pair vpmaddwd multiplies a lane's two pair sums by (|f| < 2^15).
inline __m256i mult16(__m256i f) { return _mm256_blend_epi16(f, _mm256_slli_epi32(f, 16), 0xAA); }
#endif

// out[m][r] = row r of group `g` of expert `e` dotted with activation row rows[m], m < MT.
template <int BITS, int B, bool SUB, bool MIN, int MT>
void qtile(const QMatrix& w, int64_t e, int64_t g, const QActs& a, const int64_t* rows, float* out) {
  const int64_t k = w.k, blocks = k / B, per_super = w.super / B;
  const uint8_t* codes = w.codes + e * w.codes_e + g * w.codes_g;
  const uint16_t* d = w.d + e * w.d_e + g * w.d_g;
  const int8_t* sc = SUB ? w.sc + e * w.sc_e + g * w.sc_g : nullptr;
  const uint16_t* mn = MIN ? w.m + e * w.d_e + g * w.d_g : nullptr;
  const int8_t* mc = MIN && SUB ? w.mc + e * w.sc_e + g * w.sc_g : nullptr;
  const int8_t* xq[MT];
  const float *xd[MT], *xs[MT];
  const int64_t ab = a.block;  // activation scale block: 32 (one-scale types) or the super-block (K types)
  for (int m = 0; m < MT; ++m) {
    xq[m] = a.codes.data() + rows[m] * k;
    xd[m] = a.dx.data() + rows[m] * (k / ab);
    xs[m] = (B == 16 ? a.sum16.data() + rows[m] * (k / 16) : a.sum32.data() + rows[m] * (k / 32));
  }
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  __m256 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  constexpr int64_t kStepBytes = 32, kPerStep = BITS == 8 ? 4 : 8, kSteps = B / kPerStep;
  // One block of B values of k for every row: iacc[m] += the block's integer dot products times `mult` (per
  // lane: 1, or the rows' int8 sub-block factors). Either instruction set computes the same integers.
  auto block_dot = [&](int64_t b, __m256i mult, __m256i* iacc) {
    const uint8_t* wb = codes + b * kSteps * kStepBytes;
    for (int64_t s = 0; s < kSteps; s += 2)  // two steps (64 bytes) a line
      _mm_prefetch(reinterpret_cast<const char*>(wb + s * kStepBytes) + QWEN3_QUANT_PREFETCH, QWEN3_QUANT_PF_HINT);
#if defined(QWEN3_QUANT_VNNI)
    // vpdpbusd sums the 4 unsigned x signed byte products of each lane straight into int32.
    __m256i bacc[MT];
    for (int m = 0; m < MT; ++m) bacc[m] = SUB ? _mm256_setzero_si256() : iacc[m];
    for (int64_t s = 0; s < kSteps; ++s) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * kStepBytes));
      const int64_t k0 = b * B + s * kPerStep;
      if constexpr (BITS == 8) {
        const __m256i aw = _mm256_abs_epi8(wv);
        for (int m = 0; m < MT; ++m) bacc[m] = dpbusd(bacc[m], aw, _mm256_sign_epi8(bcast4(xq[m] + k0), wv));
      } else {
        const __m256i lo = _mm256_and_si256(wv, nibble);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), nibble);
        for (int m = 0; m < MT; ++m)
          bacc[m] = dpbusd(dpbusd(bacc[m], lo, bcast4(xq[m] + k0)), hi, bcast4(xq[m] + k0 + 4));
      }
    }
    for (int m = 0; m < MT; ++m) iacc[m] = SUB ? _mm256_add_epi32(iacc[m], _mm256_mullo_epi32(bacc[m], mult)) : bacc[m];
#else
    const __m256i mult2 = mult16(mult);
    for (int64_t s = 0; s < kSteps; ++s) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + s * kStepBytes));
      const int64_t k0 = b * B + s * kPerStep;
      if constexpr (BITS == 8) {
        const __m256i aw = _mm256_abs_epi8(wv);
        for (int m = 0; m < MT; ++m) {
          const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(xq[m] + k0), wv));
          iacc[m] = _mm256_add_epi32(iacc[m], _mm256_madd_epi16(p, mult2));
        }
      } else {
        const __m256i lo = _mm256_and_si256(wv, nibble);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), nibble);
        for (int m = 0; m < MT; ++m) {
          // 15 * 127 * 2 * 2 < 2^15: the two nibbles' pair sums add in int16 without overflow
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xq[m] + k0)),
                                             _mm256_maddubs_epi16(hi, bcast4(xq[m] + k0 + 4)));
          iacc[m] = _mm256_add_epi32(iacc[m], _mm256_madd_epi16(p, mult2));
        }
      }
    }
#endif
  };
  if constexpr (SUB) {
    // K types: per super-block, sum_j sc[j] * (block j's integer dot) in int32 (bounded well below 2^31 for
    // every K type's code and factor ranges), then one float scale d * dx; mins per block, in float.
    for (int64_t sb = 0; sb < k / w.super; ++sb) {
      __m256i iacc[MT];
      for (int m = 0; m < MT; ++m) iacc[m] = _mm256_setzero_si256();
      __m256 mn8 = _mm256_setzero_ps();
      if constexpr (MIN) mn8 = load_f16x8(mn + sb * kLanes);
      for (int64_t b = sb * per_super; b < (sb + 1) * per_super; ++b) {
        block_dot(b, _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + b * kLanes))), iacc);
        if constexpr (MIN) {
          const __m256 minv = _mm256_mul_ps(mn8, load_i8x8(mc + b * kLanes));
          for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(minv, _mm256_set1_ps(xs[m][b]), acc[m]);
        }
      }
      const __m256 d8 = load_f16x8(d + sb * kLanes);
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_mul_ps(d8, _mm256_set1_ps(xd[m][sb])), acc[m]);
    }
  } else {
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i iacc[MT];
      for (int m = 0; m < MT; ++m) iacc[m] = _mm256_setzero_si256();
      block_dot(b, _mm256_set1_epi32(1), iacc);
      const __m256 scale = load_f16x8(d + b * kLanes);
      __m256 minv = _mm256_setzero_ps();
      if constexpr (MIN) minv = load_f16x8(mn + b * kLanes);
      for (int m = 0; m < MT; ++m) {
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_mul_ps(scale, _mm256_set1_ps(xd[m][b])), acc[m]);
        if constexpr (MIN) acc[m] = _mm256_fmadd_ps(minv, _mm256_set1_ps(xs[m][b]), acc[m]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) _mm256_storeu_ps(out + m * kLanes, acc[m]);
}

using TileFn = void (*)(const QMatrix&, int64_t, int64_t, const QActs&, const int64_t*, float*);
using Tiles = std::array<TileFn, kMaxMT + 1>;  // by tile height

template <int BITS, int B, bool SUB, bool MIN, int... MT>
Tiles tiles_of(std::integer_sequence<int, MT...>) {
  return {nullptr, &qtile<BITS, B, SUB, MIN, MT + 1>...};
}
template <int BITS, int B, bool SUB, bool MIN>
Tiles tiles_for() {
  return tiles_of<BITS, B, SUB, MIN>(std::make_integer_sequence<int, kMaxMT>{});
}

Tiles select_tiles(const QMatrix& w) {
  const bool sub = w.super != w.block, min = w.m != nullptr;
#define QWEN3_TILES(BITS, B)                                                               \
  if (w.bits == BITS && w.block == B) {                                                    \
    if (sub) return min ? tiles_for<BITS, B, true, true>() : tiles_for<BITS, B, true, false>(); \
    return min ? tiles_for<BITS, B, false, true>() : tiles_for<BITS, B, false, false>();   \
  }
  QWEN3_TILES(8, 32)
  QWEN3_TILES(8, 16)
  QWEN3_TILES(4, 32)
  QWEN3_TILES(4, 16)
#undef QWEN3_TILES
  TORCH_CHECK(false, "qwen3 quant: unsupported format");
}

// Every listed activation row through one group: out[i][8] for rows[i], i < count, in tiles of up to 4.
inline void group_rows(const Tiles& tiles, const QMatrix& w, int64_t e, int64_t g, const QActs& a,
                       const int64_t* rows, int64_t count, float* out) {
  for (int64_t i = 0; i < count; i += kMaxMT) {
    const int64_t mt = std::min<int64_t>(kMaxMT, count - i);
    tiles[mt](w, e, g, a, rows + i, out + i * kLanes);
  }
}

inline void store(const float* v, int64_t count, const float* bias, float* y) {
  for (int64_t r = 0; r < count; ++r) y[r] = bias ? v[r] + bias[r] : v[r];
}
inline void store(const float* v, int64_t count, const float* bias, uint16_t* y) {
  for (int64_t r = 0; r < count; ++r) y[r] = float_to_bf16_bits(bias ? v[r] + bias[r] : v[r]);
}

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == k, "qwen3 quant: x must be a CPU [M, ", k,
              "] tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "qwen3 quant: x must be bfloat16 or float32");
}

// y[M, N] = x[M, K] @ W^T (+ bias). gate_up: groups alternate gate, up (8 rows each) and
// y = silu(gate) * up [M, N].
at::Tensor quant_linear(const at::Tensor& x, const Parts& weight, at::IntArrayRef fmt, int64_t n,
                        const std::optional<at::Tensor>& bias, bool gate_up) {
  TORCH_CHECK(fmt.size() == 3, "qwen3 quant: fmt is [bits, block, super]");
  const QMatrix w = check_matrix(weight, {fmt[0], fmt[1], fmt[2]}, x.size(-1), "weight");
  check_x(x, w.k);
  TORCH_CHECK(weight.get(0)->size(0) == 1, "qwen3 quant: a stack of experts goes to quant_moe");
  const int64_t units = gate_up ? w.groups / 2 : w.groups;  // output groups of 8
  TORCH_CHECK(n > (units - 1) * kLanes && n <= units * kLanes && (!gate_up || w.groups % 2 == 0),
              "qwen3 quant: N does not match the weight");
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n && !gate_up, "qwen3 quant: bias must have N elements");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bias_p = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const int64_t m_rows = x.size(0);
  at::Tensor y = at::empty({m_rows, n}, x.options());
  if (m_rows == 0) return y;
  const QActs a = quantize_acts(x, act_block(w));
  const Tiles tiles = select_tiles(w);
  std::vector<int64_t> rows(static_cast<size_t>(m_rows));
  for (int64_t i = 0; i < m_rows; ++i) rows[i] = i;
  const bool out_bf16 = y.scalar_type() == at::kBFloat16;
  void* y_raw = y.data_ptr();
  qwen3::balanced_for(units, [&](int64_t u0, int64_t u1) {
    std::vector<float> out(static_cast<size_t>(m_rows * kLanes)), up;
    if (gate_up) up.resize(out.size());
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n0 = u * kLanes, count = std::min<int64_t>(kLanes, n - n0);
      if (gate_up) {
        group_rows(tiles, w, 0, 2 * u, a, rows.data(), m_rows, out.data());
        group_rows(tiles, w, 0, 2 * u + 1, a, rows.data(), m_rows, up.data());
        silu_mul(out.data(), up.data(), m_rows * kLanes);
      } else {
        group_rows(tiles, w, 0, u, a, rows.data(), m_rows, out.data());
      }
      const float* bp = bias_p ? bias_p + n0 : nullptr;
      for (int64_t m = 0; m < m_rows; ++m) {
        if (out_bf16)
          store(out.data() + m * kLanes, count, bp, static_cast<uint16_t*>(y_raw) + m * n + n0);
        else
          store(out.data() + m * kLanes, count, bp, static_cast<float*>(y_raw) + m * n + n0);
      }
    }
  });
  return y;
}

// A MoE layer's experts on x [T, H]: y[t] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),
// e = expert_ids[t, j]. gate_up [E, 2I/8 groups alternating gate, up] and down [E, H/8 groups] are read in
// place: the (token, expert) slots are sorted by expert, each expert's groups are tasks for the threads,
// and a task runs all of its expert's slots through its group (so at batch 1 every selected expert's rows
// are read once, and a larger batch reads each used expert once). Each slot's result depends on its token
// alone; the j terms are summed in fp32 in the router's order.
at::Tensor quant_moe(const at::Tensor& x, const Parts& gate_up, at::IntArrayRef gu_fmt, const Parts& down,
                     at::IntArrayRef down_fmt, const at::Tensor& expert_ids, const at::Tensor& weights) {
  TORCH_CHECK(gu_fmt.size() == 3 && down_fmt.size() == 3, "qwen3 quant: fmt is [bits, block, super]");
  const QMatrix gu = check_matrix(gate_up, {gu_fmt[0], gu_fmt[1], gu_fmt[2]}, x.size(-1), "gate_up");
  check_x(x, gu.k);
  const int64_t experts = gate_up.get(0)->size(0), inter = gu.groups / 2 * kLanes, hidden = gu.k;
  const QMatrix dn = check_matrix(down, {down_fmt[0], down_fmt[1], down_fmt[2]}, inter, "down");
  TORCH_CHECK(down.get(0)->size(0) == experts && dn.groups * kLanes == hidden,
              "qwen3 quant: down must be [E, H/8 groups] for the same experts");
  TORCH_CHECK(expert_ids.dim() == 2 && expert_ids.size(0) == x.size(0) && expert_ids.scalar_type() == at::kLong,
              "qwen3 quant: expert_ids must be int64 [T, k]");
  TORCH_CHECK(weights.sizes() == expert_ids.sizes(), "qwen3 quant: weights must be [T, k]");
  const int64_t tokens = x.size(0), top_k = expert_ids.size(1), slots = tokens * top_k;
  at::Tensor y = at::empty({tokens, hidden}, x.options());
  if (tokens == 0) return y;
  const at::Tensor ids_c = expert_ids.contiguous();
  const at::Tensor w_f = weights.to(at::kFloat).contiguous();
  const int64_t* ids = ids_c.data_ptr<int64_t>();
  const float* wt = w_f.data_ptr<float>();
  // Slots grouped by expert (counting sort: stable, so slots keep token order within an expert).
  std::vector<int64_t> start(static_cast<size_t>(experts + 1), 0), order(static_cast<size_t>(slots));
  for (int64_t s = 0; s < slots; ++s) {
    TORCH_CHECK(ids[s] >= 0 && ids[s] < experts, "qwen3 quant: expert id out of range");
    ++start[ids[s] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < slots; ++s) order[fill[ids[s]]++] = s;
  }
  std::vector<int64_t> used;  // experts with slots
  for (int64_t e = 0; e < experts; ++e)
    if (start[e + 1] > start[e]) used.push_back(e);
  const int64_t n_used = static_cast<int64_t>(used.size());
  // Activation row of each sorted slot: its token for gate/up, the slot itself for down.
  std::vector<int64_t> token_row(static_cast<size_t>(slots)), slot_row(static_cast<size_t>(slots));
  for (int64_t i = 0; i < slots; ++i) {
    token_row[i] = order[i] / top_k;
    slot_row[i] = i;
  }
  const QActs xa = quantize_acts(x, act_block(gu));
  const Tiles gu_tiles = select_tiles(gu), dn_tiles = select_tiles(dn);
  // h[i] = silu(gate) * up of sorted slot i, fp32 [slots, I].
  at::Tensor h = at::empty({slots, inter}, x.options().dtype(at::kFloat));
  float* hp = h.data_ptr<float>();
  const int64_t pairs = gu.groups / 2;
  qwen3::balanced_for(n_used * pairs, [&](int64_t t0, int64_t t1) {
    std::vector<float> g(static_cast<size_t>(slots * kLanes)), u(g.size());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = used[t / pairs], p = t % pairs, first = start[e], count = start[e + 1] - first;
      group_rows(gu_tiles, gu, e, 2 * p, xa, token_row.data() + first, count, g.data());
      group_rows(gu_tiles, gu, e, 2 * p + 1, xa, token_row.data() + first, count, u.data());
      silu_mul(g.data(), u.data(), count * kLanes);
      for (int64_t i = 0; i < count; ++i) std::memcpy(hp + (first + i) * inter + p * kLanes, g.data() + i * kLanes, sizeof(float) * kLanes);
    }
  });
  const QActs ha = quantize_acts(h, act_block(dn));
  std::vector<float> o(static_cast<size_t>(slots * hidden));  // down output of sorted slot i
  const int64_t groups = dn.groups;
  qwen3::balanced_for(n_used * groups, [&](int64_t t0, int64_t t1) {
    std::vector<float> out(static_cast<size_t>(slots * kLanes));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = used[t / groups], g = t % groups, first = start[e], count = start[e + 1] - first;
      group_rows(dn_tiles, dn, e, g, ha, slot_row.data() + first, count, out.data());
      for (int64_t i = 0; i < count; ++i)
        std::memcpy(o.data() + (first + i) * hidden + g * kLanes, out.data() + i * kLanes, sizeof(float) * kLanes);
    }
  });
  std::vector<int64_t> sorted_pos(static_cast<size_t>(slots));  // slot -> its row in o
  for (int64_t i = 0; i < slots; ++i) sorted_pos[order[i]] = i;
  const bool out_bf16 = y.scalar_type() == at::kBFloat16;
  void* y_raw = y.data_ptr();
  at::parallel_for(0, tokens, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> sum(static_cast<size_t>(hidden));
    for (int64_t t = r0; t < r1; ++t) {
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t j = 0; j < top_k; ++j) {
        const float* row = o.data() + sorted_pos[t * top_k + j] * hidden;
        const float wj = wt[t * top_k + j];
        for (int64_t c = 0; c < hidden; ++c) sum[c] += wj * row[c];
      }
      if (out_bf16)
        store(sum.data(), hidden, nullptr, static_cast<uint16_t*>(y_raw) + t * hidden);
      else
        store(sum.data(), hidden, nullptr, static_cast<float*>(y_raw) + t * hidden);
    }
  });
  return y;
}

}  // namespace

#ifndef QWEN3_OPS_NAMESPACE
#define QWEN3_OPS_NAMESPACE qwen3_kernels
#endif
#define QWEN3_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define QWEN3_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

QWEN3_FRAGMENT(QWEN3_OPS_NAMESPACE, m) {
  m.def("quant_linear(Tensor x, Tensor?[] weight, int[] fmt, int n, Tensor? bias=None, bool gate_up=False) -> Tensor");
  m.def(
      "quant_moe(Tensor x, Tensor?[] gate_up, int[] gu_fmt, Tensor?[] down, int[] down_fmt, Tensor expert_ids, "
      "Tensor weights) -> Tensor");
}

QWEN3_LIBRARY_IMPL(QWEN3_OPS_NAMESPACE, CPU, m) {
  m.impl("quant_linear", TORCH_FN(quant_linear));
  m.impl("quant_moe", TORCH_FN(quant_moe));
}
