// Attention over the engine's paged KV cache on x86 CPUs: bf16 or fp32 queries, keys and values, fp32 math.
//
//     out[N, Hq, D] = paged_attention(q[N, Hq, D], k[N, Hkv, D], v[N, Hkv, D], key_cache[blocks, Hkv, B, D],
//                                     value_cache[same], slots[N], block_tables[S, max_blocks], seq_lens[S],
//                                     query_starts[S + 1], scale)
//
// First the step's new keys and values k, v are written to the cache (token n to slot slots[n], i.e. row
// slots[n] % B of block slots[n] / B). Then one call computes every sequence of an engine step, decodes and prompt chunks alike: sequence s owns
// query rows query_starts[s] .. query_starts[s+1] (n_s rows, the step's packed order) and has seq_lens[s]
// tokens in the cache once this step's keys are written; row i sits at position seq_lens[s] - n_s + i
// and attends keys 0 .. that position (causal). Key p of sequence s, head h, is
// key_cache[block_tables[s][p / B], h, p % B]: a block holds each head's B keys contiguously (B * D * 2
// bytes, 4 KiB for B = 16, D = 128), so a tile streams whole blocks.
//
// Why our own: torch has no attention over a block table, so the torch path gathers every decoding
// sequence's keys and values into a padded copy per layer (at 32 sequences of ~200 tokens, ~26 MB per
// layer) and runs SDPA with a mask, whose CPU kernel is slow for one-query rows and, without
// AVX512-BF16, for bf16 at all. Here keys and values are read in place, once per tile of queries.
//
// Work is split into tiles: one sequence, one kv head, up to 8 query vectors (query heads of that kv
// head x consecutive rows), so a key or value loaded once feeds up to 8 fp32 accumulators. A tile first
// computes all its scores (scale * q.k, fp32 accumulation), then a softmax in fp32 (exp by a degree-5
// polynomial, relative error < 3e-6), then the probability-weighted sum of values, divided by the sum of
// probabilities and rounded to bf16 once. Tiles are spread over torch's threads.
//
// Batch invariance: a query's result depends only on its own q and its own keys and values. Each score is
// one accumulation over d in 8 lanes then a fixed horizontal sum; the softmax of a row runs over exactly
// its keys (limit); the weighted sum runs over the tile's keys in order, the ones past the row's limit
// adding exact zeros. So neither the tile a query lands in (other heads, other rows of its chunk) nor the
// other sequences of the step change its bits.
//
// AVX2 + FMA only, so the one code path serves both builds (every CPU with AVX512-BF16 has AVX2).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kMaxQ = 8;  // query vectors per tile: 8 ymm accumulators

// The cache's element types: bf16 (stored as its bits) and fp32.
using bf16_t = uint16_t;

inline __m256 load8(const bf16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline float to_float(bf16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(float f) { return f; }
inline void from_float(float f, bf16_t* dst) { *dst = c10::BFloat16(f).x; }
inline void from_float(float f, float* dst) { *dst = f; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#ifndef QWEN3_ATTN_PREFETCH
#define QWEN3_ATTN_PREFETCH 1
#endif

template <typename T>
inline void prefetch_row(const T* row, int64_t d_size) {
  if (!QWEN3_ATTN_PREFETCH) return;
  constexpr int64_t per_line = 64 / sizeof(T);
  for (int64_t d = 0; d < d_size; d += per_line) _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T0);
}

// e^x for x <= 0 (softmax arguments), as in gemv.cpp's SiLU: 2^round(t) * 2^f with t = x log2(e),
// f in [-0.5, 0.5] and 2^f by its degree-5 Taylor polynomial. Below -87 the result is 0.
inline __m256 exp256(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(1.44269504f));
  const __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, r);
  __m256 p = _mm256_set1_ps(0.00133335581f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.00961812911f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.0555041087f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.240226507f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.693147181f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_and_ps(y, _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GT_OQ));
}

