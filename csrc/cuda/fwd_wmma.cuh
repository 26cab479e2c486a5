// Anchor attention forward on tensor cores, for bf16 and fp16 inputs (included by anchor_attention_fwd.cu,
// which picks it for every call except the decode-like ones, see launch_fwd).
//
// The same tiling idea as fwd_kernel: a block owns BQ consecutive queries of one head and visits the key
// tiles of its plan (own-segment chunks found on the key index, then tiles of the row's gathered earlier
// anchors), with the exact pair predicate on every score and an online softmax; never a dense mask. The
// two products of a tile run on tensor cores, fp32 accumulation:
//   S = Q K^T     (bf16/fp16 in, fp32 out)   the scale and the mask are applied to S in fp32,
//   O += P V      (P rounded to the input dtype, as flash attention does; O and the softmax statistics
//                  m, l stay fp32).
// The four warps of a block split the tile as WM x WN warps: WM groups of 16 query rows, WN slices of
// the key columns (S) and head-dim columns (O).
//
// Why WMMA (nvcuda::wmma) and not mma.sync: every operand goes through shared memory with
// load_matrix_sync / store_matrix_sync, and no code here touches a fragment's registers by position.
// The mapping of matrix entries to lanes and registers of a WMMA fragment is unspecified by CUDA (and
// differs between architectures), so the online softmax, which rescales the rows of O by per-row factors,
// cannot be applied to an accumulator fragment in registers without relying on an undocumented layout.
// Instead O lives in shared memory (fp32): each tile rescales its rows there, loads them as the
// accumulator, adds P V and stores them back. That costs shared-memory traffic that an mma.sync kernel
// with the PTX ISA's documented fragment layouts would keep in registers, but its meaning depends on
// nothing undocumented, and the CUDA emulator (csrc/emu/cuda_emu.h) implements exactly these semantics
// (with a deliberately scrambled entry order), so the oracle tests check this kernel on the CPU.
#pragma once

#include <type_traits>

#include "fwd_params.cuh"
#include "tiles.cuh"
#include "wmma.cuh"

