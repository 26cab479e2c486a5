// The CPU attention kernels, forward and backward. This file is compiled once per CPU capability
// (cpu/attention_{default,avx2,avx512}.cpp include it with their own namespace, entry point and
// compiler flags); cpu/anchor_attention.cpp picks one at run time, as ATen's DispatchStub does.
//
// The AnSAN mask is never materialised. For a tile of queries the visible keys are
//   (a) keys of the queries' own segments: a few contiguous key ranges ("own" blocks), and
//   (b) earlier anchors: a per-row list of anchor keys gathered once per call ("anchor" blocks).
// Every block is a small matrix product (tile_matmul.h) followed by the exact mask predicate on the block, with an
// online softmax across blocks. Pairs with equal segments are handled only in (a) and pairs with
// different segments only in (b), so the union is exactly the AnSAN mask rule (docs/method.md, section "The AnSAN mask rule") for any key order; sorted keys
// (what token_layout and the caches produce) make (a) and (b) tight, so cost follows visible pairs.
#pragma once

#if !defined(ANLLM_CPU_NS) || !defined(ANLLM_CPU_ENTRY)
#error "include this file from csrc/cpu/attention_<capability>.cpp, which names the variant"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "dispatch.h"
#include "tile_matmul.h"

namespace anllm {
namespace ANLLM_CPU_NS {
namespace {


// Queries per tile. Larger tiles make better GEMMs but visit more keys that only some queries see.
// The forward stacks the query heads that share a key head into one tile of group * queries rows
// (one K/V block serves them all; a decode step becomes one GEMM per key head, not one per head).
constexpr int64_t kQueryTileFwd = 64;
constexpr int64_t kRowsFwd = 192;
constexpr int64_t kKeyBlock = 128;  // keys per GEMM block (forward: more when a tile has few rows)
constexpr int64_t kMaxKeyBlock = 2048;
// Anchors are read in place when they sit in runs at least this long on average (a compacted cache
// starts with all of them in one run); scattered anchors (a prompt) are gathered once per call.
constexpr int64_t kMinAnchorRun = 16;
constexpr int64_t kSummaryChunk = 64;  // keys per chunk summary used to find own-segment ranges
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Raw views of one row of a layout.
struct RowLayout {
  const int64_t* pos;
  const int32_t* seg;
  const bool* is_anchor;
  const bool* valid;
};

RowLayout row_layout(const LayoutTensors& l, int64_t b) {
  const int64_t T = l.pos.size(1);
  return {l.pos.data_ptr<int64_t>() + b * T, l.seg.data_ptr<int32_t>() + b * T,
          l.is_anchor.data_ptr<bool>() + b * T, l.valid.data_ptr<bool>() + b * T};
}

LayoutTensors contiguous_layout(const at::Tensor& pos, const at::Tensor& seg, const at::Tensor& is_anchor,
                                const at::Tensor& val) {
  return {pos.contiguous(), seg.contiguous(), is_anchor.contiguous(), val.contiguous()};
}

// Per-row structure of the keys, built once per call. Positions and segments are copied to int32
// arrays (validity folded into the position: an invalid key gets INT32_MAX, which no query position
// reaches) so the mask predicate is a branch-free loop over two int32 arrays that vectorises.
struct KeyIndex {
  struct Chunk {
    int32_t seg_min, seg_max, pos_min;
    bool any_valid;
  };
  std::vector<std::vector<Chunk>> chunks;      // [B][ceil(Tk / kSummaryChunk)]
  std::vector<std::vector<int32_t>> pos, seg;  // [B][Tk]
  std::vector<std::vector<int64_t>> anchors;   // [B][n_anchors]: key index of each valid anchor
  std::vector<std::vector<int32_t>> anchor_pos, anchor_seg;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> anchor_runs;  // [B]: (first key, count)
  std::vector<char> gathered;  // [B]: anchors of the row are read from the gathered copy
  int64_t max_gathered = 0;    // most anchors of a gathered row
};

constexpr int32_t kInvalidPos = std::numeric_limits<int32_t>::max();

int32_t checked_pos32(int64_t p) {
  ANLLM_CHECK(p >= 0 && p < kInvalidPos, "positions must be in [0, 2^31 - 1), got ", p);
  return static_cast<int32_t>(p);
}

KeyIndex build_key_index(const LayoutTensors& kl, int64_t B, int64_t Tk) {
  KeyIndex ix;
  for (auto* v : {&ix.pos, &ix.seg, &ix.anchor_pos, &ix.anchor_seg}) v->resize(B);
  ix.chunks.resize(B);
  ix.anchors.resize(B);
  ix.anchor_runs.resize(B);
  ix.gathered.assign(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    RowLayout r = row_layout(kl, b);
    ix.pos[b].resize(Tk);
    for (auto* v : {&ix.anchor_pos[b], &ix.anchor_seg[b]}) v->reserve(Tk);
    ix.anchors[b].reserve(Tk);
    ix.seg[b].assign(r.seg, r.seg + Tk);
    const int64_t n_chunks = (Tk + kSummaryChunk - 1) / kSummaryChunk;
    ix.chunks[b].resize(n_chunks);
    for (int64_t c = 0; c < n_chunks; ++c) {
      KeyIndex::Chunk ch{std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min(),
                         kInvalidPos, false};
      for (int64_t j = c * kSummaryChunk; j < std::min(Tk, (c + 1) * kSummaryChunk); ++j) {
        if (!r.valid[j]) {
          ix.pos[b][j] = kInvalidPos;
          continue;
        }
        const int32_t p = checked_pos32(r.pos[j]);
        ix.pos[b][j] = p;
        ch.any_valid = true;
        ch.seg_min = std::min(ch.seg_min, r.seg[j]);
        ch.seg_max = std::max(ch.seg_max, r.seg[j]);
        ch.pos_min = std::min(ch.pos_min, p);
        if (r.is_anchor[j]) {
          auto& runs = ix.anchor_runs[b];
          if (!runs.empty() && runs.back().first + runs.back().second == j)
            ++runs.back().second;
          else
            runs.emplace_back(j, 1);
          ix.anchors[b].push_back(j);
          ix.anchor_pos[b].push_back(p);
          ix.anchor_seg[b].push_back(r.seg[j]);
        }
      }
      ix.chunks[b][c] = ch;
    }
    const int64_t n_anchors = ix.anchors[b].size();
    if (n_anchors < kMinAnchorRun * static_cast<int64_t>(ix.anchor_runs[b].size())) {
      ix.gathered[b] = 1;
      ix.max_gathered = std::max(ix.max_gathered, n_anchors);
    }
  }
  return ix;
}

// What a tile of queries needs to know to pick its key blocks.
struct QueryTile {
  int64_t begin, count;
  int32_t seg_min, seg_max, pos_max;
  bool any_valid, any_non_anchor;
};

QueryTile summarize_queries(const RowLayout& r, int64_t begin, int64_t count) {
  QueryTile t{begin, count, std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min(),
              std::numeric_limits<int32_t>::min(), false, false};
  for (int64_t i = begin; i < begin + count; ++i) {
    if (!r.valid[i]) continue;
    t.any_valid = true;
    t.any_non_anchor |= !r.is_anchor[i];
    t.seg_min = std::min(t.seg_min, r.seg[i]);
    t.seg_max = std::max(t.seg_max, r.seg[i]);
    t.pos_max = std::max(t.pos_max, checked_pos32(r.pos[i]));
  }
  return t;
}

// Key ranges [begin, end) that may hold keys of the tile's own segments: chunks whose segment range
// overlaps the tile's, merged, then trimmed at both ends of keys that cannot qualify.
std::vector<std::pair<int64_t, int64_t>> own_segment_ranges(const KeyIndex& ix, int64_t b, int64_t Tk,
                                                            const QueryTile& qt) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  const auto& chunks = ix.chunks[b];
  for (int64_t c = 0; c < (int64_t)chunks.size(); ++c) {
    const auto& ch = chunks[c];
    if (!ch.any_valid || ch.seg_max < qt.seg_min || ch.seg_min > qt.seg_max || ch.pos_min > qt.pos_max)
      continue;
    const int64_t lo = c * kSummaryChunk, hi = std::min(Tk, lo + kSummaryChunk);
    if (!ranges.empty() && ranges.back().second == lo)
      ranges.back().second = hi;
    else
      ranges.emplace_back(lo, hi);
  }
  const int32_t* kpos = ix.pos[b].data();
  const int32_t* kseg = ix.seg[b].data();
  auto useless = [&](int64_t j) {  // invalid keys have kpos == INT32_MAX > pos_max
    return kseg[j] < qt.seg_min || kseg[j] > qt.seg_max || kpos[j] > qt.pos_max;
  };
  std::vector<std::pair<int64_t, int64_t>> trimmed;
  for (auto [lo, hi] : ranges) {
    while (lo < hi && useless(lo)) ++lo;
    while (hi > lo && useless(hi - 1)) --hi;
    if (lo < hi) trimmed.emplace_back(lo, hi);
  }
  return trimmed;
}

// Number of leading anchors of a row worth visiting for a tile: trailing anchors after the tile's last
// position are dropped (the list is in key order, so for sorted keys this is an exact prefix).
int64_t anchor_prefix(const KeyIndex& ix, int64_t b, const QueryTile& qt) {
  const auto& pos = ix.anchor_pos[b];
  int64_t n = pos.size();
  while (n > 0 && pos[n - 1] > qt.pos_max) --n;
  return n;
}

// x[j] = exp(x[j] - m) for j < n; returns the sum. Masked entries hold -inf and become 0.
float exp_and_sum(float* x, int64_t n, float m) {
  using Vec = at::vec::Vectorized<float>;
  const Vec vm(m);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) - vm).exp_u20();
    e.store(x + j);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, vsum);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    sum += x[j];
  }
  return sum;
}