// s[v][j] = q[v] . k_j for j < n_keys; q is fp32 [QV][D] (scale folded in), keys are rows at
// base + offsets[j]. With few query vectors, KJ keys are done at once so that enough independent FMA
// chains are in flight.
template <int QV, typename T>
void scores(const float* q, const T* base, const int64_t* offsets, int64_t n_keys, int64_t d_size,
            float* s, int64_t s_stride) {
  constexpr int KJ = QV <= 2 ? 4 : QV <= 4 ? 2 : 1;
  int64_t j = 0;
  for (; j + KJ <= n_keys; j += KJ) {
    __m256 acc[QV][KJ];
    for (int v = 0; v < QV; ++v)
      for (int u = 0; u < KJ; ++u) acc[v][u] = _mm256_setzero_ps();
    if (j + 2 * KJ <= n_keys)  // blocks are scattered: the prefetchers do not see the next one coming
      for (int u = 0; u < KJ; ++u) prefetch_row(base + offsets[j + KJ + u], d_size);
    for (int64_t d = 0; d < d_size; d += 8) {
      for (int u = 0; u < KJ; ++u) {
        const __m256 kv = load8(base + offsets[j + u] + d);
        for (int v = 0; v < QV; ++v) acc[v][u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + v * d_size + d), kv, acc[v][u]);
      }
    }
    for (int v = 0; v < QV; ++v)
      for (int u = 0; u < KJ; ++u) s[v * s_stride + j + u] = hsum(acc[v][u]);
  }
  for (; j < n_keys; ++j) {
    __m256 acc[QV];
    for (int v = 0; v < QV; ++v) acc[v] = _mm256_setzero_ps();
    for (int64_t d = 0; d < d_size; d += 8) {
      const __m256 kv = load8(base + offsets[j] + d);
      for (int v = 0; v < QV; ++v) acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(q + v * d_size + d), kv, acc[v]);
    }
    for (int v = 0; v < QV; ++v) s[v * s_stride + j] = hsum(acc[v]);
  }
}

// Turns row v's scores for keys [0, limit[v]) into unnormalised probabilities exp(s - max) in place
// (keys at or past limit[v] get 0) and returns their sum.
float softmax_row(float* s, int64_t n_keys, int64_t limit) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < limit; ++j) m = std::max(m, s[j]);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= limit; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum(sum);
  if (j < limit) {  // the tail through a zero-padded vector, so every exp is the same polynomial
    alignas(32) float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = j + i < limit ? s[j + i] - m : -100.0f;
    _mm256_store_ps(tail, exp256(_mm256_load_ps(tail)));
    for (int64_t i = 0; j + i < limit; ++i) {
      s[j + i] = tail[i];
      total += tail[i];
    }
    j = limit;
  }
  for (; j < n_keys; ++j) s[j] = 0.0f;
  return total;
}

// out[v][d] = sum_j p[v][j] * value_j[d] for j < n_keys, then times inv_sum[v]. With few query vectors,
// DJ chunks of 8 dimensions are done at once, for independent FMA chains.
template <int QV, typename T>
void weighted_values(const float* p, int64_t p_stride, const T* base, const int64_t* offsets,
                     int64_t n_keys, int64_t d_size, const float* inv_sum, float* out) {
  constexpr int DJ = QV <= 2 ? 4 : QV <= 4 ? 2 : 1;
  for (int64_t d0 = 0; d0 < d_size; d0 += 8 * DJ) {
    const int dj = static_cast<int>(std::min<int64_t>(DJ, (d_size - d0) / 8));
    __m256 acc[QV][DJ];
    for (int v = 0; v < QV; ++v)
      for (int u = 0; u < DJ; ++u) acc[v][u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n_keys; ++j) {
      const T* row = base + offsets[j] + d0;
      if (d0 == 0 && j + 4 < n_keys) prefetch_row(base + offsets[j + 4], d_size);
      for (int u = 0; u < DJ; ++u) {
        if (u >= dj) break;
        const __m256 vv = load8(row + 8 * u);
        for (int v = 0; v < QV; ++v)
          acc[v][u] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + v * p_stride + j), vv, acc[v][u]);
      }
    }
    for (int v = 0; v < QV; ++v)
      for (int u = 0; u < dj; ++u)
        _mm256_storeu_ps(out + v * d_size + d0 + 8 * u, _mm256_mul_ps(acc[v][u], _mm256_set1_ps(inv_sum[v])));
  }
}

struct Tile {
  int64_t seq, kv_head, head0, heads, row0, rows;
};

template <int QV, typename T>
void run_tile_qv(const float* q, const T* k, const T* v, const int64_t* offsets, int64_t n_keys,
                 const int64_t* limits, int64_t d_size, float* s, float* out) {
  scores<QV>(q, k, offsets, n_keys, d_size, s, n_keys);
  float inv_sum[QV];
  for (int i = 0; i < QV; ++i) inv_sum[i] = 1.0f / softmax_row(s + i * n_keys, n_keys, limits[i]);
  weighted_values<QV>(s, n_keys, v, offsets, n_keys, d_size, inv_sum, out);
}

