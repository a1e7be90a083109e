// CPU kernels for cross_inject_attention: FlashAttention-style tiled online softmax.
//
// A task owns one (sequence, kv head, block of queries) tile. The G = Hq/Hk query heads that share
// the kv head are stacked into the rows of one tile, so every key block is read, converted and
// rotated once for all of them, and the two products per key block (S = Q K^T, O += P V) are
// float32 GEMMs of useful size. Scores never exist beyond one [rows, key block] tile.
// Backward recomputes P from the saved log-sum-exp: one pass over key tiles writes dK/dV (each
// tile owns its rows, no atomics), a second over query tiles writes dQ.
#include "sharedllm/cross_inject_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "sharedllm/cpu_runtime.h"
#include "sharedllm/cpu_vec.h"

namespace sharedllm::cpu {
namespace {

constexpr int64_t kTileRows = 256;  // target (query head x query) rows per tile
constexpr int64_t kKeyBlock = 512;  // keys per block
constexpr int64_t kMaxTilesPerTask = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x for x <= 0 (and small positive x) with ~2e-7 relative error: x = n + f, |f| <= 1/2, 2^f by
// its degree-6 Taylor polynomial, 2^n added to the exponent bits. Underflows to exactly 0.
SHAREDLLM_INLINE vec8 exp2_nonpositive(vec8 x) {
  const vec8 clamped = x < -127.0f ? splat8(-127.0f) : x;
  const vec8 whole = (clamped + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const vec8 f = clamped - whole;
  vec8 p = splat8(1.5403530393381606e-04f);
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  const ivec8 n = __builtin_convertvector(whole, ivec8);
  const vec8 scaled = reinterpret_cast<vec8>(reinterpret_cast<ivec8>(p) + (n << 23));
  return clamped < -126.0f ? splat8(0.0f) : scaled;
}

SHAREDLLM_INLINE float exp2_nonpositive(float x) {
  return exp2_nonpositive(splat8(x))[0];
}

SHAREDLLM_CPU_CLONES float row_max(const float* s, int64_t n) {
  vec8 m = splat8(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vec8 x = load8(s + j);
    m = x > m ? x : m;
  }
  float best = horizontal_max(m);
  for (; j < n; ++j) best = s[j] > best ? s[j] : best;
  return best;
}

// s <- 2^(s - shift) in place; returns the sum.
SHAREDLLM_CPU_CLONES float exp2_shifted_sum(float* s, int64_t n, float shift) {
  vec8 acc = splat8(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vec8 e = exp2_nonpositive(load8(s + j) - shift);
    store8(s + j, e);
    acc += e;
  }
  float total = horizontal_sum(acc);
  for (; j < n; ++j) {
    s[j] = exp2_nonpositive(s[j] - shift);
    total += s[j];
  }
  return total;
}

// s <- p * (s - delta), the softmax backward of one row (p = probabilities, s = dP)
SHAREDLLM_CPU_CLONES void softmax_grad_row(float* ds, const float* p, int64_t n, float delta) {
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
}

SHAREDLLM_CPU_CLONES void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

template <typename T>
SHAREDLLM_CPU_CLONES void convert_row(float* dst, const T* src, int64_t n, float scale) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) store8(dst + j, load8(src + j) * scale);
  for (; j < n; ++j) dst[j] = to_float(src[j]) * scale;
}

template <typename T>
SHAREDLLM_CPU_CLONES void store_row(T* dst, const float* src, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) dst[j] = from_float<T>(src[j] * scale);
}

// A block of consecutive rows of one sequence for one kv head.
struct Tile {
  int64_t batch, kv_head, start, len;
};

std::vector<Tile> make_tiles(const int32_t* cu, int64_t batch, int64_t kv_heads, int64_t block) {
  std::vector<Tile> tiles;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = cu[b]; s < cu[b + 1]; s += block)
      for (int64_t g = 0; g < kv_heads; ++g) tiles.push_back({b, g, s, std::min<int64_t>(block, cu[b + 1] - s)});
  return tiles;
}

// The consecutive tiles of at most `block` rows that cover `span`.
void split_tiles(const Tile& span, int64_t block, std::vector<Tile>* tiles) {
  tiles->clear();
  for (int64_t start = span.start; start < span.start + span.len; start += block)
    tiles->push_back({span.batch, span.kv_head, start, std::min(block, span.start + span.len - start)});
}