float row_max(const float* x, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  int64_t j = 0;
  float mx = kNegInf;
  if (n >= Vec::size()) {
    Vec vmax(kNegInf);
    for (; j + Vec::size() <= n; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + j));
    mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, vmax);
  }
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

// Keys of one block as the GEMMs see them: rows `stride` floats apart, plus their layout.
struct KeyBlock {
  const float* k;
  const float* v;
  int64_t stride;  // between consecutive keys of the block
  int64_t n;
  const int32_t* pos;  // INT32_MAX for invalid keys
  const int32_t* seg;
  bool anchors;  // true: gathered anchor keys (seen across segments); false: own-segment keys
};

// Applies allowed(i, j) restricted to one kind of block (see the file comment) to a row of scores.
inline void mask_row(const KeyBlock& blk, float* s, bool q_valid, int32_t qpos, int32_t qseg,
                     bool q_is_anchor) {
  const int64_t n = blk.n;
  if (!q_valid || (blk.anchors && q_is_anchor)) {
    std::fill(s, s + n, kNegInf);
    return;
  }
  const int32_t* pos = blk.pos;
  const int32_t* seg = blk.seg;
  if (blk.anchors) {
    for (int64_t j = 0; j < n; ++j) s[j] = (pos[j] <= qpos) & (seg[j] != qseg) ? s[j] : kNegInf;
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] = (pos[j] <= qpos) & (seg[j] == qseg) ? s[j] : kNegInf;
  }
}

