// Tile pieces the attention kernels share: the CUDA-core fwd_kernel, dq_kernel and dkv_kernel (fp32 math,
// anchor_attention_fwd.cu, anchor_attention_bwd.cu) and the tensor-core fwd_wmma_kernel, dq_wmma_kernel
// and dkv_wmma_kernel (fwd_wmma.cuh, bwd_wmma.cuh). Each kernel declares its shared arrays (ANLLM_SHARED,
// dynamic shared memory) and keeps its own barriers: these helpers only fill and read what they are
// given, except enter_key_tile (the two barriers every query-tile kernel has around the key-slot load)
// and online_softmax_row (the warp's __syncwarp before lane 0 updates the row's statistics).
//
// Shared tiles hold either fp32 (the CUDA-core kernels: inputs converted on load, q pre-multiplied by
// the scale) or the input dtype T itself (the tensor-core kernels: the scale is applied to the fp32
// scores); the element type S of a tile says which.
#pragma once

#include <type_traits>

#include "bwd_params.cuh"
#include "fwd_params.cuh"

namespace anllm {
namespace cuda {

// A tile's layout in shared memory: per row (query) valid, is_anchor, position and segment; per key slot
// its key index in the row (-1: no key, K/V read as zeros), position and segment.
struct PairTile {
  bool* r_valid;
  bool* r_is_anchor;
  int64_t* r_pos;
  int32_t* r_seg;
  int64_t* k_row;
  int64_t* k_pos;
  int32_t* k_seg;

  // pair_allowed for row r and key slot c of an own-segment (anchor_tile false) or anchor tile.
  __device__ __forceinline__ bool allowed(bool anchor_tile, int r, int c) const {
    return pair_allowed(anchor_tile, r_valid[r], r_is_anchor[r], r_pos[r], r_seg[r], k_row[c] >= 0, k_pos[c],
                        k_seg[c]);
  }

