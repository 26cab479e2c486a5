// Anchor attention forward on CUDA (fp32 accumulation; fp32, fp16, bf16 inputs; D <= 256).
//
// A block owns up to BQ "rows": BQ consecutive queries of one head, or, for decode-like calls where
// group * Tq <= BQ, all Tq queries of all query heads of one key/value head (K/V read once per group,
// no repeat). The key tiles it visits are
//   (a) own-segment tiles: BK-key slices of the candidate chunks [c_lo, c_hi) found by binary search
//       on the key index's monotone arrays, chunks whose summary cannot match are skipped, and
//   (b) anchor tiles: BK entries of the row's gathered anchor list, trimmed to positions <= the
//       tile's last query position,
// with the exact pair predicate (pair_allowed) applied to every score and an online softmax. When the
// grid would be small (decode: few queries, long cache) the tile sequence is split across `nsplit`
// blocks whose partial (max, sum, acc) are merged by log-sum-exp in a second kernel.
#include <torch/library.h>

#include "common.cuh"
#include "fwd_wmma.cuh"
#include "tiles.cuh"

namespace anllm {
namespace cuda {
namespace {

constexpr int fwd_kernel_launch_bound = kThreads;
template <typename T, int DMAX, int BQ, int BK>
__global__ void __launch_bounds__(fwd_kernel_launch_bound) fwd_kernel(const FwdParams p) {
  static_assert(BQ % kTY == 0 && BK % kTX == 0 && DMAX % kTX == 0 && kChunk % BK == 0, "tiles");
  static_assert(BQ <= 32 && BK <= 64, "tiles");
  constexpr int RI = BQ / kTY, CJ = BK / kTX, DJ = DMAX / kTX;
  constexpr int QS = DMAX + 1, KS = DMAX + 1, VS = DMAX;
  constexpr int SUB = kChunk / BK;
  ANLLM_DYNAMIC_SHARED(float, smem);
  float* Qs = smem;              // [BQ][QS], pre-scaled
  float* Ks = Qs + BQ * QS;      // [BK][KS]
  float* Vs = Ks + BK * KS;      // [BK][VS]
  float* Ss = Vs + BK * VS;      // [BQ][BK]

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

  const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
  const FwdBlock blk = fwd_block(p);
  const PairTile tile{r_valid, r_is_anchor, r_pos, r_seg, k_row, k_pos, k_seg};

  fwd_init_rows<BQ>(p, blk, tid, tile, r_m, r_l, r_alpha);
  __syncthreads();

  // Query tile (pre-multiplied by the scale); rows without a valid query are zero.
  fwd_stage_queries<T, float, BQ, DMAX, QS>(p, blk, tid, r_valid, Qs);

  // The key tiles to visit (warp 0; BQ <= 32).
  if (tid < 32) plan_query_tile<BQ, BK>(tid, blk.b, SUB, r_valid, r_is_anchor, r_seg, r_pos, p.ks, p.ka, plan);
  __syncthreads();

  const int64_t n_own = plan.n_own;
  int64_t t_begin, t_end;
  fwd_split_tiles(p, blk, plan, t_begin, t_end);

  float o[RI][DJ];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) o[i][j] = 0.f;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const bool own = t < n_own;
    if (!enter_key_tile<BK>(p, blk.b, plan, SUB, t, tid, tile)) continue;  // uniform across the block
    stage_keys_values<T, float, BK, DMAX, KS, VS>(p, blk.b, blk.hk, k_row, tid, Ks, Vs);
    __syncthreads();

    // Scores of the thread's RI x CJ micro tile.
    {
      float s[RI][CJ];
#pragma unroll
      for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < CJ; ++j) s[i][j] = 0.f;
      micro_tile_mma<RI, CJ, DMAX, QS, 1, KS, 1>(Qs, Ks, ty, tx, s);
#pragma unroll
      for (int i = 0; i < RI; ++i) {
        const int r = ty + i * kTY;
#pragma unroll
        for (int j = 0; j < CJ; ++j) {
          const int c = tx + j * kTX;
          Ss[r * BK + c] = tile.allowed(!own, r, c) ? s[i][j] : -INFINITY;
        }
      }
    }
    __syncthreads();

    // Online softmax, one warp per row.
    {
      const int warp = tid / 32, lane = tid % 32;
      constexpr int NU = (BK + 31) / 32;
      for (int r = warp; r < BQ; r += kThreads / 32) {
        float x[NU];
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          const int c = lane + u * 32;
          x[u] = c < BK ? Ss[r * BK + c] : -INFINITY;
        }
        online_softmax_row(x, lane, r, r_m, r_l, r_alpha, [&](int u, float pr) {
          const int c = lane + u * 32;
          if (c < BK) Ss[r * BK + c] = pr;
        });
      }
    }
    __syncthreads();