// S[r, j] = scale * q_r . k_j over the block, masked to -inf; S row stride = ld_s. Row r holds query
// q0 + r % nq (rows may stack several heads' copies of the same nq queries).
void scores_block(const float* q, int64_t ldq, const KeyBlock& blk, int64_t rows, int64_t nq, int64_t D,
                  float scale, const RowLayout& qr, int64_t q0, float* S, int64_t ld_s) {
  matmul_nt(S, ld_s, q, ldq, blk.k, blk.stride, rows, blk.n, D, scale, /*next=*/blk.v);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t qi = q0 + r % nq;
    mask_row(blk, S + r * ld_s, qr.valid[qi], qr.valid[qi] ? static_cast<int32_t>(qr.pos[qi]) : 0,
             qr.seg[qi], qr.is_anchor[qi]);
  }
}

// Calls fn(KeyBlock) for every key block a query tile must visit, own-segment ranges first.
template <typename Fn>
void for_each_block(const KeyIndex& ix, int64_t b, int64_t Tk, const QueryTile& qt,
                    const float* k_row, const float* v_row, int64_t k_stride, const float* ak,
                    const float* av, int64_t D, int64_t key_block, Fn&& fn) {
  const int32_t* kpos = ix.pos[b].data();
  const int32_t* kseg = ix.seg[b].data();
  auto in_place_blocks = [&](int64_t lo, int64_t hi, bool anchors) {
    for (int64_t j0 = lo; j0 < hi; j0 += key_block) {
      const int64_t n = std::min(key_block, hi - j0);
      fn(KeyBlock{k_row + j0 * k_stride, v_row + j0 * k_stride, k_stride, n, kpos + j0, kseg + j0,
                  anchors},
         j0);
    }
  };
  for (auto [lo, hi] : own_segment_ranges(ix, b, Tk, qt)) in_place_blocks(lo, hi, false);
  if (!qt.any_non_anchor) return;
  if (!ix.gathered[b]) {
    for (auto [lo, count] : ix.anchor_runs[b]) {
      int64_t hi = lo + count;
      while (hi > lo && kpos[hi - 1] > qt.pos_max) --hi;  // anchors after the tile's last query
      in_place_blocks(lo, hi, true);
    }
    return;
  }
  const int64_t na = anchor_prefix(ix, b, qt);
  for (int64_t j0 = 0; j0 < na; j0 += key_block) {
    const int64_t n = std::min(key_block, na - j0);
    fn(KeyBlock{ak + j0 * D, av + j0 * D, D, n, ix.anchor_pos[b].data() + j0,
                ix.anchor_seg[b].data() + j0, true},
       -1 - j0);  // negative offsets name gathered anchor rows
  }
}

