// Anchor attention backward on CUDA. delta = rowsum(dout * out) - dlse is computed by the caller.
//
// Three kernels, no atomics on dq and none on ordinary keys:
//   dq_kernel        one block per (b, hq, query tile); visits the same key tiles as the forward
//                    (own-segment chunks + gathered anchors) and accumulates dq in registers. For
//                    bf16/fp16 inputs with a dout of the same dtype, dq_wmma_kernel (bwd_wmma.cuh) does
//                    the same on tensor cores.
//   dkv_kernel<own>  one block per (b, hkv, key tile of BK consecutive keys); visits the queries of
//                    the tile's own segments (query chunks found on the query index) for every query
//                    head of the group; owns its keys' dk/dv rows: plain read-add-write of fp32.
//   dkv_kernel<anc>  one block per (b, hkv, tile of BK gathered anchors, query split); visits the
//                    non-anchor queries at or after the anchors' positions in other segments; adds
//                    into the anchors' dk/dv rows with atomicAdd (the query range is split across
//                    blocks). Runs after the own kernel on the same stream.
// dk/dv are accumulated in fp32 [B, Hkv, Tk, D] and cast at the end.
#include <torch/library.h>

#include "bwd_wmma.cuh"
#include "common.cuh"

namespace anllm {
namespace cuda {
namespace {

// For this thread's rows r = ty + i * kTY and key columns c = tx + j * kTX of a tile:
// s[i][j] = q_r . k_c (q pre-scaled) and dp[i][j] = dout_r . v_c, from the shared Qs/Os ([BQ][QS]) and
// Ks/Vs ([BK][KS]) tiles. Both backward kernels need exactly these two products.
template <int RI, int CJ, int DMAX, int QS, int KS>
__device__ __forceinline__ void scores_and_dp(const float* Qs, const float* Os, const float* Ks,
                                              const float* Vs, int ty, int tx, float (&s)[RI][CJ],
                                              float (&dp)[RI][CJ]) {
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < CJ; ++j) s[i][j] = dp[i][j] = 0.f;
#pragma unroll 2
  for (int d = 0; d < DMAX; ++d) {
    float qv[RI], ov[RI], kv[CJ], vv[CJ];
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      qv[i] = Qs[(ty + i * kTY) * QS + d];
      ov[i] = Os[(ty + i * kTY) * QS + d];
    }
#pragma unroll
    for (int j = 0; j < CJ; ++j) {
      kv[j] = Ks[(tx + j * kTX) * KS + d];
      vv[j] = Vs[(tx + j * kTX) * KS + d];
    }
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int j = 0; j < CJ; ++j) {
        s[i][j] = fmaf(qv[i], kv[j], s[i][j]);
        dp[i][j] = fmaf(ov[i], vv[j], dp[i][j]);
      }
  }
}

// dout[i] as fp32: an fp32 dout is read as it is (as the CPU kernel does), not rounded to the dtype of q.
template <typename T>
__device__ __forceinline__ float load_dout(const BwdParams& p, int64_t i) {
  return p.dout_f32 ? static_cast<const float*>(p.dout)[i] : to_float(static_cast<const T*>(p.dout)[i]);
}