  // Row r from query qi of batch row b of the query layout; `in`: the row is inside the problem (else an
  // invalid row), `live`: the caller's further condition for a valid row.
  __device__ __forceinline__ void load_row(const LayoutView& ql, int64_t b, int64_t Tq, int r, bool in, int64_t qi,
                                           bool live) const {
    const int64_t li = b * Tq + (in ? qi : 0);
    r_valid[r] = in && ql.valid[li] && live;
    r_is_anchor[r] = in && ql.is_anchor[li];
    r_pos[r] = in ? ql.pos[li] : 0;
    r_seg[r] = in ? ql.seg[li] : 0;
  }
};

// x (input type T) as an entry of a shared tile of element type S: T itself, or converted to fp32.
template <typename S, typename T>
__device__ __forceinline__ S tile_elem(T x) {
  if constexpr (std::is_same_v<S, T>)
    return x;
  else
    return to_float(x);
}

// Enters key tile t of a query tile's plan. Returns false, the same in every thread (the caller skips the
// tile), when key_tile_start rules the tile out; else waits until the previous tile is done with the
// shared buffers, loads the key slots (threads tid < BK) and waits for them.
template <int BK>
__device__ __forceinline__ bool enter_key_tile(const AttentionParams& p, int64_t b, const QueryTilePlan& plan,
                                               int sub, int64_t t, int tid, const PairTile& tile) {
  int64_t key0, a0;
  if (!key_tile_start<BK>(p.ks, b, plan, sub, t, key0, a0)) return false;
  __syncthreads();  // the previous tile is done with the shared buffers
  if (tid < BK)
    load_key_slot(p.kl, p.ka, b, p.Tk, t < plan.n_own, key0, a0, plan.n_av, tid, tile.k_row, tile.k_pos,
                  tile.k_seg);
  __syncthreads();
  return true;
}

// The K and V rows of a tile's key slots (key/value head hk of batch row b) into Ks [BK][KLD] and
// Vs [BK][VLD], element type S, unscaled; zeros for empty slots (k_row -1) and head-dim columns >= D.
template <typename T, typename S, int BK, int DMAX, int KLD, int VLD>
__device__ __forceinline__ void stage_keys_values(const AttentionParams& p, int64_t b, int64_t hk,
                                                  const int64_t* k_row, int tid, S* Ks, S* Vs) {
  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);
  const int64_t k_base = b * p.k_sb + hk * p.k_sh;
  const int64_t v_base = b * p.v_sb + hk * p.v_sh;
  const S zero = from_float<S>(0.f);
  for (int e = tid; e < BK * DMAX; e += kThreads) {
    const int c = e / DMAX, d = e % DMAX;
    const int64_t j = k_row[c];
    S kx = zero, vx = zero;
    if (j >= 0 && d < p.D) {
      kx = tile_elem<S>(kg[k_base + j * p.k_st + d]);
      vx = tile_elem<S>(vg[v_base + j * p.v_st + d]);
    }
    Ks[c * KLD + d] = kx;
    Vs[c * VLD + d] = vx;
  }
}

// The thread's micro tile of a product on the 8 x 16 thread grid: acc[i][j] += sum over k in [0, NK) of
// A(ty + i kTY, k) * B(k, tx + j kTX), fp32 fused multiply-adds in k order, where A(r, k) is
// A[r * AR + k * AK] and B(k, c) is B[c * BC + k * BKS]. With TWO, a second product with the same strides
// (acc2 += A2 B2) runs in the same loop; else A2, B2 and acc2 are not touched.
template <int RI, int CJ, int NK, int AR, int AK, int BC, int BKS, int UNROLL, bool TWO>
__device__ __forceinline__ void micro_tile_mma_impl(const float* A, const float* B, float (&acc)[RI][CJ],
                                                    const float* A2, const float* B2, float (&acc2)[RI][CJ],
                                                    int ty, int tx) {
#pragma unroll (UNROLL)
  for (int k = 0; k < NK; ++k) {
    float a[RI], bv[CJ], a2[RI], bv2[CJ];
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      a[i] = A[(ty + i * kTY) * AR + k * AK];
      if constexpr (TWO) a2[i] = A2[(ty + i * kTY) * AR + k * AK];
    }
#pragma unroll
    for (int j = 0; j < CJ; ++j) {
      bv[j] = B[(tx + j * kTX) * BC + k * BKS];
      if constexpr (TWO) bv2[j] = B2[(tx + j * kTX) * BC + k * BKS];
    }
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int j = 0; j < CJ; ++j) {
        acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
        if constexpr (TWO) acc2[i][j] = fmaf(a2[i], bv2[j], acc2[i][j]);
      }
  }
}

// One product (see micro_tile_mma_impl), k loop unrolled 4 times.
template <int RI, int CJ, int NK, int AR, int AK, int BC, int BKS>
__device__ __forceinline__ void micro_tile_mma(const float* A, const float* B, int ty, int tx, float (&acc)[RI][CJ]) {
  micro_tile_mma_impl<RI, CJ, NK, AR, AK, BC, BKS, 4, false>(A, B, acc, A, B, acc, ty, tx);
}

// Two products with the same strides in one loop (see micro_tile_mma_impl), k loop unrolled twice.
template <int RI, int CJ, int NK, int AR, int AK, int BC, int BKS>
__device__ __forceinline__ void micro_tile_mma2(const float* A, const float* B, float (&acc)[RI][CJ], const float* A2,
                                                const float* B2, float (&acc2)[RI][CJ], int ty, int tx) {
  micro_tile_mma_impl<RI, CJ, NK, AR, AK, BC, BKS, 2, true>(A, B, acc, A2, B2, acc2, ty, tx);
}

// ------------------------------------------------------------------------------------------------
// Forward (fwd_kernel, fwd_wmma_kernel).