// Gathers the valid anchor keys/values of every (b, hkv) whose anchors are scattered into contiguous
// fp32 buffers [B, Hkv, max_gathered, D] so anchor blocks are plain GEMM operands.
std::pair<at::Tensor, at::Tensor> gather_anchors(const KeyIndex& ix, const at::Tensor& k,
                                                 const at::Tensor& v) {
  const int64_t B = k.size(0), H = k.size(1), D = k.size(3);
  if (ix.max_gathered == 0) return {at::Tensor(), at::Tensor()};  // every row reads anchors in place
  auto ak = at::empty({B, H, ix.max_gathered, D}, k.options());
  auto av = at::empty_like(ak);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      if (!ix.gathered[b]) continue;
      const float* ks = k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1);
      const float* vs = v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1);
      float* kd = ak.data_ptr<float>() + (b * H + h) * ak.size(2) * D;
      float* vd = av.data_ptr<float>() + (b * H + h) * ak.size(2) * D;
      const auto& idx = ix.anchors[b];
      for (size_t a = 0; a < idx.size(); ++a) {
        std::copy_n(ks + idx[a] * k.stride(2), D, kd + a * D);
        std::copy_n(vs + idx[a] * v.stride(2), D, vd + a * D);
      }
    }
  });
  return {ak, av};
}

at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

// fp32 copies (or views) of k and v with identical strides: key blocks step through both with one stride.
std::pair<at::Tensor, at::Tensor> float_kv(const at::Tensor& k, const at::Tensor& v) {
  at::Tensor kf = as_float(k), vf = as_float(v);
  if (kf.strides() != vf.strides()) return {kf.contiguous(), vf.contiguous()};
  return {kf, vf};
}