// ------------------------------------------------------------------------------------------------
// dq: query-centric, mirrors the forward (one head per block, BQ consecutive queries).
constexpr int dq_kernel_launch_bound = kThreads;
template <typename T, int DMAX, int BQ, int BK>
__global__ void __launch_bounds__(dq_kernel_launch_bound) dq_kernel(const BwdParams p) {
  static_assert(BQ % kTY == 0 && BK % kTX == 0 && kChunk % BK == 0 && BQ <= 32, "tiles");
  constexpr int RI = BQ / kTY, CJ = BK / kTX, DJ = DMAX / kTX;
  constexpr int QS = DMAX + 1, KS = DMAX + 1;
  constexpr int SUB = kChunk / BK;
  ANLLM_DYNAMIC_SHARED(float, smem);
  float* Qs = smem;            // [BQ][QS] pre-scaled q
  float* Os = Qs + BQ * QS;    // [BQ][QS] dout
  float* Ks = Os + BQ * QS;    // [BK][KS]
  float* Vs = Ks + BK * KS;    // [BK][KS]
  float* Ss = Vs + BK * KS;    // [BQ][BK] dS

  ANLLM_SHARED(int64_t, r_pos, [BQ]);
  ANLLM_SHARED(int32_t, r_seg, [BQ]);
  ANLLM_SHARED(bool, r_valid, [BQ]);
  ANLLM_SHARED(bool, r_is_anchor, [BQ]);
  ANLLM_SHARED(float, r_lse, [BQ]);
  ANLLM_SHARED(float, r_delta, [BQ]);
  ANLLM_SHARED(int64_t, k_row, [BK]);
  ANLLM_SHARED(int64_t, k_pos, [BK]);
  ANLLM_SHARED(int32_t, k_seg, [BK]);
  ANLLM_SHARED(QueryTilePlan, plan, );

  const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
  const int64_t qt = blockIdx.x % p.n_qtiles;
  const int64_t h = (blockIdx.x / p.n_qtiles) % p.Hq;
  const int64_t b = blockIdx.x / (p.n_qtiles * p.Hq);
  const int64_t hk = h / p.group;
  const int64_t q0 = qt * BQ;
  const int64_t hrow = (b * p.Hq + h) * p.Tq;  // row index of query 0 of this head

  if (tid < BQ) {
    const int64_t qi = q0 + tid;
    const bool in = qi < p.Tq;
    const int64_t li = b * p.Tq + (in ? qi : 0);
    const float l = in ? p.lse[hrow + qi] : -INFINITY;
    // A row that saw nothing in the forward (lse = -inf) gets no gradient.
    r_valid[tid] = in && p.ql.valid[li] && l != -INFINITY;
    r_is_anchor[tid] = in && p.ql.is_anchor[li];
    r_pos[tid] = in ? p.ql.pos[li] : 0;
    r_seg[tid] = in ? p.ql.seg[li] : 0;
    r_lse[tid] = l;
    r_delta[tid] = in ? p.delta[hrow + qi] : 0.f;
  }
  __syncthreads();
  {
    const T* q = static_cast<const T*>(p.q);
    for (int e = tid; e < BQ * DMAX; e += kThreads) {
      const int r = e / DMAX, d = e % DMAX;
      float x = 0.f, g = 0.f;
      if (d < p.D && r_valid[r]) {
        const int64_t qi = q0 + r;
        x = to_float(q[b * p.q_sb + h * p.q_sh + qi * p.q_st + d]) * p.scale;
        g = load_dout<T>(p, (hrow + qi) * p.D + d);
      }
      Qs[r * QS + d] = x;
      Os[r * QS + d] = g;
    }
  }
  // The key tiles to visit (warp 0; BQ <= 32).
  if (tid < 32) plan_query_tile<BQ, BK>(tid, b, SUB, r_valid, r_is_anchor, r_seg, r_pos, p.ks, p.ka, plan);
  __syncthreads();

  const int64_t n_own = plan.n_own, n_tiles = n_own + plan.n_anc;
  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);
  const int64_t k_base = b * p.k_sb + hk * p.k_sh;
  const int64_t v_base = b * p.v_sb + hk * p.v_sh;

  float acc[RI][DJ];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) acc[i][j] = 0.f;

  for (int64_t t = 0; t < n_tiles; ++t) {
    const bool own = t < n_own;
    int64_t key0, a0;
    if (!key_tile_start<BK>(p.ks, b, plan, SUB, t, key0, a0)) continue;  // uniform across the block
    __syncthreads();
    if (tid < BK) load_key_slot(p.kl, p.ka, b, p.Tk, own, key0, a0, plan.n_av, tid, k_row, k_pos, k_seg);
    __syncthreads();
    for (int e = tid; e < BK * DMAX; e += kThreads) {
      const int c = e / DMAX, d = e % DMAX;
      const int64_t j = k_row[c];
      float kx = 0.f, vx = 0.f;
      if (j >= 0 && d < p.D) {
        kx = to_float(kg[k_base + j * p.k_st + d]);
        vx = to_float(vg[v_base + j * p.v_st + d]);
      }
      Ks[c * KS + d] = kx;
      Vs[c * KS + d] = vx;
    }
    __syncthreads();
    {
      float s[RI][CJ], dp[RI][CJ];
      scores_and_dp<RI, CJ, DMAX, QS, KS>(Qs, Os, Ks, Vs, ty, tx, s, dp);
#pragma unroll
      for (int i = 0; i < RI; ++i) {
        const int r = ty + i * kTY;
#pragma unroll
        for (int j = 0; j < CJ; ++j) {
          const int c = tx + j * kTX;
          const bool ok = pair_allowed(!own, r_valid[r], r_is_anchor[r], r_pos[r], r_seg[r], k_row[c] >= 0,
                                       k_pos[c], k_seg[c]);
          const float pr = ok ? __expf(s[i][j] - r_lse[r]) : 0.f;
          Ss[r * BK + c] = pr * (dp[i][j] - r_delta[r]);
        }
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int c = 0; c < BK; ++c) {
      float ds[RI], kv[DJ];
#pragma unroll
      for (int i = 0; i < RI; ++i) ds[i] = Ss[(ty + i * kTY) * BK + c];
#pragma unroll
      for (int j = 0; j < DJ; ++j) kv[j] = Ks[c * KS + tx + j * kTX];
#pragma unroll
      for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < DJ; ++j) acc[i][j] = fmaf(ds[i], kv[j], acc[i][j]);
    }
  }

  T* dq = static_cast<T*>(p.dq);
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    const int64_t qi = q0 + ty + i * kTY;
    if (qi >= p.Tq) continue;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = tx + j * kTX;
      if (d < p.D) dq[(hrow + qi) * p.D + d] = from_float<T>(acc[i][j] * p.scale);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// dk, dv: key-centric. ANCHOR = false: BK consecutive keys, own-segment queries. ANCHOR = true: BK
