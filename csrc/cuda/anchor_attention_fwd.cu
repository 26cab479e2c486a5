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
  int64_t item = blockIdx.x;
  const int split = static_cast<int>(item % p.nsplit);
  item /= p.nsplit;
  const int64_t qt = item % p.n_qtiles;
  item /= p.n_qtiles;
  const int64_t hg = item % p.n_hgroups;
  const int64_t b = item / p.n_hgroups;
  const int64_t h0 = hg * p.rows_h;
  const int64_t hk = h0 / p.group;
  const int n_rows = p.rows_h * p.rows_q;

  // Row r -> (head, query); false when the row is outside the problem.
  auto row_of = [&](int r, int64_t& h, int64_t& qi) {
    h = h0 + r / p.rows_q;
    qi = qt * p.rows_q + r % p.rows_q;
    return r < n_rows && qi < p.Tq;
  };

  if (tid < BQ) {
    int64_t h, qi;
    const bool in = row_of(tid, h, qi);
    const int64_t li = b * p.Tq + (in ? qi : 0);
    r_valid[tid] = in && p.ql.valid[li];
    r_is_anchor[tid] = in && p.ql.is_anchor[li];
    r_pos[tid] = in ? p.ql.pos[li] : 0;
    r_seg[tid] = in ? p.ql.seg[li] : 0;
    r_m[tid] = -INFINITY;
    r_l[tid] = 0.f;
    r_alpha[tid] = 1.f;
  }
  __syncthreads();

  // Query tile (pre-multiplied by the scale); rows without a valid query are zero.
  {
    const T* q = static_cast<const T*>(p.q);
    for (int e = tid; e < BQ * DMAX; e += kThreads) {
      const int r = e / DMAX, d = e % DMAX;
      float x = 0.f;
      if (d < p.D && r_valid[r]) {
        int64_t h, qi;
        row_of(r, h, qi);
        x = to_float(q[b * p.q_sb + h * p.q_sh + qi * p.q_st + d]) * p.scale;
      }
      Qs[r * QS + d] = x;
    }
  }

  // The key tiles to visit (warp 0; BQ <= 32).
  if (tid < 32) plan_query_tile<BQ, BK>(tid, b, SUB, r_valid, r_is_anchor, r_seg, r_pos, p.ks, p.ka, plan);
  __syncthreads();

  const int64_t n_own = plan.n_own, n_tiles = n_own + plan.n_anc;
  const int64_t per = (n_tiles + p.nsplit - 1) / p.nsplit;
  const int64_t t_begin = split * per;
  const int64_t t_end = min(n_tiles, t_begin + per);

  float o[RI][DJ];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) o[i][j] = 0.f;

  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);
  const int64_t k_base = b * p.k_sb + hk * p.k_sh;
  const int64_t v_base = b * p.v_sb + hk * p.v_sh;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const bool own = t < n_own;
    int64_t key0, a0;
    if (!key_tile_start<BK>(p.ks, b, plan, SUB, t, key0, a0)) continue;  // uniform across the block
    __syncthreads();  // the previous tile is done with the shared buffers
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
      Vs[c * VS + d] = vx;
    }
    __syncthreads();

    // Scores of the thread's RI x CJ micro tile.
    {
      float s[RI][CJ];
#pragma unroll
      for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < CJ; ++j) s[i][j] = 0.f;
#pragma unroll 4
      for (int d = 0; d < DMAX; ++d) {
        float qv[RI], kv[CJ];
#pragma unroll
        for (int i = 0; i < RI; ++i) qv[i] = Qs[(ty + i * kTY) * QS + d];
#pragma unroll
        for (int j = 0; j < CJ; ++j) kv[j] = Ks[(tx + j * kTX) * KS + d];
#pragma unroll
        for (int i = 0; i < RI; ++i)
#pragma unroll
          for (int j = 0; j < CJ; ++j) s[i][j] = fmaf(qv[i], kv[j], s[i][j]);
      }