// Rows [start, start+len) of head `head` into dst (ld = dim) as float32, rotated if the rotary is
// on, times `scale`.
template <typename T>
void load_rows(float* dst, const T* base, int64_t row_stride, int64_t start, int64_t len, int64_t dim,
               const int32_t* positions, const RotaryParams& rot, float scale) {
  for (int64_t r = 0; r < len; ++r) {
    float* row = dst + r * dim;
    convert_row(row, base + (start + r) * row_stride, dim, 1.0f);
    if (rot.enabled()) {
      const int64_t pos = positions[start + r];
      rotary_apply(row, rot.cos + pos * dim, rot.sin + pos * dim, dim);
    }
    if (scale != 1.0f) scale_row(row, dim, scale);
  }
}

// A key or value block as a float32 row-major matrix: in place when it already is one (float32,
// not rotated, rows far enough apart for a GEMM), else converted into `scratch`.
template <typename T>
const float* key_block(float* scratch, int64_t* ld, const T* base, int64_t row_stride, int64_t start, int64_t len,
                       int64_t dim, const int32_t* positions, const RotaryParams& rot) {
  if constexpr (std::is_same_v<T, float>) {
    if (!rot.enabled() && row_stride >= dim) {
      *ld = row_stride;
      return base + start * row_stride;
    }
  }
  load_rows(scratch, base, row_stride, start, len, dim, positions, rot, 1.0f);
  *ld = dim;
  return scratch;
}

// Rows of a tile: query head (kv_head * G + gi), query (start + i) is row gi * len + i.
template <typename T>
void load_query_tile(float* dst, const AttentionParams& p, const T* q, const Tile& t, int64_t group, float scale) {
  for (int64_t gi = 0; gi < group; ++gi) {
    const T* base = q + (t.kv_head * group + gi) * p.q_head_stride;
    load_rows(dst + gi * t.len * p.head_dim, base, p.q_row_stride, t.start, t.len, p.head_dim,
              p.rotary.q_positions, p.rotary, scale);
  }
}

int64_t query_block_size(int64_t group) { return std::max<int64_t>(1, kTileRows / group); }

}  // namespace