// gathered anchors, queries of other segments (split over blockIdx across `qsplit` query ranges).
constexpr int dkv_kernel_launch_bound = kThreads;
template <typename T, int DMAX, int BQ, int BK, bool ANCHOR>
__global__ void __launch_bounds__(dkv_kernel_launch_bound) dkv_kernel(const BwdParams p) {
  static_assert(BQ % kTY == 0 && BK % kTX == 0 && BK % kTY == 0 && kChunk % BQ == 0 && BK <= 64, "tiles");
  constexpr int RI = BQ / kTY, CJ = BK / kTX;  // score micro tile: queries x keys
  constexpr int KI = BK / kTY, DJ = DMAX / kTX;  // gradient micro tile: keys x head dim
  constexpr int QS = DMAX, KS = DMAX + 1;
  constexpr int SUBQ = kChunk / BQ;
  ANLLM_DYNAMIC_SHARED(float, smem);
  float* Ks = smem;            // [BK][KS]
  float* Vs = Ks + BK * KS;    // [BK][KS]
  float* Qs = Vs + BK * KS;    // [BQ][QS] pre-scaled q
  float* Os = Qs + BQ * QS;    // [BQ][QS] dout
  float* Ps = Os + BQ * QS;    // [BQ][BK]
  float* Ds = Ps + BQ * BK;    // [BQ][BK] dS

  ANLLM_SHARED(int64_t, r_pos, [BQ]);
  ANLLM_SHARED(int32_t, r_seg, [BQ]);
  ANLLM_SHARED(bool, r_valid, [BQ]);
  ANLLM_SHARED(bool, r_is_anchor, [BQ]);
  ANLLM_SHARED(float, r_lse, [BQ]);
  ANLLM_SHARED(float, r_delta, [BQ]);
  ANLLM_SHARED(int64_t, k_row, [BK]);  // key index, -1: no key
  ANLLM_SHARED(int64_t, k_pos, [BK]);
  ANLLM_SHARED(int32_t, k_seg, [BK]);
  ANLLM_SHARED(int64_t, t_c0, );
  ANLLM_SHARED(int64_t, t_c1, );
  ANLLM_SHARED(int64_t, t_kpmin, );
  ANLLM_SHARED(int32_t, t_ksmin, );
  ANLLM_SHARED(int32_t, t_ksmax, );
  ANLLM_SHARED(int, t_any, );

  const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
  int64_t item = blockIdx.x;
  const int qsplit = ANCHOR ? p.qsplit : 1;
  const int split = static_cast<int>(item % qsplit);
  item /= qsplit;
  const int64_t kt = item % p.n_ktiles;
  item /= p.n_ktiles;
  const int64_t hk = item % p.Hkv;
  const int64_t b = item / p.Hkv;
  const int64_t first = kt * BK;  // first key (own) or first anchor list entry (anchor)
  if (ANCHOR && first >= p.ka.count[b]) return;  // uniform: no anchors in this tile

  if (tid < BK) {
    int64_t j = -1, kp = 0;
    int32_t ksg = 0;
    if (!ANCHOR) {
      const int64_t jj = first + tid;
      if (jj < p.Tk && p.kl.valid[b * p.Tk + jj]) {
        j = jj;
        kp = p.kl.pos[b * p.Tk + jj];
        ksg = p.kl.seg[b * p.Tk + jj];
      }
    } else {
      const int64_t a = first + tid;
      if (a < p.ka.count[b]) {
        j = p.ka.idx[b * p.ka.cap + a];
        kp = p.ka.pos[b * p.ka.cap + a];
        ksg = p.ka.seg[b * p.ka.cap + a];
      }
    }
    k_row[tid] = j;
    k_pos[tid] = kp;
    k_seg[tid] = ksg;
  }
  __syncthreads();
  if (tid < 32) {
    bool any = false;
    int32_t smin = kI32Max, smax = kI32Min;
    int64_t pmin = kI64Max;
    for (int c = tid; c < BK; c += 32) {
      if (k_row[c] < 0) continue;
      any = true;
      smin = min(smin, k_seg[c]);
      smax = max(smax, k_seg[c]);
      pmin = min(pmin, k_pos[c]);
    }
    const unsigned any_b = __ballot_sync(kFull, any);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      smin = min(smin, __shfl_xor_sync(kFull, smin, o));
      smax = max(smax, __shfl_xor_sync(kFull, smax, o));
      pmin = min(pmin, __shfl_xor_sync(kFull, pmin, o));
    }
    if (tid == 0) {
      const int64_t nC = p.qs.nC;
      int64_t c0 = 0, c1 = 0;
      if (any_b) {
        if (!ANCHOR) {
          c0 = lower_bound_dev(p.qs.pm_seg_max + b * nC, nC, smin);
          c1 = count_le_dev(p.qs.sm_seg_min + b * nC, nC, smax);
        } else {
          const int64_t lo = lower_bound_dev(p.qs.pm_pos_max_na + b * nC, nC, pmin);
          const int64_t per = (nC - lo + qsplit - 1) / qsplit;
          c0 = lo + split * per;
          c1 = min(nC, c0 + per);
        }
      }
      t_any = any_b != 0 && c1 > c0;
      t_c0 = c0;
      t_c1 = c1;
      t_kpmin = pmin;
      t_ksmin = smin;
      t_ksmax = smax;
    }
  }
  __syncthreads();
  if (!t_any) return;  // uniform; nothing to add

  {
    const T* kg = static_cast<const T*>(p.k);
    const T* vg = static_cast<const T*>(p.v);
    const int64_t k_base = b * p.k_sb + hk * p.k_sh;
    const int64_t v_base = b * p.v_sb + hk * p.v_sh;
    for (int e = tid; e < BK * DMAX; e += kThreads) {
      const int c = e / DMAX, d = e % DMAX;
      const int64_t j = k_row[c];
      float kx = 0.f, vx = 0.f;
      if (j >= 0 && d < p.D) {
        kx = to_float(kg[k_base + j * p.k_st + d]);
        vx = to_float(vg[v_base + j * p.v_st + d]);
      }
      Ks[c * KS + d] = kx;
      Vs[c * KS + d] = vx;
    }
  }

  float gk[KI][DJ], gv[KI][DJ];
