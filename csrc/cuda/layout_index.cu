// Per-row index of a layout, built on the device in one launch (one block per row):
//   - summaries of every chunk of kChunk tokens (segment range, position range, flags),
//   - monotone prefix-max / suffix-min arrays over them, so a tile finds a conservative contiguous
//     range of candidate chunks with a binary search (tight for sorted layouts, still correct when
//     the layout is not sorted: the exact mask predicate is evaluated per pair anyway),
//   - for keys, the list of valid anchors in key order (stream compaction by block-wide prefix sum)
//     and the suffix min of their positions.
#include "common.cuh"

namespace anllm {
namespace cuda {

LayoutView layout_view(const LayoutTensors& l) {
  return {l.pos.data_ptr<int64_t>(), l.seg.data_ptr<int32_t>(), l.is_anchor.data_ptr<bool>(),
          l.valid.data_ptr<bool>(), l.pos.size(1)};
}

SideView SideIndex::view() const {
  const int64_t n = B * nC;
  const int32_t* a = i32.data_ptr<int32_t>();
  const int64_t* c = i64.data_ptr<int64_t>();
  return {a, a + n, c, c + n, c + 2 * n, a + 2 * n, a + 3 * n, a + 4 * n, c + 3 * n, nC};
}

AnchorView AnchorIndex::view() const {
  const int64_t n = B * Tk;
  const int32_t* a = i32.data_ptr<int32_t>();
  const int64_t* c = i64.data_ptr<int64_t>();
  return {a, c, a + n, c + n, cnt.data_ptr<int32_t>(), Tk};
}

namespace {

// Inclusive scan over the kIndexThreads threads of the block (in thread order). `buf` holds 32
// entries. Returns the thread's inclusive value and writes the block total to `total`.
template <typename T, typename Op>
__device__ T block_inclusive_scan(T v, Op op, T* buf, T& total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v = op(v, n);
  }
  if (lane == 31) buf[wid] = v;
  __syncthreads();
  if (wid == 0) {
    T w = buf[lane];  // kIndexThreads / 32 == 32 warps: every entry is written
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T n = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w = op(w, n);
    }
    buf[lane] = w;
  }
  __syncthreads();
  if (wid > 0) v = op(buf[wid - 1], v);
  total = buf[31];
  __syncthreads();  // buf may be reused by the next call
  return v;
}

struct IndexOut {
  int32_t *seg_min, *seg_max, *flags, *pm_seg_max, *sm_seg_min;
  int64_t *pos_min, *pos_max, *pos_max_na, *pm_pos_max_na;
  int64_t nC;
  // anchors (nullptr when not wanted)
  int32_t *a_idx, *a_seg, *a_cnt;
  int64_t *a_pos, *a_smin_pos;
};

__global__ void __launch_bounds__(kIndexThreads) build_index_kernel(LayoutView l, IndexOut o) {
  ANLLM_SHARED(int64_t, buf64, [32]);
  ANLLM_SHARED(int32_t, buf32, [32]);
  const int64_t b = blockIdx.x;
  const int64_t T = l.T, nC = o.nC;
  const int64_t* pos = l.pos + b * T;
  const int32_t* seg = l.seg + b * T;
  const bool* is_anchor = l.is_anchor + b * T;
  const bool* val = l.valid + b * T;
  const int64_t cb = b * nC;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;

  // 1. Chunk summaries, one warp per chunk.
  for (int64_t c = wid; c < nC; c += kIndexThreads / 32) {
    int32_t smin = kI32Max, smax = kI32Min;
    int64_t pmin = kI64Max, pmax = kI64Min, pmax_na = kI64Min;
    int fl = 0;
    const int64_t j_end = (c + 1) * kChunk < T ? (c + 1) * kChunk : T;
    for (int64_t j = c * kChunk + lane; j < j_end; j += 32) {
      if (!val[j]) continue;
      const int32_t s = seg[j];
      const int64_t p = pos[j];
      smin = min(smin, s);
      smax = max(smax, s);
      pmin = min(pmin, p);
      pmax = max(pmax, p);
      fl |= kAnyValid;
      if (!is_anchor[j]) {
        pmax_na = max(pmax_na, p);
        fl |= kAnyNonAnchor;
      }
    }
    smin = warp_allreduce(smin, MinOp());
    smax = warp_allreduce(smax, MaxOp());
    pmin = warp_allreduce(pmin, MinOp());
    pmax = warp_allreduce(pmax, MaxOp());
    pmax_na = warp_allreduce(pmax_na, MaxOp());
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) fl |= __shfl_xor_sync(kFull, fl, off);
    if (lane == 0) {
      o.seg_min[cb + c] = smin;
      o.seg_max[cb + c] = smax;
      o.pos_min[cb + c] = pmin;
      o.pos_max[cb + c] = pmax;
      o.pos_max_na[cb + c] = pmax_na;
      o.flags[cb + c] = fl;
    }
  }
  __syncthreads();  // global writes of this block are visible to the block after the barrier