template <typename T>
void cross_inject_attention_forward(const AttentionForwardParams& p) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int64_t G = p.num_q_heads / p.num_kv_heads, D = p.head_dim, Dv = p.v_dim, Hq = p.num_q_heads;
  const int64_t block_q = query_block_size(G);
  const int64_t rows_max = G * block_q;
  const float score_scale = p.softmax_scale * kLog2e;  // scores in log2 units, for exp2

  // A task runs up to kMaxTilesPerTask query tiles of one (sequence, kv head) side by side, so
  // that each key block is converted and rotated once for all of them; fewer when that would
  // leave threads without work.
  const auto num_tiles = static_cast<int64_t>(make_tiles(p.cu_seqlens_q, p.batch, p.num_kv_heads, block_q).size());
  const int64_t tiles_per_task = std::clamp<int64_t>(num_tiles / (4 * num_threads()), 1, kMaxTilesPerTask);
  const std::vector<Tile> tasks = make_tiles(p.cu_seqlens_q, p.batch, p.num_kv_heads, block_q * tiles_per_task);

  parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    const int64_t super_rows = rows_max * tiles_per_task;
    std::vector<float> qs(super_rows * D), o(super_rows * Dv), m(super_rows), l(super_rows);
    std::vector<float> s(rows_max * kKeyBlock), ks(kKeyBlock * D), vs(kKeyBlock * Dv);
    std::vector<Tile> tiles;
    for (int64_t ti = begin; ti < end; ++ti) {
      const Tile& task = tasks[ti];
      split_tiles(task, block_q, &tiles);
      for (size_t j = 0; j < tiles.size(); ++j)
        load_query_tile(qs.data() + j * rows_max * D, p, q, tiles[j], G, score_scale);
      std::fill(o.begin(), o.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t k_begin = p.cu_seqlens_k[task.batch], k_end = p.cu_seqlens_k[task.batch + 1];
      for (int64_t kb = k_begin; kb < k_end; kb += kKeyBlock) {
        const int64_t nb = std::min(kKeyBlock, k_end - kb);
        int64_t ldk, ldv;
        const float* kblk = key_block(ks.data(), &ldk, k + task.kv_head * p.k_head_stride, p.k_row_stride, kb, nb, D,
                                      p.rotary.k_positions, p.rotary);
        const float* vblk = key_block(vs.data(), &ldv, v + task.kv_head * p.v_head_stride, p.v_row_stride, kb, nb,
                                      Dv, nullptr, RotaryParams{});
        for (size_t j = 0; j < tiles.size(); ++j) {
          const int64_t rows = G * tiles[j].len;
          float* oj = o.data() + j * rows_max * Dv;
          float* mj = m.data() + j * rows_max;
          float* lj = l.data() + j * rows_max;
          gemm_f32(false, true, rows, nb, D, 1.0f, qs.data() + j * rows_max * D, D, kblk, ldk, 0.0f, s.data(), nb);
          for (int64_t r = 0; r < rows; ++r) {
            float* srow = s.data() + r * nb;
            const float m_new = std::max(mj[r], row_max(srow, nb));
            const float alpha = exp2_nonpositive(mj[r] - m_new);  // 0 on the first block
            lj[r] = lj[r] * alpha + exp2_shifted_sum(srow, nb, m_new);
            mj[r] = m_new;
            if (alpha != 1.0f) scale_row(oj + r * Dv, Dv, alpha);
          }
          gemm_f32(false, false, rows, Dv, nb, 1.0f, s.data(), nb, vblk, ldv, 1.0f, oj, Dv);
        }
      }
      for (size_t j = 0; j < tiles.size(); ++j) {
        const Tile& t = tiles[j];
        for (int64_t gi = 0; gi < G; ++gi) {
          const int64_t h = t.kv_head * G + gi;
          for (int64_t i = 0; i < t.len; ++i) {
            const int64_t r = j * rows_max + gi * t.len + i, qi = t.start + i;
            const bool empty = l[r] == 0.0f;  // no keys in this sequence
            store_row(out + (qi * Hq + h) * Dv, o.data() + r * Dv, Dv, empty ? 0.0f : 1.0f / l[r]);
            p.lse[qi * Hq + h] = empty ? -std::numeric_limits<float>::infinity() : (m[r] + std::log2(l[r])) * kLn2;
          }
        }
      }
    }
  });
}