std::tuple<at::Tensor, at::Tensor> anchor_attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& q_pos,
    const at::Tensor& q_seg, const at::Tensor& q_is_anchor, const at::Tensor& q_valid,
    const at::Tensor& k_pos, const at::Tensor& k_seg, const at::Tensor& k_is_anchor,
    const at::Tensor& k_valid, double scale_d) {
  const LayoutTensors ql = contiguous_layout(q_pos, q_seg, q_is_anchor, q_valid);
  const LayoutTensors kl = contiguous_layout(k_pos, k_seg, k_is_anchor, k_valid);
  const AttentionShape s = check_attention_inputs(q_in, k_in, v_in, ql, kl);
  const at::Tensor q = as_float(q_in);
  const auto [k, v] = float_kv(k_in, v_in);
  const float scale = static_cast<float>(scale_d);
  const int64_t D = s.D, group = s.Hq / s.Hkv;

  if (s.B == 0 || s.Hq == 0 || s.Tq == 0 || s.Tk == 0)
    return {at::zeros({s.B, s.Hq, s.Tq, D}, q_in.options()), at::full({s.B, s.Hq, s.Tq}, kNegInf, q.options())};
  // Every row of out and lse is written by write_tile below (fully masked rows too), so no fill pass.
  auto out = at::empty({s.B, s.Hq, s.Tq, D}, q.options());
  auto lse = at::empty({s.B, s.Hq, s.Tq}, q.options());

  const KeyIndex ix = build_key_index(kl, s.B, s.Tk);
  auto [ak, av] = gather_anchors(ix, k, v);
  const int64_t tile = std::min(s.Tq, std::clamp<int64_t>(kRowsFwd / group, 16, kQueryTileFwd));
  const int64_t n_qtiles = (s.Tq + tile - 1) / tile;
  const int64_t max_rows = group * tile;
  const int64_t n_tiles = s.B * s.Hkv * n_qtiles;
  // Few tiles over many keys (decode steps): split each tile's key blocks over `splits` work items,
  // so every thread streams a share of the (often cold) cache once; partial softmax states are merged
  // by log-sum-exp afterwards.
  const int64_t threads = at::get_num_threads();
  const int64_t splits =
      (n_tiles < 2 * threads && s.Tk >= 2 * kKeyBlock) ? std::min<int64_t>(s.Tk / kKeyBlock, (2 * threads + n_tiles - 1) / n_tiles) : 1;
  const int64_t key_block = splits > 1
      ? std::clamp<int64_t>((s.Tk + splits - 1) / splits, kKeyBlock, kMaxKeyBlock)
      : std::clamp<int64_t>(32768 / max_rows, kKeyBlock, kMaxKeyBlock);
  // Per split: m, l and acc of every row, merged after the parallel loop.
  at::Tensor partial = splits > 1 ? at::empty({n_tiles, splits, max_rows, D + 2}, q.options()) : at::Tensor();
  const int64_t n_items = n_tiles * splits;
  // Tiny problems run on the calling thread: a parallel region costs more than them.
  const int64_t work = s.B * s.Hq * s.Tq * std::min<int64_t>(s.Tk, 4096) * D;
  const int64_t grain = (splits == 1 && work < (1 << 18)) ? n_items : 1;

  // Writes the normalised output and lse of a tile from its (merged) softmax state.
  auto write_tile = [&](int64_t b, int64_t hk, const QueryTile& qt, const float* m, const float* l,
                        const float* acc, int64_t acc_stride) {
    const int64_t nq = qt.count;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hk * group + g;
      float* op = out.data_ptr<float>() + ((b * s.Hq + h) * s.Tq + qt.begin) * D;
      float* lp = lse.data_ptr<float>() + (b * s.Hq + h) * s.Tq + qt.begin;
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t r = g * nq + i;
        if (l[r] == 0.f) {  // fully masked: zeros and lse = -inf
          std::fill_n(op + i * D, D, 0.f);
          lp[i] = kNegInf;
          continue;
        }
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < D; ++d) op[i * D + d] = acc[r * acc_stride + d] * inv;
        lp[i] = m[r] + std::log(l[r]);
      }
    }
  };

  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    SerialBlasScope serial_blas;
    std::vector<float> Q(max_rows * D), S(max_rows * key_block), acc(max_rows * D), m(max_rows),
        l(max_rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % splits, tile_id = item / splits;
      const int64_t b = tile_id / (s.Hkv * n_qtiles), hk = (tile_id / n_qtiles) % s.Hkv;
      const int64_t t = tile_id % n_qtiles;
      const RowLayout qr = row_layout(ql, b);
      const QueryTile qt = summarize_queries(qr, t * tile, std::min(tile, s.Tq - t * tile));
      const int64_t nq = qt.count, rows = group * nq;
      std::fill_n(acc.begin(), rows * D, 0.f);
      std::fill_n(m.begin(), rows, kNegInf);
      std::fill_n(l.begin(), rows, 0.f);
      if (qt.any_valid) {
        // Row g * nq + i of the tile is query qt.begin + i of head hk * group + g.
        for (int64_t g = 0; g < group; ++g)
          for (int64_t i = 0; i < nq; ++i)
            std::copy_n(q.data_ptr<float>() + b * q.stride(0) + (hk * group + g) * q.stride(1) +
                            (qt.begin + i) * q.stride(2),
                        D, Q.data() + (g * nq + i) * D);
        const float* kp = k.data_ptr<float>() + b * k.stride(0) + hk * k.stride(1);
        const float* vp = v.data_ptr<float>() + b * v.stride(0) + hk * v.stride(1);
        const float* akp = ak.defined() ? ak.data_ptr<float>() + (b * s.Hkv + hk) * ak.size(2) * D : nullptr;
        const float* avp = av.defined() ? av.data_ptr<float>() + (b * s.Hkv + hk) * ak.size(2) * D : nullptr;
        int64_t block_index = 0;
        auto visit = [&](const KeyBlock& blk, int64_t) {
          if (block_index++ % splits != split) return;  // another split's block
          scores_block(Q.data(), D, blk, rows, nq, D, scale, qr, qt.begin, S.data(), key_block);
          for (int64_t r = 0; r < rows; ++r) {
            float* srow = S.data() + r * key_block;
            const float m_new = std::max(m[r], row_max(srow, blk.n));
            if (m_new == kNegInf) {  // nothing visible yet for this query
              std::fill(srow, srow + blk.n, 0.f);
              continue;
            }
            const float alpha = std::exp(m[r] - m_new);  // 0 when m[r] == -inf
            l[r] = l[r] * alpha + exp_and_sum(srow, blk.n, m_new);
            m[r] = m_new;
            if (alpha != 1.f) {
              float* a = acc.data() + r * D;
              for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
            }
          }
          // acc[rows x D] += P[rows x n] . V[n x D]
          matmul_acc(acc.data(), D, S.data(), key_block, 1, blk.v, blk.stride, rows, blk.n, D, 1.f);
        };
        for_each_block(ix, b, s.Tk, qt, kp, vp, k.stride(2), akp, avp, D, key_block, visit);
      }
      if (splits == 1) {
        write_tile(b, hk, qt, m.data(), l.data(), acc.data(), D);  // l = 0: zeros for a tile that sees nothing
        continue;
      }
      float* part = partial.data_ptr<float>() + (tile_id * splits + split) * max_rows * (D + 2);
      for (int64_t r = 0; r < rows; ++r) {
        part[r * (D + 2)] = m[r];
        part[r * (D + 2) + 1] = l[r];
        std::copy_n(acc.data() + r * D, D, part + r * (D + 2) + 2);
      }
    }
  });
  if (splits > 1) {  // merge the splits of every tile by log-sum-exp (little work: no new region)
    at::parallel_for(0, n_tiles, n_tiles, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(max_rows * D), m(max_rows), l(max_rows);
      for (int64_t tile_id = begin; tile_id < end; ++tile_id) {
        const int64_t b = tile_id / (s.Hkv * n_qtiles), hk = (tile_id / n_qtiles) % s.Hkv;
        const int64_t t = tile_id % n_qtiles;
        const QueryTile qt = summarize_queries(row_layout(ql, b), t * tile, std::min(tile, s.Tq - t * tile));
        const int64_t rows = group * qt.count;
        if (!qt.any_valid) {  // no split saw anything: zeros
          std::fill_n(l.begin(), rows, 0.f);
          write_tile(b, hk, qt, m.data(), l.data(), acc.data(), D);
          continue;
        }
        const float* parts = partial.data_ptr<float>() + tile_id * splits * max_rows * (D + 2);
        for (int64_t r = 0; r < rows; ++r) {
          float m_all = kNegInf;
          for (int64_t sp = 0; sp < splits; ++sp) m_all = std::max(m_all, parts[(sp * max_rows + r) * (D + 2)]);
          m[r] = m_all;
          l[r] = 0.f;
          std::fill_n(acc.data() + r * D, D, 0.f);
          if (m_all == kNegInf) continue;
          for (int64_t sp = 0; sp < splits; ++sp) {
            const float* p = parts + (sp * max_rows + r) * (D + 2);
            if (p[1] == 0.f) continue;
            const float w = std::exp(p[0] - m_all);
            l[r] += w * p[1];
            for (int64_t d = 0; d < D; ++d) acc[r * D + d] += w * p[2 + d];
          }
        }
        write_tile(b, hk, qt, m.data(), l.data(), acc.data(), D);
      }
    });
  }
  return {out.to(q_in.scalar_type()), lse};
}

