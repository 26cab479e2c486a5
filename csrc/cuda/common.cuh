// Shared pieces of the CUDA kernels: layout views, the per-row key/query index (built on device, no
// host sync), tile traits, block-wide scans and small numeric helpers.
//
// Tiling scheme (all attention kernels): 128 threads as an 8 x 16 grid (ty, tx). A thread owns the
// rows ty, ty+8, ... of a tile and the columns tx, tx+16, ... (keys for score tiles, head-dim
// entries for output tiles). All math is fp32 on CUDA cores; bf16/fp16 are converted on load. The
// head dim is padded to DMAX in {64, 128, 256} with zeros, so any D <= 256 runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../checks.h"

namespace anllm {
namespace cuda {

constexpr int kThreads = 128;  // threads of every attention block
constexpr int kTY = 8;         // thread grid rows
constexpr int kTX = 16;        // thread grid columns
constexpr int kChunk = 64;     // keys / queries per summary chunk of the row index
constexpr int kIndexThreads = 1024;  // threads of the row-index kernel (32 full warps)
constexpr unsigned kFull = 0xffffffffu;

constexpr int32_t kI32Max = std::numeric_limits<int32_t>::max();
constexpr int32_t kI32Min = std::numeric_limits<int32_t>::min();
constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kI64Min = std::numeric_limits<int64_t>::min();

// Chunk flags.
constexpr int kAnyValid = 1;      // the chunk holds a valid token
constexpr int kAnyNonAnchor = 2;  // the chunk holds a valid non-anchor token

// Raw pointers to one side's layout, all [B, T] contiguous.
struct LayoutView {
  const int64_t* pos;
  const int32_t* seg;
  const bool* anchor;
  const bool* valid;
  int64_t T;
};

// Per-row chunk summaries of one side ([B, nC] each) and monotone search arrays over them.
struct SideView {
  const int32_t* seg_min;     // over valid tokens (INT32_MAX if none)
  const int32_t* seg_max;     // over valid tokens (INT32_MIN if none)
  const int64_t* pos_min;     // over valid tokens (INT64_MAX if none)
  const int64_t* pos_max;     // over valid tokens (INT64_MIN if none)
  const int64_t* pos_max_na;  // over valid non-anchor tokens (INT64_MIN if none)
  const int32_t* flags;       // kAnyValid | kAnyNonAnchor
  const int32_t* pm_seg_max;  // prefix max of seg_max      (non-decreasing)
  const int32_t* sm_seg_min;  // suffix min of seg_min      (non-decreasing)
  const int64_t* pm_pos_max_na;  // prefix max of pos_max_na (non-decreasing)
  int64_t nC;
};

// Valid anchor keys of every row, in key order ([B, Tk] capacity, count[b] used).
struct AnchorView {
  const int32_t* idx;       // key index
  const int64_t* pos;
  const int32_t* seg;
  const int64_t* smin_pos;  // suffix min of pos over the list (non-decreasing)
  const int32_t* count;     // [B]
  int64_t cap;              // row stride (= Tk)
};

// Device tensors behind SideView / AnchorView (keep them alive while kernels use the views).
struct SideIndex {
  at::Tensor i32;  // [5, B, nC]: seg_min, seg_max, flags, pm_seg_max, sm_seg_min
  at::Tensor i64;  // [4, B, nC]: pos_min, pos_max, pos_max_na, pm_pos_max_na
  int64_t B = 0, nC = 0;
  SideView view() const;
};

struct AnchorIndex {
  at::Tensor i32;  // [2, B, Tk]: idx, seg ; plus count in cnt
  at::Tensor i64;  // [2, B, Tk]: pos, smin_pos
  at::Tensor cnt;  // int32 [B]
  int64_t B = 0, Tk = 0;
  AnchorView view() const;
};

LayoutView layout_view(const LayoutTensors& l);

// Builds the chunk summaries of one side (and the anchor list when `anchors` is non-null) on the
// current stream. Layout tensors must be contiguous CUDA tensors.
void build_side_index(const LayoutTensors& l, SideIndex& side, AnchorIndex* anchors);

// ---------------------------------------------------------------------------------------------
// Device helpers.

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

// First i in [0, n) with a[i] >= x (a non-decreasing); n if none.
template <typename T>
__device__ __forceinline__ int64_t lower_bound_dev(const T* a, int64_t n, T x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Number of i in [0, n) with a[i] <= x (a non-decreasing).
template <typename T>
__device__ __forceinline__ int64_t count_le_dev(const T* a, int64_t n, T x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] <= x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Tile sizes per padded head dim. Shared memory stays under ~99 KB (sm86/sm89 opt-in limit).
// The key tiles a tile of queries visits, decided once per tile from its rows' layout (shared
// memory, BQ <= 32 rows): own-segment chunks [c_lo, c_hi) of the key side's chunk summaries, as
// n_own = (c_hi - c_lo) * sub tiles, then n_anc tiles over the first n_av earlier anchors (those at or
// before the tile's last position; none when every row is an anchor). smin/smax/pmax summarise the rows.
struct QueryTilePlan {
  int64_t c_lo, n_own, n_anc, n_av, pmax;
  int32_t smin, smax;
};

// Called by all 32 lanes of one warp; lane 0 writes `plan` (callers __syncthreads() before reading it).
template <int BQ, int BK>
__device__ __forceinline__ void plan_query_tile(int lane, int64_t b, int sub, const bool* r_valid,
                                                const bool* r_anchor, const int32_t* r_seg,
                                                const int64_t* r_pos, const SideView& ks,
                                                const AnchorView& ka, QueryTilePlan& plan) {
  const bool v = lane < BQ && r_valid[lane];
  int32_t smin = v ? r_seg[lane] : kI32Max, smax = v ? r_seg[lane] : kI32Min;
  int64_t pmax = v ? r_pos[lane] : kI64Min;
  const unsigned any_valid = __ballot_sync(kFull, v);
  const unsigned any_na = __ballot_sync(kFull, v && !r_anchor[lane]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    smin = min(smin, __shfl_xor_sync(kFull, smin, o));
    smax = max(smax, __shfl_xor_sync(kFull, smax, o));
    pmax = max(pmax, __shfl_xor_sync(kFull, pmax, o));
  }
  if (lane != 0) return;
  int64_t c_lo = 0, n_own = 0, n_anc = 0, n_av = 0;
  if (any_valid) {
    const int64_t nC = ks.nC;
    c_lo = lower_bound_dev(ks.pm_seg_max + b * nC, nC, smin);
    const int64_t c_hi = count_le_dev(ks.sm_seg_min + b * nC, nC, smax);
    n_own = c_hi > c_lo ? (c_hi - c_lo) * sub : 0;
    if (any_na) {
      n_av = count_le_dev(ka.smin_pos + b * ka.cap, static_cast<int64_t>(ka.count[b]), pmax);
      n_anc = (n_av + BK - 1) / BK;
    }
  }
  plan = QueryTilePlan{c_lo, n_own, n_anc, n_av, pmax, smin, smax};
}

// Key tile t of a query tile's plan: own-segment tiles (t < n_own) start at key `key0`, anchor tiles
// at entry `a0` of the row's anchor list. Returns false for an own-segment tile whose chunk summary
// shows no key the tile's rows can see (the same answer in every thread: skip the tile uniformly).
template <int BK>
__device__ __forceinline__ bool key_tile_start(const SideView& ks, int64_t b, const QueryTilePlan& plan,
                                               int sub, int64_t t, int64_t& key0, int64_t& a0) {
  key0 = a0 = 0;
  if (t >= plan.n_own) {
    a0 = (t - plan.n_own) * BK;
    return true;
  }
  const int64_t c = plan.c_lo + t / sub, cc = b * ks.nC + c;
  if (!(ks.flags[cc] & kAnyValid) || ks.seg_max[cc] < plan.smin || ks.seg_min[cc] > plan.smax ||
      ks.pos_min[cc] > plan.pmax)
    return false;
  key0 = c * kChunk + (t % sub) * BK;
  return true;
}

// Slot `slot` (< BK) of a key tile: its key index in the row (-1: no key, K/V read as zeros), position
// and segment, from the key layout (own-segment tile) or the row's anchor list (anchor tile).
__device__ __forceinline__ void load_key_slot(const LayoutView& kl, const AnchorView& ka, int64_t b,
                                              int64_t Tk, bool own, int64_t key0, int64_t a0,
                                              int64_t n_av, int slot, int64_t* k_row, int64_t* k_pos,
                                              int32_t* k_seg) {
  int64_t j = -1, kp = 0;
  int32_t ksg = 0;
  if (own) {
    const int64_t jj = key0 + slot;
    if (jj < Tk && kl.valid[b * Tk + jj]) {
      j = jj;
      kp = kl.pos[b * Tk + jj];
      ksg = kl.seg[b * Tk + jj];
    }
  } else {
    const int64_t a = a0 + slot;
    if (a < n_av) {
      j = ka.idx[b * ka.cap + a];
      kp = ka.pos[b * ka.cap + a];
      ksg = ka.seg[b * ka.cap + a];
    }
  }
  k_row[slot] = j;
  k_pos[slot] = kp;
  k_seg[slot] = ksg;
}

template <int DMAX>
struct FwdTraits;
template <> struct FwdTraits<64> { static constexpr int BQ = 32, BK = 64; };
template <> struct FwdTraits<128> { static constexpr int BQ = 32, BK = 64; };
template <> struct FwdTraits<256> { static constexpr int BQ = 16, BK = 32; };

template <int DMAX>
struct DqTraits;
template <> struct DqTraits<64> { static constexpr int BQ = 32, BK = 64; };
template <> struct DqTraits<128> { static constexpr int BQ = 32, BK = 32; };
template <> struct DqTraits<256> { static constexpr int BQ = 16, BK = 16; };

template <int DMAX>
struct DkvTraits;
template <> struct DkvTraits<64> { static constexpr int BQ = 32, BK = 64; };
template <> struct DkvTraits<128> { static constexpr int BQ = 32, BK = 32; };
template <> struct DkvTraits<256> { static constexpr int BQ = 16, BK = 16; };

// The AnSAN rule restricted to one kind of key tile. Own-segment tiles take only pairs with equal
// segments, anchor tiles (gathered valid anchors) only pairs with different segments, so the two
// kinds together give exactly allowed(i, j) of SPEC section 3 whatever the key order.
__device__ __forceinline__ bool pair_allowed(bool anchor_tile, bool q_valid, bool q_anchor, int64_t q_pos,
                                             int32_t q_seg, bool k_ok, int64_t k_pos, int32_t k_seg) {
  if (!q_valid || !k_ok || k_pos > q_pos) return false;
  return anchor_tile ? (!q_anchor && k_seg != q_seg) : (k_seg == q_seg);
}

inline int padded_head_dim(int64_t D) { return D <= 64 ? 64 : (D <= 128 ? 128 : 256); }

// Sets the dynamic shared memory limit of a kernel (needed above 48 KB).
template <typename K>
inline void allow_smem(K kernel, size_t bytes) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  ANLLM_CHECK(bytes <= prop->sharedMemPerBlockOptin, "kernel needs ", bytes,
              " bytes of shared memory per block, the device allows ", prop->sharedMemPerBlockOptin);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace anllm