template <typename T>
void cross_inject_attention_backward(const AttentionBackwardParams& p) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.grad_out);
  const T* out = static_cast<const T*>(p.out);
  T* dq = static_cast<T*>(p.grad_q);
  T* dk = static_cast<T*>(p.grad_k);
  T* dv = static_cast<T*>(p.grad_v);
  const int64_t G = p.num_q_heads / p.num_kv_heads, D = p.head_dim, Dv = p.v_dim;
  const int64_t Hq = p.num_q_heads, Hk = p.num_kv_heads;
  const int64_t block_q = query_block_size(G);
  const float score_scale = p.softmax_scale * kLog2e;
  const int64_t num_q = p.cu_seqlens_q[p.batch];

  // delta = rowsum(dO * O) - dlse: the softmax-backward term shared by every key of a row
  std::vector<float> delta(static_cast<size_t>(num_q * Hq));
  parallel_for(0, num_q * Hq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float acc = 0.0f;
      for (int64_t j = 0; j < Dv; ++j) acc += to_float(dout[r * Dv + j]) * to_float(out[r * Dv + j]);
      delta[r] = acc - (p.grad_lse ? p.grad_lse[r] : 0.0f);
    }
  });

  // Everything one query tile contributes: rotated q (unscaled), dO, lse in log2 units, delta.
  struct QueryTile {
    std::vector<float> qs, dos, lse2, dl;
    void load(const AttentionBackwardParams& p, const T* q, const T* dout, const std::vector<float>& delta,
              const Tile& t, int64_t G) {
      const int64_t Dv = p.v_dim, Hq = p.num_q_heads;
      load_query_tile(qs.data(), p, q, t, G, 1.0f);
      for (int64_t gi = 0; gi < G; ++gi) {
        const int64_t h = t.kv_head * G + gi;
        for (int64_t i = 0; i < t.len; ++i) {
          const int64_t r = gi * t.len + i, row = (t.start + i) * Hq + h;
          convert_row(dos.data() + r * Dv, dout + row * Dv, Dv, 1.0f);
          lse2[r] = p.lse[row] * kLog2e;
          dl[r] = delta[row];
        }
      }
    }
  };
  // P = softmax probabilities and dS = P * (dP - delta) of one (query tile, key block) pair.
  auto probs_and_grad = [&](QueryTile& qt, int64_t rows, const float* kblk, const float* vblk, int64_t nb,
                            float* prob, float* dscore) {
    gemm_f32(false, true, rows, nb, D, score_scale, qt.qs.data(), D, kblk, D, 0.0f, prob, nb);
    for (int64_t r = 0; r < rows; ++r) exp2_shifted_sum(prob + r * nb, nb, qt.lse2[r]);
    gemm_f32(false, true, rows, nb, Dv, 1.0f, qt.dos.data(), Dv, vblk, Dv, 0.0f, dscore, nb);
    for (int64_t r = 0; r < rows; ++r) softmax_grad_row(dscore + r * nb, prob + r * nb, nb, qt.dl[r]);
  };
  auto new_query_tile = [&]() {
    const int64_t rows_max = G * block_q;
    return QueryTile{std::vector<float>(rows_max * D), std::vector<float>(rows_max * Dv),
                     std::vector<float>(rows_max), std::vector<float>(rows_max)};
  };

  // Writes the float32 dQ of a query tile (rows as in load_query_tile), rotated back to q's frame.
  auto store_dq_tile = [&](const Tile& t, float* acc) {
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t h = t.kv_head * G + gi;
      for (int64_t i = 0; i < t.len; ++i) {
        float* g = acc + (gi * t.len + i) * D;
        const int64_t qi = t.start + i;
        if (p.rotary.enabled()) {
          const int64_t pos = p.rotary.q_positions[qi];
          rotary_apply_transposed(g, p.rotary.cos + pos * D, p.rotary.sin + pos * D, D);
        }
        store_row(dq + (qi * Hq + h) * D, g, D, 1.0f);
      }
    }
  };

  // Pass 1: dK, dV. A task owns a range of keys of one kv head and visits every query of the
  // sequence. When there are enough (sequence, kv head) pairs to keep every thread busy, a task
  // owns all keys of its pair, and so also every dQ row of the pair: it accumulates dQ on the way
  // and pass 2, which recomputes the scores, is skipped.
  const bool fused_dq = p.batch * Hk >= 2 * num_threads();
  std::vector<Tile> key_tasks;
  if (fused_dq) {
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t g = 0; g < Hk; ++g)
        key_tasks.push_back({b, g, p.cu_seqlens_k[b], p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]});
  } else {
    key_tasks = make_tiles(p.cu_seqlens_k, p.batch, Hk, kKeyBlock);
  }
  parallel_for(0, static_cast<int64_t>(key_tasks.size()), 1, [&](int64_t begin, int64_t end) {
    QueryTile qt = new_query_tile();
    const int64_t rows_max = G * block_q;
    std::vector<float> ks(kKeyBlock * D), vs(kKeyBlock * Dv), dk_acc(kKeyBlock * D), dv_acc(kKeyBlock * Dv);
    std::vector<float> prob(rows_max * kKeyBlock), dscore(rows_max * kKeyBlock), dq_acc;
    std::vector<Tile> q_tiles;
    for (int64_t ti = begin; ti < end; ++ti) {
      const Tile& task = key_tasks[ti];
      const int64_t q_begin = p.cu_seqlens_q[task.batch], q_end = p.cu_seqlens_q[task.batch + 1];
      split_tiles(Tile{task.batch, task.kv_head, q_begin, q_end - q_begin}, block_q, &q_tiles);
      const int64_t num_q_tiles = static_cast<int64_t>(q_tiles.size());
      if (fused_dq) dq_acc.assign(num_q_tiles * rows_max * D, 0.0f);  // query tile j at j * rows_max * D
      for (int64_t kb = task.start; kb < task.start + task.len; kb += kKeyBlock) {
        const int64_t nb = std::min(kKeyBlock, task.start + task.len - kb);
        load_rows(ks.data(), k + task.kv_head * p.k_head_stride, p.k_row_stride, kb, nb, D, p.rotary.k_positions,
                  p.rotary, 1.0f);
        load_rows(vs.data(), v + task.kv_head * p.v_head_stride, p.v_row_stride, kb, nb, Dv, nullptr,
                  RotaryParams{}, 1.0f);
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
        for (int64_t j = 0; j < num_q_tiles; ++j) {
          const Tile& t = q_tiles[j];
          const int64_t rows = G * t.len;
          qt.load(p, q, dout, delta, t, G);
          probs_and_grad(qt, rows, ks.data(), vs.data(), nb, prob.data(), dscore.data());
          gemm_f32(true, false, nb, Dv, rows, 1.0f, prob.data(), nb, qt.dos.data(), Dv, 1.0f, dv_acc.data(), Dv);
          gemm_f32(true, false, nb, D, rows, p.softmax_scale, dscore.data(), nb, qt.qs.data(), D, 1.0f,
                   dk_acc.data(), D);
          if (fused_dq)
            gemm_f32(false, false, rows, D, nb, p.softmax_scale, dscore.data(), nb, ks.data(), D, 1.0f,
                     dq_acc.data() + j * rows_max * D, D);
        }
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t row = (kb + r) * Hk + task.kv_head;
          float* g = dk_acc.data() + r * D;
          if (p.rotary.enabled()) {
            const int64_t pos = p.rotary.k_positions[kb + r];
            rotary_apply_transposed(g, p.rotary.cos + pos * D, p.rotary.sin + pos * D, D);
          }
          store_row(dk + row * D, g, D, 1.0f);
          store_row(dv + row * Dv, dv_acc.data() + r * Dv, Dv, 1.0f);
        }
      }
      if (!fused_dq) continue;
      for (int64_t j = 0; j < num_q_tiles; ++j) store_dq_tile(q_tiles[j], dq_acc.data() + j * rows_max * D);
    }
  });
  if (fused_dq) return;

  // Pass 2: dQ. A task owns a query tile and visits every key block of its sequence.
  const std::vector<Tile> query_tiles = make_tiles(p.cu_seqlens_q, p.batch, Hk, block_q);
  parallel_for(0, static_cast<int64_t>(query_tiles.size()), 1, [&](int64_t begin, int64_t end) {
    QueryTile qt = new_query_tile();
    const int64_t rows_max = G * block_q;
    std::vector<float> ks(kKeyBlock * D), vs(kKeyBlock * Dv), dq_acc(rows_max * D);
    std::vector<float> prob(rows_max * kKeyBlock), dscore(rows_max * kKeyBlock);
    for (int64_t ti = begin; ti < end; ++ti) {
      const Tile& t = query_tiles[ti];
      const int64_t rows = G * t.len;
      qt.load(p, q, dout, delta, t, G);
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
      const int64_t k_begin = p.cu_seqlens_k[t.batch], k_end = p.cu_seqlens_k[t.batch + 1];
      for (int64_t kb = k_begin; kb < k_end; kb += kKeyBlock) {
        const int64_t nb = std::min(kKeyBlock, k_end - kb);
        load_rows(ks.data(), k + t.kv_head * p.k_head_stride, p.k_row_stride, kb, nb, D, p.rotary.k_positions,
                  p.rotary, 1.0f);
        load_rows(vs.data(), v + t.kv_head * p.v_head_stride, p.v_row_stride, kb, nb, Dv, nullptr, RotaryParams{},
                  1.0f);
        probs_and_grad(qt, rows, ks.data(), vs.data(), nb, prob.data(), dscore.data());
        gemm_f32(false, false, rows, D, nb, p.softmax_scale, dscore.data(), nb, ks.data(), D, 1.0f, dq_acc.data(),
                 D);
      }
      store_dq_tile(t, dq_acc.data());
    }
  });
}

#define SHAREDLLM_INSTANTIATE(T)                                                          \
  template void cross_inject_attention_forward<T>(const AttentionForwardParams&); \
  template void cross_inject_attention_backward<T>(const AttentionBackwardParams&);
SHAREDLLM_INSTANTIATE(float)
SHAREDLLM_INSTANTIATE(half_t)
SHAREDLLM_INSTANTIATE(bfloat16_t)
#undef SHAREDLLM_INSTANTIATE

}  // namespace sharedllm::cpu