#pragma unroll
  for (int i = 0; i < KI; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) gk[i][j] = gv[i][j] = 0.f;

  const int64_t c0 = t_c0, c1 = t_c1, kpmin = t_kpmin;
  const int32_t ksmin = t_ksmin, ksmax = t_ksmax;
  const int64_t qcb = b * p.qs.nC;
  const T* q = static_cast<const T*>(p.q);

  for (int64_t h = hk * p.group; h < (hk + 1) * p.group; ++h) {
    const int64_t hrow = (b * p.Hq + h) * p.Tq;
    for (int64_t c = c0; c < c1; ++c) {
      // Chunk-level skip, uniform across the block.
      if (!ANCHOR) {
        if (!(p.qs.flags[qcb + c] & kAnyValid) || p.qs.seg_max[qcb + c] < ksmin ||
            p.qs.seg_min[qcb + c] > ksmax || p.qs.pos_max[qcb + c] < kpmin)
          continue;
      } else {
        if (!(p.qs.flags[qcb + c] & kAnyNonAnchor) || p.qs.pos_max_na[qcb + c] < kpmin) continue;
      }
      for (int sub = 0; sub < SUBQ; ++sub) {
        const int64_t q0 = c * kChunk + sub * BQ;
        if (q0 >= p.Tq) break;  // uniform
        __syncthreads();        // previous sub-tile is done with the shared buffers
        if (tid < BQ) {
          const int64_t qi = q0 + tid;
          const bool in = qi < p.Tq;
          const int64_t li = b * p.Tq + (in ? qi : 0);
          const float l = in ? p.lse[hrow + qi] : -INFINITY;
          r_valid[tid] = in && p.ql.valid[li] && l != -INFINITY;
          r_is_anchor[tid] = in && p.ql.is_anchor[li];
          r_pos[tid] = in ? p.ql.pos[li] : 0;
          r_seg[tid] = in ? p.ql.seg[li] : 0;
          r_lse[tid] = l;
          r_delta[tid] = in ? p.delta[hrow + qi] : 0.f;
        }
        __syncthreads();
        for (int e = tid; e < BQ * DMAX; e += kThreads) {
          const int r = e / DMAX, d = e % DMAX;
          float x = 0.f, g = 0.f;
          if (d < p.D && r_valid[r]) {
            const int64_t qi = q0 + r;
            x = to_float(q[b * p.q_sb + h * p.q_sh + qi * p.q_st + d]) * p.scale;
            g = load_dout<T>(p, (hrow + qi) * p.D + d);
          }
          Qs[r * QS + d] = x;
          Os[r * QS + d] = g;
        }
        __syncthreads();
        {
          float s[RI][CJ], dp[RI][CJ];
          scores_and_dp<RI, CJ, DMAX, QS, KS>(Qs, Os, Ks, Vs, ty, tx, s, dp);
#pragma unroll
          for (int i = 0; i < RI; ++i) {
            const int r = ty + i * kTY;
#pragma unroll
            for (int j = 0; j < CJ; ++j) {
              const int cc = tx + j * kTX;
              const bool ok = pair_allowed(ANCHOR, r_valid[r], r_is_anchor[r], r_pos[r], r_seg[r],
                                           k_row[cc] >= 0, k_pos[cc], k_seg[cc]);
              const float pr = ok ? __expf(s[i][j] - r_lse[r]) : 0.f;
              Ps[r * BK + cc] = pr;
              Ds[r * BK + cc] = pr * (dp[i][j] - r_delta[r]);
            }
          }
        }
        __syncthreads();
        // dv += P^T dO ; dk += dS^T (scale * q)
#pragma unroll 2
        for (int r = 0; r < BQ; ++r) {
          float pk[KI], dk[KI], ov[DJ], qv[DJ];
#pragma unroll
          for (int i = 0; i < KI; ++i) {
            pk[i] = Ps[r * BK + ty + i * kTY];
            dk[i] = Ds[r * BK + ty + i * kTY];
          }
#pragma unroll
          for (int j = 0; j < DJ; ++j) {
            ov[j] = Os[r * QS + tx + j * kTX];
            qv[j] = Qs[r * QS + tx + j * kTX];
          }
#pragma unroll
          for (int i = 0; i < KI; ++i)
#pragma unroll
            for (int j = 0; j < DJ; ++j) {
              gv[i][j] = fmaf(pk[i], ov[j], gv[i][j]);
              gk[i][j] = fmaf(dk[i], qv[j], gk[i][j]);
            }
        }
      }
    }
  }

  // Write back (k_row is not modified after the first barrier).