namespace anllm {
namespace cuda {

// Dynamic shared memory of fwd_wmma_kernel: byte offsets of its buffers (layout rules: WmmaSmemLayout).
template <int DMAX, int BQ, int BK>
struct WmmaFwdSmem : WmmaSmemLayout<DMAX, BK> {
  using L = WmmaSmemLayout<DMAX, BK>;
  static constexpr size_t q = 0;                                    // Qs: input dtype [BQ][LDT]
  static constexpr size_t k = q + L::up(size_t(BQ) * L::LDT * 2);   // Ks: [BK][LDT]
  static constexpr size_t v = k + L::up(size_t(BK) * L::LDT * 2);   // Vs: [BK][LDT]
  static constexpr size_t s = v + L::up(size_t(BK) * L::LDT * 2);   // Ss: fp32 scores [BQ][LDS]
  static constexpr size_t p = s + L::up(size_t(BQ) * L::LDS * 4);   // Ps: probabilities, input dtype [BQ][LDP]
  static constexpr size_t o = p + L::up(size_t(BQ) * L::LDP * 2);   // Os: fp32 output accumulator [BQ][LDO]
  static constexpr size_t bytes = o + L::up(size_t(BQ) * L::LDO * 4);
};

constexpr int fwd_wmma_kernel_launch_bound = kThreads;
template <typename T, int DMAX, int BQ, int BK, int WM>
__global__ void __launch_bounds__(fwd_wmma_kernel_launch_bound) fwd_wmma_kernel(const FwdParams p) {
  using namespace nvcuda;
  using E = typename WmmaElem<T>::type;
  using Smem = WmmaFwdSmem<DMAX, BQ, BK>;
  constexpr int NWARPS = kThreads / 32, WN = NWARPS / WM;
  constexpr int LDT = Smem::LDT, LDS = Smem::LDS, LDP = Smem::LDP, LDO = Smem::LDO;
  constexpr int SUB = kChunk / BK;
  static_assert(sizeof(T) == 2 && sizeof(E) == 2, "16-bit inputs");
  static_assert(BQ == 16 * WM && NWARPS % WM == 0 && BK % (16 * WN) == 0 && DMAX % (16 * WN) == 0, "warp tiles");
  static_assert(BQ <= 64 && BK % 32 == 0 && BK <= 64 && kChunk % BK == 0, "tiles");
  // (its own name: under nvcc every extern __shared__ array of a translation unit is one entity, and
  // fwd_kernel's is a float array)
  ANLLM_DYNAMIC_SHARED_ALIGN(128, unsigned char, wmma_smem);
  unsigned char* smem = wmma_smem;
  T* Qs = reinterpret_cast<T*>(smem + Smem::q);
  T* Ks = reinterpret_cast<T*>(smem + Smem::k);
  T* Vs = reinterpret_cast<T*>(smem + Smem::v);
  float* Ss = reinterpret_cast<float*>(smem + Smem::s);
  T* Ps = reinterpret_cast<T*>(smem + Smem::p);
  float* Os = reinterpret_cast<float*>(smem + Smem::o);

  ANLLM_SHARED(int64_t, r_pos, [BQ]);
  ANLLM_SHARED(int32_t, r_seg, [BQ]);
  ANLLM_SHARED(bool, r_valid, [BQ]);
  ANLLM_SHARED(bool, r_is_anchor, [BQ]);
  ANLLM_SHARED(float, r_m, [BQ]);
  ANLLM_SHARED(float, r_l, [BQ]);
  ANLLM_SHARED(float, r_alpha, [BQ]);
  ANLLM_SHARED(int64_t, k_row, [BK]);  // key index in the row, -1: no key (masked, zero K/V)
  ANLLM_SHARED(int64_t, k_pos, [BK]);
  ANLLM_SHARED(int32_t, k_seg, [BK]);
  ANLLM_SHARED(QueryTilePlan, plan, );

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / WN, wn = warp % WN;
  const FwdBlock blk = fwd_block(p);
  const PairTile tile{r_valid, r_is_anchor, r_pos, r_seg, k_row, k_pos, k_seg};
  // Head-dim columns that can be non-zero, rounded up to whole 16-column blocks (the same in every thread).
  const int d16 = (p.D + 15) / 16 * 16;

  fwd_init_rows<BQ>(p, blk, tid, tile, r_m, r_l, r_alpha);
  __syncthreads();

  // Query tile in the input dtype (unscaled: the scale is applied to the fp32 scores); rows without a
  // valid query and head-dim columns >= D are zero. The output accumulator starts at zero.
  fwd_stage_queries<T, T, BQ, DMAX, LDT>(p, blk, tid, r_valid, Qs);
  for (int e = tid; e < BQ * DMAX; e += kThreads) Os[e / DMAX * LDO + e % DMAX] = 0.f;

  // The key tiles to visit (warp 0).
  if (tid < 32) plan_query_tile<BQ, BK>(tid, blk.b, SUB, r_valid, r_is_anchor, r_seg, r_pos, p.ks, p.ka, plan);
  __syncthreads();

  const int64_t n_own = plan.n_own;
  int64_t t_begin, t_end;
  fwd_split_tiles(p, blk, plan, t_begin, t_end);

  const E* Qe = reinterpret_cast<const E*>(Qs);
  const E* Ke = reinterpret_cast<const E*>(Ks);
  const E* Ve = reinterpret_cast<const E*>(Vs);
  const E* Pe = reinterpret_cast<const E*>(Ps);

  for (int64_t t = t_begin; t < t_end; ++t) {
    const bool own = t < n_own;
    if (!enter_key_tile<BK>(p, blk.b, plan, SUB, t, tid, tile)) continue;  // uniform across the block
    stage_keys_values<T, T, BK, DMAX, LDT, LDT>(p, blk.b, blk.hk, k_row, tid, Ks, Vs);
    __syncthreads();

    // S = Q K^T: warp (wm, wn) computes rows [16 wm, 16 wm + 16) x its BK / WN key columns.
    for (int nb = wn * (BK / WN); nb < (wn + 1) * (BK / WN); nb += 16) {
      WmmaAcc acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < d16; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> fb;  // K^T: K's rows as columns
        wmma::load_matrix_sync(fa, Qe + (16 * wm) * LDT + kk, LDT);
        wmma::load_matrix_sync(fb, Ke + nb * LDT + kk, LDT);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(Ss + (16 * wm) * LDS + nb, acc, LDS, wmma::mem_row_major);
    }
    __syncthreads();

    // Scale, mask and online softmax in fp32, one warp per row; P to Ps in the input dtype.
    for (int r = warp; r < BQ; r += NWARPS) {
      float x[BK / 32];
#pragma unroll
      for (int u = 0; u < BK / 32; ++u) {
        const int c = lane + u * 32;
        x[u] = tile.allowed(!own, r, c) ? Ss[r * LDS + c] * p.scale : -INFINITY;
      }
      online_softmax_row(x, lane, r, r_m, r_l, r_alpha,
                         [&](int u, float pr) { Ps[r * LDP + lane + u * 32] = from_float<T>(pr); });
    }
    __syncthreads();

    // O = O * alpha + P V: warp (wm, wn) owns rows [16 wm, 16 wm + 16) x its DMAX / WN head-dim columns
    // of Os; it rescales them (plain shared-memory entries), then adds P V on tensor cores.
    constexpr int OCOLS = DMAX / WN;
    const int o_c0 = wn * OCOLS;
    if (o_c0 < d16) {  // columns >= d16 stay zero
      for (int e = lane; e < 16 * OCOLS; e += 32) {
        const int r = 16 * wm + e / OCOLS, d = o_c0 + e % OCOLS;
        Os[r * LDO + d] *= r_alpha[r];
      }
      __syncwarp();
      for (int nd = o_c0; nd < o_c0 + OCOLS && nd < d16; nd += 16) {
        WmmaAcc acc;
        wmma::load_matrix_sync(acc, Os + (16 * wm) * LDO + nd, LDO, wmma::mem_row_major);
        for (int kk = 0; kk < BK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> fb;
          wmma::load_matrix_sync(fa, Pe + (16 * wm) * LDP + kk, LDP);
          wmma::load_matrix_sync(fb, Ve + kk * LDT + nd, LDT);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(Os + (16 * wm) * LDO + nd, acc, LDO, wmma::mem_row_major);
      }
    }
  }
  __syncthreads();

  // Results: every row of the block is written (zeros / -inf when nothing was visible).
  const int64_t rows_total = p.B * p.Hq * p.Tq;
  for (int e = tid; e < BQ * DMAX; e += kThreads) {
    const int r = e / DMAX, d = e % DMAX;
    int64_t h, qi;
    if (d >= p.D || !blk.row(p, r, h, qi)) continue;
    const int64_t row = (blk.b * p.Hq + h) * p.Tq + qi;
    const float l = r_l[r];
    if (p.nsplit == 1)
      static_cast<T*>(p.out)[row * p.D + d] = from_float<T>(l > 0.f ? Os[r * LDO + d] / l : 0.f);
    else
      p.part_acc[(blk.split * rows_total + row) * p.D + d] = Os[r * LDO + d];
  }
  fwd_store_row_stats<BQ>(p, blk, tid, r_m, r_l);
}

}  // namespace cuda
}  // namespace anllm
