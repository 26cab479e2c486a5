// Anchor attention backward, dq on tensor cores, for bf16 and fp16 inputs with a dout of the same dtype
// (included by anchor_attention_bwd.cu; an fp32 dout is read as fp32 by dq_kernel instead: rounding it
// for the tensor cores would lose what the CPU kernel keeps).
//
// The same visit as dq_kernel (the query tile's own-segment key chunks, then its gathered earlier
// anchors; the exact pair predicate; recomputation of P from the forward's log-sum-exp), with the three
// products on tensor cores through shared memory (WMMA, see fwd_wmma.cuh for why):
//   S = Q K^T and dP = dout V^T   (bf16/fp16 in, fp32 out; the scale, the mask, P = exp(scale S - lse)
//                                  and dS = P (dP - delta) in fp32),
//   dQ += dS K                    (dS rounded to the input dtype; dQ accumulated in fp32 fragments: no
//                                  per-row rescaling is needed, so the accumulators stay in registers
//                                  across tiles and are only stored, through shared memory, at the end).
// dk/dv keep dkv_kernel (CUDA cores, fp32).
#pragma once

#include "bwd_params.cuh"
#include "wmma.cuh"

namespace anllm {
namespace cuda {

template <int DMAX>
struct WmmaDqTraits;
template <> struct WmmaDqTraits<64> { static constexpr int BQ = 64, BK = 64, WM = 4; };
template <> struct WmmaDqTraits<128> { static constexpr int BQ = 64, BK = 64, WM = 4; };
template <> struct WmmaDqTraits<256> { static constexpr int BQ = 32, BK = 64, WM = 2; };

// Dynamic shared memory of dq_wmma_kernel (byte offsets, 128-byte aligned; leading dimensions multiples of
// 16 bytes). The fp32 dQ staging at the end reuses the K and V buffers.
template <int DMAX, int BQ, int BK>
struct WmmaDqSmem {
  static constexpr int LDT = DMAX + 8, LDS = BK + 4, LDP = BK + 8, LDO = DMAX + 4;
  static constexpr size_t up(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t q = 0;
  static constexpr size_t g = q + up(size_t(BQ) * LDT * 2);   // dout
  static constexpr size_t k = g + up(size_t(BQ) * LDT * 2);
  static constexpr size_t v = k + up(size_t(BK) * LDT * 2);
  static constexpr size_t s = v + up(size_t(BK) * LDT * 2);   // S, fp32
  static constexpr size_t dp = s + up(size_t(BQ) * LDS * 4);  // dP, fp32
  static constexpr size_t ds = dp + up(size_t(BQ) * LDS * 4); // dS, input dtype
  static constexpr size_t bytes = ds + up(size_t(BQ) * LDP * 2);
  static_assert(size_t(BQ) * LDO * 4 <= s - k, "the dQ staging fits the K and V buffers");
};

constexpr int dq_wmma_kernel_launch_bound = kThreads;
template <typename T, int DMAX, int BQ, int BK, int WM>
__global__ void __launch_bounds__(dq_wmma_kernel_launch_bound) dq_wmma_kernel(const BwdParams p) {
  using namespace nvcuda;
  using E = typename WmmaElem<T>::type;
  using Smem = WmmaDqSmem<DMAX, BQ, BK>;
  constexpr int NWARPS = kThreads / 32, WN = NWARPS / WM;
  constexpr int LDT = Smem::LDT, LDS = Smem::LDS, LDP = Smem::LDP, LDO = Smem::LDO;
  constexpr int SUB = kChunk / BK;
  constexpr int OCOLS = DMAX / WN, NF = OCOLS / 16;  // a warp's dQ columns and accumulator fragments
  static_assert(sizeof(T) == 2 && sizeof(E) == 2, "16-bit inputs");
  static_assert(BQ == 16 * WM && NWARPS % WM == 0 && BK % (16 * WN) == 0 && DMAX % (16 * WN) == 0, "warp tiles");
  static_assert(BQ <= 64 && BK <= 64 && kChunk % BK == 0, "tiles");
  // (its own name: under nvcc every extern __shared__ array of a translation unit is one entity)
  ANLLM_DYNAMIC_SHARED_ALIGN(128, unsigned char, dq_wmma_smem);
  unsigned char* smem = dq_wmma_smem;
  T* Qs = reinterpret_cast<T*>(smem + Smem::q);
  T* Gs = reinterpret_cast<T*>(smem + Smem::g);
  T* Ks = reinterpret_cast<T*>(smem + Smem::k);
  T* Vs = reinterpret_cast<T*>(smem + Smem::v);
  float* Ss = reinterpret_cast<float*>(smem + Smem::s);
  float* Ps = reinterpret_cast<float*>(smem + Smem::dp);
  T* Ds = reinterpret_cast<T*>(smem + Smem::ds);
  float* Qout = reinterpret_cast<float*>(smem + Smem::k);  // after the last tile

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

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / WN, wn = warp % WN;
  const int64_t qt = blockIdx.x % p.n_qtiles;
  const int64_t h = (blockIdx.x / p.n_qtiles) % p.Hq;
  const int64_t b = blockIdx.x / (p.n_qtiles * p.Hq);
  const int64_t hk = h / p.group;
  const int64_t q0 = qt * BQ;
  const int64_t hrow = (b * p.Hq + h) * p.Tq;  // row index of query 0 of this head
  const int d16 = (p.D + 15) / 16 * 16;       // head-dim columns that can be non-zero, whole 16-blocks

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
    const T* g = static_cast<const T*>(p.dout);
    const T zero = from_float<T>(0.f);
    for (int e = tid; e < BQ * DMAX; e += kThreads) {
      const int r = e / DMAX, d = e % DMAX;
      T x = zero, y = zero;
      if (d < p.D && r_valid[r]) {
        const int64_t qi = q0 + r;
        x = q[b * p.q_sb + h * p.q_sh + qi * p.q_st + d];
        y = g[(hrow + qi) * p.D + d];
      }
      Qs[r * LDT + d] = x;
      Gs[r * LDT + d] = y;
    }
  }
  if (tid < 32) plan_query_tile<BQ, BK>(tid, b, SUB, r_valid, r_is_anchor, r_seg, r_pos, p.ks, p.ka, plan);
  __syncthreads();