#pragma unroll
  for (int i = 0; i < KI; ++i) {
    const int64_t j = k_row[ty + i * kTY];
    if (j < 0) continue;
    float* dkr = p.dk + ((b * p.Hkv + hk) * p.Tk + j) * p.D;
    float* dvr = p.dv + ((b * p.Hkv + hk) * p.Tk + j) * p.D;
#pragma unroll
    for (int jj = 0; jj < DJ; ++jj) {
      const int d = tx + jj * kTX;
      if (d >= p.D) continue;
      if (ANCHOR) {
        atomicAdd(dkr + d, gk[i][jj]);
        atomicAdd(dvr + d, gv[i][jj]);
      } else {
        dkr[d] += gk[i][jj];
        dvr[d] += gv[i][jj];
      }
    }
  }
}

template <typename T, int DMAX>
void launch_bwd(BwdParams p, const at::Tensor& q) {
  auto stream = at::cuda::getCurrentCUDAStream();
  bool dq_done = false;
  if constexpr (!std::is_same_v<T, float>) {
    if (!p.dout_f32) {  // tensor cores (an fp32 dout stays fp32: dq_kernel below)
      using W = WmmaDqTraits<DMAX>;
      p.n_qtiles = (p.Tq + W::BQ - 1) / W::BQ;
      const int64_t blocks = p.B * p.Hq * p.n_qtiles;
      ANLLM_CHECK(blocks < std::numeric_limits<int32_t>::max(), "problem too large for one grid");
      const size_t smem = WmmaDqSmem<DMAX, W::BQ, W::BK>::bytes;
      auto dq_wmma = ANLLM_KERNEL(dq_wmma_kernel, T, DMAX, W::BQ, W::BK, W::WM);
      allow_smem(dq_wmma, smem);
      ANLLM_LAUNCH(dq_wmma, static_cast<unsigned>(blocks), kThreads, smem, stream)(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dq_done = true;
    }
  }
  if (!dq_done) {
    constexpr int BQ = DqTraits<DMAX>::BQ, BK = DqTraits<DMAX>::BK;
    p.n_qtiles = (p.Tq + BQ - 1) / BQ;
    const int64_t blocks = p.B * p.Hq * p.n_qtiles;
    ANLLM_CHECK(blocks < std::numeric_limits<int32_t>::max(), "problem too large for one grid");
    const size_t smem = sizeof(float) * (2 * BQ * (DMAX + 1) + 2 * BK * (DMAX + 1) + BQ * BK);
    auto kernel = ANLLM_KERNEL(dq_kernel, T, DMAX, BQ, BK);
    allow_smem(kernel, smem);
    ANLLM_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, smem, stream)(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  {
    constexpr int BQ = DkvTraits<DMAX>::BQ, BK = DkvTraits<DMAX>::BK;
    p.n_ktiles = (p.Tk + BK - 1) / BK;
    const size_t smem = sizeof(float) * (2 * BK * (DMAX + 1) + 2 * BQ * DMAX + 2 * BQ * BK);
    const int64_t blocks = p.B * p.Hkv * p.n_ktiles;
    // Anchor tiles: split the query range so that each block walks ~8 query chunks.
    p.qsplit = static_cast<int>(std::min<int64_t>(32, std::max<int64_t>(1, p.qs.nC / 8)));
    // With qsplit > 1 several blocks add into an anchor's dk/dv rows with float atomicAdd in no fixed
    // order: the low bits vary from run to run.
    if (p.qsplit > 1)
      at::globalContext().alertNotDeterministic(
          "anllm::anchor_attention_bwd on CUDA with more than 1024 queries (the key/value gradients of anchor "
          "keys are summed with atomicAdd across query splits)");
    ANLLM_CHECK(blocks * p.qsplit < std::numeric_limits<int32_t>::max(), "problem too large for one grid");
    auto own = ANLLM_KERNEL(dkv_kernel, T, DMAX, BQ, BK, false);
    allow_smem(own, smem);
    ANLLM_LAUNCH(own, static_cast<unsigned>(blocks), kThreads, smem, stream)(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto anc = ANLLM_KERNEL(dkv_kernel, T, DMAX, BQ, BK, true);
    allow_smem(anc, smem);
    ANLLM_LAUNCH(anc, static_cast<unsigned>(blocks * p.qsplit), kThreads, smem, stream)(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_bwd_dim(const BwdParams& p, const at::Tensor& q) {
  switch (padded_head_dim(p.D)) {
    case 64: return launch_bwd<T, 64>(p, q);
    case 128: return launch_bwd<T, 128>(p, q);
    default: return launch_bwd<T, 256>(p, q);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> anchor_attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse_in, const at::Tensor& delta_in, const at::Tensor& q_pos,
    const at::Tensor& q_seg, const at::Tensor& q_is_anchor, const at::Tensor& q_valid,
    const at::Tensor& k_pos, const at::Tensor& k_seg, const at::Tensor& k_is_anchor,
    const at::Tensor& k_valid, double scale) {
  const LayoutTensors ql{q_pos.contiguous(), q_seg.contiguous(), q_is_anchor.contiguous(), q_valid.contiguous()};
  const LayoutTensors kl{k_pos.contiguous(), k_seg.contiguous(), k_is_anchor.contiguous(), k_valid.contiguous()};
  const AttentionShape s = check_attention_inputs(q, k, v, ql, kl);
  ANLLM_CHECK(on_kernel_device(q), "q must be a CUDA tensor");
  // Validation first (host only), so mixed-device inputs get the clear error, then the guard.
  c10::cuda::OptionalCUDAGuard guard(q.device());
  ANLLM_CHECK_SHAPE(dout_in, s.B, s.Hq, s.Tq, s.D);
  ANLLM_CHECK_SHAPE(lse_in, s.B, s.Hq, s.Tq);
  ANLLM_CHECK_SHAPE(delta_in, s.B, s.Hq, s.Tq);
  ANLLM_CHECK_DTYPE(lse_in, at::kFloat);
  ANLLM_CHECK_DTYPE(delta_in, at::kFloat);
  ANLLM_CHECK_SAME_DEVICE(dout_in, q);
  ANLLM_CHECK_SAME_DEVICE(lse_in, q);
  ANLLM_CHECK_SAME_DEVICE(delta_in, q);
  // Like the CPU kernel, any floating dout is accepted: fp32 is read as fp32, others in the dtype of q.
  const bool dout_f32 = dout_in.scalar_type() == at::kFloat;
  const at::Tensor dout = (dout_f32 ? dout_in : dout_in.to(q.scalar_type())).contiguous();
  const at::Tensor lse = lse_in.contiguous(), delta = delta_in.contiguous();

  auto dq = at::empty({s.B, s.Hq, s.Tq, s.D}, q.options());
  auto dk32 = at::zeros({s.B, s.Hkv, s.Tk, s.D}, q.options().dtype(at::kFloat));
  auto dv32 = at::zeros({s.B, s.Hkv, s.Tk, s.D}, q.options().dtype(at::kFloat));
  auto finish = [&]() {
    return std::make_tuple(dq, dk32.to(q.scalar_type()), dv32.to(q.scalar_type()));
  };
  if (s.B == 0 || s.Hq == 0 || s.Tq == 0) return finish();
  if (s.Tk == 0) {
    dq.zero_();
    return finish();
  }
  SideIndex kside, qside;
  AnchorIndex anchors;
  build_side_index(kl, kside, &anchors);
  build_side_index(ql, qside, nullptr);

  BwdParams p{};
  set_attention_params(p, q, k, v, ql, kl, s, kside, anchors, scale);
  p.dout = dout.data_ptr();
  p.dout_f32 = dout_f32;
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk32.data_ptr<float>();
  p.dv = dv32.data_ptr<float>();
  p.qs = qside.view();
  switch (q.scalar_type()) {
    case at::kFloat: launch_bwd_dim<float>(p, q); break;
    case at::kHalf: launch_bwd_dim<at::Half>(p, q); break;
    case at::kBFloat16: launch_bwd_dim<at::BFloat16>(p, q); break;
    default: ANLLM_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(anllm, CUDA, m) { m.impl("anchor_attention_bwd", &anchor_attention_bwd_cuda); }

}  // namespace cuda
}  // namespace anllm
