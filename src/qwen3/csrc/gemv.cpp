// Decode-shaped linear layers for bf16 weights on x86 CPUs: y[M, N] = x[M, K] @ W[N, K]^T (+ bias)
// for small M (1..8 rows: a decode step of a few sequences). Any M is computed correctly; with many
// rows the kernel is compute-bound (on the AVX2 path ~180 GFLOPS on 2 Zen 3 cores, on a par with
// MKL's fp32 GEMM and ~9x torch's bf16 matmul there, which has no fast path without AVX512-BF16).
//
// Why our own kernel: at batch 1 a linear layer is a matrix-vector product that reads every weight
// once and does two flops per weight, so its speed is the speed at which the weights stream from
// memory. torch's CPU paths reach a third to a half of the machine's read bandwidth for bf16
// weights; this kernel is written to stream at the bandwidth limit.
//
// Packed layout (done once, at load, by qwen3/kernels.py): W is padded to N_pad = ceil(N/16)*16 rows
// and K_pad = ceil(K/32)*32 columns with zeros, then stored as
//
//     packed[N_pad/16][K_pad/2][16][2]    (bf16)
//
// i.e. for each block of 16 output rows, for each pair of k values, the 16 rows' two weights side by
// side. Why this layout:
//   * one block is one contiguous run of memory (16 * K_pad * 2 bytes), so each thread streams
//     long contiguous runs that the hardware prefetchers follow (helped by a software prefetch,
//     see QWEN3_PREFETCH);
//   * one 64-byte load (one cache line, one zmm register) holds 16 rows x 2 k values, which is
//     exactly the operand shape of AVX512-BF16's `vdpbf16ps`: lane r accumulates
//     w[r][k] * x[k] + w[r][k+1] * x[k+1] in fp32. The activation pair (x[k], x[k+1]) is broadcast
//     to all lanes, so no horizontal reductions are needed: after the K loop each lane holds the
//     dot product of one output row;
//   * the AVX2 path uses the same layout: a 32-byte load holds 8 rows x 2 k values, and the two bf16
//     halves of each 32-bit lane become fp32 with one shift (even k) and one mask (odd k) — bf16 is
//     the top half of an fp32.
// Zero padding makes every tail disappear from the inner loops: the padded weights are zero, and the
// activation copy is zero-padded to K_pad, so the padded products add exactly 0.
//
// Threads split the blocks of 16 rows statically (at::parallel_for, i.e. torch's own OpenMP pool and
// thread count), so each thread reads one contiguous slice of the packed matrix. The M rows of x are
// handled inside a block (tiles of up to 8 rows for AVX-512, 4 for AVX2) so the block's weights are
// read from memory once whatever M is; a repeated pass over a block hits L1/L2.
//
// Instruction set: the file is compiled for the machine that runs it (kernels.py picks the -m flags
// from /proc/cpuinfo); the AVX512-BF16 path is used when __AVX512BF16__ is defined, else the AVX2+FMA
// path. QWEN3_EMULATE_AVX512BF16 swaps the AVX-512 intrinsics used here for scalar code so that the
// AVX-512 path's indexing can be tested on a machine without AVX-512 (slow; tests only).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

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

namespace {

// Software prefetch distance in bytes (0 = off). The L2 stream prefetcher does not cross 4 KiB pages,
// so each page's first lines would be demand misses; one prefetch per 64-byte line, 1 KiB ahead, hides
// that. Measured on Zen 3 (AVX2 path), Qwen3-0.6B decode shapes: 1024 ~5% faster than none, 512 and
// 1536 in between, 2048+ slower. Not measured on an AVX-512 machine; the same distance is used there.
#ifndef QWEN3_PREFETCH
#define QWEN3_PREFETCH 1024
#endif
constexpr int64_t kRows = 16;   // output rows per packed block
constexpr int64_t kKAlign = 32; // K is padded to a multiple of this (64 bytes of bf16)

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  // Round to nearest even, like torch's .to(torch.bfloat16) (c10::BFloat16 does the same).
  return c10::BFloat16(f).x;
}