#pragma unroll
      for (int i = 0; i < RI; ++i) {
        const int r = ty + i * kTY;
#pragma unroll
        for (int j = 0; j < CJ; ++j) {
          const int c = tx + j * kTX;
          const bool ok = pair_allowed(!own, r_valid[r], r_is_anchor[r], r_pos[r], r_seg[r], k_row[c] >= 0,
                                       k_pos[c], k_seg[c]);
          Ss[r * BK + c] = ok ? s[i][j] : -INFINITY;
        }
      }
    }
    __syncthreads();

    // Online softmax, one warp per row.
    {
      const int warp = tid / 32, lane = tid % 32;
      for (int r = warp; r < BQ; r += kThreads / 32) {
        float x[(BK + 31) / 32];
        float mx = -INFINITY;
#pragma unroll
        for (int u = 0; u < (BK + 31) / 32; ++u) {
          const int c = lane + u * 32;
          x[u] = c < BK ? Ss[r * BK + c] : -INFINITY;
          mx = fmaxf(mx, x[u]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
        const float m_old = r_m[r];
        const float m_new = fmaxf(m_old, mx);
        float alpha = 1.f, sum = 0.f;
        if (m_new != -INFINITY) {
          alpha = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
#pragma unroll
          for (int u = 0; u < (BK + 31) / 32; ++u) {
            x[u] = x[u] == -INFINITY ? 0.f : __expf(x[u] - m_new);
            sum += x[u];
          }
        } else {
#pragma unroll
          for (int u = 0; u < (BK + 31) / 32; ++u) x[u] = 0.f;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
#pragma unroll
        for (int u = 0; u < (BK + 31) / 32; ++u) {
          const int c = lane + u * 32;
          if (c < BK) Ss[r * BK + c] = x[u];
        }
        __syncwarp();
        if (lane == 0) {
          r_l[r] = r_l[r] * alpha + sum;
          r_m[r] = m_new;
          r_alpha[r] = alpha;
        }
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
#pragma unroll 4
    for (int c = 0; c < BK; ++c) {
      float pv[RI], vv[DJ];
#pragma unroll
      for (int i = 0; i < RI; ++i) pv[i] = Ss[(ty + i * kTY) * BK + c];
#pragma unroll
      for (int j = 0; j < DJ; ++j) vv[j] = Vs[c * VS + tx + j * kTX];
#pragma unroll
      for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < DJ; ++j) o[i][j] = fmaf(pv[i], vv[j], o[i][j]);
    }
  }
  __syncthreads();

  // Results: every row of the block is written (zeros / -inf when nothing was visible).
  const int64_t rows_total = p.B * p.Hq * p.Tq;
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    const int r = ty + i * kTY;
    int64_t h, qi;
    if (!row_of(r, h, qi)) continue;
    const int64_t row = (b * p.Hq + h) * p.Tq + qi;
    const float l = r_l[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = tx + j * kTX;
      if (d >= p.D) continue;
      if (p.nsplit == 1)
        static_cast<T*>(p.out)[row * p.D + d] = from_float<T>(o[i][j] * inv);
      else
        p.part_acc[(split * rows_total + row) * p.D + d] = o[i][j];
    }
  }
  if (tid < BQ) {
    int64_t h, qi;
    if (row_of(tid, h, qi)) {
      const int64_t row = (b * p.Hq + h) * p.Tq + qi;
      const float l = r_l[tid];
      if (p.nsplit == 1) {
        p.lse[row] = l > 0.f ? r_m[tid] + __logf(l) : -INFINITY;
      } else {
        p.part_m[split * rows_total + row] = l > 0.f ? r_m[tid] : -INFINITY;
        p.part_l[split * rows_total + row] = l;
      }
    }
  }
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
      bq = WmmaFwdTraits<DMAX>::BQ;
      bk = WmmaFwdTraits<DMAX>::BK;
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
      using W = WmmaFwdTraits<DMAX>;
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
  const LayoutTensors ql{q_pos.contiguous(), q_seg.contiguous(), q_is_anchor.contiguous(), q_valid.contiguous()};
  const LayoutTensors kl{k_pos.contiguous(), k_seg.contiguous(), k_is_anchor.contiguous(), k_valid.contiguous()};
  const AttentionShape s = check_attention_inputs(q, k, v, ql, kl);
  ANLLM_CHECK(on_kernel_device(q), "q must be a CUDA tensor");
  // Validation first (host only), so mixed-device inputs get the clear error, then the guard.
  c10::cuda::OptionalCUDAGuard guard(q.device());
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