// A forward block (FwdParams' grid: split, query tile, head group, batch row) and its rows: row r is query
// qt * rows_q + r % rows_q of head h0 + r / rows_q.
struct FwdBlock {
  int split;
  int64_t qt, b, h0, hk;
  int n_rows;

  // Row r -> (head, query); false when the row is outside the problem.
  __device__ __forceinline__ bool row(const FwdParams& p, int r, int64_t& h, int64_t& qi) const {
    h = h0 + r / p.rows_q;
    qi = qt * p.rows_q + r % p.rows_q;
    return r < n_rows && qi < p.Tq;
  }
};

__device__ __forceinline__ FwdBlock fwd_block(const FwdParams& p) {
  FwdBlock blk;
  int64_t item = blockIdx.x;
  blk.split = static_cast<int>(item % p.nsplit);
  item /= p.nsplit;
  blk.qt = item % p.n_qtiles;
  item /= p.n_qtiles;
  const int64_t hg = item % p.n_hgroups;
  blk.b = item / p.n_hgroups;
  blk.h0 = hg * p.rows_h;
  blk.hk = blk.h0 / p.group;
  blk.n_rows = p.rows_h * p.rows_q;
  return blk;
}

// The block's rows (threads tid < BQ): their layout, and the online softmax's running max, sum and
// rescale factor.
template <int BQ>
__device__ __forceinline__ void fwd_init_rows(const FwdParams& p, const FwdBlock& blk, int tid, const PairTile& tile,
                                              float* r_m, float* r_l, float* r_alpha) {
  if (tid >= BQ) return;
  int64_t h, qi;
  const bool in = blk.row(p, tid, h, qi);
  tile.load_row(p.ql, blk.b, p.Tq, tid, in, qi, true);
  r_m[tid] = -INFINITY;
  r_l[tid] = 0.f;
  r_alpha[tid] = 1.f;
}

// The query tile Qs [BQ][LD] (element type S: fp32 pre-multiplied by the scale, or T unscaled); rows
// without a valid query and head-dim columns >= D are zero.
template <typename T, typename S, int BQ, int DMAX, int LD>
__device__ __forceinline__ void fwd_stage_queries(const FwdParams& p, const FwdBlock& blk, int tid,
                                                  const bool* r_valid, S* Qs) {
  const T* q = static_cast<const T*>(p.q);
  for (int e = tid; e < BQ * DMAX; e += kThreads) {
    const int r = e / DMAX, d = e % DMAX;
    S x = from_float<S>(0.f);
    if (d < p.D && r_valid[r]) {
      int64_t h, qi;
      blk.row(p, r, h, qi);
      const int64_t i = blk.b * p.q_sb + h * p.q_sh + qi * p.q_st + d;
      if constexpr (std::is_same_v<S, float>)
        x = to_float(q[i]) * p.scale;
      else
        x = q[i];
    }
    Qs[r * LD + d] = x;
  }
}

// The key tiles [t_begin, t_end) of the block's split of its plan's tiles.
__device__ __forceinline__ void fwd_split_tiles(const FwdParams& p, const FwdBlock& blk, const QueryTilePlan& plan,
                                                int64_t& t_begin, int64_t& t_end) {
  const int64_t n_tiles = plan.n_own + plan.n_anc;
  const int64_t per = (n_tiles + p.nsplit - 1) / p.nsplit;
  t_begin = blk.split * per;
  t_end = min(n_tiles, t_begin + per);
}