#if defined(QWEN3_EMULATE_AVX512BF16)
// Scalar stand-ins for the handful of AVX-512 intrinsics below (tests only). dpbf16 is computed in
// fp32 with the same pairing as the hardware instruction (lane i: a[2i]*b[2i] + a[2i+1]*b[2i+1]).
struct Emu512 {
  float f[16];
};
struct Emu512i {
  uint32_t u[16];
};
using Vec512 = Emu512;
using VecW512 = Emu512i;
inline Vec512 zero512() {
  Vec512 v;
  for (float& f : v.f) f = 0.f;
  return v;
}
inline VecW512 load512(const uint32_t* p) {
  VecW512 v;
  std::memcpy(v.u, p, sizeof(v.u));
  return v;
}
inline VecW512 set1_512(uint32_t x) {
  VecW512 v;
  for (uint32_t& u : v.u) u = x;
  return v;
}
inline Vec512 dpbf16(Vec512 acc, VecW512 a, VecW512 b) {
  for (int i = 0; i < 16; ++i) {
    acc.f[i] += bf16_bits_to_float(a.u[i] & 0xffff) * bf16_bits_to_float(b.u[i] & 0xffff) +
                bf16_bits_to_float(a.u[i] >> 16) * bf16_bits_to_float(b.u[i] >> 16);
  }
  return acc;
}
inline Vec512 add512(Vec512 a, Vec512 b) {
  for (int i = 0; i < 16; ++i) a.f[i] += b.f[i];
  return a;
}
inline void store512(float* p, Vec512 v) { std::memcpy(p, v.f, sizeof(v.f)); }
inline void prefetch(const void*) {}
#elif defined(QWEN3_PATH_AVX512BF16)
using Vec512 = __m512;
using VecW512 = __m512i;
inline Vec512 zero512() { return _mm512_setzero_ps(); }
inline VecW512 load512(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline VecW512 set1_512(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline Vec512 dpbf16(Vec512 acc, VecW512 a, VecW512 b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}
inline Vec512 add512(Vec512 a, Vec512 b) { return _mm512_add_ps(a, b); }
inline void store512(float* p, Vec512 v) { _mm512_storeu_ps(p, v); }
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
#endif

#if defined(QWEN3_PATH_AVX512BF16)
// The activations as the kernel wants them: bf16, zero-padded to K_pad, read as 32-bit pairs.
using XElem = uint16_t;
constexpr int64_t kMaxTile = 8;  // rows of x per pass over a block: 8 accumulators + weights in 32 zmm

// One block of 16 output rows against MT rows of x: out[m][r] = sum_k w[r][k] * x[m][k].
// w: the block, [kp_count][16] bf16 pairs; x: MT rows of kp_count bf16 pairs, row stride x_stride.
template <int MT>
inline void block_tile(const uint32_t* __restrict w, int64_t kp_count, const uint32_t* __restrict x,
                       int64_t x_stride, float* __restrict out /* [MT][16] */) {
  // A dpbf16 has a latency of several cycles; with few x rows a single accumulator chain per row
  // would stall the loop, so consecutive k pairs rotate over U independent accumulators (summed at
  // the end). 32 zmm registers hold even MT=8 x U=2 accumulators.
  constexpr int U = MT == 1 ? 4 : 2;
  Vec512 acc[MT][U];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = zero512();
  // kp_count is a multiple of 16 (K_pad is a multiple of 32), so U always divides it.
  for (int64_t kp = 0; kp < kp_count; kp += U) {
    for (int u = 0; u < U; ++u) {
#if QWEN3_PREFETCH > 0
      prefetch(reinterpret_cast<const char*>(w + (kp + u) * kRows) + QWEN3_PREFETCH);
#endif
      const VecW512 wv = load512(w + (kp + u) * kRows);
      for (int m = 0; m < MT; ++m) acc[m][u] = dpbf16(acc[m][u], wv, set1_512(x[m * x_stride + kp + u]));
    }
  }
  for (int m = 0; m < MT; ++m) {
    Vec512 s = acc[m][0];
    for (int u = 1; u < U; ++u) s = add512(s, acc[m][u]);
    store512(out + m * kRows, s);
  }
}
#else
// AVX2: activations in fp32 (exact products: bf16 -> fp32 is exact), zero-padded to K_pad.
using XElem = float;
constexpr int64_t kMaxTile = 4;  // 4 rows x 2 accumulators + converted weights fit in 16 ymm

template <int MT>
inline void block_tile(const uint32_t* __restrict w, int64_t kp_count, const float* __restrict x,
                       int64_t x_stride, float* __restrict out /* [MT][16] */) {
  // Rows 0-7 and 8-15 of the block each get an accumulator per x row; with few x rows, even and
  // odd k get separate accumulators too, so that several FMA chains are in flight.
  constexpr int U = MT <= 2 ? 2 : 1;
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 acc[MT][2][U];
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h)
      for (int u = 0; u < U; ++u) acc[m][h][u] = _mm256_setzero_ps();
  for (int64_t kp = 0; kp < kp_count; ++kp) {
#if QWEN3_PREFETCH > 0
    _mm_prefetch(reinterpret_cast<const char*>(w + kp * kRows) + QWEN3_PREFETCH, _MM_HINT_T0);
#endif
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kp * kRows));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kp * kRows + 8));
    // Low 16 bits of each 32-bit lane = weight for k = 2kp, high 16 bits = weight for k = 2kp + 1.
    const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, hi_mask));
    const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, hi_mask));
    for (int m = 0; m < MT; ++m) {
      const __m256 xe = _mm256_broadcast_ss(x + m * x_stride + 2 * kp);
      const __m256 xo = _mm256_broadcast_ss(x + m * x_stride + 2 * kp + 1);
      acc[m][0][0] = _mm256_fmadd_ps(e0, xe, acc[m][0][0]);
      acc[m][1][0] = _mm256_fmadd_ps(e1, xe, acc[m][1][0]);
      acc[m][0][U - 1] = _mm256_fmadd_ps(o0, xo, acc[m][0][U - 1]);
      acc[m][1][U - 1] = _mm256_fmadd_ps(o1, xo, acc[m][1][U - 1]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m256 lo = acc[m][0][0], hi = acc[m][1][0];
    if (U == 2) {
      lo = _mm256_add_ps(lo, acc[m][0][U - 1]);
      hi = _mm256_add_ps(hi, acc[m][1][U - 1]);
    }
    _mm256_storeu_ps(out + m * kRows, lo);
    _mm256_storeu_ps(out + m * kRows + 8, hi);
  }
}
#endif