  const int64_t n_own = plan.n_own, n_tiles = n_own + plan.n_anc;
  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);
  const int64_t k_base = b * p.k_sb + hk * p.k_sh;
  const int64_t v_base = b * p.v_sb + hk * p.v_sh;
  const E* Qe = reinterpret_cast<const E*>(Qs);
  const E* Ge = reinterpret_cast<const E*>(Gs);
  const E* Ke = reinterpret_cast<const E*>(Ks);
  const E* Ve = reinterpret_cast<const E*>(Vs);
  const E* De = reinterpret_cast<const E*>(Ds);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);

  for (int64_t t = 0; t < n_tiles; ++t) {
    const bool own = t < n_own;
    int64_t key0, a0;
    if (!key_tile_start<BK>(p.ks, b, plan, SUB, t, key0, a0)) continue;  // uniform across the block
    __syncthreads();
    if (tid < BK) load_key_slot(p.kl, p.ka, b, p.Tk, own, key0, a0, plan.n_av, tid, k_row, k_pos, k_seg);
    __syncthreads();
    {
      const T zero = from_float<T>(0.f);
      for (int e = tid; e < BK * DMAX; e += kThreads) {
        const int c = e / DMAX, d = e % DMAX;
        const int64_t j = k_row[c];
        T kx = zero, vx = zero;
        if (j >= 0 && d < p.D) {
          kx = kg[k_base + j * p.k_st + d];
          vx = vg[v_base + j * p.v_st + d];
        }
        Ks[c * LDT + d] = kx;
        Vs[c * LDT + d] = vx;
      }
    }
    __syncthreads();

    // S = Q K^T and dP = dout V^T: warp (wm, wn) computes rows [16 wm, 16 wm + 16) x its BK / WN keys.
    for (int nb = wn * (BK / WN); nb < (wn + 1) * (BK / WN); nb += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s, dp;
      wmma::fill_fragment(s, 0.f);
      wmma::fill_fragment(dp, 0.f);
      for (int kk = 0; kk < d16; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> fb;  // K^T, V^T
        wmma::load_matrix_sync(fa, Qe + (16 * wm) * LDT + kk, LDT);
        wmma::load_matrix_sync(fb, Ke + nb * LDT + kk, LDT);
        wmma::mma_sync(s, fa, fb, s);
        wmma::load_matrix_sync(fa, Ge + (16 * wm) * LDT + kk, LDT);
        wmma::load_matrix_sync(fb, Ve + nb * LDT + kk, LDT);
        wmma::mma_sync(dp, fa, fb, dp);
      }
      wmma::store_matrix_sync(Ss + (16 * wm) * LDS + nb, s, LDS, wmma::mem_row_major);
      wmma::store_matrix_sync(Ps + (16 * wm) * LDS + nb, dp, LDS, wmma::mem_row_major);
    }
    __syncthreads();

    // dS = P (dP - delta) with P = exp(scale S - lse) on the visible pairs, 0 elsewhere (fp32).
    for (int e = tid; e < BQ * BK; e += kThreads) {
      const int r = e / BK, c = e % BK;
      const bool ok = pair_allowed(!own, r_valid[r], r_is_anchor[r], r_pos[r], r_seg[r], k_row[c] >= 0, k_pos[c],
                                   k_seg[c]);
      const float pr = ok ? __expf(Ss[r * LDS + c] * p.scale - r_lse[r]) : 0.f;
      Ds[r * LDP + c] = from_float<T>(pr * (Ps[r * LDS + c] - r_delta[r]));
    }
    __syncthreads();

    // dQ += dS K: warp (wm, wn) owns rows [16 wm, 16 wm + 16) x its DMAX / WN head-dim columns.
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int nd = wn * OCOLS + 16 * f;
      if (nd >= d16) continue;  // uniform: those columns stay zero
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, De + (16 * wm) * LDP + kk, LDP);
        wmma::load_matrix_sync(fb, Ke + kk * LDT + nd, LDT);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }
  __syncthreads();  // every warp is done with Ks / Vs: they become the dQ staging

#pragma unroll
  for (int f = 0; f < NF; ++f) {
    const int nd = wn * OCOLS + 16 * f;
    wmma::store_matrix_sync(Qout + (16 * wm) * LDO + nd, acc[f], LDO, wmma::mem_row_major);
  }
  __syncthreads();
  T* dq = static_cast<T*>(p.dq);
  for (int e = tid; e < BQ * DMAX; e += kThreads) {
    const int r = e / DMAX, d = e % DMAX;
    const int64_t qi = q0 + r;
    if (qi < p.Tq && d < p.D) dq[(hrow + qi) * p.D + d] = from_float<T>(Qout[r * LDO + d] * p.scale);
  }
}

}  // namespace cuda
}  // namespace anllm