// One online-softmax step of row r over a key tile, by the 32 lanes of one warp: x[u] is the score of
// key column lane + 32 u (-inf: masked). x becomes P = exp(x - m_new) (0 where masked), written by
// store(u, P); then lane 0 updates the row's running max r_m and sum r_l and sets r_alpha, the factor
// that rescales the row's earlier output.
template <int NU, typename Store>
__device__ __forceinline__ void online_softmax_row(float (&x)[NU], int lane, int r, float* r_m, float* r_l,
                                                   float* r_alpha, Store store) {
  float mx = -INFINITY;
#pragma unroll
  for (int u = 0; u < NU; ++u) mx = fmaxf(mx, x[u]);
  mx = warp_allreduce(mx, FmaxOp());
  const float m_old = r_m[r];
  const float m_new = fmaxf(m_old, mx);
  float alpha = 1.f, sum = 0.f;
  if (m_new != -INFINITY) {
    alpha = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      x[u] = x[u] == -INFINITY ? 0.f : __expf(x[u] - m_new);
      sum += x[u];
    }
  } else {
#pragma unroll
    for (int u = 0; u < NU; ++u) x[u] = 0.f;
  }
  sum = warp_allreduce(sum, AddOp());
#pragma unroll
  for (int u = 0; u < NU; ++u) store(u, x[u]);
  __syncwarp();
  if (lane == 0) {
    r_l[r] = r_l[r] * alpha + sum;
    r_m[r] = m_new;
    r_alpha[r] = alpha;
  }
}

// The softmax statistics of the block's rows (threads tid < BQ): lse (one split), or the partial max and
// sum that combine_kernel merges (split keys). -inf where the row saw nothing.
template <int BQ>
__device__ __forceinline__ void fwd_store_row_stats(const FwdParams& p, const FwdBlock& blk, int tid, const float* r_m,
                                                    const float* r_l) {
  int64_t h, qi;
  if (tid >= BQ || !blk.row(p, tid, h, qi)) return;
  const int64_t rows_total = p.B * p.Hq * p.Tq;
  const int64_t row = (blk.b * p.Hq + h) * p.Tq + qi;
  const float l = r_l[tid];
  if (p.nsplit == 1) {
    p.lse[row] = l > 0.f ? r_m[tid] + __logf(l) : -INFINITY;
  } else {
    p.part_m[blk.split * rows_total + row] = l > 0.f ? r_m[tid] : -INFINITY;
    p.part_l[blk.split * rows_total + row] = l;
  }
}

// ------------------------------------------------------------------------------------------------
// Backward (dq_kernel, dkv_kernel, dq_wmma_kernel).

// dout[i] as fp32: an fp32 dout is read as it is (as the CPU kernel does), not rounded to the dtype of q.
template <typename T>
__device__ __forceinline__ float load_dout(const BwdParams& p, int64_t i) {
  return p.dout_f32 ? static_cast<const float*>(p.dout)[i] : to_float(static_cast<const T*>(p.dout)[i]);
}

// A query-centric backward block (dq): BQ consecutive queries from q0 of head h, batch row b, key/value
// head hk; hrow is the row index of the head's query 0.
struct BwdQueryBlock {
  int64_t b, h, hk, q0, hrow;
};

template <int BQ>
__device__ __forceinline__ BwdQueryBlock bwd_query_block(const BwdParams& p) {
  BwdQueryBlock blk;
  const int64_t qt = blockIdx.x % p.n_qtiles;
  blk.h = (blockIdx.x / p.n_qtiles) % p.Hq;
  blk.b = blockIdx.x / (p.n_qtiles * p.Hq);
  blk.hk = blk.h / p.group;
  blk.q0 = qt * BQ;
  blk.hrow = (blk.b * p.Hq + blk.h) * p.Tq;
  return blk;
}

// Row r = query q0 + r of a backward tile (batch row b; hrow: the row index of query 0 of its head): its
// layout, lse and delta. A row that saw nothing in the forward (lse = -inf) gets no gradient (not valid).
__device__ __forceinline__ void bwd_load_row(const BwdParams& p, int64_t b, int64_t hrow, int64_t q0, int r,
                                             const PairTile& tile, float* r_lse, float* r_delta) {
  const int64_t qi = q0 + r;
  const bool in = qi < p.Tq;
  const float l = in ? p.lse[hrow + qi] : -INFINITY;
  tile.load_row(p.ql, b, p.Tq, r, in, qi, l != -INFINITY);
  r_lse[r] = l;
  r_delta[r] = in ? p.delta[hrow + qi] : 0.f;
}

