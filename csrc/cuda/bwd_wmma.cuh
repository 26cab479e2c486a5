// Anchor attention backward on tensor cores, for bf16 and fp16 inputs with a dout of the same dtype
// (included by anchor_attention_bwd.cu; an fp32 dout is read as fp32 by dq_kernel and dkv_kernel
// instead: rounding it for the tensor cores would lose what the CPU kernel keeps).
//
// dq_wmma_kernel: the same visit as dq_kernel (the query tile's own-segment key chunks, then its
// gathered earlier anchors; the exact pair predicate; recomputation of P from the forward's log-sum-exp),
// with the three products on tensor cores through shared memory (WMMA, see fwd_wmma.cuh for why):
//   S = Q K^T and dP = dout V^T   (bf16/fp16 in, fp32 out; the scale, the mask, P = exp(scale S - lse)
//                                  and dS = P (dP - delta) in fp32),
//   dQ += dS K                    (dS rounded to the input dtype; dQ accumulated in fp32 fragments: no
//                                  per-row rescaling is needed, so the accumulators stay in registers
//                                  across tiles and are only stored, through shared memory, at the end).
//
// dkv_wmma_kernel<own> / <anchor>: the same visit as dkv_kernel (a block owns BK consecutive keys, or BK
// gathered anchors and one query split; it walks the query tiles of the query index's candidate chunks
// for every query head of the group), with S = Q K^T and dP = dout V^T as above (P and dS in fp32 on
// every pair, then rounded to the input dtype, as flash attention does) and
//   dV += P^T dout, dK += dS^T Q  (fp32 accumulator fragments in registers across all query tiles;
//                                  dK times the scale at the end), added into the fp32 dk/dv rows
//                                  through shared memory: read-add-write (own) or atomicAdd (anchor).
#pragma once

#include <type_traits>

#include "bwd_params.cuh"
#include "tiles.cuh"
#include "wmma.cuh"