    // o = o * alpha + P V
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      const float a = r_alpha[ty + i * kTY];
#pragma unroll
      for (int j = 0; j < DJ; ++j) o[i][j] *= a;
    }
    micro_tile_mma<RI, DJ, BK, BK, 1, 1, VS>(Ss, Vs, ty, tx, o);
  }
  __syncthreads();

  // Results: every row of the block is written (zeros / -inf when nothing was visible).
  const int64_t rows_total = p.B * p.Hq * p.Tq;
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    const int r = ty + i * kTY;
    int64_t h, qi;
    if (!blk.row(p, r, h, qi)) continue;
    const int64_t row = (blk.b * p.Hq + h) * p.Tq + qi;
    const float l = r_l[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = tx + j * kTX;
      if (d >= p.D) continue;
      if (p.nsplit == 1)
        static_cast<T*>(p.out)[row * p.D + d] = from_float<T>(o[i][j] * inv);
      else
        p.part_acc[(blk.split * rows_total + row) * p.D + d] = o[i][j];
    }
  }
  fwd_store_row_stats<BQ>(p, blk, tid, r_m, r_l);
}

// Merges the nsplit partial results of every row by log-sum-exp. One block per row.
constexpr int combine_kernel_launch_bound = 128;
template <typename T>
__global__ void __launch_bounds__(combine_kernel_launch_bound) combine_kernel(const float* __restrict__ part_acc,
                                                      const float* __restrict__ part_m,
                                                      const float* __restrict__ part_l, T* out,
                                                      float* lse, int64_t rows, int D, int nsplit) {
  const int64_t row = blockIdx.x;
  float M = -INFINITY;
  for (int s = 0; s < nsplit; ++s) M = fmaxf(M, part_m[s * rows + row]);
  if (M == -INFINITY) {
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[row * D + d] = from_float<T>(0.f);
    if (threadIdx.x == 0) lse[row] = -INFINITY;
    return;
  }
  float L = 0.f;
  for (int s = 0; s < nsplit; ++s) {
    const float m = part_m[s * rows + row];
    if (m != -INFINITY) L += part_l[s * rows + row] * __expf(m - M);
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < nsplit; ++s) {
      const float m = part_m[s * rows + row];
      if (m != -INFINITY) acc += part_acc[(s * rows + row) * D + d] * __expf(m - M);
    }
    out[row * D + d] = from_float<T>(acc * inv);
  }
  if (threadIdx.x == 0) lse[row] = L > 0.f ? M + __logf(L) : -INFINITY;
}