template <typename T>
void run_tile(int qv, const float* q, const T* k, const T* v, const int64_t* offsets, int64_t n_keys,
              const int64_t* limits, int64_t d_size, float* s, float* out) {
  switch (qv) {
    case 1: run_tile_qv<1>(q, k, v, offsets, n_keys, limits, d_size, s, out); break;
    case 2: run_tile_qv<2>(q, k, v, offsets, n_keys, limits, d_size, s, out); break;
    case 3: run_tile_qv<3>(q, k, v, offsets, n_keys, limits, d_size, s, out); break;
    case 4: run_tile_qv<4>(q, k, v, offsets, n_keys, limits, d_size, s, out); break;
    case 5: run_tile_qv<5>(q, k, v, offsets, n_keys, limits, d_size, s, out); break;
    case 6: run_tile_qv<6>(q, k, v, offsets, n_keys, limits, d_size, s, out); break;
    case 7: run_tile_qv<7>(q, k, v, offsets, n_keys, limits, d_size, s, out); break;
    case 8: run_tile_qv<8>(q, k, v, offsets, n_keys, limits, d_size, s, out); break;
    default: TORCH_CHECK(false, "qwen3 attention: bad tile size ", qv);
  }
}

// Copies the rows of k/v ([N, Hkv, D], contiguous last dim) into their slots of the cache.
template <typename T>
void write_cache(const at::Tensor& src, const at::Tensor& cache, const int64_t* slots) {
  TORCH_CHECK(src.dim() == 3 && src.size(1) == cache.size(1) && src.size(2) == cache.size(3) && src.stride(2) == 1 &&
                  src.scalar_type() == cache.scalar_type(),
              "qwen3 attention: new keys/values must be [N, Hkv, D] with contiguous rows, in the cache's dtype");
  const int64_t hkv = cache.size(1), block_size = cache.size(2), d_size = cache.size(3), blocks = cache.size(0);
  const auto* sp = static_cast<const T*>(src.data_ptr());
  auto* cp = static_cast<T*>(cache.data_ptr());
  for (int64_t n = 0; n < src.size(0); ++n) {
    const int64_t block = slots[n] / block_size, row = slots[n] % block_size;
    TORCH_CHECK(slots[n] >= 0 && block < blocks, "qwen3 attention: slot out of range");
    for (int64_t h = 0; h < hkv; ++h)
      std::memcpy(cp + ((block * hkv + h) * block_size + row) * d_size, sp + n * src.stride(0) + h * src.stride(1),
                  d_size * sizeof(T));
  }
}