  // 2. Prefix max of seg_max and pos_max_na, suffix min of seg_min (chunks without valid tokens
  //    carry the identity values, so they never tighten anything).
  {
    int32_t carry32 = kI32Min;
    int64_t carry64 = kI64Min;
    for (int64_t base = 0; base < nC; base += kIndexThreads) {
      const int64_t c = base + threadIdx.x;
      const int32_t v32 = c < nC ? o.seg_max[cb + c] : kI32Min;
      const int64_t v64 = c < nC ? o.pos_max_na[cb + c] : kI64Min;
      int32_t t32;
      int64_t t64;
      const int32_t s32 = block_inclusive_scan(v32, MaxOp(), buf32, t32);
      const int64_t s64 = block_inclusive_scan(v64, MaxOp(), buf64, t64);
      if (c < nC) {
        o.pm_seg_max[cb + c] = max(carry32, s32);
        o.pm_pos_max_na[cb + c] = max(carry64, s64);
      }
      carry32 = max(carry32, t32);
      carry64 = max(carry64, t64);
    }
    carry32 = kI32Max;
    for (int64_t base = 0; base < nC; base += kIndexThreads) {
      const int64_t c = nC - 1 - (base + threadIdx.x);  // walk from the end
      const int32_t v32 = c >= 0 ? o.seg_min[cb + c] : kI32Max;
      int32_t t32;
      const int32_t s32 = block_inclusive_scan(v32, MinOp(), buf32, t32);
      if (c >= 0) o.sm_seg_min[cb + c] = min(carry32, s32);
      carry32 = min(carry32, t32);
    }
  }
  if (o.a_idx == nullptr) return;  // uniform across the block

  // 3. Anchor list: valid anchors in key order.
  const int64_t ab = b * T;
  int32_t count = 0;
  for (int64_t base = 0; base < T; base += kIndexThreads) {
    const int64_t j = base + threadIdx.x;
    const int32_t f = (j < T && val[j] && is_anchor[j]) ? 1 : 0;
    int32_t tot;
    const int32_t incl = block_inclusive_scan(f, AddOp(), buf32, tot);
    if (f) {
      const int64_t slot = count + incl - 1;
      o.a_idx[ab + slot] = static_cast<int32_t>(j);
      o.a_pos[ab + slot] = pos[j];
      o.a_seg[ab + slot] = seg[j];
    }
    count += tot;
  }
  if (threadIdx.x == 0) o.a_cnt[b] = count;
  __syncthreads();
  // 4. Suffix min of anchor positions.
  int64_t carry = kI64Max;
  for (int64_t base = 0; base < count; base += kIndexThreads) {
    const int64_t a = count - 1 - (base + threadIdx.x);
    const int64_t v = a >= 0 ? o.a_pos[ab + a] : kI64Max;
    int64_t t;
    const int64_t s = block_inclusive_scan(v, MinOp(), buf64, t);
    if (a >= 0) o.a_smin_pos[ab + a] = min(carry, s);
    carry = min(carry, t);
  }
}

}  // namespace

void build_side_index(const LayoutTensors& l, SideIndex& side, AnchorIndex* anchors) {
  const int64_t B = l.pos.size(0), T = l.pos.size(1);
  const int64_t nC = (T + kChunk - 1) / kChunk;
  ANLLM_CHECK(T < std::numeric_limits<int32_t>::max(), "sequence length ", T, " is too long");
  auto opts = l.pos.options();
  side.B = B;
  side.nC = nC;
  side.i32 = at::empty({5, B, nC}, opts.dtype(at::kInt));
  side.i64 = at::empty({4, B, nC}, opts.dtype(at::kLong));
  IndexOut o{};
  {
    int32_t* a = side.i32.data_ptr<int32_t>();
    int64_t* c = side.i64.data_ptr<int64_t>();
    const int64_t n = B * nC;
    o.seg_min = a;
    o.seg_max = a + n;
    o.flags = a + 2 * n;
    o.pm_seg_max = a + 3 * n;
    o.sm_seg_min = a + 4 * n;
    o.pos_min = c;
    o.pos_max = c + n;
    o.pos_max_na = c + 2 * n;
    o.pm_pos_max_na = c + 3 * n;
    o.nC = nC;
  }
  if (anchors != nullptr) {
    anchors->B = B;
    anchors->Tk = T;
    anchors->i32 = at::empty({2, B, T}, opts.dtype(at::kInt));
    anchors->i64 = at::empty({2, B, T}, opts.dtype(at::kLong));
    anchors->cnt = at::empty({B}, opts.dtype(at::kInt));
    const int64_t n = B * T;
    o.a_idx = anchors->i32.data_ptr<int32_t>();
    o.a_seg = o.a_idx + n;
    o.a_pos = anchors->i64.data_ptr<int64_t>();
    o.a_smin_pos = o.a_pos + n;
    o.a_cnt = anchors->cnt.data_ptr<int32_t>();
  }
  if (B == 0) return;
  ANLLM_LAUNCH(build_index_kernel, static_cast<unsigned>(B), kIndexThreads, 0,
               at::cuda::getCurrentCUDAStream())(layout_view(l), o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace anllm
