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
//                    For the inputs of dq_wmma_kernel, dkv_wmma_kernel<own> / <anc> (bwd_wmma.cuh) do
//                    the same on tensor cores.
// dk/dv are accumulated in fp32 [B, Hkv, Tk, D] and cast at the end.
#include <torch/library.h>

#include "bwd_wmma.cuh"
#include "common.cuh"
#include "tiles.cuh"

namespace anllm {
namespace cuda {
namespace {

// For this thread's rows r = ty + i * kTY and key columns c = tx + j * kTX of a tile: s = q_r . k_c
// (q pre-scaled) and dp = dout_r . v_c from the shared Qs/Os ([BQ][QS]) and Ks/Vs ([BK][KS]) tiles, then
// P = exp(s - lse) on the pairs the tile allows (0 elsewhere) and dS = P (dp - delta), written to
// Ds [BQ][BK] (and P to Ps [BQ][BK] when STORE_P). Both backward kernels need exactly these.
template <int RI, int CJ, int DMAX, int QS, int KS, int BK, bool STORE_P>
__device__ __forceinline__ void probs_and_ds(const float* Qs, const float* Os, const float* Ks, const float* Vs,
                                             int ty, int tx, const PairTile& tile, bool anchor_tile,
                                             const float* r_lse, const float* r_delta, float* Ps, float* Ds) {
  float s[RI][CJ], dp[RI][CJ];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < CJ; ++j) s[i][j] = dp[i][j] = 0.f;
  micro_tile_mma2<RI, CJ, DMAX, QS, 1, KS, 1>(Qs, Ks, s, Os, Vs, dp, ty, tx);
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    const int r = ty + i * kTY;
#pragma unroll
    for (int j = 0; j < CJ; ++j) {
      const int c = tx + j * kTX;
      const float pr = tile.allowed(anchor_tile, r, c) ? __expf(s[i][j] - r_lse[r]) : 0.f;
      if constexpr (STORE_P) Ps[r * BK + c] = pr;
      Ds[r * BK + c] = pr * (dp[i][j] - r_delta[r]);
    }
  }
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
  const BwdQueryBlock blk = bwd_query_block<BQ>(p);
  const int64_t b = blk.b, h = blk.h, hk = blk.hk, q0 = blk.q0, hrow = blk.hrow;

  const PairTile tile{r_valid, r_is_anchor, r_pos, r_seg, k_row, k_pos, k_seg};

  if (tid < BQ) bwd_load_row(p, b, hrow, q0, tid, tile, r_lse, r_delta);
  __syncthreads();
  bwd_stage_queries<T, float, BQ, DMAX, QS>(p, b, h, hrow, q0, tid, r_valid, Qs, Os);
  // The key tiles to visit (warp 0; BQ <= 32).
  if (tid < 32) plan_query_tile<BQ, BK>(tid, b, SUB, r_valid, r_is_anchor, r_seg, r_pos, p.ks, p.ka, plan);
  __syncthreads();

  const int64_t n_own = plan.n_own, n_tiles = n_own + plan.n_anc;

  float acc[RI][DJ];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) acc[i][j] = 0.f;