template <typename T>
at::Tensor paged_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& slots,
                                const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                const at::Tensor& query_starts, double scale) {
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() && q.stride(2) == 1,
              "qwen3 attention: contiguous caches and q rows");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_starts.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  block_tables.dim() == 2,
              "qwen3 attention: int32 block tables, lengths and starts");
  const int64_t n_rows = q.size(0), hq = q.size(1), d_size = q.size(2);
  const int64_t hkv = key_cache.size(1), block_size = key_cache.size(2), n_seqs = seq_lens.numel();
  TORCH_CHECK(key_cache.size(3) == d_size && d_size % 8 == 0 && hq % hkv == 0, "qwen3 attention: bad head shapes");
  TORCH_CHECK(query_starts.numel() == n_seqs + 1 && block_tables.size(0) == n_seqs, "qwen3 attention: bad metadata");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_starts.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(starts[n_seqs] == n_rows, "qwen3 attention: query_starts must end at N");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == n_rows &&
                  k.size(0) == n_rows && v.size(0) == n_rows,
              "qwen3 attention: one int64 slot per new token");
  write_cache<T>(k, key_cache, slots.data_ptr<int64_t>());
  write_cache<T>(v, value_cache, slots.data_ptr<int64_t>());

  // Tiles: per sequence and kv head, up to kMaxQ query vectors (heads of the group x rows).
  const int64_t group = hq / hkv;
  const int64_t heads_per_tile = std::min<int64_t>(group, kMaxQ);
  const int64_t rows_per_tile = std::max<int64_t>(1, kMaxQ / heads_per_tile);
  std::vector<Tile> tiles;
  int64_t max_keys = 0;
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int64_t n = starts[s + 1] - starts[s];
    TORCH_CHECK(n >= 0 && lens[s] >= n && (lens[s] + block_size - 1) / block_size <= max_blocks,
                "qwen3 attention: sequence ", s, " does not fit its block table");
    max_keys = std::max<int64_t>(max_keys, lens[s]);
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t h0 = 0; h0 < group; h0 += heads_per_tile)
        for (int64_t r0 = 0; r0 < n; r0 += rows_per_tile)
          tiles.push_back({s, h, h * group + h0, std::min(heads_per_tile, group - h0), r0,
                           std::min(rows_per_tile, n - r0)});
  }
  at::Tensor out = at::empty({n_rows, hq, d_size}, q.options());
  if (tiles.empty()) return out;
  const auto* qp = static_cast<const T*>(q.data_ptr());
  const auto* kp = static_cast<const T*>(key_cache.data_ptr());
  const auto* vp = static_cast<const T*>(value_cache.data_ptr());
  auto* op = static_cast<T*>(out.data_ptr());
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const float fscale = static_cast<float>(scale);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());

  at::parallel_for(0, n_tiles, std::max<int64_t>(1, (n_tiles + threads - 1) / threads), [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(kMaxQ * d_size), res(kMaxQ * d_size), s(kMaxQ * max_keys);
    std::vector<int64_t> offsets(max_keys);
    int64_t cached_seq = -1, cached_head = -1, cached_keys = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const Tile& tile = tiles[t];
      const int64_t n = starts[tile.seq + 1] - starts[tile.seq], context = lens[tile.seq] - n;
      const int64_t n_keys = context + tile.row0 + tile.rows;  // the tile's last row sees this many keys
      if (tile.seq != cached_seq || tile.kv_head != cached_head || n_keys > cached_keys) {
        const int32_t* table = tables + tile.seq * max_blocks;
        for (int64_t j = 0; j < n_keys; ++j)
          offsets[j] = ((static_cast<int64_t>(table[j / block_size]) * hkv + tile.kv_head) * block_size +
                        j % block_size) * d_size;
        cached_seq = tile.seq, cached_head = tile.kv_head, cached_keys = n_keys;
      }
      // Query vectors in fp32 with the scale folded in; vector i = (row i / heads, head i % heads).
      int64_t limits[kMaxQ];
      const int qv = static_cast<int>(tile.rows * tile.heads);
      for (int i = 0; i < qv; ++i) {
        const int64_t row = tile.row0 + i / tile.heads, head = tile.head0 + i % tile.heads;
        const T* src = qp + (starts[tile.seq] + row) * q_row + head * q_head;
        for (int64_t d = 0; d < d_size; ++d) qf[i * d_size + d] = to_float(src[d]) * fscale;
        limits[i] = context + row + 1;
      }
      run_tile(qv, qf.data(), kp, vp, offsets.data(), n_keys, limits, d_size, s.data(), res.data());
      for (int i = 0; i < qv; ++i) {
        const int64_t row = tile.row0 + i / tile.heads, head = tile.head0 + i % tile.heads;
        T* dst = op + ((starts[tile.seq] + row) * hq + head) * d_size;
        for (int64_t d = 0; d < d_size; ++d) from_float(res[i * d_size + d], dst + d);
      }
    }
  });
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& slots, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, const at::Tensor& query_starts, double scale) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "qwen3 attention: q must be [N, Hq, D] and the caches [blocks, Hkv, block_size, D]");
  const auto dtype = key_cache.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && q.scalar_type() == dtype &&
                  value_cache.scalar_type() == dtype,
              "qwen3 attention: q and the caches must all be bf16 or all fp32");
  if (dtype == at::kFloat)
    return paged_attention_impl<float>(q, k, v, key_cache, value_cache, slots, block_tables, seq_lens, query_starts,
                                       scale);
  return paged_attention_impl<bf16_t>(q, k, v, key_cache, value_cache, slots, block_tables, seq_lens, query_starts,
                                      scale);
}

}  // namespace

#ifndef QWEN3_OPS_NAMESPACE
#define QWEN3_OPS_NAMESPACE qwen3_kernels
#endif
#define QWEN3_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define QWEN3_FRAGMENT_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

QWEN3_FRAGMENT(QWEN3_OPS_NAMESPACE, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slots, "
      "Tensor block_tables, Tensor seq_lens, Tensor query_starts, float scale) -> Tensor");
}

QWEN3_FRAGMENT_IMPL(QWEN3_OPS_NAMESPACE, CPU, m) { m.impl("paged_attention", TORCH_FN(paged_attention)); }
