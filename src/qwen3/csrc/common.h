// Scalar helpers shared by qwen3's kernels (gemv.cpp, quant.cpp): bf16 <-> fp32, the SwiGLU activation,
// and how work is split over torch's threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace qwen3 {

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, like torch's .to(torch.bfloat16), for finite values (NaN stays NaN).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// g[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, with exp computed as 2^round(t) * 2^f, t = -g*log2(e),
// f in [-0.5, 0.5], 2^f by its degree-5 Taylor polynomial (relative error < 3e-6). Unlike std::exp this
// loop is branch-free and the compiler vectorises it (with -fno-trapping-math).
inline void silu_mul(float* __restrict g, const float* __restrict u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = std::min(std::max(-g[i], -87.0f), 87.0f) * 1.44269504f;  // -g * log2(e)
    // Round to nearest with the 1.5 * 2^23 trick: plain arithmetic, which vectorises where std::nearbyint
    // (a libm call for the compiler) would not. |t| < 126, so it is exact.
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

// Grain for at::parallel_for: every thread one contiguous, equal share.
inline int64_t grain_for(int64_t units) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, (units + threads - 1) / threads);
}

// fn(u0, u1) over [0, units) in chunks that the threads take as they finish, about 8 a thread: a thread
// that runs slower (its core busy with an interrupt, a vCPU descheduled, a farther memory channel) takes
// fewer, instead of the others waiting for it at the end of every call. Which thread computes a unit never
// changes its result, so this keeps batch invariance. Chunks stay contiguous runs of units.
template <class F>
void balanced_for(int64_t units, const F& fn) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (threads == 1 || units <= 1 || at::in_parallel_region()) {
    fn(0, units);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, units / (threads * 8));
  const int64_t chunks = (units + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      fn(c * chunk, std::min(units, (c + 1) * chunk));
  });
}

}  // namespace qwen3