namespace anllm {
namespace cuda {

// Dynamic shared memory of dq_wmma_kernel (byte offsets; layout rules: WmmaSmemLayout). The fp32 dQ
// staging at the end reuses the K and V buffers.
template <int DMAX, int BQ, int BK>
struct WmmaDqSmem : WmmaSmemLayout<DMAX, BK> {
  using L = WmmaSmemLayout<DMAX, BK>;
  static constexpr size_t q = 0;
  static constexpr size_t g = q + L::up(size_t(BQ) * L::LDT * 2);    // dout
  static constexpr size_t k = g + L::up(size_t(BQ) * L::LDT * 2);
  static constexpr size_t v = k + L::up(size_t(BK) * L::LDT * 2);
  static constexpr size_t s = v + L::up(size_t(BK) * L::LDT * 2);    // S, fp32
  static constexpr size_t dp = s + L::up(size_t(BQ) * L::LDS * 4);   // dP, fp32
  static constexpr size_t ds = dp + L::up(size_t(BQ) * L::LDS * 4);  // dS, input dtype
  static constexpr size_t bytes = ds + L::up(size_t(BQ) * L::LDP * 2);
  static_assert(size_t(BQ) * L::LDO * 4 <= s - k, "the dQ staging fits the K and V buffers");
};

// One 16 x 16 block of S = Q K^T and dP = dout V^T (rows mb.., keys nb..) on tensor cores, by one warp:
// from the input-dtype tiles Qe/Ge ([rows][LDT]) and Ke/Ve ([keys][LDT], read as K^T / V^T) over the
// head-dim columns [0, d16), stored as fp32 into Ss and dPs ([rows][LDS]).
template <typename E, int LDT, int LDS>
__device__ __forceinline__ void wmma_scores_and_dp(const E* Qe, const E* Ge, const E* Ke, const E* Ve, int mb, int nb,
                                                   int d16, float* Ss, float* dPs) {
  using namespace nvcuda;
  WmmaAcc s, dp;
  wmma::fill_fragment(s, 0.f);
  wmma::fill_fragment(dp, 0.f);
  for (int kk = 0; kk < d16; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> fb;  // K^T, V^T
    wmma::load_matrix_sync(fa, Qe + mb * LDT + kk, LDT);
    wmma::load_matrix_sync(fb, Ke + nb * LDT + kk, LDT);
    wmma::mma_sync(s, fa, fb, s);
    wmma::load_matrix_sync(fa, Ge + mb * LDT + kk, LDT);
    wmma::load_matrix_sync(fb, Ve + nb * LDT + kk, LDT);
    wmma::mma_sync(dp, fa, fb, dp);
  }
  wmma::store_matrix_sync(Ss + mb * LDS + nb, s, LDS, wmma::mem_row_major);
  wmma::store_matrix_sync(dPs + mb * LDS + nb, dp, LDS, wmma::mem_row_major);
}

// dS = P (dP - delta) with P = exp(scale S - lse) on the pairs the tile allows, 0 elsewhere, in fp32 from
// Ss and dPs ([BQ][LDS]); dS to Ds and, with STORE_P, P to Ps, both rounded to the input dtype
// ([BQ][LDP]). All threads of the block.
template <typename T, int BQ, int BK, int LDS, int LDP, bool STORE_P>
__device__ __forceinline__ void wmma_probs_and_ds(const BwdParams& p, int tid, const PairTile& tile, bool anchor_tile,
                                                  const float* Ss, const float* dPs, const float* r_lse,
                                                  const float* r_delta, T* Ps, T* Ds) {
  for (int e = tid; e < BQ * BK; e += kThreads) {
    const int r = e / BK, c = e % BK;
    const float pr = tile.allowed(anchor_tile, r, c) ? __expf(Ss[r * LDS + c] * p.scale - r_lse[r]) : 0.f;
    if constexpr (STORE_P) Ps[r * LDP + c] = from_float<T>(pr);
    Ds[r * LDP + c] = from_float<T>(pr * (dPs[r * LDS + c] - r_delta[r]));
  }
}

// acc[f] += A B for one warp's 16 output rows from m0 and its NF 16-column blocks from column n0 (blocks at
// or past d16 are skipped: their columns stay zero), over k in [0, NK): A(m, k) is A[m * LDA + k]
// (ALayout row_major) or A[m + k * LDA] (col_major: the transpose of a row-major [k][m] tile), B(k, n) is
// B[k * LDB + n]; input-dtype tiles in shared memory, fp32 accumulator fragments. With TWO, acc2 += A2 B2
// (same layouts) in the same loop; else A2, B2 and acc2 are not touched.
template <typename ALayout, int NF, int NK, int LDA, int LDB, bool TWO, typename E>
__device__ __forceinline__ void wmma_accumulate_impl(const E* A, const E* B, WmmaAcc (&acc)[NF], const E* A2,
                                                     const E* B2, WmmaAcc (&acc2)[NF], int m0, int n0, int d16) {
  using namespace nvcuda;
  const int a_off = std::is_same_v<ALayout, wmma::row_major> ? m0 * LDA : m0;  // + kk or kk * LDA
  const int a_kk = std::is_same_v<ALayout, wmma::row_major> ? 1 : LDA;
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    const int nd = n0 + 16 * f;
    if (nd >= d16) continue;  // uniform across the warp
    for (int kk = 0; kk < NK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, ALayout> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, A + a_off + kk * a_kk, LDA);
      wmma::load_matrix_sync(fb, B + kk * LDB + nd, LDB);
      wmma::mma_sync(acc[f], fa, fb, acc[f]);
      if constexpr (TWO) {
        wmma::load_matrix_sync(fa, A2 + a_off + kk * a_kk, LDA);
        wmma::load_matrix_sync(fb, B2 + kk * LDB + nd, LDB);
        wmma::mma_sync(acc2[f], fa, fb, acc2[f]);
      }
    }
  }
}

// One product (see wmma_accumulate_impl).
template <typename ALayout, int NF, int NK, int LDA, int LDB, typename E>
__device__ __forceinline__ void wmma_accumulate(const E* A, const E* B, WmmaAcc (&acc)[NF], int m0, int n0, int d16) {
  wmma_accumulate_impl<ALayout, NF, NK, LDA, LDB, false>(A, B, acc, A, B, acc, m0, n0, d16);
}