// Dispatch a tile of `mt` (<= kMaxTile) x rows to the template instance unrolled for it.
inline void block_rows(const uint32_t* w, int64_t kp_count, const XElem* x, int64_t x_stride_elems,
                       int64_t mt, float* out) {
#if defined(QWEN3_PATH_AVX512BF16)
  // x rows are read as 32-bit bf16 pairs.
  const auto* xp = reinterpret_cast<const uint32_t*>(x);
  const int64_t xs = x_stride_elems / 2;
#else
  const float* xp = x;
  const int64_t xs = x_stride_elems;
#endif
  switch (mt) {
    case 1: block_tile<1>(w, kp_count, xp, xs, out); break;
    case 2: block_tile<2>(w, kp_count, xp, xs, out); break;
    case 3: block_tile<3>(w, kp_count, xp, xs, out); break;
    case 4: block_tile<4>(w, kp_count, xp, xs, out); break;
#if defined(QWEN3_PATH_AVX512BF16)
    case 5: block_tile<5>(w, kp_count, xp, xs, out); break;
    case 6: block_tile<6>(w, kp_count, xp, xs, out); break;
    case 7: block_tile<7>(w, kp_count, xp, xs, out); break;
    case 8: block_tile<8>(w, kp_count, xp, xs, out); break;
#endif
    default: TORCH_CHECK(false, "qwen3 gemv: bad tile size ", mt);
  }
}

// All M rows of x against one block: out[m][r] for m < M, in tiles of up to kMaxTile rows. The first
// tile streams the block from memory, later tiles find it in cache.
inline void block_all_rows(const uint32_t* w, int64_t kp_count, const XElem* x, int64_t k_pad, int64_t m_rows,
                           float* out /* [M][16] */) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxTile) {
    const int64_t mt = std::min(kMaxTile, m_rows - m0);
    block_rows(w, kp_count, x + m0 * k_pad, k_pad, mt, out + m0 * kRows);
  }
}