// The forward of one padded head dim. Decode-like calls (group * Tq <= BQ of fwd_kernel: all query heads of
// a key/value head in one block, K/V read once per group) and fp32 inputs run fwd_kernel (CUDA cores,
// fp32); every other bf16/fp16 call runs fwd_wmma_kernel (tensor cores). Either way, when the grid would
// be small the key tiles are split across blocks and combine_kernel merges the partial results.
template <typename T, int DMAX>
void launch_fwd(FwdParams p, const at::Tensor& q, at::Tensor& out, at::Tensor& lse) {
  constexpr int BQ = FwdTraits<DMAX>::BQ;
  const bool decode = static_cast<int64_t>(p.group) * p.Tq <= BQ;
  constexpr bool low_precision = !std::is_same_v<T, float>;
  const bool tensor_cores = low_precision && !decode;
  int bq = BQ, bk = FwdTraits<DMAX>::BK;
  if constexpr (low_precision) {
    if (tensor_cores) {
      bq = WmmaTraits<DMAX>::BQ;
      bk = WmmaTraits<DMAX>::BK;
    }
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  if (decode) {  // decode-like: all heads of a group per block
    p.rows_h = p.group;
    p.rows_q = static_cast<int>(p.Tq);
    p.n_hgroups = p.Hkv;
    p.n_qtiles = 1;
  } else {
    p.rows_h = 1;
    p.rows_q = bq;
    p.n_hgroups = p.Hq;
    p.n_qtiles = (p.Tq + bq - 1) / bq;
  }
  const int64_t blocks = p.B * p.n_hgroups * p.n_qtiles;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t nsplit = 1;
  if (blocks < 2 * sms) {
    const int64_t key_tiles = (p.Tk + bk - 1) / bk;
    nsplit = std::min<int64_t>({(2 * sms + blocks - 1) / blocks, std::max<int64_t>(1, key_tiles / 4), 64});
  }
  p.nsplit = static_cast<int>(nsplit);
  ANLLM_CHECK(blocks * nsplit < std::numeric_limits<int32_t>::max(), "problem too large for one grid");
  at::Tensor part_acc, part_ml;
  const int64_t rows = p.B * p.Hq * p.Tq;
  if (nsplit > 1) {
    part_acc = at::empty({nsplit, rows, p.D}, q.options().dtype(at::kFloat));
    part_ml = at::empty({2, nsplit, rows}, q.options().dtype(at::kFloat));
    p.part_acc = part_acc.data_ptr<float>();
    p.part_m = part_ml.data_ptr<float>();
    p.part_l = p.part_m + nsplit * rows;
  }
  const unsigned grid = static_cast<unsigned>(blocks * nsplit);
  bool launched = false;
  if constexpr (low_precision) {
    if (tensor_cores) {
      using W = WmmaTraits<DMAX>;
      const size_t smem = WmmaFwdSmem<DMAX, W::BQ, W::BK>::bytes;
      auto wmma_kernel = ANLLM_KERNEL(fwd_wmma_kernel, T, DMAX, W::BQ, W::BK, W::WM);
      allow_smem(wmma_kernel, smem);
      ANLLM_LAUNCH(wmma_kernel, grid, kThreads, smem, stream)(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launched = true;
    }
  }
  if (!launched) {
    constexpr int BK = FwdTraits<DMAX>::BK;
    const size_t smem = sizeof(float) * (BQ * (DMAX + 1) + BK * (DMAX + 1) + BK * DMAX + BQ * BK);
    auto kernel = ANLLM_KERNEL(fwd_kernel, T, DMAX, BQ, BK);
    allow_smem(kernel, smem);
    ANLLM_LAUNCH(kernel, grid, kThreads, smem, stream)(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (nsplit > 1) {
    ANLLM_CHECK(rows < std::numeric_limits<int32_t>::max(), "too many query rows");
    auto combine = ANLLM_KERNEL(combine_kernel, T);
    ANLLM_LAUNCH(combine, static_cast<unsigned>(rows), 128, 0, stream)(
        p.part_acc, p.part_m, p.part_l, static_cast<T*>(p.out), p.lse, rows, p.D, p.nsplit);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_fwd_dim(const FwdParams& p, const at::Tensor& q, at::Tensor& out, at::Tensor& lse) {
  switch (padded_head_dim(p.D)) {
    case 64: return launch_fwd<T, 64>(p, q, out, lse);
    case 128: return launch_fwd<T, 128>(p, q, out, lse);
    default: return launch_fwd<T, 256>(p, q, out, lse);
  }
}

std::tuple<at::Tensor, at::Tensor> anchor_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
    const at::Tensor& q_seg, const at::Tensor& q_is_anchor, const at::Tensor& q_valid,
    const at::Tensor& k_pos, const at::Tensor& k_seg, const at::Tensor& k_is_anchor,
    const at::Tensor& k_valid, double scale) {
  const CudaAttentionInputs in =
      check_cuda_attention_inputs(q, k, v, q_pos, q_seg, q_is_anchor, q_valid, k_pos, k_seg, k_is_anchor, k_valid);
  const LayoutTensors &ql = in.ql, &kl = in.kl;
  const AttentionShape& s = in.s;
  c10::cuda::OptionalCUDAGuard guard(q.device());  // after the validation
  auto out = at::empty({s.B, s.Hq, s.Tq, s.D}, q.options());
  auto lse = at::empty({s.B, s.Hq, s.Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.Tk == 0 || out.numel() == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  SideIndex kside;
  AnchorIndex anchors;
  build_side_index(kl, kside, &anchors);

  FwdParams p{};
  set_attention_params(p, q, k, v, ql, kl, s, kside, anchors, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.nsplit = 1;
  switch (q.scalar_type()) {
    case at::kFloat: launch_fwd_dim<float>(p, q, out, lse); break;
    case at::kHalf: launch_fwd_dim<at::Half>(p, q, out, lse); break;
    case at::kBFloat16: launch_fwd_dim<at::BFloat16>(p, q, out, lse); break;
    default: ANLLM_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(anllm, CUDA, m) { m.impl("anchor_attention_fwd", &anchor_attention_fwd_cuda); }

}  // namespace cuda
}  // namespace anllm