// Two products with the same layouts in one loop (see wmma_accumulate_impl).
template <typename ALayout, int NF, int NK, int LDA, int LDB, typename E>
__device__ __forceinline__ void wmma_accumulate2(const E* A, const E* B, WmmaAcc (&acc)[NF], const E* A2, const E* B2,
                                                 WmmaAcc (&acc2)[NF], int m0, int n0, int d16) {
  wmma_accumulate_impl<ALayout, NF, NK, LDA, LDB, true>(A, B, acc, A2, B2, acc2, m0, n0, d16);
}

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
  float* dPs = reinterpret_cast<float*>(smem + Smem::dp);
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
  const BwdQueryBlock blk = bwd_query_block<BQ>(p);
  const int64_t b = blk.b, h = blk.h, hk = blk.hk, q0 = blk.q0, hrow = blk.hrow;
  const int d16 = (p.D + 15) / 16 * 16;       // head-dim columns that can be non-zero, whole 16-blocks

  const PairTile tile{r_valid, r_is_anchor, r_pos, r_seg, k_row, k_pos, k_seg};

  if (tid < BQ) bwd_load_row(p, b, hrow, q0, tid, tile, r_lse, r_delta);
  __syncthreads();
  bwd_stage_queries<T, T, BQ, DMAX, LDT>(p, b, h, hrow, q0, tid, r_valid, Qs, Gs);
  if (tid < 32) plan_query_tile<BQ, BK>(tid, b, SUB, r_valid, r_is_anchor, r_seg, r_pos, p.ks, p.ka, plan);
  __syncthreads();

  const int64_t n_own = plan.n_own, n_tiles = n_own + plan.n_anc;
  const E* Qe = reinterpret_cast<const E*>(Qs);
  const E* Ge = reinterpret_cast<const E*>(Gs);
  const E* Ke = reinterpret_cast<const E*>(Ks);
  const E* Ve = reinterpret_cast<const E*>(Vs);
  const E* De = reinterpret_cast<const E*>(Ds);

  WmmaAcc acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);

  for (int64_t t = 0; t < n_tiles; ++t) {
    const bool own = t < n_own;
    if (!enter_key_tile<BK>(p, b, plan, SUB, t, tid, tile)) continue;  // uniform across the block
    stage_keys_values<T, T, BK, DMAX, LDT, LDT>(p, b, hk, k_row, tid, Ks, Vs);
    __syncthreads();

    // S = Q K^T and dP = dout V^T: warp (wm, wn) computes rows [16 wm, 16 wm + 16) x its BK / WN keys.
    for (int nb = wn * (BK / WN); nb < (wn + 1) * (BK / WN); nb += 16)
      wmma_scores_and_dp<E, LDT, LDS>(Qe, Ge, Ke, Ve, 16 * wm, nb, d16, Ss, dPs);
    __syncthreads();

    // dS = P (dP - delta) with P = exp(scale S - lse) on the visible pairs, 0 elsewhere (fp32).
    wmma_probs_and_ds<T, BQ, BK, LDS, LDP, false>(p, tid, tile, !own, Ss, dPs, r_lse, r_delta, nullptr, Ds);
    __syncthreads();

    // dQ += dS K: warp (wm, wn) owns rows [16 wm, 16 wm + 16) x its DMAX / WN head-dim columns.
    wmma_accumulate<wmma::row_major, NF, BK, LDP, LDT>(De, Ke, acc, 16 * wm, wn * OCOLS, d16);
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

// Tiles of dkv_wmma_kernel per padded head dim: BK = 16 * WM keys (warp wm owns keys [16 wm, 16 wm + 16)
// of dK and dV; WN = 4 / WM warps split the head dim), BQ queries per visited tile (kChunk % BQ == 0).
// Each warp holds 2 NF accumulator fragments of 8 fp32 registers per lane (NF = DMAX / (16 WN)): 128
// registers for head dims 128 and 256, as flash attention's backward holds for its dK and dV.
template <int DMAX>
struct WmmaDkvTraits;
template <> struct WmmaDkvTraits<64> { static constexpr int BQ = 64, BK = 64, WM = 4; };
template <> struct WmmaDkvTraits<128> { static constexpr int BQ = 64, BK = 64, WM = 4; };
template <> struct WmmaDkvTraits<256> { static constexpr int BQ = 32, BK = 32, WM = 2; };

// Dynamic shared memory of dkv_wmma_kernel (byte offsets; layout rules: WmmaSmemLayout). The fp32 dK / dV
// staging at the end reuses the Q and dout buffers.
template <int DMAX, int BQ, int BK>
struct WmmaDkvSmem : WmmaSmemLayout<DMAX, BK> {
  using L = WmmaSmemLayout<DMAX, BK>;
  static constexpr size_t k = 0;
  static constexpr size_t v = k + L::up(size_t(BK) * L::LDT * 2);
  static constexpr size_t q = v + L::up(size_t(BK) * L::LDT * 2);
  static constexpr size_t g = q + L::up(size_t(BQ) * L::LDT * 2);    // dout
  static constexpr size_t s = g + L::up(size_t(BQ) * L::LDT * 2);    // S, fp32 [BQ][LDS]
  static constexpr size_t dp = s + L::up(size_t(BQ) * L::LDS * 4);   // dP, fp32 [BQ][LDS]
  static constexpr size_t p = dp + L::up(size_t(BQ) * L::LDS * 4);   // P, input dtype [BQ][LDP]
  static constexpr size_t ds = p + L::up(size_t(BQ) * L::LDP * 2);   // dS, input dtype [BQ][LDP]
  static constexpr size_t bytes = ds + L::up(size_t(BQ) * L::LDP * 2);
  static_assert(size_t(BK) * L::LDO * 4 <= s - q, "the dK / dV staging fits the Q and dout buffers");
};

constexpr int dkv_wmma_kernel_launch_bound = kThreads;
template <typename T, int DMAX, int BQ, int BK, int WM, bool ANCHOR>
__global__ void __launch_bounds__(dkv_wmma_kernel_launch_bound) dkv_wmma_kernel(const BwdParams p) {
  using namespace nvcuda;
  using E = typename WmmaElem<T>::type;
  using Smem = WmmaDkvSmem<DMAX, BQ, BK>;
  constexpr int NWARPS = kThreads / 32, WN = NWARPS / WM;
  constexpr int LDT = Smem::LDT, LDS = Smem::LDS, LDP = Smem::LDP, LDO = Smem::LDO;
  constexpr int OCOLS = DMAX / WN, NF = OCOLS / 16;  // a warp's dK / dV columns and fragments of each
  static_assert(sizeof(T) == 2 && sizeof(E) == 2, "16-bit inputs");
  static_assert(BK == 16 * WM && NWARPS % WM == 0 && DMAX % (16 * WN) == 0, "warp tiles");
  static_assert(BQ % 16 == 0 && BQ <= 64 && BK <= 64 && kChunk % BQ == 0, "tiles");
  // (its own name: under nvcc every extern __shared__ array of a translation unit is one entity)
  ANLLM_DYNAMIC_SHARED_ALIGN(128, unsigned char, dkv_wmma_smem);
  unsigned char* smem = dkv_wmma_smem;
  T* Ks = reinterpret_cast<T*>(smem + Smem::k);
  T* Vs = reinterpret_cast<T*>(smem + Smem::v);
  T* Qs = reinterpret_cast<T*>(smem + Smem::q);
  T* Gs = reinterpret_cast<T*>(smem + Smem::g);
  float* Ss = reinterpret_cast<float*>(smem + Smem::s);
  float* dPs = reinterpret_cast<float*>(smem + Smem::dp);
  T* Pt = reinterpret_cast<T*>(smem + Smem::p);
  T* Dt = reinterpret_cast<T*>(smem + Smem::ds);
  float* Stage = reinterpret_cast<float*>(smem + Smem::q);  // after the last query tile

  ANLLM_SHARED(int64_t, r_pos, [BQ]);
  ANLLM_SHARED(int32_t, r_seg, [BQ]);
  ANLLM_SHARED(bool, r_valid, [BQ]);
  ANLLM_SHARED(bool, r_is_anchor, [BQ]);
  ANLLM_SHARED(float, r_lse, [BQ]);
  ANLLM_SHARED(float, r_delta, [BQ]);
  ANLLM_SHARED(int64_t, k_row, [BK]);  // key index, -1: no key
  ANLLM_SHARED(int64_t, k_pos, [BK]);
  ANLLM_SHARED(int32_t, k_seg, [BK]);
  ANLLM_SHARED(KeyTilePlan, kplan, );

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / WN, wn = warp % WN;
  const BwdKeyBlock blk = bwd_key_block<BK, ANCHOR>(p);
  const int64_t b = blk.b, hk = blk.hk;
  if (ANCHOR && blk.first >= p.ka.count[b]) return;  // uniform: no anchors in this tile

  const PairTile tile{r_valid, r_is_anchor, r_pos, r_seg, k_row, k_pos, k_seg};
  const int d16 = (p.D + 15) / 16 * 16;  // head-dim columns that can be non-zero, whole 16-blocks

  if (tid < BK)
    load_key_slot(p.kl, p.ka, b, p.Tk, !ANCHOR, blk.first, blk.first, p.ka.count[b], tid, k_row, k_pos, k_seg);
  __syncthreads();
  if (tid < 32) plan_key_tile<BK, ANCHOR>(tid, p, blk, tile, kplan);
  __syncthreads();
  if (!kplan.any) return;  // uniform; nothing to add

  stage_keys_values<T, T, BK, DMAX, LDT, LDT>(p, b, hk, k_row, tid, Ks, Vs);

  const E* Qe = reinterpret_cast<const E*>(Qs);
  const E* Ge = reinterpret_cast<const E*>(Gs);
  const E* Ke = reinterpret_cast<const E*>(Ks);
  const E* Ve = reinterpret_cast<const E*>(Vs);
  const E* Pe = reinterpret_cast<const E*>(Pt);
  const E* De = reinterpret_cast<const E*>(Dt);

  WmmaAcc dk_acc[NF], dv_acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    wmma::fill_fragment(dk_acc[f], 0.f);
    wmma::fill_fragment(dv_acc[f], 0.f);
  }

  for_key_tile_queries<BQ, ANCHOR>(p, blk, kplan, [&](int64_t h, int64_t hrow, int64_t q0) {
    __syncthreads();  // the previous query tile is done with the shared buffers (and the K/V staging done)
    if (tid < BQ) bwd_load_row(p, b, hrow, q0, tid, tile, r_lse, r_delta);
    __syncthreads();
    bwd_stage_queries<T, T, BQ, DMAX, LDT>(p, b, h, hrow, q0, tid, r_valid, Qs, Gs);
    __syncthreads();

    // S = Q K^T and dP = dout V^T, [BQ][BK] in 16 x 16 blocks spread over the warps.
    for (int blk16 = warp; blk16 < (BQ / 16) * (BK / 16); blk16 += NWARPS)
      wmma_scores_and_dp<E, LDT, LDS>(Qe, Ge, Ke, Ve, blk16 / (BK / 16) * 16, blk16 % (BK / 16) * 16, d16, Ss, dPs);
    __syncthreads();

    // P = exp(scale S - lse) on the visible pairs, 0 elsewhere, and dS = P (dP - delta), in fp32; both
    // rounded to the input dtype for the tensor cores.
    wmma_probs_and_ds<T, BQ, BK, LDS, LDP, true>(p, tid, tile, ANCHOR, Ss, dPs, r_lse, r_delta, Pt, Dt);
    __syncthreads();

    // dV += P^T dout and dK += dS^T Q: warp (wm, wn) owns keys [16 wm, 16 wm + 16) x its OCOLS head-dim
    // columns. P^T and dS^T are P and dS (row-major [BQ][LDP]) loaded as column-major matrices.
    wmma_accumulate2<wmma::col_major, NF, BQ, LDP, LDT>(Pe, Ge, dv_acc, De, Qe, dk_acc, 16 * wm, wn * OCOLS, d16);
  });

  // Write back through the staging (the Q and dout buffers): dK times the scale, then dV.
  auto add_rows = [&](WmmaAcc (&acc)[NF], float mul, float* out) {
    __syncthreads();  // every warp is done with the staging's previous contents
#pragma unroll
    for (int f = 0; f < NF; ++f)
      wmma::store_matrix_sync(Stage + (16 * wm) * LDO + wn * OCOLS + 16 * f, acc[f], LDO, wmma::mem_row_major);
    __syncthreads();
    add_key_rows<BK, DMAX, LDO, ANCHOR>(p, b, hk, k_row, tid, Stage, mul, out);
  };
  add_rows(dk_acc, p.scale, p.dk);
  add_rows(dv_acc, 1.f, p.dv);
}

}  // namespace cuda
}  // namespace anllm