// The query rows q0 + r of head h (hrow: row index of its query 0) into Qs and their dout rows into Gs,
// both [BQ][LD] of element type S: fp32 (q pre-multiplied by the scale, dout read by load_dout) or T as
// stored (tensor cores: dout has the dtype of q); rows that get no gradient and columns >= D are zero.
template <typename T, typename S, int BQ, int DMAX, int LD>
__device__ __forceinline__ void bwd_stage_queries(const BwdParams& p, int64_t b, int64_t h, int64_t hrow, int64_t q0,
                                                  int tid, const bool* r_valid, S* Qs, S* Gs) {
  const T* q = static_cast<const T*>(p.q);
  const S zero = from_float<S>(0.f);
  for (int e = tid; e < BQ * DMAX; e += kThreads) {
    const int r = e / DMAX, d = e % DMAX;
    S x = zero, g = zero;
    if (d < p.D && r_valid[r]) {
      const int64_t qi = q0 + r;
      const int64_t qoff = b * p.q_sb + h * p.q_sh + qi * p.q_st + d, goff = (hrow + qi) * p.D + d;
      if constexpr (std::is_same_v<S, float>) {
        x = to_float(q[qoff]) * p.scale;
        g = load_dout<T>(p, goff);
      } else {
        x = q[qoff];
        g = static_cast<const T*>(p.dout)[goff];
      }
    }
    Qs[r * LD + d] = x;
    Gs[r * LD + d] = g;
  }
}

// A key-centric backward block (dk/dv kernels): key tile kt of BK consecutive keys (own-segment kernel)
// or of BK entries of the row's gathered anchor list (ANCHOR) from `first` on, key/value head hk, batch
// row b, query split `split` of qsplit (anchor kernel; 1 otherwise).
struct BwdKeyBlock {
  int split, qsplit;
  int64_t b, hk, first;
};

template <int BK, bool ANCHOR>
__device__ __forceinline__ BwdKeyBlock bwd_key_block(const BwdParams& p) {
  BwdKeyBlock blk;
  int64_t item = blockIdx.x;
  blk.qsplit = ANCHOR ? p.qsplit : 1;
  blk.split = static_cast<int>(item % blk.qsplit);
  item /= blk.qsplit;
  const int64_t kt = item % p.n_ktiles;
  item /= p.n_ktiles;
  blk.hk = item % p.Hkv;
  blk.b = item / p.Hkv;
  blk.first = kt * BK;
  return blk;
}

// The query chunks [c0, c1) of the query index a key tile visits, and its keys' segment range and first
// position (for the chunk-level skip); `any`: there is something to visit.
struct KeyTilePlan {
  int64_t c0, c1, kpmin;
  int32_t ksmin, ksmax;
  int any;
};