  for (int64_t t = 0; t < n_tiles; ++t) {
    const bool own = t < n_own;
    if (!enter_key_tile<BK>(p, b, plan, SUB, t, tid, tile)) continue;  // uniform across the block
    stage_keys_values<T, float, BK, DMAX, KS, KS>(p, b, hk, k_row, tid, Ks, Vs);
    __syncthreads();
    probs_and_ds<RI, CJ, DMAX, QS, KS, BK, false>(Qs, Os, Ks, Vs, ty, tx, tile, !own, r_lse, r_delta, nullptr, Ss);
    __syncthreads();
    micro_tile_mma<RI, DJ, BK, BK, 1, 1, KS>(Ss, Ks, ty, tx, acc);
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
  ANLLM_SHARED(KeyTilePlan, kplan, );

  const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
  const BwdKeyBlock blk = bwd_key_block<BK, ANCHOR>(p);
  const int64_t b = blk.b, hk = blk.hk;
  if (ANCHOR && blk.first >= p.ka.count[b]) return;  // uniform: no anchors in this tile

  const PairTile tile{r_valid, r_is_anchor, r_pos, r_seg, k_row, k_pos, k_seg};

  if (tid < BK)
    load_key_slot(p.kl, p.ka, b, p.Tk, !ANCHOR, blk.first, blk.first, p.ka.count[b], tid, k_row, k_pos, k_seg);
  __syncthreads();
  if (tid < 32) plan_key_tile<BK, ANCHOR>(tid, p, blk, tile, kplan);
  __syncthreads();
  if (!kplan.any) return;  // uniform; nothing to add

  stage_keys_values<T, float, BK, DMAX, KS, KS>(p, b, hk, k_row, tid, Ks, Vs);

  float gk[KI][DJ], gv[KI][DJ];
#pragma unroll
  for (int i = 0; i < KI; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) gk[i][j] = gv[i][j] = 0.f;

  for_key_tile_queries<BQ, ANCHOR>(p, blk, kplan, [&](int64_t h, int64_t hrow, int64_t q0) {
    __syncthreads();  // previous sub-tile is done with the shared buffers
    if (tid < BQ) bwd_load_row(p, b, hrow, q0, tid, tile, r_lse, r_delta);
    __syncthreads();
    bwd_stage_queries<T, float, BQ, DMAX, QS>(p, b, h, hrow, q0, tid, r_valid, Qs, Os);
    __syncthreads();
    probs_and_ds<RI, CJ, DMAX, QS, KS, BK, true>(Qs, Os, Ks, Vs, ty, tx, tile, ANCHOR, r_lse, r_delta, Ps, Ds);
    __syncthreads();
    // dv += P^T dO ; dk += dS^T (scale * q): keys as rows, the tile's queries as k
    micro_tile_mma2<KI, DJ, BQ, 1, BK, 1, QS>(Ps, Os, gv, Ds, Qs, gk, ty, tx);
  });

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
      using W = WmmaTraits<DMAX>;
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
  // dk/dv: the own-segment kernel, then the anchor kernel on the same stream. Anchor tiles split the query
  // range so that each block walks ~8 query chunks.
  p.qsplit = static_cast<int>(std::min<int64_t>(32, std::max<int64_t>(1, p.qs.nC / 8)));
  // With qsplit > 1 several blocks add into an anchor's dk/dv rows with float atomicAdd in no fixed
  // order: the low bits vary from run to run.
  if (p.qsplit > 1)
    at::globalContext().alertNotDeterministic(
        "anllm::anchor_attention_bwd on CUDA with more than 1024 queries (the key/value gradients of anchor "
        "keys are summed with atomicAdd across query splits)");
  // Grid of both kernels for key tiles of bk keys (the anchor kernel: times qsplit).
  auto dkv_blocks = [&](int bk) {
    p.n_ktiles = (p.Tk + bk - 1) / bk;
    const int64_t blocks = p.B * p.Hkv * p.n_ktiles;
    ANLLM_CHECK(blocks * p.qsplit < std::numeric_limits<int32_t>::max(), "problem too large for one grid");
    return static_cast<unsigned>(blocks);
  };
  bool dkv_done = false;
  if constexpr (!std::is_same_v<T, float>) {
    if (!p.dout_f32) {  // tensor cores (an fp32 dout stays fp32: dkv_kernel below)
      using W = WmmaDkvTraits<DMAX>;
      const unsigned blocks = dkv_blocks(W::BK);
      const size_t smem = WmmaDkvSmem<DMAX, W::BQ, W::BK>::bytes;
      auto dkv_wmma_own = ANLLM_KERNEL(dkv_wmma_kernel, T, DMAX, W::BQ, W::BK, W::WM, false);
      allow_smem(dkv_wmma_own, smem);
      ANLLM_LAUNCH(dkv_wmma_own, blocks, kThreads, smem, stream)(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto dkv_wmma_anc = ANLLM_KERNEL(dkv_wmma_kernel, T, DMAX, W::BQ, W::BK, W::WM, true);
      allow_smem(dkv_wmma_anc, smem);
      ANLLM_LAUNCH(dkv_wmma_anc, blocks * p.qsplit, kThreads, smem, stream)(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dkv_done = true;
    }
  }
  if (!dkv_done) {
    constexpr int BQ = DkvTraits<DMAX>::BQ, BK = DkvTraits<DMAX>::BK;
    const unsigned blocks = dkv_blocks(BK);
    const size_t smem = sizeof(float) * (2 * BK * (DMAX + 1) + 2 * BQ * DMAX + 2 * BQ * BK);
    auto own = ANLLM_KERNEL(dkv_kernel, T, DMAX, BQ, BK, false);
    allow_smem(own, smem);
    ANLLM_LAUNCH(own, blocks, kThreads, smem, stream)(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto anc = ANLLM_KERNEL(dkv_kernel, T, DMAX, BQ, BK, true);
    allow_smem(anc, smem);
    ANLLM_LAUNCH(anc, blocks * p.qsplit, kThreads, smem, stream)(p);
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
  const CudaAttentionInputs in =
      check_cuda_attention_inputs(q, k, v, q_pos, q_seg, q_is_anchor, q_valid, k_pos, k_seg, k_is_anchor, k_valid);
  const LayoutTensors &ql = in.ql, &kl = in.kl;
  const AttentionShape& s = in.s;
  c10::cuda::OptionalCUDAGuard guard(q.device());  // after the validation
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