// Copies x[M, K] (bf16 or fp32, any strides) into the zero-padded [M, K_pad] buffer the kernel reads.
std::vector<XElem> prepare_x(const at::Tensor& x, int64_t k_pad) {
  const int64_t m_rows = x.size(0), k = x.size(1);
  std::vector<XElem> buf(static_cast<size_t>(m_rows * k_pad), XElem{0});
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  if (x.scalar_type() == at::kBFloat16) {
    const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t m = 0; m < m_rows; ++m)
      for (int64_t i = 0; i < k; ++i) {
        const uint16_t bits = src[m * s0 + i * s1];
#if defined(QWEN3_PATH_AVX512BF16)
        buf[m * k_pad + i] = bits;
#else
        buf[m * k_pad + i] = bf16_bits_to_float(bits);
#endif
      }
  } else {
    const float* src = x.data_ptr<float>();
    for (int64_t m = 0; m < m_rows; ++m)
      for (int64_t i = 0; i < k; ++i) {
        const float v = src[m * s0 + i * s1];
#if defined(QWEN3_PATH_AVX512BF16)
        buf[m * k_pad + i] = float_to_bf16_bits(v);
#else
        buf[m * k_pad + i] = v;
#endif
      }
  }
  return buf;
}

// Writes out[m][n0 + r] for r < count from the fp32 block result (bias added, cast to the output type).
template <typename T>
inline void write_rows(const float* acc /* [M][16] */, int64_t m_rows, int64_t n0, int64_t count, const float* bias,
                       T* y, int64_t n) {
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t r = 0; r < count; ++r) {
      float v = acc[m * kRows + r];
      if (bias != nullptr) v += bias[n0 + r];
      y[m * n + n0 + r] = static_cast<T>(v);
    }
}

struct Checked {
  int64_t m_rows, k_pad, kp_count, blocks;
};

Checked check_args(const at::Tensor& x, const at::Tensor& packed, int64_t blocks_per_group) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "qwen3 gemv: CPU tensors only");
  TORCH_CHECK(x.dim() == 2, "qwen3 gemv: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "qwen3 gemv: x must be bfloat16 or float32");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kRows && packed.size(3) == 2 &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "qwen3 gemv: packed weight must be a contiguous bf16 [N_pad/16, K_pad/2, 16, 2] tensor");
  const int64_t k_pad = packed.size(1) * 2;
  TORCH_CHECK(k_pad % kKAlign == 0 && x.size(1) <= k_pad && x.size(1) > k_pad - kKAlign,
              "qwen3 gemv: x has ", x.size(1), " features, the packed weight was made for K_pad=", k_pad);
  TORCH_CHECK(packed.size(0) % blocks_per_group == 0, "qwen3 gemv: bad number of packed blocks");
  return {x.size(0), k_pad, packed.size(1), packed.size(0)};
}

// Grain for at::parallel_for: hand every thread one contiguous, equal share of the blocks.
inline int64_t grain_for(int64_t units) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, (units + threads - 1) / threads);
}

// Runs fn(u0, u1) over [0, units) on torch's threads, one contiguous share each. (A dynamic schedule,
// threads taking chunks of 1/4 or 1/16 of a share from an atomic counter, measured the same.)
template <typename F>
inline void parallel_units(int64_t units, const F& fn) {
  at::parallel_for(0, units, grain_for(units), fn);
}

// y[M, N] = x[M, K] @ W^T (+ bias), W given packed. Output dtype = x's dtype.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const std::optional<at::Tensor>& bias) {
  const Checked c = check_args(x, packed, 1);
  TORCH_CHECK(n > (c.blocks - 1) * kRows && n <= c.blocks * kRows, "qwen3 gemv: N does not match the packed weight");
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "qwen3 gemv: bias must have N elements");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bias_p = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({c.m_rows, n}, x.options());
  if (c.m_rows == 0) return y;
  const std::vector<XElem> xbuf = prepare_x(x, c.k_pad);
  const auto* w = reinterpret_cast<const uint32_t*>(packed.data_ptr<at::BFloat16>());
  const int64_t block_pairs = c.kp_count * kRows;  // uint32 pairs per block
  const bool out_bf16 = x.scalar_type() == at::kBFloat16;
  void* y_raw = y.data_ptr();

  parallel_units(c.blocks, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(static_cast<size_t>(c.m_rows * kRows));
    for (int64_t b = b0; b < b1; ++b) {
      block_all_rows(w + b * block_pairs, c.kp_count, xbuf.data(), c.k_pad, c.m_rows, acc.data());
      const int64_t n0 = b * kRows, count = std::min(kRows, n - n0);
      if (out_bf16)
        write_rows(acc.data(), c.m_rows, n0, count, bias_p, static_cast<at::BFloat16*>(y_raw), n);
      else
        write_rows(acc.data(), c.m_rows, n0, count, bias_p, static_cast<float*>(y_raw), n);
    }
  });
  return y;
}