// Backward. delta = rowsum(dout * out) - dlse (computed by the caller, fp32 [B, Hq, Tq]).
// Per query tile and key block: recompute P from the saved lse, then dV += P^T dO, dS = P (dO V^T -
// delta), dQ += dS K, dK += dS^T Q (see the work split below).
std::tuple<at::Tensor, at::Tensor, at::Tensor> anchor_attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& lse_in, const at::Tensor& delta_in, const at::Tensor& q_pos,
    const at::Tensor& q_seg, const at::Tensor& q_is_anchor, const at::Tensor& q_valid,
    const at::Tensor& k_pos, const at::Tensor& k_seg, const at::Tensor& k_is_anchor,
    const at::Tensor& k_valid, double scale_d) {
  const LayoutTensors ql = contiguous_layout(q_pos, q_seg, q_is_anchor, q_valid);
  const LayoutTensors kl = contiguous_layout(k_pos, k_seg, k_is_anchor, k_valid);
  const AttentionShape s = check_attention_inputs(q_in, k_in, v_in, ql, kl);
  ANLLM_CHECK_SHAPE(dout_in, s.B, s.Hq, s.Tq, s.D);
  ANLLM_CHECK_SHAPE(lse_in, s.B, s.Hq, s.Tq);
  ANLLM_CHECK_SHAPE(delta_in, s.B, s.Hq, s.Tq);
  ANLLM_CHECK_DTYPE(lse_in, at::kFloat);
  ANLLM_CHECK_DTYPE(delta_in, at::kFloat);
  const at::Tensor q = as_float(q_in);
  const auto [k, v] = float_kv(k_in, v_in);
  const at::Tensor dout = as_float(dout_in).contiguous();
  const at::Tensor lse = lse_in.contiguous(), delta = delta_in.contiguous();
  const float scale = static_cast<float>(scale_d);
  const int64_t D = s.D, group = s.Hq / s.Hkv;

  const int64_t n_qtiles = (s.Tq + kQueryTileBwd - 1) / kQueryTileBwd;
  // Work items are (b, hkv, split): a split owns a range of query tiles of every head of the group,
  // so dq rows are written by one item only. Split 0 accumulates dk/dv into the result, every other
  // split into its own fp32 partial, summed at the end. Splits exist only to keep all threads busy
  // when B * Hkv is small; their partials are held within a byte budget (plan_cpu_backward).
  const CpuBackwardPlan plan = plan_cpu_backward(s.B, s.Hkv, s.Tq, s.Tk, D, at::get_num_threads());
  const int64_t splits = plan.splits;
  auto dq = at::zeros({s.B, s.Hq, s.Tq, D}, q.options());
  auto dk = at::zeros({s.B, s.Hkv, s.Tk, D}, q.options());
  auto dv = at::zeros({s.B, s.Hkv, s.Tk, D}, q.options());
  at::Tensor dk_extra, dv_extra;  // [splits - 1, B, Hkv, Tk, D]
  if (splits > 1) {
    dk_extra = at::zeros({splits - 1, s.B, s.Hkv, s.Tk, D}, q.options());
    dv_extra = at::zeros({splits - 1, s.B, s.Hkv, s.Tk, D}, q.options());
  }
  auto cast_back = [&]() {
    for (int64_t sp = 0; sp + 1 < splits; ++sp) {  // in place: no temporary the size of dk
      dk.add_(dk_extra[sp]);
      dv.add_(dv_extra[sp]);
    }
    return std::make_tuple(dq.to(q_in.scalar_type()), dk.to(q_in.scalar_type()), dv.to(q_in.scalar_type()));
  };
  if (s.B == 0 || s.Hq == 0 || s.Tq == 0 || s.Tk == 0) return cast_back();

  const KeyIndex ix = build_key_index(kl, s.B, s.Tk);
  auto [ak, av] = gather_anchors(ix, k, v);
  const int64_t amax = ak.defined() ? ak.size(2) : 0;
  const int64_t tiles_per_split = (n_qtiles + splits - 1) / splits;

  at::parallel_for(0, s.B * s.Hkv * splits, 1, [&](int64_t begin, int64_t end) {
    SerialBlasScope serial_blas;
    std::vector<float> P(kQueryTileBwd * kKeyBlock), dP(kQueryTileBwd * kKeyBlock);
    std::vector<float> dak(amax * D), dav(amax * D);  // gradients of the gathered anchors
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % splits, b = item / (splits * s.Hkv), hk = (item / splits) % s.Hkv;
      const int64_t t_begin = split * tiles_per_split;
      const int64_t t_end = std::min(n_qtiles, t_begin + tiles_per_split);
      const RowLayout qr = row_layout(ql, b);
      const float* kp = k.data_ptr<float>() + b * k.stride(0) + hk * k.stride(1);
      const float* vp = v.data_ptr<float>() + b * v.stride(0) + hk * v.stride(1);
      const float* akp = ak.defined() ? ak.data_ptr<float>() + (b * s.Hkv + hk) * amax * D : nullptr;
      const float* avp = av.defined() ? av.data_ptr<float>() + (b * s.Hkv + hk) * amax * D : nullptr;
      const int64_t row_offset = (b * s.Hkv + hk) * s.Tk * D;
      const int64_t part_offset = (split - 1) * s.B * s.Hkv * s.Tk * D + row_offset;
      float* dkp = split == 0 ? dk.data_ptr<float>() + row_offset : dk_extra.data_ptr<float>() + part_offset;
      float* dvp = split == 0 ? dv.data_ptr<float>() + row_offset : dv_extra.data_ptr<float>() + part_offset;
      std::fill(dak.begin(), dak.end(), 0.f);
      std::fill(dav.begin(), dav.end(), 0.f);

      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t t = t_begin; t < t_end; ++t) {
          const QueryTile qt =
              summarize_queries(qr, t * kQueryTileBwd, std::min(kQueryTileBwd, s.Tq - t * kQueryTileBwd));
          if (!qt.any_valid) continue;
          const int64_t nq = qt.count;
          const float* qp = q.data_ptr<float>() + b * q.stride(0) + h * q.stride(1) + qt.begin * q.stride(2);
          const float* dop = dout.data_ptr<float>() + ((b * s.Hq + h) * s.Tq + qt.begin) * D;
          float* dqp = dq.data_ptr<float>() + ((b * s.Hq + h) * s.Tq + qt.begin) * D;
          const float* lp = lse.data_ptr<float>() + (b * s.Hq + h) * s.Tq + qt.begin;
          const float* dlp = delta.data_ptr<float>() + (b * s.Hq + h) * s.Tq + qt.begin;

          auto visit = [&](const KeyBlock& blk, int64_t offset) {
            // offset >= 0: own-segment block at key `offset`; < 0: anchor rows starting at -1 - offset.
            float* dk_blk = offset >= 0 ? dkp + offset * D : dak.data() + (-1 - offset) * D;
            float* dv_blk = offset >= 0 ? dvp + offset * D : dav.data() + (-1 - offset) * D;
            scores_block(qp, q.stride(2), blk, nq, nq, D, scale, qr, qt.begin, P.data(), kKeyBlock);
            for (int64_t i = 0; i < nq; ++i) {
              float* prow = P.data() + i * kKeyBlock;
              if (lp[i] == kNegInf) {  // fully masked row: no gradient flows
                std::fill(prow, prow + blk.n, 0.f);
                continue;
              }
              exp_and_sum(prow, blk.n, lp[i]);
            }
            // dV[n x D] += P^T . dO
            matmul_acc(dv_blk, D, P.data(), 1, kKeyBlock, dop, D, blk.n, nq, D, 1.f);
            // dP[nq x n] = dO . V^T
            matmul_nt(dP.data(), kKeyBlock, dop, D, blk.v, blk.stride, nq, blk.n, D, 1.f);
            // dS = P * (dP - delta), stored in P
            for (int64_t i = 0; i < nq; ++i) {
              float* prow = P.data() + i * kKeyBlock;
              const float* dprow = dP.data() + i * kKeyBlock;
              for (int64_t j = 0; j < blk.n; ++j) prow[j] *= dprow[j] - dlp[i];
            }
            // dQ[nq x D] += scale * dS . K
            matmul_acc(dqp, D, P.data(), kKeyBlock, 1, blk.k, blk.stride, nq, blk.n, D, scale);
            // dK[n x D] += scale * dS^T . Q
            matmul_acc(dk_blk, D, P.data(), 1, kKeyBlock, qp, q.stride(2), blk.n, nq, D, scale);
          };
          for_each_block(ix, b, s.Tk, qt, kp, vp, k.stride(2), akp, avp, D, kKeyBlock, visit);
        }
      }
      // Scatter the gathered anchors' gradients back to their key slots (in-place anchor blocks
      // accumulated into dk/dv directly).
      const auto& idx = ix.anchors[b];
      for (size_t a = 0; ix.gathered[b] && a < idx.size(); ++a) {
        for (int64_t d = 0; d < D; ++d) {
          dkp[idx[a] * D + d] += dak[a * D + d];
          dvp[idx[a] * D + d] += dav[a * D + d];
        }
      }
    }
  });
  return cast_back();
}

}  // namespace
}  // namespace ANLLM_CPU_NS
}  // namespace anllm

// The variant's only global symbol (setup.py localises the rest of its object file, so none of the
// inline functions it compiled with its flags can stand in for the baseline's copies).
extern "C" const anllm::CpuAttentionKernels* ANLLM_CPU_ENTRY() {
  static constexpr anllm::CpuAttentionKernels kernels{&anllm::ANLLM_CPU_NS::anchor_attention_fwd_cpu,
                                                      &anllm::ANLLM_CPU_NS::anchor_attention_bwd_cpu};
  return &kernels;
}