// Called by all 32 lanes of one warp after the key slots are loaded; lane 0 writes `plan` (callers
// __syncthreads() before reading it). Own-segment tiles: the chunks that can hold queries of the keys'
// segments. Anchor tiles: this split's share of the chunks from the first that holds a non-anchor query
// at or after the earliest anchor.
template <int BK, bool ANCHOR>
__device__ __forceinline__ void plan_key_tile(int lane, const BwdParams& p, const BwdKeyBlock& blk,
                                              const PairTile& tile, KeyTilePlan& plan) {
  bool any = false;
  int32_t smin = kI32Max, smax = kI32Min;
  int64_t pmin = kI64Max;
  for (int c = lane; c < BK; c += 32) {
    if (tile.k_row[c] < 0) continue;
    any = true;
    smin = min(smin, tile.k_seg[c]);
    smax = max(smax, tile.k_seg[c]);
    pmin = min(pmin, tile.k_pos[c]);
  }
  const unsigned any_b = __ballot_sync(kFull, any);
  smin = warp_allreduce(smin, MinOp());
  smax = warp_allreduce(smax, MaxOp());
  pmin = warp_allreduce(pmin, MinOp());
  if (lane != 0) return;
  const int64_t nC = p.qs.nC, b = blk.b;
  int64_t c0 = 0, c1 = 0;
  if (any_b) {
    if (!ANCHOR) {
      c0 = lower_bound_dev(p.qs.pm_seg_max + b * nC, nC, smin);
      c1 = count_le_dev(p.qs.sm_seg_min + b * nC, nC, smax);
    } else {
      const int64_t lo = lower_bound_dev(p.qs.pm_pos_max_na + b * nC, nC, pmin);
      const int64_t per = (nC - lo + blk.qsplit - 1) / blk.qsplit;
      c0 = lo + blk.split * per;
      c1 = min(nC, c0 + per);
    }
  }
  plan = KeyTilePlan{c0, c1, pmin, smin, smax, any_b != 0 && c1 > c0};
}

// Calls body(h, hrow, q0) for every query tile of BQ queries from q0 a key tile visits (h: a query head of
// the key/value head's group, hrow: the row index of its query 0): the plan's query chunks that their
// summaries do not rule out, BQ-query sub-tiles inside the problem. The same sequence in every thread.
template <int BQ, bool ANCHOR, typename Body>
__device__ __forceinline__ void for_key_tile_queries(const BwdParams& p, const BwdKeyBlock& blk,
                                                     const KeyTilePlan& plan, Body&& body) {
  static_assert(kChunk % BQ == 0, "query sub-tiles of a chunk");
  const int64_t b = blk.b, qcb = b * p.qs.nC;
  for (int64_t h = blk.hk * p.group; h < (blk.hk + 1) * p.group; ++h) {
    const int64_t hrow = (b * p.Hq + h) * p.Tq;
    for (int64_t c = plan.c0; c < plan.c1; ++c) {
      // Chunk-level skip.
      if (!ANCHOR) {
        if (!(p.qs.flags[qcb + c] & kAnyValid) || p.qs.seg_max[qcb + c] < plan.ksmin ||
            p.qs.seg_min[qcb + c] > plan.ksmax || p.qs.pos_max[qcb + c] < plan.kpmin)
          continue;
      } else {
        if (!(p.qs.flags[qcb + c] & kAnyNonAnchor) || p.qs.pos_max_na[qcb + c] < plan.kpmin) continue;
      }
      for (int sub = 0; sub < kChunk / BQ; ++sub) {
        const int64_t q0 = c * kChunk + sub * BQ;
        if (q0 >= p.Tq) break;
        body(h, hrow, q0);
      }
    }
  }
}

// Adds a key tile's gradient rows (fp32, [BK][LD] in shared memory, times `mul`) into out ([B, Hkv, Tk, D]
// fp32) at the slots' keys: plain read-add-write (own-segment tiles: the block owns its keys' rows) or
// atomicAdd (anchor tiles: several blocks add into an anchor's rows).
template <int BK, int DMAX, int LD, bool ATOMIC>
__device__ __forceinline__ void add_key_rows(const BwdParams& p, int64_t b, int64_t hk, const int64_t* k_row, int tid,
                                             const float* G, float mul, float* out) {
  for (int e = tid; e < BK * DMAX; e += kThreads) {
    const int c = e / DMAX, d = e % DMAX;
    const int64_t j = k_row[c];
    if (j < 0 || d >= p.D) continue;
    float* o = out + ((b * p.Hkv + hk) * p.Tk + j) * p.D + d;
    if constexpr (ATOMIC)
      atomicAdd(o, G[c * LD + d] * mul);
    else
      *o += G[c * LD + d] * mul;
  }
}

}  // namespace cuda
}  // namespace anllm