// g[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, with exp computed as 2^round(t) * 2^f, t = -g*log2(e),
// f in [-0.5, 0.5], 2^f by its degree-5 Taylor polynomial (relative error < 3e-6; the result is
// rounded to bf16 or used in fp32 next to bf16 weights anyway). Unlike std::exp this loop is
// branch-free and the compiler vectorises it (with -fno-trapping-math): std::exp made the fused
// gate/up op ~25 us slower than the plain linear for Qwen3-0.6B's 3072 rows.
inline void silu_mul(float* __restrict g, const float* __restrict u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = std::min(std::max(-g[i], -87.0f), 87.0f) * 1.44269504f;  // -g * log2(e)
    // Round to nearest with the 1.5 * 2^23 trick: plain arithmetic, which vectorises where
    // std::nearbyint (a libm call for the compiler) would not. |t| < 126, so it is exact.
    const float r = (t + 12582912.0f) - 12582912.0f;
    const float f = t - r;
    const float p =
        1.0f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f + f * (0.00961812911f + f * 0.00133335581f))));
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(r) + 127) << 23;  // 2^r
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    g[i] = g[i] / (1.0f + p * scale) * u[i];
  }
}

// silu(x @ Wg^T) * (x @ Wu^T) in one pass. The packed tensor interleaves the two matrices block by
// block (gate block i, then up block i), so the thread that owns output rows [16i, 16i+16) streams
// both halves contiguously and applies the activation while the results are still in registers/L1.
at::Tensor packed_gate_up_silu(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  const Checked c = check_args(x, packed, 2);
  const int64_t pairs = c.blocks / 2;
  TORCH_CHECK(n > (pairs - 1) * kRows && n <= pairs * kRows, "qwen3 gemv: N does not match the packed weight");
  at::Tensor y = at::empty({c.m_rows, n}, x.options());
  if (c.m_rows == 0) return y;
  const std::vector<XElem> xbuf = prepare_x(x, c.k_pad);
  const auto* w = reinterpret_cast<const uint32_t*>(packed.data_ptr<at::BFloat16>());
  const int64_t block_pairs = c.kp_count * kRows;
  const bool out_bf16 = x.scalar_type() == at::kBFloat16;
  void* y_raw = y.data_ptr();

  parallel_units(pairs, [&](int64_t p0, int64_t p1) {
    std::vector<float> gate(static_cast<size_t>(c.m_rows * kRows)), up(gate.size());
    for (int64_t p = p0; p < p1; ++p) {
      block_all_rows(w + (2 * p) * block_pairs, c.kp_count, xbuf.data(), c.k_pad, c.m_rows, gate.data());
      block_all_rows(w + (2 * p + 1) * block_pairs, c.kp_count, xbuf.data(), c.k_pad, c.m_rows, up.data());
      // The reference rounds each projection to the activation dtype before the SiLU; here g and u
      // stay in fp32 (slightly more accurate, never less).
      silu_mul(gate.data(), up.data(), static_cast<int64_t>(gate.size()));
      const int64_t n0 = p * kRows, count = std::min(kRows, n - n0);
      if (out_bf16)
        write_rows(gate.data(), c.m_rows, n0, count, nullptr, static_cast<at::BFloat16*>(y_raw), n);
      else
        write_rows(gate.data(), c.m_rows, n0, count, nullptr, static_cast<float*>(y_raw), n);
    }
  });
  return y;
}

// Streams a bf16 buffer and returns a checksum: the memory-read roofline for the benchmark, using
// the same threads and the same 64-byte loads as the kernels, with no arithmetic to speak of.
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

}  // namespace

// The op namespace is a macro so that test builds (e.g. the emulated AVX-512 path) can be loaded into
// the same process as the real one; the extra level of macros makes the preprocessor expand it.
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
}

QWEN3_LIBRARY_IMPL(QWEN3_OPS_NAMESPACE, CPU, m) {
  m.impl("packed_linear", TORCH_FN(packed_linear));
  m.impl("packed_gate_up_silu", TORCH_FN(packed_gate_up_silu));
  m.impl("read_bandwidth_probe", TORCH_FN(read_bandwidth_probe));
}
